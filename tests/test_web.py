"""The web app (web/app.py, chat.py, openai.py, api.py, metrics.py): every route against a fake leader,
then a few against a real local cluster.

The fake leader stands in for the cluster behind the app's CLIENT_FACTORY: it streams scripted
tokens, answers status, and can be switched to "down", "fails mid-reply" or "refuses the request",
so each error path is checked without starting processes.
"""
from __future__ import annotations

import dataclasses
import json
import re
import threading

import pytest
from click.testing import CliRunner
from helpers import CONFIG_DIR, status, wait_status

from nanopipe.cluster.client import ClientError
from nanopipe.decoding import infer_strategy
from nanopipe.tokenizer import get_tokenizer
from nanopipe.web.app import create_app, settings_from_configs
from nanopipe.web.metrics import WebMetrics, render_metrics
from nanopipe.web.openai import chat_prompt

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
                 text=True, **fields):
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
                       top_logprobs=0, text=True, score_only=None, **fields):
        """The batch as the fake runs it: each prompt in turn (the real leader's batching is tested
        against a live cluster); score_only scripts no tokens, only the prompt's logprobs."""
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

    def close(self):
        self.closed.set()


class FakeLeader:
    """The cluster as the app sees it. `connect` is the app's CLIENT_FACTORY; connections are recorded."""

    def __init__(self):
        self.tokens = [(15496, "Hello"), (995, " world"), (11, ","), (9387, " distributed")]
        self.statuses: list = []
        self.down = False
        self.fail: ClientError | None = None
        self.fail_after = 0
        self.hang_after: int | None = None
        self.n_ctx = 64
        self.nodes = [dict(n) for n in NODES]
        self.defaults = DEFAULTS
        self.connections: list = []

    def connect(self, addr, token, attempts=1):
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


@pytest.fixture
def leader():
    return FakeLeader()


@pytest.fixture
def app(leader):
    return create_app({"TESTING": True, "CLIENT_FACTORY": leader.connect, "LEADER": "10.0.0.1:65432",
                       "MODEL_NAME": "gpt2", "MODEL_DEFAULTS": DEFAULTS})


@pytest.fixture
def client(app):
    return app.test_client()


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


# ---------------------------------------------------------------------------------------------
# The page


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    # relative to the page: the same names work served here, from a file and from http.server
    assert 'src="app.js"' in html and 'href="style.css"' in html
    assert "http://" not in html and "https://" not in html          # no CDN: works offline
    for name, mimetype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        for path in (f"/{name}", f"/static/{name}"):
            r = client.get(path)
            assert r.status_code == 200 and r.mimetype == mimetype and len(r.data) > 1000


def test_unknown_route_and_wrong_method_answer_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "Not Found" in r.json["error"]
    r = client.get("/chat")
    assert r.status_code == 405 and "Method Not Allowed" in r.json["error"]


# ---------------------------------------------------------------------------------------------
# POST /chat


def test_chat_returns_response_config_and_stats(client, leader):
    r = client.post("/chat", json={"text": "Hello", "max_tokens": 3, "temperature": 0.5, "top_k": 7,
                                   "decoding_strategy": "top_k", "seed": 11})
    assert r.status_code == 200, r.json
    assert r.json["response"] == "Hello world,"
    # what ran: top_k does not use top_p, so it is null rather than a value that played no part
    assert r.json["config"] == {"tokens_generated": 3, "temperature": 0.5, "top_k": 7, "top_p": None,
                                "decoding_strategy": "top_k", "max_tokens": 3, "seed": 11}
    stats = r.json["stats"]
    assert stats["tokens"] == 3 and stats["finish_reason"] == "length" and stats["node_ms"] == NODE_MS
    assert stats["ttft_ms"] >= 0 and stats["total_ms"] >= stats["ttft_ms"]
    (call,) = leader.calls
    assert call["prompt"] == [15496]                                  # tokenized here: "Hello"
    p = call["params"]
    assert (p.strategy, p.temperature, p.top_k, p.max_tokens, p.seed) == ("top_k", 0.5, 7, 3, 11)


def test_guide_chat_request_runs_top_k_on_a_greedy_cluster(leader):
    # issue 11 §4: the guide's curl, against a cluster whose default is greedy, used to run greedily
    # while its config claimed temperature 0.8 and top_k 40
    leader.defaults = {"active_decoding_strategy": "greedy", "max_new_tokens": 50,
                       "decoding_strategies": {"greedy": {}, "top_k": {"temperature": 1.0, "k": 50}}}
    app = create_app({"CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": None})
    r = app.test_client().post("/chat", json={"text": "What is distributed computing?", "max_tokens": 30,
                                               "temperature": 0.8, "top_k": 40})
    assert r.status_code == 200, r.json
    p = leader.calls[0]["params"]
    assert (p.strategy, p.temperature, p.top_k, p.max_tokens) == ("top_k", 0.8, 40, 30), "what ran"
    config = r.json["config"]
    assert {k: config[k] for k in ("temperature", "top_k", "decoding_strategy")} == {
        "temperature": 0.8, "top_k": 40, "decoding_strategy": "top_k"}, "what the response says ran"


@pytest.mark.parametrize("body, param", [
    ({"decoding_strategy": "greedy", "top_k": 40}, "top_k"),
    ({"decoding_strategy": "greedy", "temperature": 0.8}, "temperature"),
    ({"decoding_strategy": "top_k", "top_p": 0.8}, "top_p"),
    ({"top_k": 40, "top_p": 0.9}, "top_p"),
])
def test_chat_field_the_strategy_would_ignore_is_a_400(client, leader, body, param):
    r = client.post("/chat", json={"text": "Hello", **body})
    assert r.status_code == 400 and r.json["error"].startswith(f"{param}:"), r.json
    assert leader.calls == [], "nothing ran"


def test_chat_defaults_come_from_the_model_config(client, leader):
    r = client.post("/chat", json={"text": "Hello"})
    assert r.status_code == 200
    assert r.json["config"]["decoding_strategy"] == "top_p"
    assert (r.json["config"]["temperature"], r.json["config"]["top_p"]) == (0.8, 0.9)
    assert leader.calls[0]["params"].max_tokens == 50


def test_chat_temperature_zero_without_a_strategy_is_greedy(client, leader):
    r = client.post("/chat", json={"text": "Hello", "temperature": 0})
    assert r.status_code == 200 and r.json["config"]["decoding_strategy"] == "greedy"


def test_chat_defaults_from_the_leader_when_there_is_no_model_config(leader):
    leader.defaults = {"active_decoding_strategy": "greedy", "max_new_tokens": 3, "decoding_strategies": {"greedy": {}}}
    app = create_app({"CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": None})
    r = app.test_client().post("/chat", json={"text": "Hello"})
    assert r.status_code == 200 and r.json["config"]["decoding_strategy"] == "greedy"
    assert r.json["config"]["tokens_generated"] == 3


def test_each_request_gets_its_own_leader_connection_and_closes_it(client, leader):
    for _ in range(2):
        assert client.post("/chat", json={"text": "Hello", "max_tokens": 2}).status_code == 200
    assert len(leader.connections) == 2
    assert all(c.closed.is_set() and len(c.calls) == 1 for c in leader.connections)


def test_two_streams_at_once_use_two_connections(client, leader):
    a = client.post("/chat", json={"text": "Hello", "stream": True}, buffered=False)
    b = client.post("/chat", json={"text": "Hello", "stream": True}, buffered=False)
    first_a, first_b = next(a.response), next(b.response)
    assert b'"token":15496' in first_a and b'"token":15496' in first_b
    rest_a, rest_b = b"".join(a.response), b"".join(b.response)
    assert b"event: done" in rest_a and b"event: done" in rest_b
    assert len(leader.connections) == 2 and leader.connections[0] is not leader.connections[1]


BAD_CHAT = [
    (b"{not json", "request body: not valid JSON"),
    (b"", "request body: expected a JSON object, got an empty body"),
    (b"[1, 2]", "request body: expected a JSON object, got list"),
    ({}, "text: give the prompt as a non-empty string"),
    ({"text": ""}, "text: give the prompt as a non-empty string"),
    ({"text": "   \n"}, "text: give the prompt as a non-empty string"),
    ({"text": 42}, "text: give the prompt as a non-empty string"),
    ({"text": "hi", "decoding_strategy": "beam"}, "decoding_strategy: must be one of greedy, sampling, top_k, top_p"),
    ({"text": "hi", "max_tokens": 0}, "max_tokens: must be an integer >= 1 (got 0)"),
    ({"text": "hi", "max_tokens": "5"}, 'max_tokens: must be an integer >= 1 (got "5")'),
    ({"text": "hi", "max_tokens": 2.5}, "max_tokens: must be an integer >= 1 (got 2.5)"),
    ({"text": "hi", "temperature": -0.1}, "temperature: must be a number >= 0 (got -0.1)"),
    ({"text": "hi", "temperature": True}, "temperature: must be a number >= 0 (got true)"),
    ({"text": "hi", "decoding_strategy": "sampling", "temperature": 0}, "temperature: must be > 0 for strategy"),
    ({"text": "hi", "top_p": 1.5}, "top_p: must be a number in (0, 1] (got 1.5)"),
    ({"text": "hi", "top_p": 0}, "top_p: must be a number in (0, 1] (got 0)"),
    ({"text": "hi", "top_k": 0}, "top_k: must be an integer >= 1 (got 0)"),
    ({"text": "hi", "seed": -3}, "seed: must be an integer >= 0 or null (got -3)"),
    ({"text": "hi", "seed": "abc"}, 'seed: must be an integer >= 0 or null (got "abc")'),
    ({"text": "hi", "stream": "yes"}, 'stream: must be true or false (got "yes")'),
    ({"text": "hi", "temprature": 1}, "unknown field 'temprature' (did you mean 'temperature'?); known fields: "
                                      "text, max_tokens"),
    ({"text": "hi", "max_tokens": 64}, "max_tokens too large: prompt length 1 + max_tokens 64 = 65 exceeds the "
                                       "context size n_ctx=64"),
    ({"text": "hi" + " hi" * 69}, "text: the prompt is 70 tokens, but the model's context is n_ctx=64 tokens"),
]


@pytest.mark.parametrize("body, message", BAD_CHAT)
def test_chat_bad_input_is_a_400_naming_the_field(client, leader, body, message):
    data = body if isinstance(body, bytes) else json.dumps(body)
    r = client.post("/chat", data=data, content_type="application/json")
    assert r.status_code == 400, r.data
    assert r.json["error"].startswith(message), r.json["error"]
    assert leader.calls == []                 # refused before the cluster did any work


def test_nan_is_refused_even_though_python_json_accepts_it(client):
    r = client.post("/chat", data='{"text": "hi", "temperature": NaN}', content_type="application/json")
    assert r.status_code == 400 and r.json["error"].startswith("temperature: must be a number >= 0")


def test_oversized_body_is_a_json_413(client):
    r = client.post("/chat", data=b"{" + b" " * (1 << 21) + b"}", content_type="application/json")
    assert r.status_code == 413 and "Too Large" in r.json["error"]


def test_a_request_the_leader_refuses_is_a_400_with_its_message(client, leader):
    leader.fail = ClientError("max_tokens too large: prompt length 60 + max_tokens 10 = 70 exceeds the context "
                              "size n_ctx=64; use max_tokens <= 4 or a shorter prompt", "invalid")
    r = client.post("/chat", json={"text": "Hello"})
    assert r.status_code == 400 and r.json["error"] == str(leader.fail)


# ---------------------------------------------------------------------------------------------
# Streaming


def test_chat_stream_sends_each_token_then_done(client, leader):
    leader.statuses = ["waiting for rank 2 to join"]
    r = client.post("/chat", json={"text": "Hello", "max_tokens": 4, "decoding_strategy": "greedy", "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    events = sse_events(r.data)
    assert events[0] == ("status", {"status": "waiting for rank 2 to join"})
    tokens = [data for name, data in events if name == "message"]
    assert tokens == [{"token": 15496, "text": "Hello"}, {"token": 995, "text": " world"}, {"token": 11, "text": ","},
                      {"token": 9387, "text": " distributed"}]
    name, done = events[-1]
    assert name == "done"
    assert done["response"] == "".join(t["text"] for t in tokens) == "Hello world, distributed"
    assert done["config"]["tokens_generated"] == 4 and done["config"]["decoding_strategy"] == "greedy"
    assert done["stats"]["tokens"] == 4 and done["stats"]["node_ms"] == NODE_MS
    assert done["stats"]["tokens_per_s"] is None or done["stats"]["tokens_per_s"] > 0


def test_chat_stream_ends_with_an_error_event_if_the_cluster_fails(client, leader):
    leader.fail = ClientError("rank 2 (pi1) did not come back within rejoin_grace_s=30s", "cluster")
    leader.fail_after = 2
    events = sse_events(client.post("/chat", json={"text": "Hello", "stream": True}).data)
    assert [name for name, _ in events] == ["message", "message", "error"]
    assert events[-1][1] == {"error": "rank 2 (pi1) did not come back within rejoin_grace_s=30s", "status": 503}


def test_the_end_of_text_token_ends_a_reply_without_showing_up(client, leader):
    leader.tokens = [(15496, "Hello"), (EOT, "<|endoftext|>")]
    r = client.post("/chat", json={"text": "Hello"})
    assert r.json["response"] == "Hello" and r.json["stats"]["finish_reason"] == "stop"


def test_a_browser_that_goes_away_hangs_up_on_the_leader(client, leader):
    leader.hang_after = 1
    r = client.post("/chat", json={"text": "Hello", "stream": True}, buffered=False)
    assert b'"token":15496' in next(r.response)
    r.close()                                            # what the server does when the socket dies
    (conn,) = leader.connections
    assert conn.closed.wait(5)


# ---------------------------------------------------------------------------------------------
# /config, /health, /reconnect


def test_config_lists_defaults_model_and_nodes(client):
    r = client.get("/config")
    assert r.status_code == 200
    c = r.json
    assert (c["max_tokens"], c["temperature"], c["top_k"], c["top_p"], c["active_strategy"]) == (50, 0.8, 50, 0.9,
                                                                                                 "top_p")
    assert c["strategies"]["top_k"] == {"temperature": 0.8, "top_k": 40, "top_p": 1.0}
    assert c["strategy_uses"]["greedy"] == []
    assert c["model"] == "fake-gpt2" and c["n_ctx"] == 64 and c["leader_up"] is True
    assert [(n["rank"], n["host"], n["layers"]) for n in c["nodes"]] == [(0, "mini1", [0, 3]), (1, "mini2", [4, 7]),
                                                                         (2, "pi1", [8, 11])]


def test_health_is_200_when_every_node_is_up(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json["ok"] is True
    assert r.json["leader"] == {"addr": "10.0.0.1:65432", "reachable": True, "authorized": True, "ready": True,
                                "model": "fake-gpt2"}
    assert [(n["rank"], n["host"], n["layers"], n["status"]) for n in r.json["nodes"]] == [
        (0, "mini1", [0, 3], "up"), (1, "mini2", [4, 7], "up"), (2, "pi1", [8, 11], "up")]
    assert r.json["nodes"][2]["last_seen_s"] == 0.7


def test_health_is_503_naming_the_node_that_is_down(client, leader):
    leader.nodes[2].update(status="down", last_seen_s=41.0)
    r = client.get("/health")
    assert r.status_code == 503 and r.json["ok"] is False
    assert r.json["error"] == "not ready: rank 2 (pi1) is down"
    assert r.json["nodes"][2]["last_seen_s"] == 41.0


def test_reconnect_redials_with_retries_and_reports(client, leader):
    r = client.post("/reconnect")
    assert r.status_code == 200
    assert r.json == {"ok": True, "leader": "10.0.0.1:65432", "model": "fake-gpt2", "ready": True, "nodes_up": 3,
                      "nodes": 3}
    assert leader.connections[-1].attempts == 3 and leader.connections[-1].closed.is_set()


@pytest.mark.parametrize("method, path, body", [
    ("post", "/chat", {"text": "Hello"}),
    ("post", "/chat", {"text": "Hello", "stream": True}),
    ("post", "/v1/completions", {"prompt": "Hello"}),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ("get", "/health", None),
    ("post", "/reconnect", None),
])
def test_leader_down_is_a_503_with_a_clear_message(client, leader, method, path, body):
    leader.down = True
    r = getattr(client, method)(path, json=body)
    assert r.status_code == 503 and r.mimetype == "application/json"
    message = r.json["error"]["message"] if path.startswith("/v1/") else r.json["error"]
    assert "leader at 10.0.0.1:65432 is unreachable" in message
    assert message.count("nanopipe serve --rank 0") == 1, message      # the hint once, not twice


def test_leader_down_still_serves_config_metrics_and_models(client, leader):
    leader.down = True
    c = client.get("/config")
    assert c.status_code == 200 and c.json["leader_up"] is False and c.json["nodes"] == []
    assert c.json["active_strategy"] == "top_p" and "unreachable" in c.json["leader_error"]
    m = client.get("/metrics")
    assert m.status_code == 200 and parse_metrics(m.get_data(as_text=True))[("nanopipe_leader_up", ())] == 0
    assert client.get("/v1/models").json["data"][0]["id"] == "gpt2"


def test_a_cluster_failure_without_streaming_is_a_503(client, leader):
    leader.fail = ClientError("rank 1 (mini2) did not come back within rejoin_grace_s=30s", "cluster")
    r = client.post("/chat", json={"text": "Hello"})
    assert r.status_code == 503 and "rank 1 (mini2)" in r.json["error"]


# ---------------------------------------------------------------------------------------------
# /metrics

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


def test_metrics_count_requests_tokens_times_and_nodes(client, leader):
    for stream in (False, True):
        client.post("/chat", json={"text": "Hello", "max_tokens": 3, "stream": stream})
    client.post("/chat", json={"text": ""})                                    # one invalid request
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    m = parse_metrics(r.get_data(as_text=True))
    assert m[("nanopipe_web_requests_total", (("route", "chat"),))] == 2
    assert m[("nanopipe_web_tokens_total", ())] == 6
    assert m[("nanopipe_web_errors_total", (("kind", "invalid"),))] == 1
    assert m[("nanopipe_web_ttft_seconds_count", ())] == 2                     # one first token per reply
    assert m[("nanopipe_web_time_per_token_seconds_count", ())] == 4           # and the gaps between the others
    assert m[("nanopipe_web_ttft_seconds_bucket", (("le", "+Inf"),))] == 2
    assert m[("nanopipe_node_compute_seconds_total", (("rank", "0"),))] == pytest.approx(2 * 6.0 / 1000)
    assert m[("nanopipe_node_transit_seconds_total", (("rank", "0"),))] == pytest.approx(2 * 2.0 / 1000)
    assert m[("nanopipe_node_compute_seconds_total", (("rank", "2"),))] == pytest.approx(2 * 4.0 / 1000)
    assert m[("nanopipe_node_rss_bytes", (("rank", "1"), ("host", "mini2")))] == int(300.5 * 1024 * 1024)
    assert m[("nanopipe_node_up", (("rank", "2"), ("host", "pi1")))] == 1
    assert m[("nanopipe_live_sessions", ())] == 1 and m[("nanopipe_leader_up", ())] == 1
    assert m[("nanopipe_leader_tokens_total", ())] == 99


def test_histogram_buckets_are_cumulative():
    m = WebMetrics()
    for v in (0.005, 0.01, 0.05, 3.0):          # 0.01 belongs in le="0.01": buckets are "less or equal"
        m.observe_token(v, first=True)
    got = parse_metrics(render_metrics(m, None))
    ttft = "nanopipe_web_ttft_seconds"
    assert [got[(f"{ttft}_bucket", (("le", le),))] for le in ("0.01", "0.1", "+Inf")] == [2, 3, 4]
    assert got[(f"{ttft}_sum", ())] == pytest.approx(3.065) and got[(f"{ttft}_count", ())] == 4


def test_each_app_has_its_own_metrics():
    """A registry per app: two apps in one process count apart, and neither touches the global one."""
    import prometheus_client
    a, b = WebMetrics(), WebMetrics()
    a.count_request("chat")
    assert parse_metrics(render_metrics(a, None))[("nanopipe_web_requests_total", (("route", "chat"),))] == 1
    assert parse_metrics(render_metrics(b, None))[("nanopipe_web_requests_total", (("route", "chat"),))] == 0
    assert prometheus_client.REGISTRY.get_sample_value("nanopipe_web_requests_total", {"route": "chat"}) is None


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible routes


def test_chat_template_by_hand():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Who are "}, {"type": "text", "text": "you?"}]}]
    assert chat_prompt(messages) == "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Who are you?\nAssistant:"


@pytest.mark.parametrize("fields, strategy", [
    ({"temperature": 0, "top_p": 0.5}, "greedy"),
    ({"temperature": 0.7, "top_p": 1, "top_k": 5}, "top_k"),
    ({"temperature": 0.7}, "sampling"),
    ({"top_p": 0.3}, "top_p"),
    ({}, "top_p"),                               # nothing given: the model's default strategy
])
def test_openai_fields_map_to_a_strategy(client, leader, fields, strategy):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **fields})
    assert r.status_code == 200, r.json
    p = leader.calls[0]["params"]
    assert p.strategy == strategy
    if "temperature" in fields and strategy != "greedy":
        assert p.temperature == fields["temperature"]
    assert infer_strategy(None, fields.get("temperature"), fields.get("top_k"), fields.get("top_p")) == (
        None if not fields else strategy)


def test_completions(client, leader):
    r = client.post("/v1/completions", json={"model": "fake-gpt2", "prompt": "Hello", "max_tokens": 2, "temperature": 0,
                                             "seed": 3})
    assert r.status_code == 200
    body = r.json
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "fake-gpt2"
    assert body["choices"] == [{"text": "Hello world", "index": 0, "finish_reason": "length", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert leader.calls[0]["params"].seed == 3


def test_completions_with_token_id_prompt_logprobs_and_echo(client, leader):
    r = client.post("/v1/completions", json={"prompt": [15496, 995], "max_tokens": 2, "logprobs": 2, "echo": True})
    assert r.status_code == 200
    choice = r.json["choices"][0]
    assert choice["text"] == "Hello world" + "Hello world"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hello", " world", "Hello", " world"]
    assert lp["token_logprobs"] == [None, -2.0, -1.0, -1.5]
    assert lp["top_logprobs"] == [None, None, {"Hello": -1.0, ".": -7.0}, {" world": -1.5, ".": -7.0}]
    assert lp["text_offset"] == [0, 5, 11, 16]
    assert leader.calls[0]["prompt"] == [15496, 995] and leader.calls[0]["top_logprobs"] == 2


def test_completions_stream_in_openai_chunks(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r.data)
    assert events[-1] == ("message", "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello world,"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_completions_use_the_template(client, leader):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/chat/completions", json={"model": "fake-gpt2", "messages": messages, "max_tokens": 2,
                                                  "logprobs": True, "top_logprobs": 1})
    assert r.status_code == 200
    assert get_tokenizer().decode(leader.calls[0]["prompt"]) == "System: Be brief.\nUser: Hi\nAssistant:"
    body = r.json
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello world"} and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [(c["token"], c["logprob"], [t["token"] for t in c["top_logprobs"]]) for c in content] == [
        ("Hello", -1.0, ["Hello"]), (" world", -1.5, [" world"])]
    assert body["usage"]["completion_tokens"] == 2


def test_chat_completions_stream_in_openai_chunks(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                  "stream": True})
    events = sse_events(r.data)
    assert events[-1] == ("message", "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": " world"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_stream_reports_a_cluster_failure_in_band(client, leader):
    leader.fail, leader.fail_after = ClientError("worker 1 stopped answering", "cluster"), 1
    events = sse_events(client.post("/v1/completions", json={"prompt": "Hello", "stream": True}).data)
    assert events[-2][1]["error"]["message"] == "worker 1 stopped answering" and events[-1][1] == "[DONE]"


def test_models(client):
    r = client.get("/v1/models")
    assert r.json == {"object": "list", "data": [{"id": "fake-gpt2", "object": "model", "created": 0,
                                                  "owned_by": "nanopipe", "root": "fake-gpt2"}]}


def test_models_lists_the_hub_name_as_an_alias_that_requests_may_use(leader):
    c = make_app(leader, MODEL_NAME="fake-gpt2", MODEL_ALIASES=("openai-community/gpt2",))
    assert [m["id"] for m in c.get("/v1/models").json["data"]] == ["fake-gpt2", "openai-community/gpt2"]
    r = c.post("/v1/completions", json={"model": "openai-community/gpt2", "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json["model"] == "fake-gpt2"      # the served name, not the alias


def test_an_unknown_model_is_a_404_model_not_found(client, leader):
    for path, body in [("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        r = client.post(path, json={"model": "no-such-model", **body})
        assert r.status_code == 404, r.json
        err = r.json["error"]
        assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error" and err["param"] == "model"
        assert '"no-such-model" does not exist' in err["message"] and '"fake-gpt2"' in err["message"]
    assert leader.calls == []


def test_completions_batch_of_prompts_gives_one_choice_each_in_prompt_order(client, leader):
    r = client.post("/v1/completions", json={"prompt": ["Hello", "Hi there"], "max_tokens": 2, "user": "u1"})
    assert r.status_code == 200, r.json
    tok = get_tokenizer()
    assert leader.connections[-1].batches[0]["prompts"] == [tok.encode("Hello"), tok.encode("Hi there")]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in r.json["choices"]] == [
        (0, "Hello world", "length"), (1, "Hello world", "length")]
    n_prompt = len(tok.encode("Hello")) + len(tok.encode("Hi there"))
    assert r.json["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 4, "total_tokens": n_prompt + 4,
                               "prompt_tokens_details": {"cached_tokens": 0}}


def test_completions_n_choices_per_prompt_with_derived_seeds(client, leader):
    r = client.post("/v1/completions", json={"prompt": [[15496], [995]], "n": 3, "best_of": 3, "max_tokens": 1,
                                             "temperature": 0.7, "seed": 5})
    assert r.status_code == 200, r.json
    batch = leader.connections[-1].batches[0]
    assert batch["prompts"] == [[15496]] * 3 + [[995]] * 3           # choice i*n + j: prompt i, choice j
    assert batch["seeds"] == [5, 6, 7, 5, 6, 7]                       # choice j samples with seed + j
    assert [c["index"] for c in r.json["choices"]] == list(range(6))
    assert r.json["usage"]["prompt_tokens"] == 2 and r.json["usage"]["completion_tokens"] == 6


def test_completions_batch_stream_chunks_carry_their_index(client):
    r = client.post("/v1/completions", json={"prompt": ["Hello", "Hi"], "max_tokens": 2, "stream": True,
                                             "stream_options": {"include_usage": True}})
    chunks = [data for _, data in sse_events(r.data)[:-1]]
    text = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] += ch["text"]
    assert text == {0: "Hello world", 1: "Hello world"}
    finals = [(ch["index"], ch["finish_reason"]) for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finals == [(0, "length"), (1, "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_scoring_only_echoes_the_prompt_with_logprobs_and_no_new_token(client, leader):
    r = client.post("/v1/completions", json={"prompt": [15496, 995, 11], "max_tokens": 0, "echo": True,
                                             "logprobs": 2})
    assert r.status_code == 200, r.json
    assert leader.connections[-1].batches[0]["score_only"] is True
    choice = r.json["choices"][0]
    assert choice["text"] == "Hello world,"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hello", " world", ","] and lp["token_logprobs"] == [None, -2.0, -2.0]
    assert lp["top_logprobs"] == [None, {" world": -2.0, ".": -3.0}, {",": -2.0, ".": -3.0}]
    assert r.json["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                               "prompt_tokens_details": {"cached_tokens": 0}}


def test_scoring_may_use_the_whole_context(client, leader):
    fits = client.post("/v1/completions", json={"prompt": [11] * 64, "max_tokens": 0, "echo": True})
    assert fits.status_code == 200, fits.json                                 # n_ctx is 64: nothing is generated
    too_long = client.post("/v1/completions", json={"prompt": [11] * 65, "max_tokens": 0, "echo": True})
    assert too_long.status_code == 400 and "n_ctx=64" in too_long.json["error"]["message"]
    generate = client.post("/v1/completions", json={"prompt": [11] * 64, "max_tokens": 1})
    assert generate.status_code == 400                                        # 64 + 1 token does not fit


def test_chat_reports_usage(client):
    r = client.post("/chat", json={"text": "Hello", "max_tokens": 2})
    assert r.json["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    events = sse_events(client.post("/chat", json={"text": "Hello", "max_tokens": 2, "stream": True}).data)
    assert events[-1][0] == "done" and events[-1][1]["usage"]["completion_tokens"] == 2


BAD_OPENAI = [
    ("/v1/completions", {}, "prompt", "prompt: must be a non-empty string or a list of token ids"),
    ("/v1/completions", {"prompt": ""}, "prompt", "prompt: give a non-empty prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt", "prompt[1]: give a non-empty prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [99999]]}, "prompt", "prompt[1]: must be a non-empty string"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt", "prompt[1]: must be a non-empty string"),
    ("/v1/completions", {"prompt": [1, 99999]}, "prompt", "prompt: must be a non-empty string or a list of token ids"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 4}, "n", "prompt/n: 5 prompt(s) x n=4 = 20 completions; at most 16"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, "n", "n: must be an integer >= 1"),
    ("/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 3}, "best_of", "best_of: only best_of == n"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, "suffix", "suffix: not supported"),
    ("/v1/completions", {"prompt": "Hi", "user": 5}, "user", "user: must be a string"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens", "max_tokens: 0 generates nothing"),
    ("/v1/completions", {"prompt": "Hi", "temprature": 0}, "temprature",
     "unknown field 'temprature' (did you mean 'temperature'?); known"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "n: only n=1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo",
     "unknown field 'echo'"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 9}, "logprobs", "logprobs: must be an integer in 0..5"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 1, "stream": True}, "logprobs", "logprobs/echo: not available"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "stop: must be a string or a list of up to 4 non-empty strings"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": list("abcde")}, "stop",
     "stop: must be a string or a list of up to 4 non-empty strings"),
    ("/v1/completions", {"prompt": "Hi", "frequency_penalty": 3}, "frequency_penalty",
     "frequency_penalty: must be a number in [-2, 2]"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"50256": -101}}, "logit_bias",
     "logit_bias: must be a number in [-100, 100]"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 0.5, "top_k": 5, "top_p": 0.5}, "top_p", "top_p: top_k=5"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, "temperature", "temperature: must be a number >= 0"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 2}, "top_p", "top_p: must be a number in (0, 1]"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 100}, "max_tokens", "max_tokens too large"),
    ("/v1/chat/completions", {}, "messages", "messages: give a non-empty list"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages: give a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages",
     'messages[0].role: must be system, user or assistant (got "robot")'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages",
     "messages[0].content: must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": 0}, "top_k",
     "top_k: must be an integer >= 1"),
]


@pytest.mark.parametrize("path, body, param, message", BAD_OPENAI)
def test_openai_bad_input_is_a_400_in_openai_shape(client, leader, path, body, param, message):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.data
    err = r.json["error"]
    assert err["message"].startswith(message), err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert leader.calls == []


# ---------------------------------------------------------------------------------------------
# CORS and the API token


def make_app(leader, **settings):
    return create_app({"CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": DEFAULTS, **settings}).test_client()


def test_cors_allows_only_configured_origins(leader):
    c = make_app(leader, CORS_ORIGINS=("https://chat.example",))
    ok = c.get("/config", headers={"Origin": "https://chat.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "Origin" in ok.headers["Vary"]
    other = c.get("/config", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers


def test_no_cors_by_default_and_never_a_wildcard(client):
    r = client.get("/config", headers={"Origin": "https://chat.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("origin", ["http://localhost:8080", "http://127.0.0.1:8080", "http://[::1]:3000",
                                    "http://localhost", "null"])
def test_cors_admits_this_machine_and_a_file_page_by_default(client, origin):
    """The page served by `python -m http.server` or opened as a file (Origin: null) reaches the API."""
    r = client.options("/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Credentials" not in r.headers
    r = client.post("/chat", json={"text": "Hi"}, headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("origin", ["http://localhost.evil.example", "https://localhost:8080", "http://10.0.0.5:8000",
                                    "https://evil.example"])
def test_other_origins_are_not_admitted_by_default(client, origin):
    r = client.get("/config", headers={"Origin": origin})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_configured_origins_replace_the_defaults(leader):
    c = make_app(leader, CORS_ORIGINS=("https://chat.example",))
    for origin in ("http://localhost:8080", "null"):
        assert c.post("/chat", json={"text": "Hi"}, headers={"Origin": origin}).status_code == 403


@pytest.mark.parametrize("path, body", [("/chat", '{"text": "Hi"}'), ("/v1/completions", '{"prompt": "Hi"}'),
                                        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}]}'),
                                        ("/reconnect", "{}")])
def test_a_cross_site_post_is_refused_before_it_runs(client, leader, path, body):
    """A form or fetch() on another site (text/plain needs no preflight) cannot make the cluster work."""
    r = client.post(path, data=body, content_type="text/plain", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403, r.data
    message = r.json["error"]["message"] if path.startswith("/v1/") else r.json["error"]
    assert "https://evil.example" in message and "cors_origins" in message
    assert leader.calls == [] and leader.connections == []
    # the same body from a program (no Origin) or from the app's own page is served
    assert client.post(path, data=body, content_type="text/plain").status_code == 200
    own = client.post(path, data=body, content_type="text/plain", headers={"Origin": "http://localhost"})
    assert own.status_code == 200


@pytest.mark.parametrize("path", ["/", "/app.js", "/style.css", "/static/app.js", "/config", "/chat"])
def test_every_answer_says_nosniff_and_the_page_may_not_be_framed(client, path):
    r = client.get(path) if path != "/chat" else client.post("/chat", json={"text": "Hi"})
    assert r.status_code == 200, (path, r.status_code)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    csp = dict(part.strip().split(" ", 1) for part in r.headers["Content-Security-Policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["script-src"] == "'self'" and csp["default-src"] == "'none'"


def test_preflight_needs_no_token_and_allows_the_authorization_header(leader):
    c = make_app(leader, CORS_ORIGINS=("https://chat.example",), API_TOKEN="s3cret")
    r = c.options("/chat", headers={"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert "POST" in r.headers["Access-Control-Allow-Methods"]


API_ROUTES = [("get", "/config", None), ("get", "/health", None), ("post", "/reconnect", None),
              ("get", "/metrics", None), ("post", "/chat", {"text": "Hello"}), ("get", "/v1/models", None),
              ("post", "/v1/completions", {"prompt": "Hello"}),
              ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]


@pytest.mark.parametrize("method, path, body", API_ROUTES)
def test_api_token_is_required_on_api_routes(leader, method, path, body):
    c = make_app(leader, API_TOKEN="s3cret")
    send = getattr(c, method)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = send(path, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        message = r.json["error"]["message"] if path.startswith("/v1/") else r.json["error"]
        assert "Authorization: Bearer <api_token>" in message
    assert send(path, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_page_is_served_without_the_token(leader):
    c = make_app(leader, API_TOKEN="s3cret")
    assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


# ---------------------------------------------------------------------------------------------
# Settings and the `nanopipe web` command


def test_settings_from_the_repository_configs():
    s = settings_from_configs(str(CONFIG_DIR))
    assert s["LEADER"] == "127.0.0.1:65432" and s["MODEL_NAME"] == "gpt2"
    assert s["MODEL_DEFAULTS"]["active_decoding_strategy"] == "top_p"
    assert s["CORS_ORIGINS"] == () and s["API_TOKEN"] is None


def test_web_command_serves_on_localhost_by_default(monkeypatch):
    import nanopipe.tools.cli
    import nanopipe.web.server
    from nanopipe.tools.cli import main
    seen = {}
    monkeypatch.setattr(nanopipe.web.server, "serve", lambda app, host, port, **kw: seen.update(
        host=host, port=port, app=app, **kw))
    # nothing is served here: whether port 8000 happens to be taken on this machine is not the question
    monkeypatch.setattr(nanopipe.tools.cli, "check_port_free", lambda host, port: None)
    r = CliRunner().invoke(main, ["web", "--config-dir", str(CONFIG_DIR)])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"], seen["grace_s"]) == ("127.0.0.1", 8000, 10.0)
    assert seen["app"].config["LEADER"] == "127.0.0.1:65432"
    assert "http://127.0.0.1:8000/" in r.output and "WARNING" not in r.output

    r = CliRunner().invoke(main, ["web", "--config-dir", str(CONFIG_DIR), "--host", "0.0.0.0", "--port", "9000",
                                  "--leader", "10.0.0.5:7000"])
    assert r.exit_code == 0 and (seen["host"], seen["port"]) == ("0.0.0.0", 9000)
    assert seen["app"].config["LEADER"] == "10.0.0.5:7000" and "without api_token" in r.output


def test_web_command_rejects_a_malformed_leader_address():
    from nanopipe.tools.cli import main
    r = CliRunner().invoke(main, ["web", "--config-dir", str(CONFIG_DIR), "--leader", "nohost"])
    assert r.exit_code == 1 and "--leader: address 'nohost' must be HOST:PORT" in r.output


# ---------------------------------------------------------------------------------------------
# Against a real local cluster: 3 processes on 127.0.0.1, the tiny synthetic model


@pytest.fixture(scope="module")
def live(cluster):
    app = create_app(settings_from_configs(cluster.config_dir, leader=cluster.leader_addr))
    return app.test_client()


def single_process_text(engine, prompt: str, max_tokens: int) -> str:
    from nanopipe.decoding import SamplingParams
    tok = get_tokenizer()
    ids = engine.generate(tok.encode(prompt), SamplingParams("greedy", max_tokens=max_tokens))["token_ids"]
    return tok.decode([t for t in ids if t != EOT])


def test_cluster_chat_equals_single_process_greedy(live, tiny_engine):
    prompt = "The three small computers on my desk"
    expected = single_process_text(tiny_engine, prompt, 12)
    r = live.post("/chat", json={"text": prompt, "max_tokens": 12, "decoding_strategy": "greedy"})
    assert r.status_code == 200, r.json
    assert r.json["response"] == expected and r.json["config"]["tokens_generated"] == 12
    assert sorted(r.json["stats"]["node_ms"]) == ["0", "1", "2"]

    events = sse_events(live.post("/chat", json={"text": prompt, "max_tokens": 12, "temperature": 0,
                                                 "stream": True}).data)
    assert "".join(d["text"] for name, d in events if name == "message") == expected
    assert events[-1][0] == "done" and events[-1][1]["response"] == expected


def test_cluster_openai_completion_equals_single_process_greedy(live, tiny_engine):
    r = live.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 6, "temperature": 0})
    assert r.json["choices"][0]["text"] == single_process_text(tiny_engine, "Hello world", 6)


def _stop_from(text: str) -> str:
    """A stop string that first occurs in `text` a few words in: two of its words."""
    words = text.split(" ")
    for i in range(2, len(words) - 2):
        stop = " " + " ".join(words[i:i + 2])
        if words[i] and words[i + 1] and "\ufffd" not in stop and text.index(stop) > 0:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


SEEDED = {"temperature": 1.0, "seed": 5}        # sampling: greedy on random weights repeats one word


def seeded_text(engine, prompt: str, max_tokens: int) -> str:
    from nanopipe.decoding import SamplingParams
    tok = get_tokenizer()
    ids = engine.generate(tok.encode(prompt), SamplingParams("sampling", max_tokens=max_tokens, **SEEDED))["token_ids"]
    return tok.decode([t for t in ids if t != EOT])


def test_cluster_completion_with_stop_ends_before_it(live, tiny_engine):
    # the curl request: {"prompt": "Hello", "max_tokens": 3, "stop": ["\n"]} used to be a 400
    r = live.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stop": ["\n"]})
    assert r.status_code == 200, r.json
    full = seeded_text(tiny_engine, "Hello world", 30)
    stop = _stop_from(full)
    r = live.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 30, **SEEDED,
                                           "stop": [stop, "never appears"]})
    choice = r.json["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop", (choice, stop)
    assert r.json["usage"]["completion_tokens"] < 30


def test_cluster_streamed_chat_with_stop_never_sends_the_stop_string(live, tiny_engine):
    from nanopipe.web.openai import chat_prompt
    messages = [{"role": "user", "content": "Tell me about the three computers"}]
    full = seeded_text(tiny_engine, chat_prompt(messages), 40)
    cut = full.split("\nUser:")[0]         # the chat route also stops at the template's next turn
    stop = _stop_from(cut)
    events = sse_events(live.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 40, **SEEDED, "stream": True, "stop": stop}).data)
    chunks = [d for _, d in events if isinstance(d, dict) and d.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == cut[:cut.index(stop)], (text, stop)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(stop in c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_chat_completions_stop_at_the_next_user_turn_by_default(client, leader):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and leader.calls[-1]["params"].stop == ("\nUser:",)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "stop": ["."]})
    assert r.status_code == 200 and leader.calls[-1]["params"].stop == ("\nUser:", ".")
    r = client.post("/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 200 and leader.calls[-1]["params"].stop == (), "completions add no stop of their own"


def test_chat_flag_uses_the_chat_template_and_stops_at_the_next_turn(client, leader):
    # the page sends chat: true, so its replies end where GPT-2 would invent the user's next line
    r = client.post("/chat", json={"text": "Hi", "chat": True, "stop": "."})
    assert r.status_code == 200, r.json
    call = leader.calls[-1]
    assert call["prompt"] == get_tokenizer().encode("User: Hi\nAssistant:")
    assert call["params"].stop == ("\nUser:", ".")
    r = client.post("/chat", json={"text": "Hi"})
    assert leader.calls[-1]["prompt"] == get_tokenizer().encode("Hi") and leader.calls[-1]["params"].stop == ()


@pytest.mark.parametrize("path, body", [
    ("/chat", {"text": "Hi"}),
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_penalties_bias_and_stop_reach_the_leader(client, leader, path, body):
    extra = {"stop": ["x"], "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.2,
             "logit_bias": {"50256": -100}}
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 200, r.json
    p = leader.calls[-1]["params"]
    assert "x" in p.stop and (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.logit_bias == ((50256, -100.0),)
    if path == "/chat":
        assert r.json["config"]["logit_bias"] == {"50256": -100.0} and r.json["config"]["stop"] == ["x"]


TURNS = ["Hi there", "Tell me about the three computers", "Why three?", "And the Raspberry Pis?", "How fast is it?",
         "Thanks"]


@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
def test_cluster_six_turn_chat_reuses_all_the_last_turn_computed(live, route):
    """A 6-turn greedy chat on the real cluster: each turn's cached_tokens covers the previous turn's
    prompt and reply (all but its last token, which no stage ever computed keys for)."""
    history, table, last = [{"role": "system", "content": f"A chat on {route}."}], [], None   # none cached yet
    for turn, text in enumerate(TURNS, 1):
        if route == "/chat":
            r = live.post("/chat", json={"text": text, "history": history, "temperature": 0, "max_tokens": 8})
            assert r.status_code == 200, r.json
            reply, usage = r.json["response"], r.json["usage"]
        else:
            r = live.post(route, json={"messages": history + [{"role": "user", "content": text}], "temperature": 0,
                                       "max_tokens": 8})
            assert r.status_code == 200, r.json
            reply, usage = r.json["choices"][0]["message"]["content"], r.json["usage"]
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        table.append(f"turn {turn}: prompt {prompt}, reply {completion}, cached {cached}"
                     + (f" (turn {turn - 1} computed {last[0]} + {last[1]})" if last else ""))
        if last:
            assert cached >= last[0] + last[1] - 1, "\n".join(table)
        last = (prompt, completion)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    print(f"{route}, greedy, max_tokens 8:\n" + "\n".join(table))


def test_cluster_health_lists_three_nodes(live, cluster):
    r = live.get("/health")
    assert r.status_code == 200 and r.json["ok"] is True
    nodes = r.json["nodes"]
    assert [(n["rank"], n["host"], n["status"]) for n in nodes] == [(0, "node0", "up"), (1, "node1", "up"),
                                                                    (2, "node2", "up")]
    assert nodes[0]["layers"][0] == 0 and nodes[-1]["layers"][1] == 3          # the 4 layers (0-3), split in 3
    m = parse_metrics(live.get("/metrics").get_data(as_text=True))
    assert all(m[("nanopipe_node_up", (("rank", str(r)), ("host", f"node{r}")))] == 1 for r in range(3))


def test_cluster_prompt_longer_than_the_context_is_a_400(live):
    r = live.post("/chat", json={"text": "word " * 200})
    assert r.status_code == 400 and "n_ctx=128" in r.json["error"]


def test_cluster_stops_generating_when_the_browser_goes_away(live, cluster):
    before = status(cluster)["tokens"]
    r = live.post("/chat", json={"text": "Hi", "max_tokens": 120, "stream": True}, buffered=False)
    assert b'"token"' in next(r.response)
    r.close()                                        # the web app hangs up; the leader cancels the session
    st = wait_status(cluster, lambda st: st["live_sessions"] == 0, 5, "the session cancelled")
    assert st["tokens"] - before < 120, "the leader generated the whole reply for nobody"


# ---------------------------------------------------------------------------------------------
# /chat with a conversation: history and conversation_id (prefix reuse makes sending it cheap)


def test_chat_history_sends_the_whole_conversation_in_the_chat_template(client, leader):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    r = client.post("/chat", json={"text": "Who?", "history": history, "conversation_id": "c1", "max_tokens": 4})
    assert r.status_code == 200, r.json
    call = leader.calls[-1]
    assert call["prompt"] == get_tokenizer().encode("User: Hi\nAssistant: Hello!\nUser: Who?\nAssistant:")
    assert call["params"].stop == ("\nUser:",), "a conversation's reply ends at the next user turn"
    assert r.json["conversation_id"] == "c1" and r.json["trimmed_turns"] == 0 and r.json["history_turns"] == 2
    assert {"prompt_tokens", "cached_tokens", "prefill_ms", "ttft_ms"} <= set(r.json["stats"])
    events = sse_events(client.post("/chat", json={"text": "Who?", "history": history, "stream": True,
                                                   "max_tokens": 4}).data)
    assert events[-1][0] == "done" and events[-1][1]["trimmed_turns"] == 0


def test_chat_history_is_trimmed_from_the_oldest_turn_to_fit_n_ctx(client, leader):
    # n_ctx is 64: the system line stays, the oldest turns go until prompt + max_tokens fit
    system = {"role": "system", "content": "Be brief."}
    old = [{"role": "user", "content": " ".join(["word"] * 20)},        # 68 tokens in all; without the
           {"role": "assistant", "content": " ".join(["word"] * 20)}]   # first turn 45, without both 22
    recent = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    r = client.post("/chat", json={"text": "Who?", "history": [system] + old + recent, "max_tokens": 20})
    assert r.status_code == 200, r.json
    prompt = leader.calls[-1]["prompt"]
    assert len(prompt) + 20 <= 64
    assert r.json["trimmed_turns"] == 2, r.json
    assert prompt == get_tokenizer().encode("System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Who?\nAssistant:")


@pytest.mark.parametrize("body, says", [
    ({"history": "Hi"}, "history: give a list"),
    ({"history": [{"role": "robot", "content": "x"}]}, "history[0]: must be"),
    ({"history": [{"role": "user", "content": 3}]}, "history[0]: must be"),
    ({"history": [], "conversation_id": ""}, "conversation_id: give a string"),
])
def test_chat_bad_history_is_a_400_naming_it(client, body, says):
    r = client.post("/chat", json={"text": "Hi", **body})
    assert r.status_code == 400 and says in r.json["error"], r.json


# ---------------------------------------------------------------------------------------------
# A chat's next turn starts with exactly the tokens the last turn computed, so the prefix cache
# reuses all of them: the reply as the model wrote it, not the text encoded again


REPLIES = {     # what the model wrote: (token id, text streamed); "" where a stop string holds the text back
    "space": [(262, " the"), (260, "re")],          # " there", which the tokenizer makes one token (612)
    "newline": [(628, "\n\n"), (464, "The")],       # "\n\nThe", which the tokenizer makes [198, 198, 464]
    "stop": [(17867, " Fine"), (13, "."), (198, ""), (12982, ""), (25, "")],    # ended at "\nUser:"
    "no space": [(15496, "Hello"), (995, " world")],  # right after "Assistant:", no space between
}


def chat_turn(client, route: str, history: list, text: str) -> str:
    """One turn on `route`, the way its clients send it; returns the reply's text."""
    if route == "/chat":
        r = client.post("/chat", json={"text": text, "chat": True, "history": history, "max_tokens": 10})
        assert r.status_code == 200, r.json
        return r.json["response"]
    messages = history + [{"role": "user", "content": text}]
    r = client.post(route, json={"messages": messages, "max_tokens": 10})
    assert r.status_code == 200, r.json
    return r.json["choices"][0]["message"]["content"]


@pytest.mark.parametrize("reply", sorted(REPLIES))
@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
def test_a_chats_next_turn_starts_with_the_tokens_the_last_one_computed(client, leader, route, reply):
    leader.tokens = REPLIES[reply]
    history = [{"role": "system", "content": "Be brief."}]
    content = chat_turn(client, route, history, "Hi")
    assert content == "".join(piece for _, piece in REPLIES[reply])
    computed = leader.calls[-1]["prompt"] + [t for t, _ in REPLIES[reply]]
    history += [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
    chat_turn(client, route, history, "And then?")
    prompt = leader.calls[-1]["prompt"]
    assert prompt[:len(computed)] == computed, (prompt, computed)
    transcripts = client.application.extensions["nanopipe"].transcripts
    text = chat_prompt(history + [{"role": "user", "content": "And then?"}], transcripts)
    assert get_tokenizer().decode(prompt) == text and "\nAssistant:" + content + "\nUser: And then?" in text


def test_chat_template_puts_no_second_space_before_a_reply_that_has_one():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello!"},
                {"role": "user", "content": "\nA poem"}, {"role": "assistant", "content": "\nRoses"}]
    assert chat_prompt(messages) == "User: Hi\nAssistant: Hello!\nUser:\nA poem\nAssistant:\nRoses\nAssistant:"


def test_transcripts_keep_the_longest_prefix_and_forget_the_oldest():
    from nanopipe.web.api import Transcripts
    tok = get_tokenizer()
    kept = Transcripts(max_entries=2)
    kept.remember("User: Hi", [1, 2])
    kept.remember("User: Hi\nAssistant: there", [1, 2, 3, 262, 260])
    assert kept.encode("User: Hi\nAssistant: there\nUser: x", tok) == [1, 2, 3, 262, 260] + tok.encode("\nUser: x")
    assert kept.encode("User: Hi!", tok) == [1, 2] + tok.encode("!")
    assert kept.encode("Other", tok) == tok.encode("Other")
    kept.remember("Third", [9])                      # the least recently used ("...there") goes
    assert kept.encode("User: Hi\nAssistant: there", tok) == [1, 2] + tok.encode("\nAssistant: there")


class CountingTokenizer:
    """The tokenizer, counting the characters it is asked to encode."""

    def __init__(self):
        self.tok, self.chars = get_tokenizer(), 0

    def encode(self, text):
        self.chars += len(text)
        return self.tok.encode(text)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_long_history_is_trimmed_in_one_pass(leader):
    """Trimming encodes each message about once, not the whole conversation once per dropped turn."""
    counting = CountingTokenizer()
    app = create_app({"CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": DEFAULTS, "TOKENIZER": counting})
    history = [{"role": ("user", "assistant")[i % 2], "content": f"turn number {i} of many"} for i in range(600)]
    r = app.test_client().post("/chat", json={"text": "Who?", "history": history, "max_tokens": 20})
    assert r.status_code == 200, r.json
    assert r.json["trimmed_turns"] > 590 and len(leader.calls[-1]["prompt"]) + 20 <= leader.n_ctx
    size = len(chat_prompt(history + [{"role": "user", "content": "Who?"}]))
    assert counting.chars < 3 * size, f"encoded {counting.chars} characters for a {size}-character conversation"


@pytest.mark.parametrize("route, many, says", [
    ("/chat", {"history": [{"role": "user", "content": "x"}] * 1001}, "history: 1001 messages; at most 1000"),
    ("/chat", {"history": [{"role": "user", "content": "x" * 1000}] * 300}, "history: 300000 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 1001}, "messages: 1001 messages"),
])
def test_a_conversation_too_big_is_a_400_saying_the_limit(client, route, many, says):
    r = client.post(route, json={"text": "Hi", **many} if route == "/chat" else many)
    assert r.status_code == 400
    message = r.json["error"] if route == "/chat" else r.json["error"]["message"]
    assert says in message and "at most" in message, message


def test_trimming_keeps_the_first_message_whole_when_the_parts_fit(leader):
    """The model's own tokens (kept) make the prompt one token longer than its messages encoded
    apart: too long whole, it fits counted apart, so nothing is left out and nothing is cut."""
    from nanopipe.web.api import Transcripts
    from nanopipe.web.chat import conversation_ids
    tok = get_tokenizer()
    kept = Transcripts()
    said = "User: Hi\nAssistant:"
    kept.remember(said + " there", tok.encode(said) + [262, 260])       # " the" + "re", not " there"
    app = create_app({"CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": DEFAULTS})
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " there"}]
    with app.app_context():
        whole, _ = conversation_ids(history, "Who?", 0, None, kept)
        ids, left_out = conversation_ids(history, "Who?", 1, len(whole), kept)
    assert left_out == 0 and tok.decode(ids) == tok.decode(whole) and len(ids) == len(whole) - 1
