"""A client that stops reading must not stall anyone else (real `serve` / `join` processes).

The leader's scheduler thread emits every session's tokens. Each client connection has its own
outgoing queue and sender thread (leader.ClientOutbox), so the scheduler only appends to a queue
and never waits on a socket. What must hold:

    a client that never reads      its generations still run to the end (their frames wait in its
                                   queue), and another client's generation completes at once
    its queue passes the bound     it is dropped (CLIENT_QUEUE_MAX frames) and its sessions cancelled

The stuck client asks for SO_RCVBUF=4096 and reads nothing. On a LAN the leader's kernel send
buffer then fills after some tens of KB; on loopback Linux grows it to ~4 MB, so the stuck client
also sends PINGs whose PONG replies (the PING's meta, echoed) add up to 8 MB. With the scheduler
writing to client sockets itself, the next token for the stuck client would then hold up every
generation of every client until the leader dropped that client, CLIENT_SEND_TIMEOUT_S later.
"""
from __future__ import annotations

import socket
import time

import pytest
from helpers import log_of, status, wait_log, wait_status

from nanopipe.cluster.client_protocol import CLIENT_QUEUE_MAX, CLIENT_SEND_TIMEOUT_S
from nanopipe.cluster.wire import PROTOCOL_VERSION, Msg, auth_proof, encode_frame, recv_frame, send_frame
from nanopipe.decoding import SamplingParams
from nanopipe.tools.localcluster import LocalCluster

PROMPT = [15496, 995, 11, 616, 1438]               # "Hello world, my name"
LONG = 120                                          # tokens: prompt + LONG fills most of n_ctx=128
STUCK_SESSIONS, STUCK_TOKENS = 4, 60
LINK_DELAY_MS = 10                                  # each hop takes >= 10 ms, so 120 tokens take > 2 s
FILL = encode_frame(Msg.PING, {"pad": "x" * 100_000}) * 80      # 8 MB of PONGs it will never read


@pytest.fixture(scope="module")
def cluster(tiny_weights, tmp_path_factory):
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path_factory.mktemp("slow")), ready_timeout=30,
                      cluster_extra={"link_delay_ms": LINK_DELAY_MS})
    with cl:
        yield cl


def stuck_client(cl: LocalCluster) -> socket.socket:
    """A client with a tiny receive buffer that passes the handshake and then never reads again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)      # before connect: sets the TCP window
    sock.settimeout(5)
    sock.connect(("127.0.0.1", cl.cluster["port"]))
    challenge = recv_frame(sock, "leader")
    send_frame(sock, Msg.HELLO, {"role": "client", "version": PROTOCOL_VERSION,
                                 "proof": auth_proof(None, challenge.meta["nonce"])})
    assert recv_frame(sock, "leader").msg is Msg.WELCOME
    return sock


def long_generate(i: int, max_tokens: int = LONG) -> dict:
    return {"request": f"stuck{i}", "prompt_ids": PROMPT, "strategy": "greedy", "max_tokens": max_tokens}


def fill_buffers(sock):
    """Send PINGs whose replies fill every buffer between the leader and us; we read none of them."""
    sock.settimeout(10)
    try:
        sock.sendall(FILL)
    except OSError:         # timed out: the leader stopped reading from us (or hung up)
        pass


def peer_name(sock) -> str:
    """How the leader names this connection in its log."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def test_client_that_stops_reading_stalls_nobody(cluster, tiny_engine):
    before = status(cluster)["tokens"]
    stuck = stuck_client(cluster)
    try:
        for i in range(STUCK_SESSIONS):
            send_frame(stuck, Msg.GENERATE, long_generate(i, STUCK_TOKENS))
        wait_status(cluster, lambda st: st["live_sessions"] == STUCK_SESSIONS, 10, "the stuck client's sessions")
        fill_buffers(stuck)

        params = SamplingParams("greedy", max_tokens=10)
        t0 = time.monotonic()
        with cluster.client(timeout=20) as c:
            got = c.generate(PROMPT, params)
        took = time.monotonic() - t0
        assert got["token_ids"] == tiny_engine.generate(PROMPT, params)["token_ids"]
        assert took < 20, f"a 10-token generation took {took:.1f}s next to a client that reads nothing"

        # The stuck client's generations ran to the end although it read nothing: the scheduler
        # never waited for it. (Had it blocked on that socket, nothing would have moved until the
        # client was dropped, and dropping cancels its sessions: fewer tokens.)
        want = before + STUCK_SESSIONS * STUCK_TOKENS + 10
        wait_status(cluster, lambda st: st["live_sessions"] == 0 and st["tokens"] >= want,
                   CLIENT_SEND_TIMEOUT_S / 2, f"all {STUCK_SESSIONS * STUCK_TOKENS} tokens of the stuck client made")
        assert f"Dropping client {peer_name(stuck)}" not in log_of(cluster, 0)
    finally:
        stuck.close()


def test_client_whose_queue_overflows_is_dropped_and_its_session_cancelled(cluster):
    before = status(cluster)["tokens"]
    stuck = stuck_client(cluster)
    peer = peer_name(stuck)
    try:
        send_frame(stuck, Msg.GENERATE, long_generate(0))
        wait_status(cluster, lambda st: st["live_sessions"] == 1, 10, "the stuck client's session")
        fill_buffers(stuck)
        # Each PING is answered with a PONG: now they wait in the leader's queue, 3x its bound.
        try:
            stuck.sendall(encode_frame(Msg.PING, {}) * (3 * CLIENT_QUEUE_MAX))
        except OSError:
            pass                                # the leader hung up on us mid-flood: what we want
        line = wait_log(cluster, 0, f"Dropping client {peer}", timeout=10)
        assert f"limit {CLIENT_QUEUE_MAX}" in line, line
        st = wait_status(cluster, lambda st: st["live_sessions"] == 0, 10, "its session cancelled")
        made = st["tokens"] - before
        assert made < LONG, f"{made} tokens made for a dropped client (max_tokens={LONG}): not cancelled"
    finally:
        stuck.close()
    with cluster.client() as c:                 # and the leader serves on
        assert len(c.generate(PROMPT, SamplingParams("greedy", max_tokens=3))["token_ids"]) == 3

