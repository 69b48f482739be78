"""Listening ports under pressure, with real processes: running out of file descriptors, peers
that trickle their handshake, and more pending handshakes than a port takes.

    leader under `prlimit --nofile=64`, ~100 idle connections   -> logs it, keeps serving, answers after
    a worker's data port out of descriptors                       -> accepts again: the next ring build works
    1 byte of HELLO every 2 s                                     -> closed at the handshake deadline (10 s)
    MAX_PENDING_HANDSHAKES + 8 idle connections                   -> the 8 extra closed at once, one log line
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import time

import pytest
from helpers import log_of, wait_until

from nanopipe.cluster.net import HANDSHAKE_TIMEOUT_S, MAX_PENDING_HANDSHAKES, serve_accepts
from nanopipe.cluster.wire import PROTOCOL_VERSION, Msg, WireError, auth_proof, encode_frame, recv_frame
from nanopipe.decoding import SamplingParams
from nanopipe.tools.localcluster import LocalCluster

TOKEN = "accept-loop secret"
PROMPT = [15496, 995, 11, 616]
FD_LIMIT = 64
IDLE_CONNECTIONS = 100

needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None or not os.path.isdir("/proc/self/fd"),
                                   reason="needs util-linux `prlimit` and /proc (Linux) to cap a node's descriptors")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1                           # the process is gone


def hold_connections(port: int, n: int) -> list:
    """Up to n idle TCP connections to 127.0.0.1:port (a connect the backlog cannot take is skipped)."""
    held = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            held.append(s)
        except OSError:
            s.close()
    return held


def close_all(socks):
    for s in socks:
        s.close()


def greedy(cl, n=8) -> list:
    with cl.client(timeout=10) as c:
        return c.generate(PROMPT, SamplingParams("greedy", max_tokens=n))["token_ids"]


@needs_prlimit
def test_leader_out_of_file_descriptors_keeps_serving(tiny_weights, tiny_engine, tmp_path):
    """The old accept loop ended `serve` (exit 0, no log line) at the first EMFILE."""
    with LocalCluster(tiny_weights, nodes=1, workdir=str(tmp_path), ready_timeout=60,
                      cluster_extra={"auth_token": TOKEN}, wrap={0: ["prlimit", f"--nofile={FD_LIMIT}"]}) as cl:
        leader = cl.procs[0]
        held = hold_connections(cl.cluster["port"], IDLE_CONNECTIONS)
        try:
            wait_until("the leader at its descriptor limit (or gone)",
                       lambda: open_fds(leader.pid) >= FD_LIMIT - 1 or leader.poll() is not None, 30)
            # it keeps failing accept() for as long as we hold them: give it a few retries' worth
            wait_until("the leader's log saying it cannot accept",
                       lambda: "Cannot accept connections" in log_of(cl, 0) or leader.poll() is not None, 10)
            assert leader.poll() is None, f"the leader exited with {leader.returncode}:\n{cl.logs()}"
            time.sleep(3)       # accept() fails all this while (retried every <= 1 s); the node must stay up
            assert leader.poll() is None, f"the leader exited with {leader.returncode}:\n{cl.logs()}"
        finally:
            close_all(held)
        assert len(held) >= IDLE_CONNECTIONS * 0.9, f"only {len(held)} connections were taken"
        print(f"held {len(held)} idle connections to a leader limited to {FD_LIMIT} descriptors")
        log = log_of(cl, 0)
        assert "Too many open files" in log and "out of file descriptors" in log, log[-3000:]
        # logged once per episode, not once per retry (the deadline frees descriptors, so a second
        # episode can follow the first while we hold the backlog)
        assert log.count("Cannot accept connections") <= 3, log[-3000:]
        got = wait_until("a generation after the connections closed", lambda: _try(lambda: greedy(cl)), 30,
                         detail=cl.logs)
        assert got == tiny_engine.generate(PROMPT, SamplingParams("greedy", max_tokens=8))["token_ids"]
        wait_until("the leader saying it accepts again", lambda: "again, after" in log_of(cl, 0), 30, detail=cl.logs)
        assert leader.poll() is None


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


@needs_prlimit
def test_worker_data_port_accepts_again_after_running_out(tiny_weights, tiny_engine, tmp_path):
    """The old data-port loop returned at the first EMFILE: the worker stayed up (and "up" in
    /health) but the next ring build could never dial it."""
    with LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), ready_timeout=60,
                      cluster_extra={"auth_token": TOKEN}, wrap={1: ["prlimit", f"--nofile={FD_LIMIT}"]}) as cl:
        w1 = cl.procs[1]
        held = hold_connections(cl.cluster["workers"][0]["port"], IDLE_CONNECTIONS)
        try:
            wait_until("worker 1 at its descriptor limit (or gone)",
                       lambda: open_fds(w1.pid) >= FD_LIMIT - 1 or w1.poll() is not None, 30)
            # (an old data port gave up at the first EMFILE, silently: the ring build below finds out)
            _try(lambda: wait_until("worker 1's log saying it cannot accept",
                                    lambda: "Cannot accept connections" in log_of(cl, 1) or w1.poll() is not None, 10))
        finally:
            close_all(held)
        assert w1.poll() is None, f"worker 1 exited with {w1.returncode}:\n{cl.logs()}"
        # a new ring: worker 2 restarts, so the leader dials worker 1's data port again
        cl.kill_rank(2)
        cl.start_rank(2)
        cl.wait_ready(timeout=60)
        got = wait_until("a generation on the rebuilt ring", lambda: _try(lambda: greedy(cl)), 30, detail=cl.logs)
        assert got == tiny_engine.generate(PROMPT, SamplingParams("greedy", max_tokens=8))["token_ids"]
        log = log_of(cl, 1)
        assert "Cannot accept connections on worker 1's data port" in log and "Too many open files" in log, log[-3000:]


@pytest.fixture(scope="module")
def leader(tiny_weights, tmp_path_factory):
    with LocalCluster(tiny_weights, nodes=1, workdir=str(tmp_path_factory.mktemp("accept")), ready_timeout=60,
                      cluster_extra={"auth_token": TOKEN}) as cl:
        yield cl


def closed_by_peer(sock, wait: float) -> bool:
    """Has the peer closed? (waits up to `wait` s for data or the close)"""
    sock.settimeout(wait)
    try:
        return sock.recv(4096) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_a_trickled_handshake_is_closed_at_the_deadline(leader):
    """One byte every 2 s never trips a per-read timeout; the overall deadline ends it."""
    hello = encode_frame(Msg.HELLO, {"role": "client", "rank": None, "version": PROTOCOL_VERSION, "proof": None})
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", leader.cluster["port"]), timeout=5) as s:
        assert recv_frame(s, "leader").msg is Msg.CHALLENGE
        closed = False
        for i in range(len(hello)):
            try:
                s.sendall(hello[i:i + 1])
            except OSError:
                closed = True
                break
            if closed_by_peer(s, 2.0):
                closed = True
                break
            if time.monotonic() - start > 4 * HANDSHAKE_TIMEOUT_S:
                break
        took = time.monotonic() - start
    assert closed, f"a peer sending a byte every 2 s was still connected after {took:.0f}s"
    assert HANDSHAKE_TIMEOUT_S - 1 <= took <= 3 * HANDSHAKE_TIMEOUT_S, took
    wait_until("the leader logging the late handshake",
               lambda: f"did not finish the handshake within {HANDSHAKE_TIMEOUT_S:g}s" in log_of(leader, 0), 5)
    assert greedy(leader, 2)


def client_handshake(cl) -> bool:
    with socket.create_connection(("127.0.0.1", cl.cluster["port"]), timeout=5) as sock:
        nonce = recv_frame(sock, "leader").meta["nonce"]
        sock.sendall(encode_frame(Msg.HELLO, {"role": "client", "rank": None, "version": PROTOCOL_VERSION,
                                              "proof": auth_proof(TOKEN, nonce)}))
        return recv_frame(sock, "leader").msg is Msg.WELCOME


def test_pending_handshakes_are_capped(leader):
    before = log_of(leader, 0).count("still in the handshake")
    extra = 8
    held = hold_connections(leader.cluster["port"], MAX_PENDING_HANDSHAKES + extra)
    try:
        assert len(held) == MAX_PENDING_HANDSHAKES + extra
        challenged = refused = 0
        for s in held:
            s.settimeout(5)
            try:
                frame = recv_frame(s, "leader")
                assert frame.msg is Msg.CHALLENGE
                challenged += 1
            except socket.timeout:
                raise AssertionError("no CHALLENGE and no close within 5 s") from None
            except (WireError, ConnectionResetError):      # closed without a word: refused
                refused += 1
        assert (challenged, refused) == (MAX_PENDING_HANDSHAKES, extra)
        log = log_of(leader, 0)
        assert log.count("still in the handshake") - before == 1, log[-2000:]     # rate-limited: one line
    finally:
        close_all(held)
    # the places free as soon as those peers hang up: a real client gets in
    wait_until("a client passing the handshake", lambda: _try(lambda: client_handshake(leader)), 10, detail=leader.logs)
    assert greedy(leader, 2)


class ScriptedListener:
    """A listening socket whose accept() follows a script: OSErrors to raise, then real socket pairs."""

    def __init__(self, script):
        self.script, self.kept = list(script), []

    def accept(self):
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        a, b = socket.socketpair()
        self.kept.append(b)
        return a, ("10.0.0.9", step)

    def shutdown(self, how):
        pass

    def close(self):
        pass


def test_the_accept_loop_waits_out_transient_errors_and_says_so_once():
    emfile = OSError(errno.EMFILE, "Too many open files")
    srv = ScriptedListener([emfile] * 5 + [1001, OSError(errno.ECONNABORTED, "aborted"), 1002,
                                            OSError(errno.EBADF, "Bad file descriptor")])
    lines, served = [], []

    def handle(sock, addr, slot):
        slot()
        served.append(addr[1])
        sock.close()
    with pytest.raises(OSError, match="the test port stopped accepting connections: Bad file descriptor"):
        serve_accepts(srv, handle, stopped=lambda: False, log=lambda m, level=None: lines.append(m),
                      what="the test port")
    wait_until("both connections served", lambda: sorted(served) == [1001, 1002], 5)
    assert len(lines) == 4, lines           # one line when it starts failing, one when it works again
    assert lines[0].startswith("Cannot accept connections on the test port: Too many open files; this process "
                               "is out of file descriptors"), lines
    assert "the test port again, after 5 failed attempt(s)" in lines[1], lines
    assert lines[2].startswith("Cannot accept connections on the test port: aborted"), lines
    assert "the test port again, after 1 failed attempt(s)" in lines[3], lines


def test_the_accept_loop_closes_what_is_past_the_pending_cap():
    srv = ScriptedListener([1, 2, 3, 4, 5, OSError(errno.EBADF, "closed")])
    held, lines = [], []
    release = threading.Event()

    def handle(sock, addr, slot):          # handshakes that never end (until released)
        held.append(addr[1])
        release.wait(5)
        slot()
    with pytest.raises(OSError):
        serve_accepts(srv, handle, stopped=lambda: False, log=lambda m, level=None: lines.append(m),
                      what="p", max_pending=3)
    release.set()
    assert sorted(held) == [1, 2, 3]
    assert [peer.recv(1) for peer in srv.kept[3:]] == [b"", b""]          # 4 and 5 closed at once
    assert len([m for m in lines if m.startswith("Refused")]) == 1, lines   # one line for both


def test_a_worker_whose_data_port_fails_stops_saying_why(tiny_weights, tmp_path, caplog):
    """Not a transient error: the worker is of no use to the ring, so it stops, logs why, and
    `run` exits non-zero (it used to stay up with a dead port, "up" in /health)."""
    from nanopipe.cluster.worker import Worker
    from nanopipe.config import load_cluster_config
    from nanopipe.tools.localcluster import write_configs
    write_configs(str(tmp_path), weights=tiny_weights, nodes=2, n_layer=4)
    worker = Worker(load_cluster_config(str(tmp_path)), 1, tiny_weights)
    worker.data.srv = ScriptedListener([OSError(errno.EBADF, "Bad file descriptor")])
    with caplog.at_level("ERROR", logger="nanopipe.cluster.worker"):
        worker.data.serve_port()
    assert worker.stop_event.is_set() and "stopped accepting connections: Bad file descriptor" in worker.fatal
    assert any("Stopping: worker 1's data port" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(SystemExit) as e:
        worker.run()
    assert e.value.code == 2
