"""Reliability and security of the cluster: real `nanopipe serve` / `nanopipe join` processes on 127.0.0.1.

What must hold, each checked below against live processes:

    a secret       a peer without the cluster's auth_token sees a CHALLENGE, then a REJECT, nothing else;
                   the leader's log names its address. TLS, when configured, carries every link.
    bad frames     each closes only its own connection, with a log line naming the peer and the fault;
                   the generation running meanwhile comes out exactly as in one process.
    a worker dies  the leader notices at once, generations wait up to rejoin_grace_s, then either go
                   on where they stopped (greedy answer unchanged), or, past the grace, on a new plan
                   over the nodes that are left (cluster/replan.py; more in test_live_membership.py).
    the leader     restarted, it is found again by every worker on its own.
    load           32 chats at once through the web app: each answer is its single-process answer,
                   and every KV cache is freed afterwards.

The model is tiny and synthetic (4 layers, n_embd 64), so a cluster starts in about a second and a
100-token greedy answer takes about one more.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from helpers import (
    finish,
    frames_until_close,
    generate_in_background,
    handshake,
    leader_addr,
    local_peer,
    log_of,
    node,
    peak_rss_mb,
    self_signed_cert,
    status,
    wait_freed,
    wait_log,
    wait_until,
    worker_addr,
)

from nanopipe.cluster.leader_client import ClientError, LeaderClient
from nanopipe.cluster.wire import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    Msg,
    encode_frame,
    recv_frame,
)
from nanopipe.decoding import SamplingParams, make_params
from nanopipe.tools.localcluster import LocalCluster

TOKEN = "correct horse battery staple"
PROMPT = [15496, 995, 11, 616, 1438]               # "Hello world, my name"
LONG = SamplingParams("greedy", max_tokens=100)    # about a second on the tiny model, through the ring
HEARTBEAT_S = 0.2
READY_S = 30


# ---------------------------------------------------------------------------------------------
# helpers: start a cluster, speak the protocol by hand, read logs


def start(cl: LocalCluster, timeout: float = READY_S) -> LocalCluster:
    """Start every rank and wait until the ring is up; LocalCluster dials with the cluster's own
    secret (auth_token or NANOPIPE_TOKEN) and, under TLS, pins its certificate."""
    for rank in range(cl.nodes):
        cl.start_rank(rank)
    cl.wait_ready(timeout)
    return cl


def client(cl: LocalCluster, token=None, tls_ca=None) -> LeaderClient:
    """A client with exactly the given secret: None to show what a peer without one gets."""
    return LeaderClient.connect(cl.leader_addr, token=token, tls_ca=tls_ca)


def run_generation(cl: LocalCluster, params=LONG, token=None, tls_ca=None, on_token=None, prompt=PROMPT) -> dict:
    """Start a generation on its own thread (helpers.generate_in_background), with exactly the given secret."""
    return generate_in_background(lambda: client(cl, token, tls_ca), prompt, params, on_token)


@pytest.fixture(scope="module")
def reference(tiny_engine):
    """reference(prompt, params) -> the single process's token ids, computed once per question."""
    memo = {}

    def run(prompt, params):
        key = (tuple(prompt), params)
        if key not in memo:
            memo[key] = tiny_engine.generate(list(prompt), params)["token_ids"]
        return memo[key]
    return run


# ---------------------------------------------------------------------------------------------
# authentication


@pytest.fixture(scope="module")
def secure(tiny_weights, tmp_path_factory):
    """3 nodes sharing the secret TOKEN; the hardened-frame tests hammer this one too."""
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path_factory.mktemp("secure")),
                      cluster_extra={"auth_token": TOKEN, "heartbeat_s": HEARTBEAT_S})
    try:
        yield start(cl)
    finally:
        cl.stop()


def test_right_secret_generates_as_one_process(secure, reference):
    with client(secure, TOKEN) as c:
        got = c.generate(PROMPT, SamplingParams("greedy", max_tokens=20))
    assert got["token_ids"] == reference(PROMPT, SamplingParams("greedy", max_tokens=20))
    assert "WARNING: no auth_token" not in log_of(secure, 0)


@pytest.mark.parametrize("token", ["wrong secret", None], ids=["wrong", "missing"])
def test_client_without_the_secret_is_refused_and_logged(secure, token):
    with pytest.raises(ClientError, match="authentication failed"):
        client(secure, token)
    sock, challenge, reply = handshake(leader_addr(secure), token=token)
    with sock:
        assert challenge.msg is Msg.CHALLENGE
        assert reply.msg is Msg.REJECT and "auth_token" in reply.meta["reason"]
        assert frames_until_close(sock) == []
        wait_log(secure, 0, "Rejected connection from", local_peer(sock), "failed authentication")


def test_peer_skipping_the_handshake_gets_nothing_but_the_challenge(secure):
    """A raw socket that sends GENERATE instead of HELLO: no token, no status, no prompt comes back."""
    sock = socket.create_connection(leader_addr(secure), timeout=5)
    with sock:
        first = recv_frame(sock, "leader")
        sock.sendall(encode_frame(Msg.GENERATE, {"prompt_ids": PROMPT, "max_tokens": 5})
                     + encode_frame(Msg.STATE_REQUEST, {}))
        rest = frames_until_close(sock)
        assert first.msg is Msg.CHALLENGE and set(first.meta) == {"nonce", "version"}
        assert set(rest) <= {Msg.REJECT}, f"a peer without the secret was sent {rest}"
        wait_log(secure, 0, "Rejected connection from", local_peer(sock), "expected HELLO, got GENERATE")


def test_data_link_without_the_secret_is_refused_by_the_worker(secure):
    sock, _, reply = handshake(worker_addr(secure, 2), token="guess", role="data", rank=1)
    with sock:
        assert reply.msg is Msg.REJECT
        assert frames_until_close(sock) == []
        wait_log(secure, 2, "Rejected data connection from", local_peer(sock), "failed authentication")


def test_worker_with_the_wrong_secret_is_refused_and_exits(secure):
    before = log_of(secure, 0).count("failed authentication")
    cmd = secure.command(2)
    out = subprocess.run(cmd, env=dict(secure.env, NANOPIPE_TOKEN="not the secret"), cwd=secure.workdir,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Registration refused" in out.stderr and "authentication failed" in out.stderr, out.stderr   # the log
    wait_until("the leader logging the refused worker",
               lambda: log_of(secure, 0).count("failed authentication") > before, 5)
    assert status(secure)["ready"], "a refused worker disturbed the ring"


def test_token_from_the_environment(tiny_weights, reference, tmp_path):
    """NANOPIPE_TOKEN, set for every process, is the secret when the config has none."""
    cl = LocalCluster(tiny_weights, nodes=2, workdir=str(tmp_path), env={"NANOPIPE_TOKEN": "from the environment"})
    try:
        start(cl)
        with pytest.raises(ClientError, match="authentication failed"):
            client(cl, None)
        with client(cl, "from the environment") as c:
            got = c.generate(PROMPT, SamplingParams("greedy", max_tokens=10))
        assert got["token_ids"] == reference(PROMPT, SamplingParams("greedy", max_tokens=10))
        assert "WARNING: no auth_token" not in log_of(cl, 0)
    finally:
        cl.stop()


# ---------------------------------------------------------------------------------------------
# TLS


def test_cluster_over_tls(tiny_weights, reference, tmp_path):
    cert, key = self_signed_cert(str(tmp_path))
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path),
                      cluster_extra={"auth_token": TOKEN, "tls_cert": cert, "tls_key": key})
    try:
        start(cl)
        with client(cl, TOKEN, tls_ca=cert) as c:
            assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
            got = c.generate(PROMPT, SamplingParams("greedy", max_tokens=20))
        assert got["token_ids"] == reference(PROMPT, SamplingParams("greedy", max_tokens=20))
        # a plaintext peer gets not even the CHALLENGE, from the leader or from a worker
        for rank, addr in ((0, leader_addr(cl)), (2, worker_addr(cl, 2))):
            with socket.create_connection(addr, timeout=5) as sock:
                sock.sendall(encode_frame(Msg.HELLO, {"role": "client", "version": PROTOCOL_VERSION}))
                assert frames_until_close(sock) == []
                wait_log(cl, rank, "Rejected", local_peer(sock))
    finally:
        cl.stop()


# ---------------------------------------------------------------------------------------------
# hardened frames: each bad frame closes only its own connection


OLDER = PROTOCOL_VERSION - 1      # a node of the nanopipe before this one


def header(msg=Msg.PING, meta_len=2, payload_len=0, magic=MAGIC, version=PROTOCOL_VERSION, flags=0) -> bytes:
    return HEADER.pack(magic, version, int(msg), flags, meta_len, payload_len)


# name -> (bytes a client sends after a good handshake, what the leader's log line must say)
BAD_CLIENT_FRAMES = {
    "bad magic": (header(magic=b"HTTP") + b"{}", "bad magic"),
    "wrong version": (header(version=OLDER) + b"{}", f"protocol version {OLDER}"),
    "unknown type": (HEADER.pack(MAGIC, PROTOCOL_VERSION, 99, 0, 2, 0) + b"{}", "unknown message type 99"),
    "4 GB payload": (header(Msg.GENERATE, payload_len=1 << 32) + b"{}", "4294967296-byte payload"),
    "4 GB meta": (header(Msg.GENERATE, meta_len=(1 << 32) - 1), "4294967295 bytes of meta"),
    "truncated": (encode_frame(Msg.GENERATE, {"prompt_ids": PROMPT, "max_tokens": 5})[:30], "truncated frame"),
    "meta not JSON": (header(Msg.GENERATE, meta_len=5) + b"{nope", "not valid UTF-8 JSON"),
    "meta not an object": (header(Msg.GENERATE, meta_len=5) + b"[1,2]", "must be a JSON object"),
    "payload from a client": (encode_frame(Msg.PING, {}, b"x" * 8), "over the 0-byte limit"),
    "flags set": (header(flags=1) + b"{}", "flags"),
}


def send_bad(addr, data: bytes, **hello) -> socket.socket:
    """Pass the handshake, send `data`, half-close (so a truncated frame really ends), expect a close."""
    sock, _, reply = handshake(addr, **hello)
    assert reply.msg is Msg.WELCOME, reply
    sock.sendall(data)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass                # it has already hung up on us
    got = frames_until_close(sock)
    assert Msg.TOKEN not in got and Msg.DONE not in got, got
    return sock


def test_bad_frames_close_only_their_connection(secure, reference):
    rss_before = node(status(secure), 0)["rss_mb"]
    box = run_generation(secure, token=TOKEN)          # another session, going on throughout
    for name, (data, says) in BAD_CLIENT_FRAMES.items():
        with send_bad(leader_addr(secure), data, token=TOKEN) as sock:
            line = wait_log(secure, 0, "Closed connection from", local_peer(sock), says)
            assert "(client)" in line, f"{name}: {line}"
    # before the handshake too: a bad first frame is a rejected connection
    with socket.create_connection(leader_addr(secure), timeout=5) as sock:
        recv_frame(sock, "leader")
        sock.sendall(header(magic=b"GET ") + b"{}")
        assert frames_until_close(sock) == []
        wait_log(secure, 0, "Rejected connection from", local_peer(sock), "bad magic")
    assert finish(box)["token_ids"] == reference(PROMPT, LONG), "the session beside the bad frames changed"
    st = status(secure)
    assert st["ready"] and st["bad_frames"] >= len(BAD_CLIENT_FRAMES)
    assert node(st, 0)["rss_mb"] - rss_before < 100, "a 4 GB header made the leader allocate"
    with client(secure, TOKEN) as c:
        assert c.generate(PROMPT, SamplingParams("greedy", max_tokens=20))["token_ids"] == \
            reference(PROMPT, SamplingParams("greedy", max_tokens=20))


def act(shape, dtype="float32", sessions=None, nbytes=None, epoch=0) -> bytes:
    """An ACT frame as rank r-1 would send it; `nbytes` overrides the payload size to lie about it."""
    rows = shape[0] if shape else 0
    sessions = sessions if sessions is not None else [{"id": "x", "pos": 0, "n": rows}]
    size = {"float32": 4, "float16": 2, "int64": 8, "float64": 8}[dtype]
    n = 1
    for d in shape:
        n *= d
    payload = b"\0" * (nbytes if nbytes is not None else n * size)
    return encode_frame(Msg.ACT, {"sessions": sessions, "epoch": epoch, "trace": [], "dtype": dtype,
                                  "shape": shape}, payload)


# name -> (what rank 1 sends worker 2 on its data port, what worker 2's log line must say)
BAD_ACTS = {
    "float16 rows": (act([1, 64], "float16"), "ACT must carry float32 rows"),
    "float64": (act([1, 64], "float64"), "ACT must carry float32 rows"),       # a wire dtype (TOP's), not an ACT's
    "wrong width": (act([1, 32]), "rows of width 32 but this model has n_embd=64"),
    "3-d": (act([1, 1, 64]), "ACT must carry float32 rows"),
    "payload shorter than shape": (act([2, 64], nbytes=256), "carries 256 payload bytes"),
    "rows not matching sessions": (act([1, 64], sessions=[{"id": "x", "pos": 0, "n": 2}]), "sessions hold 2 rows"),
    "no sessions": (act([1, 64], sessions=[]), "non-empty \"sessions\""),
    "meta not JSON": (header(Msg.ACT, meta_len=3) + b"{x}", "not valid UTF-8 JSON"),
    "huge payload": (header(Msg.ACT, payload_len=1 << 40) + b"{}", "-byte payload, over the"),
    "a client message": (encode_frame(Msg.GENERATE, {}), "unexpected GENERATE on a data link"),
}


def test_bad_activations_close_only_that_data_link(secure, reference):
    """Rank 1's data port of worker 2, with the right secret: every bad ACT closes only its link;
    worker 2 lives on and the ring (whose own link from rank 1 stays open beside ours) still works."""
    addr = worker_addr(secure, 2)
    box = run_generation(secure, token=TOKEN)
    for data, says in BAD_ACTS.values():
        with send_bad(addr, data, token=TOKEN, role="data", rank=1) as sock:
            wait_log(secure, 2, "Closed data connection from", local_peer(sock), says)
    # a well-formed ACT of a ring that is not the current one is dropped, and the link stays open
    sock, _, reply = handshake(addr, token=TOKEN, role="data", rank=1)
    with sock:
        sock.sendall(act([1, 64], epoch="not this ring"))
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            recv_frame(sock, "worker 2")
    # rank 2 only takes activations from rank 1
    sock, _, reply = handshake(addr, token=TOKEN, role="data", rank=0)
    with sock:
        assert reply.msg is Msg.REJECT and "from rank 1 only" in reply.meta["reason"]
    assert finish(box)["token_ids"] == reference(PROMPT, LONG)
    assert secure.procs[2].poll() is None, "worker 2 died of a bad frame"
    st = status(secure)
    assert st["ready"] and node(st, 2)["status"] == "up"
    assert "Ring broken" not in log_of(secure, 0), "a stranger's bad frames broke the ring"


def test_other_protocol_version_is_refused_at_registration(secure):
    """A worker of an older nanopipe version: its HELLO says version OLDER (its frames still parse)."""
    sock, _, reply = handshake(leader_addr(secure), token=TOKEN, role="worker", rank=2, version=OLDER,
                               extra={"host": "node2"})
    with sock:
        assert reply.msg is Msg.REJECT and f"protocol version {OLDER}" in reply.meta["reason"]
        wait_log(secure, 0, "Rejected connection from", local_peer(sock), f"protocol version {OLDER}")
    # and one whose very frames are version OLDER
    with socket.create_connection(leader_addr(secure), timeout=5) as sock:
        recv_frame(sock, "leader")
        body = json.dumps({"role": "worker", "rank": 2, "version": OLDER}).encode()
        sock.sendall(header(Msg.HELLO, meta_len=len(body), version=OLDER) + body)
        assert frames_until_close(sock) == []
        wait_log(secure, 0, "Rejected connection from", local_peer(sock), f"protocol version {OLDER}")


@pytest.mark.parametrize("rank, says", [(7, "no worker rank 7"), (2, "already connected"),
                                        (True, "no worker rank True")])
def test_registration_of_a_rank_that_cannot_join(secure, rank, says):
    sock, _, reply = handshake(leader_addr(secure), token=TOKEN, role="worker", rank=rank)
    with sock:
        assert reply.msg is Msg.REJECT and says in reply.meta["reason"], reply.meta
        wait_log(secure, 0, "Rejected worker from", local_peer(sock))
    assert status(secure)["ready"]


# ---------------------------------------------------------------------------------------------
# a worker dies in the middle of an answer


def failover_cluster(weights, grace: float, workdir, **extra) -> LocalCluster:
    return LocalCluster(weights, nodes=3, workdir=str(workdir),
                        cluster_extra={"rejoin_grace_s": grace, "heartbeat_s": HEARTBEAT_S, **extra})


def test_worker_killed_mid_answer_rejoins_and_the_answer_is_unchanged(tiny_weights, reference, tmp_path):
    cl = failover_cluster(tiny_weights, grace=30, workdir=tmp_path)
    try:
        start(cl)
        assert "WARNING: no auth_token set" in log_of(cl, 0), "no secret, and the leader did not warn"
        killed = threading.Event()
        t_kill = {}

        def kill_after_5(n):
            if n == 5:
                cl.kill_rank(2, signal.SIGKILL)
                t_kill["t"] = time.time()
                killed.set()
        box = run_generation(cl, on_token=kill_after_5)
        assert killed.wait(30), "the generation never reached 5 tokens"
        with client(cl) as watcher:       # a second client sees the rank go down
            wait_until("rank 2 down in status()", lambda: node(watcher.status(), 2)["status"] == "down", 5, 0.02)
        wait_until("the client told the answer waits", lambda: box["status"], 5, 0.02)
        noticed_s = time.time() - t_kill["t"]
        assert noticed_s < 5, f"the leader took {noticed_s:.1f}s to notice and tell the client"
        wait_log(cl, 0, "Worker 2 is down")
        wait_log(cl, 0, "Ring broken")
        assert "result" not in box, "the answer finished without rank 2"
        cl.start_rank(2)
        got = finish(box)
        assert got["token_ids"] == reference(PROMPT, LONG), "the replayed answer differs from one process's"
        assert any("waiting up to 30s" in s for s in box["status"]), f"no STATUS event: {box['status']}"
        wait_log(cl, 0, "replaying 1 interrupted session")
    finally:
        cl.stop()


def test_frozen_worker_is_dropped_after_missed_heartbeats(tiny_weights, reference, tmp_path):
    """SIGSTOP: the process keeps its sockets open but says nothing, like a machine behind a cut
    cable. Only the heartbeat watchdog can tell: max(3 s, 3 heartbeats) of silence."""
    cl = failover_cluster(tiny_weights, grace=30, workdir=tmp_path)
    try:
        start(cl)
        t_stop = {}

        def freeze_after_5(n):
            if n == 5:
                cl.procs[2].send_signal(signal.SIGSTOP)
                t_stop["t"] = time.time()
        box = run_generation(cl, on_token=freeze_after_5)
        wait_until("worker 2 frozen", lambda: t_stop, 30)
        with client(cl) as watcher:
            wait_until("rank 2 down in status()", lambda: node(watcher.status(), 2)["status"] == "down", 8, 0.05)
        silent_s = time.time() - t_stop["t"]
        # the watchdog waits 3 s; the bound leaves room for a loaded machine, far below a hang
        assert 2.5 < silent_s < 10, f"dropped after {silent_s:.1f}s of silence; the watchdog waits 3s"
        wait_log(cl, 0, "Worker 2", "silent for", "dropping it")
        cl.kill_rank(2, signal.SIGKILL)      # its port is still held: only a new process can take it
        cl.start_rank(2)
        assert finish(box)["token_ids"] == reference(PROMPT, LONG)
    finally:
        cl.stop()


def test_worker_not_back_within_grace_the_rest_replan_then_it_comes_back(tiny_weights, reference, tmp_path):
    """Past rejoin_grace_s the leader stops waiting: it re-plans over the nodes that are left and the
    answer goes on (cluster/replan.py). The rank restarted later is brought back in by a re-plan."""
    cl = failover_cluster(tiny_weights, grace=3, workdir=tmp_path)
    try:
        start(cl)
        box = run_generation(cl, on_token=lambda n: n == 5 and cl.kill_rank(1, signal.SIGKILL))
        wait_until("rank 1 killed", lambda: len(box["tokens"]) >= 5, 30)
        t0 = time.time()
        got = finish(box)
        waited = time.time() - t0
        assert got["token_ids"] == reference(PROMPT, LONG), "the answer re-planned over the rest differs"
        # at least the grace; the upper bound only has to tell "the configured 3 s" from the default 30 s,
        # with room for a loaded CI machine
        assert 2.5 < waited < 25, f"answered {waited:.1f}s after the kill with rejoin_grace_s=3"
        wait_log(cl, 0, "Rank 1 (node1) is gone: down for more than rejoin_grace_s=3s; re-planning over the rest")
        with client(cl) as watcher:
            assert [n["rank"] for n in watcher.status()["nodes"]] == [0, 2], "a gone rank is still listed"
        # ... and once rank 1 is back, a re-plan takes it in again
        cl.start_rank(1)
        wait_log(cl, 0, "Re-planned (rank 1 (node1) joined)", timeout=READY_S)
        with client(cl) as watcher:
            st = watcher.status()
        assert [(n["rank"], n["status"]) for n in st["nodes"]] == [(0, "up"), (1, "up"), (2, "up")], st["nodes"]
        with client(cl) as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference(PROMPT, LONG)
    finally:
        cl.stop()


def test_leader_restart_workers_find_it_again_with_fresh_caches(tiny_weights, reference, tmp_path):
    # 20 ms per hop: the answer takes ~4 s, time enough to see caches on every worker and kill the leader
    cl = failover_cluster(tiny_weights, grace=30, workdir=tmp_path, link_delay_ms=20)
    try:
        start(cl)
        box = run_generation(cl)
        with client(cl) as watcher:      # caches held on the workers, mid-answer
            wait_until("a session on every worker", lambda: all(
                (node(st, r).get("sessions") or 0) >= 1 for st in [watcher.status()] for r in (1, 2)), 10, 0.02)
        cl.kill_rank(0, signal.SIGKILL)
        with pytest.raises(ClientError, match="closed the connection|lost the connection"):
            finish(box)
        cl.start_rank(0)
        st = cl.wait_ready(READY_S)
        for r in (1, 2):
            assert "Leader connection closed; reconnecting" in log_of(cl, r)

        def fresh_stats():
            s = status(cl)
            return s if all(node(s, r).get("sessions") is not None for r in (1, 2)) else None
        st = wait_until("worker STATS after the restart", fresh_stats, 5)
        assert all(node(st, r)["sessions"] == 0 and node(st, r)["kv_cache_bytes"] == 0 for r in (1, 2)), \
            f"workers kept caches from before the leader restarted: {st['nodes']}"
        short = SamplingParams("greedy", max_tokens=20)
        with client(cl) as c:
            assert c.generate(PROMPT, short)["token_ids"] == reference(PROMPT, short)
    finally:
        cl.stop()


# ---------------------------------------------------------------------------------------------
# load: 32 chats at once, through the web app


def test_32_concurrent_chats_through_the_web_app(tiny_weights, tiny_engine, tmp_path):
    from nanopipe.tokenizer import get_tokenizer
    from nanopipe.web.app import create_app
    from nanopipe.web.server import WebServer

    tok = get_tokenizer()
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), cluster_extra={"heartbeat_s": HEARTBEAT_S})
    server = None
    try:
        start(cl)
        defaults = status(cl)["defaults"]
        app = create_app({"LEADER": cl.leader_addr, "LEADER_TOKEN": None, "MODEL_DEFAULTS": defaults})
        server = WebServer(app, "127.0.0.1", 0).start()         # what `nanopipe web` serves with
        url = f"http://127.0.0.1:{server.port}/chat"

        chats = []
        for i in range(32):
            body = {"text": f"Chat number {i}: the {['cat', 'dog', 'ship', 'river'][i % 4]} said", "max_tokens": 12}
            if i % 2:
                body.update(decoding_strategy="sampling", temperature=0.8, seed=i)
            else:
                body.update(decoding_strategy="greedy")
            params = make_params(defaults, strategy=body["decoding_strategy"], temperature=body.get("temperature"),
                                 seed=body.get("seed"), max_tokens=body["max_tokens"])
            ids = tiny_engine.generate(tok.encode(body["text"]), params)["token_ids"]
            chats.append((body, tok.decode([t for t in ids if t != 50256])))

        answers, errors = [None] * len(chats), []
        barrier = threading.Barrier(len(chats))

        def chat(i, body):
            try:
                req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
                barrier.wait(10)
                with urllib.request.urlopen(req, timeout=60) as resp:
                    answers[i] = json.loads(resp.read())
            except Exception as e:  # reported in the test thread
                errors.append((i, e))
        threads = [threading.Thread(target=chat, args=(i, body)) for i, (body, _) in enumerate(chats)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        elapsed = time.time() - t0
        assert not errors, errors[:3]
        for i, ((body, want), got) in enumerate(zip(chats, answers)):
            assert got["response"] == want, f"chat {i} ({body}): got {got['response']!r}, one process {want!r}"
            assert got["stats"]["tokens"] == body["max_tokens"] or got["stats"]["finish_reason"] == "stop"
        st = wait_freed(cl)                      # as workers report after the last chat ended
        peaks = {r: peak_rss_mb(cl.procs[r].pid) for r in range(3)}
        print(f"\n32 chats through the web app in {elapsed:.1f}s; peak RSS MB per rank: "
              + ", ".join(f"{r}: {p:.0f}" for r, p in peaks.items() if p is not None)
              + "; RSS now: " + ", ".join(f"{n['rank']}: {n['rss_mb']}" for n in st["nodes"]))
        assert st["errors"] == 0 and st["requests"] >= 32
    finally:
        if server is not None:
            server.stop()
        cl.stop()
