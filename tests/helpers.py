"""Helpers the test files share: one copy of each, imported as `from helpers import ...`.

    wait_until(what, ok, timeout)        poll ok() until it returns something truthy; never a bare sleep
    run_nanopipe(*args)                  the real command line, `python -m nanopipe ...`, as a user runs it
    port_free(port), free_port_run(n)    ports on 127.0.0.1
    self_signed_cert(folder)             a throwaway certificate for 127.0.0.1 (openssl), for TLS tests
    read_tensors(path)                   every tensor of a safetensors file, name -> array as stored
    GOLDEN_CASES, GOLDEN_PROVENANCE      what transformers computed for tests/golden/tiny-hf (HF_DIR)

and, for a running LocalCluster `cl`:

    status(cl), node(st, rank), workers(st)     the leader's status and the nodes in it
    wait_status(cl, ok, timeout, what)          poll the status until ok(status)
    wait_freed(cl)                              every KV cache freed, as reported after the generations ended
    log_of(cl, rank), wait_log(cl, rank, ...)   a node's log, and waiting for a line in it
    leader_addr(cl), worker_addr(cl, rank)      (host, port) to dial by hand
    handshake(addr, token=...)                  a handshake by hand: (sock, CHALLENGE, reply to HELLO)
    frames_until_close(sock), local_peer(sock)  what a peer sends until it hangs up; how a node logs us
    peak_rss_mb(pid)                            a process's resident-memory high-water mark, from /proc
    generate_in_background(connect, prompt, params), finish(box)   a generation on its own thread, and its end

and, for the web app without a cluster (fixtures `leader`, `app`, `client` in conftest.py):

    FakeLeader, FakeClient              the leader behind CLIENT_FACTORY, scripted; checked against LeaderClient
    DEFAULTS, NODES, NODE_MS, EOT       what the fake serves
    make_app(leader, **settings)        a test client of an app on a FakeLeader with these settings
    serve_app(app)                      an app served for real on a free port, in a thread: (url, server)
    sse_events(body)                    a text/event-stream body as [(event, data)], framing checked
    signature_drift(fake, real)         how two callables' parameters differ ([] when they match)
    parse_metrics(text)                 GET /metrics' Prometheus text, every line checked

    wait_until("rank 2 down", lambda: node(status(cl), 2)["status"] == "down", 5)
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest


def wait_until(what: str, ok, timeout: float, interval: float = 0.05, detail=None):
    """Poll ok() every `interval` s until it returns something truthy, and return that; after
    `timeout` s fail naming `what` (and detail(), when given, for the state to debug from)."""
    deadline = time.time() + timeout
    while True:
        got = ok()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout}s" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)


def run_nanopipe(*args, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real command line, `python -m nanopipe *args`, as a user would (output captured)."""
    return subprocess.run([sys.executable, "-m", "nanopipe", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_tensors(path) -> dict:
    """Every tensor of a safetensors file, read with nanopipe's own reader: name -> array, as stored."""
    from nanopipe.safetensors_io import read_header, read_tensor
    header = read_header(str(path))
    with open(path, "rb") as f:
        return {name: read_tensor(f, info) for name, info in header.tensors.items()}


REPO = str(Path(__file__).resolve().parent.parent)
CONFIG_DIR = os.path.join(REPO, "configs")             # the shipped configs/

GOLDEN = Path(__file__).parent / "golden"
HF_DIR = GOLDEN / "tiny-hf"             # the small random GPT-2 transformers saved (save_pretrained)


def _golden():
    """The recorded cases: a list of (prompt ids, logits (T, V), greedy ids (16,)), and the provenance."""
    with np.load(GOLDEN / "tiny_golden.npz") as z:
        n = len([k for k in z.files if k.startswith("prompt_ids_")])
        cases = [(z[f"prompt_ids_{i}"].tolist(), z[f"logits_{i}"], z[f"greedy_{i}"].tolist())
                 for i in range(n)]
    return cases, json.loads((GOLDEN / "tiny_golden.json").read_text())


GOLDEN_CASES, GOLDEN_PROVENANCE = _golden()    # made by tests/golden/make_golden.py


# ---------------------------------------------------------------------------------------------
# ports and certificates


def port_free(port: int) -> bool:
    """Can a new listener bind 127.0.0.1:port right now?"""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port_run(n: int) -> int:
    """A port p with p, p+1, ..., p+n-1 free a moment ago (the guide's workers listen on port + rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n - 1 <= 65535 and all(port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def self_signed_cert(folder) -> tuple:
    """A throwaway certificate for 127.0.0.1, made with the openssl command line: (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the `openssl` command to make a self-signed certificate")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=nanopipe-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


# ---------------------------------------------------------------------------------------------
# a running LocalCluster: its status and its logs


def status(cl) -> dict:
    """The leader's status, asked with the cluster's own secret (and certificate, under TLS)."""
    with cl.client() as c:
        return c.status()


def node(st: dict, rank: int) -> dict:
    """Rank's entry in a status."""
    return next(n for n in st["nodes"] if n["rank"] == rank)


def workers(st: dict) -> list:
    """Every worker's entry in a status (rank 0, the leader, left out)."""
    return [n for n in st["nodes"] if n["rank"] > 0]


def wait_status(cl, ok, timeout: float, what: str) -> dict:
    """Poll the leader's status until ok(status); fail naming `what`, the last status and the logs."""
    last = {}

    def check():
        last["st"] = status(cl)
        return last["st"] if ok(last["st"]) else None
    return wait_until(what, check, timeout,
                      detail=lambda: f"last status:\n{json.dumps(last.get('st'), indent=1)}\n{cl.logs()}")


def all_freed(st: dict) -> bool:
    """No live session anywhere, and every stage holds exactly the finished sessions' caches the
    leader keeps for reuse (nanopipe/prefix.py), none more and none fewer, in every worker's last
    report (with reuse off, or nothing kept: no KV cache byte left at all)."""
    kept = st.get("prefix_kept", 0)
    return (st["live_sessions"] == 0 and st["kv_cache_bytes"] == st.get("prefix_cache_bytes", 0)
            and all(n["sessions"] == kept and (n["kv_cache_bytes"] > 0) == (kept > 0) for n in workers(st)))


def reported_since(st: dict, since: float, asked_at: float) -> bool:
    """Has every worker's last report reached the leader after time `since`? (`asked_at`: a time
    before the status was asked; the leader says how long ago each report came, in last_seen_s.)"""
    return all(n["last_seen_s"] is not None and asked_at - n["last_seen_s"] > since for n in workers(st))


def wait_freed(cl, timeout: float = 5) -> dict:
    """Every cache freed, on the leader and on every worker, by reports sent after this call (the
    generations have ended by then). A stale "0 sessions" from before they began cannot pass, and a
    FREE that never arrived keeps a worker's count up and fails here."""
    since = time.time()

    def check():
        asked_at = time.time()
        st = status(cl)
        return st if reported_since(st, since, asked_at) and all_freed(st) else None
    return wait_until("every cache freed (only the kept ones left, on every stage, reported after the end)",
                      check, timeout, detail=lambda: f"last status:\n{json.dumps(status(cl), indent=1)}\n{cl.logs()}")


def generate_in_background(connect, prompt, params, on_token=None) -> dict:
    """A generation on its own thread, through the client connect() returns (cl.client, or one with
    a chosen secret): box["tokens"] and box["times"] (perf_counter of each) as they come, box["status"]
    texts, then box["result"] or box["error"]. on_token(n) is called with the count after each token."""
    box = {"tokens": [], "times": [], "status": []}

    def tokens(t, _text):
        if t is not None:
            box["tokens"].append(t)
            box["times"].append(time.perf_counter())
            if on_token is not None:
                on_token(len(box["tokens"]))

    def run():
        try:
            with connect() as c:
                box["result"] = c.generate(prompt, params, on_token=tokens, on_status=box["status"].append)
        except Exception as e:   # the test thread looks at it
            box["error"] = e
    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def finish(box: dict, timeout: float = 60) -> dict:
    """generate_in_background's result once its thread ends; its error raised; a hang fails the test."""
    box["thread"].join(timeout)
    assert not box["thread"].is_alive(), f"the generation hung for {timeout}s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def log_of(cl, rank: int) -> str:
    """Everything rank has logged so far (the log is written as things happen)."""
    with open(cl.log_path(rank), errors="replace") as f:
        return f.read()


def wait_log(cl, rank: int, *needles: str, timeout: float = 5.0) -> str:
    """The first line of rank's log holding every needle, once it is there."""
    def find():
        return next((line for line in log_of(cl, rank).splitlines() if all(n in line for n in needles)), None)
    return wait_until(f"a line with {needles} in rank {rank}'s log", find, timeout, detail=cl.logs)


# ---------------------------------------------------------------------------------------------
# A fake leader for the web app: FakeLeader.connect is the app's CLIENT_FACTORY (web.connection.dial_leader's
# place) and returns a FakeClient (LeaderClient's place, minus the socket). Their signatures are checked
# against the real ones (test_web_health.py::test_the_fake_leader_client_has_the_real_signatures), so
# the fake cannot drift from what the app calls. The fixtures `leader`, `app`, `client` are in conftest.py.

EOT = 50256
DEFAULTS = {"active_decoding_strategy": "top_p", "max_new_tokens": 50,
            "decoding_strategies": {"greedy": {}, "sampling": {"temperature": 0.8},
                                    "top_p": {"temperature": 0.8, "p": 0.9}, "top_k": {"temperature": 0.8, "k": 40}}}
NODES = [{"rank": 0, "host": "mini1", "layers": [0, 3], "status": "up", "last_seen_s": 0.0, "rss_mb": 512.0},
         {"rank": 1, "host": "mini2", "layers": [4, 7], "status": "up", "last_seen_s": 0.4, "rss_mb": 300.5},
         {"rank": 2, "host": "pi1", "layers": [8, 11], "status": "up", "last_seen_s": 0.7, "rss_mb": 290.0}]
NODE_MS = {"0": {"compute": 6.0, "transit": 2.0}, "1": {"compute": 3.0, "transit": 0.0},
           "2": {"compute": 4.0, "transit": 0.0}}


class FakeClient:
    """What LeaderClient.connect returns, minus the socket."""

    def __init__(self, leader: FakeLeader, addr: str, token, attempts: int):
        self.leader, self.addr, self.token, self.attempts = leader, addr, token, attempts
        self.welcome = {"model": "fake-gpt2", "n_ctx": leader.n_ctx}
        self.calls: list = []
        self.batches: list = []
        self.closed = threading.Event()

    def generate(self, prompt=None, params=None, on_token=None, on_status=None, echo=False, top_logprobs=0,
                 text=True, on_event=None, **fields):
        from nanopipe.cluster.leader_client import ClientError
        lead = self.leader
        self.calls.append({"prompt": prompt, "params": params, "echo": echo, "top_logprobs": top_logprobs})
        for s in lead.statuses:
            on_status(s)
        script = lead.tokens[:params.max_tokens]
        for i, (tid, piece) in enumerate(script):
            if lead.fail is not None and i == lead.fail_after:
                raise lead.fail
            if lead.hang_after is not None and i == lead.hang_after:
                self.closed.wait(5)             # like a recv() that the web app's hang-up wakes
                raise ClientError(f"the leader at {self.addr} closed the connection", "unreachable")
            on_token(tid, piece)
        if lead.fail is not None:
            raise lead.fail
        ids = [t for t, _ in script]
        result = {"token_ids": ids, "prompt_ids": list(prompt), "tokens_generated": len(ids),
                  "logprobs": [-1.0 - 0.5 * i for i in range(len(ids))], "ttft_ms": 5.0,
                  "finish_reason": "stop" if ids and ids[-1] == EOT else "length", "node_ms": NODE_MS}
        if top_logprobs:
            result["top_logprobs"] = [[{"id": t, "logprob": -1.0 - 0.5 * i}, {"id": 13, "logprob": -7.0}][:top_logprobs]
                                      for i, t in enumerate(ids)]
        if echo:
            result["prompt_logprobs"] = [-2.0] * (len(prompt) - 1)
        return result

    def generate_batch(self, prompts, params=None, seeds=None, on_token=None, on_status=None, echo=False,
                       top_logprobs=0, text=True, **fields):
        """The batch as the fake runs it: each prompt in turn (the real leader's batching is tested
        against a live cluster); fields["score_only"] scripts no tokens, only the prompt's logprobs."""
        score_only = fields.get("score_only")
        results = []
        self.batches.append({"prompts": [list(p) for p in prompts], "seeds": seeds, "score_only": score_only})
        for i, prompt in enumerate(prompts):
            seed = seeds[i] if seeds and seeds[i] is not None else params.seed
            p = dataclasses.replace(params, seed=seed, max_tokens=0 if score_only else params.max_tokens)
            r = self.generate(prompt, p, lambda t, piece, i=i: on_token(i, t, piece), on_status, echo=echo,
                              top_logprobs=top_logprobs)
            if echo and top_logprobs:
                r["prompt_top_logprobs"] = [[{"id": t, "logprob": -2.0}, {"id": 13, "logprob": -3.0}][:top_logprobs]
                                            for t in prompt[1:]]
            results.append(r)
        return results

    def status(self):
        return self.leader.status()

    def cancel(self):
        """Nothing runs past the scripted tokens, so there is nothing to cancel."""

    def leave(self, rank: int, timeout: float = 420.0) -> dict:
        """Drain `rank`: refused with the leader's `fail` (a ClientError) when one is set."""
        self.calls.append({"leave": rank})
        if self.leader.fail is not None:
            raise self.leader.fail
        return {"rank": rank, "message": f"rank {rank} drained: ring 0 -> 1 -> 0"}

    def close(self):
        self.closed.set()


class FakeLeader:
    """The cluster as the app sees it. `connect` is the app's CLIENT_FACTORY; connections are recorded."""

    def __init__(self):
        self.tokens = [(15496, "Hello"), (995, " world"), (11, ","), (9387, " distributed")]
        self.statuses: list = []
        self.down = False
        self.fail = None            # a ClientError to raise after fail_after tokens
        self.fail_after = 0
        self.hang_after: int | None = None
        self.n_ctx = 64
        self.nodes = [dict(n) for n in NODES]
        self.defaults = DEFAULTS
        self.connections: list = []

    def connect(self, addr, token, attempts=1, tls_ca=None):
        from nanopipe.cluster.leader_client import ClientError
        if self.down:
            raise ClientError(f"leader at {addr} is unreachable: [Errno 111] Connection refused. "
                              "Is `nanopipe serve --rank 0` running?", "unreachable")
        client = FakeClient(self, addr, token, attempts)
        self.connections.append(client)
        return client

    def status(self):
        return {"model": "fake-gpt2", "ready": all(n["status"] == "up" for n in self.nodes), "nodes": self.nodes,
                "live_sessions": 1, "requests": 7, "tokens": 99, "errors": 2, "n_ctx": self.n_ctx,
                "defaults": self.defaults, "kv_cache_bytes": 4096}

    @property
    def calls(self) -> list:
        return [call for c in self.connections for call in c.calls]


def make_app(leader, **settings):
    """A test client of a web app on `leader` (a FakeLeader) with these settings."""
    from nanopipe.web.app import create_app
    return create_app({"CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": DEFAULTS, **settings}).test_client()


def signature_drift(fake, real) -> list:
    """How callable `fake`'s parameters differ from `real`'s (names, order, kinds, defaults; not
    annotations): [] when a caller of one can call the other the same way."""
    def shape(f):
        return inspect.Signature([p.replace(annotation=inspect.Parameter.empty)
                                  for p in inspect.signature(f).parameters.values() if p.name != "self"],
                                 return_annotation=inspect.Signature.empty)
    ours, theirs = shape(fake), shape(real)
    return [] if ours == theirs else [f"{fake.__qualname__}{ours} != {real.__qualname__}{theirs}"]


def sse_events(body: bytes) -> list:
    """A text/event-stream body -> [(event name, data)], data parsed as JSON where it is JSON.

    Checks the framing too: every event ends with a blank line, every line is a known field."""
    text = body.decode()
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-40:]!r}"
    events = []
    for block in text[:-2].split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(": ")
            assert sep and field in ("event", "data"), f"bad SSE line {line!r}"
            if field == "event":
                name = value
            else:
                data.append(value)
        if data:
            raw = "\n".join(data)
            events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


# Prometheus text, as GET /metrics answers it

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


class Samples(dict):
    """{(name, ((label, value), ...)): value} where the labels' order does not matter, as in Prometheus."""

    def __setitem__(self, key, value):
        super().__setitem__((key[0], tuple(sorted(key[1]))), value)

    def __getitem__(self, key):
        return super().__getitem__((key[0], tuple(sorted(key[1]))))


def parse_metrics(text: str) -> dict:
    """Prometheus text format -> {(name, ((label, value), ...)): float}, checking every line's syntax
    and that each sample's family was declared by a # TYPE line before it."""
    declared, out = {}, Samples()
    for line in text.strip().split("\n"):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            declared[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in declared else name
        assert family in declared, f"{name} has no # TYPE line before it"
        labels = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(name, labels)] = float(m.group(3))
    return out


# ---------------------------------------------------------------------------------------------
# Speaking the protocol by hand to a LocalCluster, and what a process used


def leader_addr(cl) -> tuple:
    """Where a LocalCluster's leader listens, to dial by hand."""
    return "127.0.0.1", cl.cluster["port"]


def worker_addr(cl, rank: int) -> tuple:
    """Where a LocalCluster's rank `rank` listens for data links."""
    return "127.0.0.1", cl.cluster["workers"][rank - 1]["port"]


def local_peer(sock) -> str:
    """How the node names us in its log: 127.0.0.1:<our port>."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def handshake(addr: tuple, *, token, role="client", rank=None, version=None, extra=None):
    """Do the handshake by hand: (sock, CHALLENGE frame, the reply to our HELLO); version None is
    this tree's PROTOCOL_VERSION."""
    from nanopipe.cluster.wire import PROTOCOL_VERSION, Msg, auth_proof, recv_frame, send_frame
    version = PROTOCOL_VERSION if version is None else version
    sock = socket.create_connection(addr, timeout=5)
    challenge = recv_frame(sock, "node")
    meta = {"role": role, "rank": rank, "version": version, "proof": auth_proof(token, challenge.meta["nonce"])}
    send_frame(sock, Msg.HELLO, {**meta, **(extra or {})})
    return sock, challenge, recv_frame(sock, "node")


def frames_until_close(sock, timeout: float = 5.0) -> list:
    """Every frame the peer sends until it closes the connection; fails if it never does."""
    from nanopipe.cluster.wire import ConnectionClosed, WireError, recv_frame
    sock.settimeout(timeout)
    got = []
    while True:
        try:
            got.append(recv_frame(sock, "node").msg)
        except (ConnectionClosed, ConnectionResetError):
            return got
        except socket.timeout:
            raise AssertionError(f"the node kept the connection open for {timeout}s (got {got})") from None
        except WireError:           # it closed in the middle of something: closed all the same
            return got


def peak_rss_mb(pid: int) -> float | None:
    """The process's high-water mark of resident memory (VmHWM), from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def serve_app(app):
    """The app on a free port of 127.0.0.1, in a thread (as `nanopipe web` serves it): (url, server),
    the url without a trailing slash; `server.shutdown()` stops it."""
    from werkzeug.serving import make_server
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True, name="web").start()
    return f"http://127.0.0.1:{srv.server_port}", srv
