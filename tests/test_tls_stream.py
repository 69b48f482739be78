"""TLSStream: one TLS connection used by a reading thread and a writing thread at the same time.

Every nanopipe link is full duplex across threads (a worker's heartbeat writes while its main
thread reads; the leader writes STATUS to a worker it is reading; a client's tokens are sent by
one thread while another waits for its next request). A plain socket allows that; CPython's
SSLSocket does not (OpenSSL forbids two threads in one SSL object), and CI once saw the leader of
a TLS cluster die with `free(): corrupted unsorted chunks`. net.TLSStream serializes every call
into the SSL object without ever holding its lock while waiting.

The stress test below is the evidence: fresh connections (the race is likeliest right after the
handshake, while TLS 1.3 session tickets are still in flight) with both ends reading and writing
from two threads at once. Run with bare SSLSocket objects instead of TLSStream, the same program
failed 3 runs out of 3 here (bad record MAC, EOF in violation of protocol, lost data); it runs in
a child process so that a heap corruption would fail this test instead of killing pytest.
"""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from helpers import self_signed_cert

from nanopipe.cluster.client_protocol import _send_timeout
from nanopipe.cluster.net import TLSStream, close_now, tls_wrap
from nanopipe.cluster.wire import ConnectionClosed, Msg, recv_frame, send_frame

STRESS = r"""
import socket, ssl, sys, threading
from nanopipe.cluster.net import tls_wrap, tune
cert, key, conns = sys.argv[1], sys.argv[2], int(sys.argv[3])
ROUNDS, BLOCK = 50, 512
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain(cert, key)
cctx = ssl.create_default_context(cafile=cert); cctx.check_hostname = False
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)

def block(i, tag):
    return bytes([(i * 7 + tag) % 256]) * BLOCK

def writer(sock, tag):
    for i in range(ROUNDS):
        sock.sendall(block(i, tag))

def reader(sock, tag, got):
    data, buf = bytearray(), bytearray(65536)
    while len(data) < ROUNDS * BLOCK:
        k = sock.recv_into(buf, len(buf))
        if k == 0:
            break
        data += buf[:k]
    got[tag] = bytes(data)

for n in range(conns):
    ends = {}
    def accept():
        s, _ = srv.accept(); tune(s); ends["server"] = tls_wrap(sctx, s, server_side=True)
    t = threading.Thread(target=accept); t.start()
    raw = socket.create_connection(srv.getsockname()); tune(raw)
    client = tls_wrap(cctx, raw); t.join()
    server, got = ends["server"], {}
    threads = [threading.Thread(target=reader, args=(server, 1, got)),
               threading.Thread(target=reader, args=(client, 2, got)),
               threading.Thread(target=writer, args=(client, 1)),
               threading.Thread(target=writer, args=(server, 2))]
    for th in threads: th.start()
    for th in threads: th.join(60)
    for tag in (1, 2):
        want = b"".join(block(i, tag) for i in range(ROUNDS))
        if got.get(tag) != want:
            sys.exit(f"connection {n}, direction {tag}: {len(got.get(tag, b''))} of {len(want)} bytes, or wrong bytes")
    client.close(); server.close()
print(f"{conns} connections ok")
"""


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return self_signed_cert(str(tmp_path_factory.mktemp("tlsstream")))


@pytest.fixture
def pair(cert):
    """A connected (client, server) pair of TLSStreams over loopback."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*cert)
    cctx = ssl.create_default_context(cafile=cert[0])
    cctx.check_hostname = False
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    ends = {}
    t = threading.Thread(target=lambda: ends.update(server=tls_wrap(sctx, srv.accept()[0], server_side=True)))
    t.start()
    client = tls_wrap(cctx, socket.create_connection(srv.getsockname()))
    t.join()
    yield client, ends["server"]
    client.close()
    ends["server"].close()
    srv.close()


def test_concurrent_reads_and_writes_on_fresh_connections_never_corrupt(cert):
    r = subprocess.run([sys.executable, "-c", STRESS, cert[0], cert[1], "200"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"exit code {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.strip() == "200 connections ok"


def test_frames_cross_both_ways_while_the_other_thread_reads(pair):
    client, server = pair
    got = []
    reader = threading.Thread(target=lambda: got.extend(recv_frame(server, "client") for _ in range(20)))
    reader.start()
    for i in range(20):
        send_frame(client, Msg.STATS, {"i": i})
        send_frame(server, Msg.STATS, {"back": i})          # the server writes while its reader waits
    reader.join(10)
    assert [f.meta["i"] for f in got] == list(range(20))
    assert [recv_frame(client, "server").meta["back"] for _ in range(20)] == list(range(20))
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    assert isinstance(client, TLSStream) and client.getpeername()[0] == "127.0.0.1"


def test_a_read_times_out_like_a_plain_socket(pair):
    client, _ = pair
    client.settimeout(0.2)
    with pytest.raises(socket.timeout):
        client.recv(10)
    assert client.gettimeout() == 0.2


def test_shutdown_from_another_thread_wakes_a_blocked_reader(pair):
    client, _ = pair
    outcome = []

    def read():
        try:
            outcome.append(recv_frame(client, "server"))
        except (ConnectionClosed, OSError) as e:
            outcome.append(e)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.2)         # time to block in recv: nothing to poll for, the point is that it waits
    assert t.is_alive(), "the reader should be waiting for a frame"
    close_now(client)
    t.join(5)
    assert not t.is_alive(), "close_now did not wake the reader"
    assert isinstance(outcome[0], (ConnectionClosed, OSError))
    with pytest.raises(OSError):
        client.sendall(b"x")


def test_a_send_to_a_peer_that_never_reads_fails_after_the_send_timeout(pair):
    client, _ = pair
    _send_timeout(client, 0.3)          # how the leader bounds sends to a client (SO_SNDTIMEO)
    with pytest.raises(socket.timeout):
        for _ in range(10_000):                    # the peer never reads: the buffers fill, then we wait
            client.sendall(b"x" * 65536)
