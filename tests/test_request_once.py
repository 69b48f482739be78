"""A request is parsed once at the edge and validated once on each side of the wire.

The web app parses a route's body into a typed request carrying its final SamplingParams (without
dialing the leader), checks once that the prompt fits the leader's context, and sends it. The leader
checks whatever arrives (any client may send anything) with sampling_params.check_request, the very
function an in-process Scheduler.check runs: one validation each, and one wording for "does not fit".
"""
from __future__ import annotations

import threading

import pytest
from helpers import DEFAULTS, FakeLeader, wait_until

from nanopipe.cluster.leader_client import ClientError, LeaderClient
from nanopipe.sampling_params import DecodingError, SamplingParams, request_params
from nanopipe.web.app import create_app
from nanopipe.web.chat import parse_chat
from nanopipe.web.openai import CHAT_STOP, parse_chat_completion, parse_completion


@pytest.fixture
def validations(monkeypatch) -> list:
    """Every SamplingParams.validate call from now on, as the params it was called on."""
    calls: list = []
    real = SamplingParams.validate

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(SamplingParams, "validate", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# the web app


def refuse_to_dial(*args, **kwargs):
    raise AssertionError("parsing a body dialed the leader")


@pytest.mark.parametrize("parse, body, sent", [
    (lambda b: parse_chat(b, DEFAULTS), {"text": "Hi", "temperature": 0.8, "top_k": 40, "max_tokens": 7},
     dict(temperature=0.8, top_k=40, max_tokens=7)),
    (lambda b: parse_chat(b, DEFAULTS), {"text": "Hi", "chat": True, "stop": "."},
     dict(stop=[CHAT_STOP, "."])),
    (lambda b: parse_completion(b, DEFAULTS, 16), {"prompt": "Hi", "temperature": 0, "max_tokens": 3},
     dict(temperature=0, max_tokens=3)),
    (lambda b: parse_chat_completion(b, DEFAULTS), {"messages": [{"role": "user", "content": "Hi"}], "top_p": 0.5},
     dict(top_p=0.5, stop=[CHAT_STOP])),
], ids=["chat", "chat-template", "completions", "chat-completions"])
def test_each_route_parses_its_body_once_into_final_params_without_the_leader(parse, body, sent):
    app = create_app({"TESTING": True, "CLIENT_FACTORY": refuse_to_dial, "MODEL_DEFAULTS": DEFAULTS})
    with app.test_request_context("/"):
        req = parse(body)
    assert req.params == request_params(DEFAULTS, **sent), req.params


def test_the_web_app_validates_a_chat_request_once(validations):
    """/chat's fields are checked as its body is parsed, and the context once the leader's n_ctx is
    known (sampling_params.check_fits): the params are validated once, not again on the way out."""
    leader = FakeLeader()
    client = create_app({"TESTING": True, "CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": DEFAULTS}).test_client()
    r = client.post("/chat", json={"text": "Hello", "temperature": 0.8, "top_k": 40, "max_tokens": 3,
                                   "stop": "x", "logit_bias": {"50256": -100}})
    assert r.status_code == 200, r.json
    assert len(validations) == 1, f"validated {len(validations)} times: {validations}"
    assert len(leader.calls) == 1 and leader.calls[0]["params"] == request_params(
        DEFAULTS, temperature=0.8, top_k=40, max_tokens=3, stop="x", logit_bias={"50256": -100})


def test_a_prompt_too_long_is_refused_in_the_same_words_by_the_web_app_and_the_engine(tiny_engine):
    """One rule, one message: the web app (before it sends) and the engine (whatever reaches it)."""
    n_ctx = tiny_engine.config.n_ctx
    with pytest.raises(DecodingError) as engine_err:
        tiny_engine.generate([464] * n_ctx, SamplingParams("greedy", max_tokens=5))
    leader = FakeLeader()
    leader.n_ctx = n_ctx
    client = create_app({"TESTING": True, "CLIENT_FACTORY": leader.connect, "MODEL_DEFAULTS": DEFAULTS}).test_client()
    r = client.post("/chat", json={"text": " The" * n_ctx, "max_tokens": 5})       # " The" is one token: 464
    assert r.status_code == 400 and r.json["error"].startswith("text: "), r.json
    web_words = r.json["error"].removeprefix("text: ")
    assert str(engine_err.value) == f"prompt: {web_words}", (str(engine_err.value), web_words)
    assert engine_err.value.field == "prompt" and f"the prompt is {n_ctx} tokens" in web_words
    assert leader.calls == []


# ---------------------------------------------------------------------------------------------
# the leader, over its socket


@pytest.fixture
def live_leader(tiny_weights, tmp_path):
    """A one-node leader in this process (so a test can count what it calls), served on its port."""
    from nanopipe.cluster.leader import Leader
    from nanopipe.config import load_cluster_config, load_model_config
    from nanopipe.tools.localcluster import write_configs
    from nanopipe.weights import load_stage

    write_configs(str(tmp_path), weights=tiny_weights, nodes=1, n_layer=4)
    cc = load_cluster_config(str(tmp_path))
    stage = load_stage(tiny_weights)
    leader = Leader(cc, load_model_config(str(tmp_path)), stage, [(0, stage.config.n_layer)], log_fn=lambda *a: None)
    threading.Thread(target=leader.serve_forever, daemon=True, name="leader").start()
    addr = f"{cc.leader.ip}:{cc.leader.port}"

    def dial():
        try:
            return LeaderClient.connect(addr, token=cc.auth_token)
        except ClientError:
            return None
    client = wait_until(f"the leader to listen on {addr}", dial, timeout=30)
    yield leader, client
    client.close()
    leader.shutdown()


def test_the_leader_validates_a_generate_once(live_leader, validations):
    leader, client = live_leader
    result = client.generate([15496, 995], None, temperature=0.8, top_k=5, max_tokens=2, seed=3, stop=["zzz"])
    assert len(result["token_ids"]) == 2
    assert len(validations) == 1, f"the leader validated {len(validations)} times: {validations}"


@pytest.mark.parametrize("fields, field, words", [
    ({"temperature": -1}, "temperature", "temperature: must be a number >= 0"),
    ({"top_k": 3, "top_p": 0.5}, "top_p", "a strategy uses one of them"),
    ({"max_tokens": 100}, "max_tokens", "max_tokens too large: prompt length 40 + max_tokens 100"),
    ({"logit_bias": {"50257": 1}}, "logit_bias", 'logit_bias: "50257" is not a token id (0..50256)'),
], ids=["range", "conflict", "context", "vocabulary"])
def test_the_leader_checks_what_any_client_sends(live_leader, fields, field, words):
    """A client other than the web app (or one that lies) meets the same check on the leader."""
    leader, client = live_leader
    with pytest.raises(ClientError) as e:
        client.generate([464] * 40, None, **fields)
    assert e.value.kind == "invalid" and e.value.field == field and words in str(e.value), str(e.value)


def test_the_engine_validates_a_request_once(tiny_engine, validations):
    """In one process too: Engine.generate checks through Scheduler.check alone (check_request)."""
    out = tiny_engine.generate([464, 3290], SamplingParams("top_k", temperature=0.8, top_k=5, max_tokens=2, seed=1,
                                                           stop="zzz"))
    assert len(out["token_ids"]) == 2
    assert len(validations) == 1, f"validated {len(validations)} times: {validations}"
