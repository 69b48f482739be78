"""One request's failure ends that request only: the scheduler's other sessions finish their tokens.

    a bad value     a sampling field that would make the float32 arithmetic overflow is refused when
                    the request is checked, naming the field and the allowed range
    a failing step  an exception in one session's own work (penalties, sampling, detokenizing, its
                    caller's callback) fails that session with a message saying what failed; the
                    others in the same batch finish exactly as they would alone
    a cancel        of a request still waiting to be admitted removes it: it never runs
    busy            a leader whose queue is full answers "busy" (kind busy), which the web app turns
                    into 429 with Retry-After: what OpenAI's clients retry

The real-process tests run a LocalCluster on tiny synthetic weights with a 512-token context, so
a 200-token answer fits.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import status, wait_status

from nanopipe import sessions as sessions_mod
from nanopipe.cluster.leader_client import ClientError
from nanopipe.cluster.wire import Msg
from nanopipe.decoding import DecodingError, SamplingParams, softmax
from nanopipe.engine import Request, Scheduler
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.app import create_app, settings_from_configs
from nanopipe.web.server import WebServer
from nanopipe.weights import init_weights

PROMPT = [15496, 995, 11, 616, 1438]        # "Hello world, my name"


def prompt(n: int, seed: int) -> list:
    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


# ---------------------------------------------------------------------------------------------
# validation: a value that would overflow is refused up front, naming the field


@pytest.mark.parametrize("value", [1e-300, 0.001, 101, 1e300])
def test_repetition_penalty_outside_its_range_is_refused_naming_it(value):
    with pytest.raises(DecodingError, match=r"^repetition_penalty: must be a number in \[0.01, 100\]") as e:
        SamplingParams(repetition_penalty=value).validate()
    assert e.value.field == "repetition_penalty"


def test_repetition_penalty_at_its_limits_keeps_the_logits_finite(tiny_engine):
    for p in (0.01, 100):
        out = tiny_engine.generate(PROMPT, SamplingParams("greedy", max_tokens=3, repetition_penalty=p))
        assert len(out["token_ids"]) == 3 and all(np.isfinite(out["logprobs"]))


@pytest.mark.parametrize("fields", [
    {"strategy": "sampling", "temperature": 1e-300}, {"strategy": "sampling", "temperature": 1e300},
    {"strategy": "top_k", "temperature": 5e-324, "top_k": 10**9}, {"strategy": "top_p", "top_p": 1e-12},
    {"frequency_penalty": 2, "presence_penalty": -2, "repetition_penalty": 0.01},
    {"frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 100, "logit_bias": {"11": 100, "13": -100}},
])
def test_every_accepted_extreme_generates(tiny_engine, fields):
    """The edges of what validation lets through: each generates its tokens, with finite logprobs."""
    out = tiny_engine.generate(PROMPT, SamplingParams(**{"max_tokens": 6, "seed": 1, **fields}))
    assert len(out["token_ids"]) == 6 and all(np.isfinite(out["logprobs"]))


def test_a_tiny_temperature_still_gives_probabilities():
    """x / 1e-306 overflows to inf for logits of ~1000; the shift before the division keeps it finite."""
    probs = softmax(np.array([1000.0, 999.0, -5.0]), 1e-306)
    assert probs.tolist() == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# the scheduler: one session's failure is its own


def run_three(stage, monkeypatch=None, bad_seed=None, where=None) -> dict:
    """Three sessions in one batch (seeds 1, 2, 3); the one with `bad_seed` fails `where`. Returns
    {seed: ("done", token ids) or ("error", message)}."""
    sched = Scheduler(stage)
    got = {}

    def make_emit(seed):
        def emit(kind, data):
            if kind == "token" and where == "emit" and seed == bad_seed and data["index"] == 2:
                raise ConnectionError("its client's outbox is broken")
            if kind == "done":
                got[seed] = ("done", data["token_ids"])
            elif kind == "error":
                got[seed] = ("error", data["error"])
        return emit

    if where in ("sample", "penalize"):
        real = getattr(sessions_mod, where)

        def failing(*args):
            params = args[1]
            if params.seed == bad_seed:
                raise FloatingPointError(f"{where} blew up")
            return real(*args)
        monkeypatch.setattr(sessions_mod, where, failing)

    class BrokenText:               # a detokenizer that breaks on the third token
        text, stopped = "", None

        def __init__(self):
            self.n = 0

        def push(self, tok):
            self.n += 1
            if self.n == 3:
                raise UnicodeError("cannot decode this token")
            return "x"

        def flush(self):
            return ""

    for seed in (1, 2, 3):
        text = BrokenText() if where == "text" and seed == bad_seed else None
        sched.submit(Request(prompt(4, seed), SamplingParams("top_k", temperature=0.9, top_k=20, seed=seed,
                                                             max_tokens=12), make_emit(seed), text=text))
    sched.run_until_idle()
    assert not sched.sessions and not sched.in_flight
    return got


@pytest.mark.parametrize("where, says", [
    ("sample", "this request failed while choosing its next token: FloatingPointError: sample blew up"),
    ("penalize", "this request failed while choosing its next token: FloatingPointError: penalize blew up"),
    ("text", "this request failed while choosing its next token: UnicodeError: cannot decode this token"),
    ("emit", "this request failed while choosing its next token: ConnectionError: its client's outbox is broken"),
])
def test_one_sessions_failure_ends_it_alone_and_the_batch_goes_on(tiny_engine, monkeypatch, where, says):
    alone = run_three(tiny_engine.stage)
    assert all(kind == "done" and len(ids) == 12 for kind, ids in alone.values())
    got = run_three(tiny_engine.stage, monkeypatch, bad_seed=2, where=where)
    assert got[2] == ("error", says)
    assert got[1] == alone[1] and got[3] == alone[3], "the other sessions' answers changed"


def test_non_finite_activations_from_the_ring_fail_only_their_session(tiny_engine):
    """A ring whose last stage sends NaN for one session's rows: that session fails naming the
    sender; the others (greedy, same weights) answer exactly as in one process."""
    class NaNRing:
        depth, source = 1, "rank 2 (node2)"

        def __init__(self):
            self.inbox = []

        def send(self, batch_id, sessions, x, logits=None, greedy=False):
            x = x.copy()
            row = 0
            for s in sessions:
                if s["id"] == "poisoned":
                    x[row:row + s["n"]] = np.nan
                row += s["n"]
            self.inbox.append((batch_id, x, []))

        def recv(self, timeout):
            return self.inbox.pop(0) if self.inbox else None

        def free(self, ids):
            pass

    greedy = SamplingParams("greedy", max_tokens=8)
    want = {i: tiny_engine.generate(prompt(3, i), greedy)["token_ids"] for i in (1, 3)}
    sched = Scheduler(tiny_engine.stage, ring=NaNRing())
    got = {}
    for i, sid in ((1, "a"), (2, "poisoned"), (3, "b")):
        sched.submit(Request(prompt(3, i), greedy, lambda kind, data, i=i: kind in ("done", "error")
                             and got.setdefault(i, (kind, data)), id=sid))
    for _ in range(200):
        if not (sched.busy or sched.in_flight):
            break
        sched.step()
    kind, data = got[2]
    assert kind == "error" and data["error"].startswith(
        "rank 2 (node2) sent non-finite activations (NaN or inf) for this request"), data
    assert got[1][0] == got[3][0] == "done"
    assert got[1][1]["token_ids"] == want[1] and got[3][1]["token_ids"] == want[3]


# ---------------------------------------------------------------------------------------------
# a cancel reaches requests that are still waiting


def test_cancelling_a_waiting_request_removes_it(tiny_engine):
    """Six requests, two admitted: at the first token the client goes away and cancels all six."""
    sched = Scheduler(tiny_engine.stage, max_sessions=2)
    events, ids = [], []

    def emit(i):
        def on(kind, data):
            events.append((i, kind))
            if kind == "token" and len(events) == 1:
                assert len(sched.sessions) == 2 and sched.waiting.qsize() == 4
                for sid in ids:
                    sched.cancel(sid)
        return on

    ids += [sched.submit(Request(prompt(3, i), SamplingParams("greedy", max_tokens=20), emit(i)))
            for i in range(6)]
    sched.run_until_idle()
    assert sched.stats["requests"] == 2, "a cancelled waiting request was admitted and ran for nobody"
    assert sched.stats["cancelled_waiting"] == 4 and sched.stats["tokens"] <= 2
    assert not [e for e in events if e[0] >= 2], f"a cancelled waiting request emitted: {events}"
    assert not sched.admission.cancels and not sched.admission.queued, "cancels or queued ids left behind"


# ---------------------------------------------------------------------------------------------
# real processes: a LocalCluster (3 nodes, max_sessions 2) and the web app in front of it

MAX_SESSIONS = 2


@pytest.fixture(scope="module")
def long_cluster(tmp_path_factory):
    """Tiny synthetic weights with a 512-token context (a 200-token answer fits), 3 nodes. Each hop
    is slowed by 10 ms (a simulated link), so a token takes >= 30 ms and a 300-token answer >= 9 s:
    a queue filled by such answers stays full while a test looks at it, however fast the machine."""
    path = tmp_path_factory.mktemp("long") / "long.safetensors"
    init_weights(str(path), n_layer=4, n_embd=64, n_head=4, n_ctx=512, n_vocab=50257, seed=0)
    with LocalCluster(str(path), nodes=3, ready_timeout=60,
                      cluster_extra={"max_sessions": MAX_SESSIONS, "link_delay_ms": 10}) as cl:
        yield cl


@pytest.fixture(scope="module")
def web(long_cluster):
    """The web app's base URL, talking to long_cluster's leader."""
    app = create_app(settings_from_configs(long_cluster.config_dir, leader=long_cluster.leader_addr))
    server = WebServer(app, "127.0.0.1", 0).start()        # what `nanopipe web` serves with
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def post(url: str, body: dict, timeout: float = 60):
    """POST JSON; (status, headers, body as parsed JSON)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


NO_EOT = {"50256": -100}            # the synthetic model's answer never ends early


def test_a_bad_request_beside_a_long_stream_fails_alone(web):
    """The issue's reproduction: a 200-token completion streaming, then repetition_penalty=1e-300."""
    events, first = [], threading.Event()

    def stream():
        body = {"prompt": "Hello world", "max_tokens": 200, "temperature": 0, "logit_bias": NO_EOT, "stream": True,
                "stream_options": {"include_usage": True}}
        req = urllib.request.Request(f"{web}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                    first.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first.wait(60), "the long stream never started"
    code, _, body = post(f"{web}/v1/completions", {"prompt": "x", "max_tokens": 2, "repetition_penalty": 1e-300})
    assert code == 400, body
    assert body["error"]["param"] == "repetition_penalty"
    assert "repetition_penalty: must be a number in [0.01, 100]" in body["error"]["message"], body
    t.join(120)
    assert not t.is_alive(), "the long stream hung"
    chunks = [json.loads(e) for e in events if e != b"[DONE]"]
    assert not [c for c in chunks if "error" in c], f"the long stream failed: {[c for c in chunks if 'error' in c]}"
    usage = [c["usage"] for c in chunks if c.get("usage")]
    print(f"long stream: {usage[-1]['completion_tokens']} tokens; the bad request: {code} {body['error']['message']}")
    assert usage[-1]["completion_tokens"] == 200
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "length"


def open_batch(cl, n: int, max_tokens: int = 300, first_token: bool = True):
    """One client connection that queues `n` long greedy generations as one batch; returns it once
    its first token has come (so the first MAX_SESSIONS are running, the rest waiting)."""
    c = cl.client()
    c._send(Msg.GENERATE_BATCH, {"request": "b", "strategy": "greedy", "max_tokens": max_tokens, "ignore_eos": True,
                                 "batch": [{"request": f"b.{i}", "prompt_ids": prompt(4, i)} for i in range(n)]})
    while first_token:
        frame = c._recv()
        assert frame.msg is not Msg.ERROR, frame.meta
        if frame.msg is Msg.TOKEN:
            break
    return c


def idle(cl) -> dict:
    return wait_status(cl, lambda st: st["live_sessions"] == 0 and st["waiting"] == 0, 60, "the leader idle")


def test_a_client_that_leaves_takes_its_waiting_requests_with_it(long_cluster):
    before = idle(long_cluster)
    c = open_batch(long_cluster, 8)                 # 2 running, 6 waiting
    assert status(long_cluster)["waiting"] == 6
    c.close()
    after = idle(long_cluster)
    ran = after["requests"] - before["requests"]
    print(f"8 queued, client gone after its first token: {ran} admitted, "
          f"{after['tokens'] - before['tokens']} tokens generated")
    assert ran == MAX_SESSIONS, f"{ran - MAX_SESSIONS} waiting request(s) ran for a client that had left"
    assert after["cancelled_waiting"] - before["cancelled_waiting"] == 6


def test_busy_is_429_with_retry_after_which_openai_clients_retry(long_cluster, web):
    openai = pytest.importorskip("openai", reason="the `openai` package is in the test extra")
    idle(long_cluster)
    full = [open_batch(long_cluster, 8)]                        # 2 running, 6 waiting
    full.append(open_batch(long_cluster, 2, first_token=False))  # 8 waiting: the limit
    try:
        wait_status(long_cluster, lambda st: st["waiting"] == 4 * MAX_SESSIONS, 30, "a full queue")
        with long_cluster.client() as c:            # the leader's own answer
            with pytest.raises(ClientError) as e:
                c.generate(PROMPT, SamplingParams("greedy", max_tokens=2))
        assert e.value.kind == "busy" and e.value.retry_after_s == 1 and str(e.value).startswith("busy: ")
        code, headers, body = post(f"{web}/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert code == 429 and headers["Retry-After"] == "1", (code, dict(headers), body)
        assert body["error"]["type"] == "rate_limit_error" and "busy" in body["error"]["message"]
        busy_before = busy_count(web)
        client = openai.OpenAI(base_url=f"{web}/v1", api_key="unused", max_retries=1, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="local", prompt="x", max_tokens=2)
        assert busy_count(web) - busy_before == 2, "the openai client did not retry the 429"
        assert time.monotonic() - t0 >= 0.9, "the openai client did not wait for Retry-After"
        # streamed, on every route: the refusal comes before the 200, so it is the same 429
        for route, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 2, "stream": True}),
                            ("/chat", {"text": "x", "max_tokens": 2})):
            code, headers, answer = post(f"{web}{route}", body)
            assert code == 429 and headers["Retry-After"] == "1", (route, code, dict(headers), answer)
        with pytest.raises(openai.RateLimitError):
            for _ in client.completions.create(model="local", prompt="x", max_tokens=2, stream=True):
                pass
    finally:
        for c in full:
            c.close()
    idle(long_cluster)


def busy_count(web: str) -> float:
    with urllib.request.urlopen(f"{web}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('nanopipe_web_errors_total{kind="busy"}'):
                return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------------------------------------
# a batch's prompts are tokenized without holding the scheduler


def test_batch_prompts_are_tokenized_without_holding_the_scheduler(tiny_weights, tmp_path):
    """The leader's GENERATE with a batch of text prompts: while each is tokenized, another thread
    (the scheduler's step) can take the scheduler's lock."""
    from nanopipe.cluster.leader import Leader
    from nanopipe.config import load_cluster_config, load_model_config
    from nanopipe.tools.localcluster import write_configs
    from nanopipe.weights import load_stage

    write_configs(str(tmp_path), weights=tiny_weights, nodes=1, n_layer=4)
    stage = load_stage(tiny_weights)
    leader = Leader(load_cluster_config(str(tmp_path)), load_model_config(str(tmp_path)), stage,
                    [(0, stage.config.n_layer)], log_fn=lambda *a: None)

    class ProbingTokenizer:         # encodes anything as 3 tokens, and notes whether the lock was free
        free: list = []

        def encode(self, text):
            got = []

            def probe():
                got.append(leader.scheduler.lock.acquire(timeout=2))
                if got[0]:
                    leader.scheduler.lock.release()
            t = threading.Thread(target=probe)
            t.start()
            t.join()
            self.free.append(got[0])
            return [15496, 995, 11]

    leader.clients.tokenizer = ProbingTokenizer()
    sent = []
    leader.clients.generate_batch({"request": "r", "text": False, "max_tokens": 1,
                                   "batch": [{"request": f"r.{i}", "prompt": "Hello world"} for i in range(4)]},
                                  lambda msg, meta: sent.append((msg, meta)), set())
    assert ProbingTokenizer.free == [True] * 4, "a prompt was tokenized while the scheduler was held"
    assert sent == [] and leader.scheduler.waiting.qsize() == 4, sent
