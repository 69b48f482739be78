"""The web app's OpenAI-compatible routes (web/openai.py), and the sampling fields every route passes on.

The fake leader (helpers.FakeLeader, fixtures `leader`, `app`, `client` in conftest.py) stands in for
the cluster behind the app's CLIENT_FACTORY: it streams scripted tokens, answers status, and can be
switched to "down", "fails mid-reply" or "refuses the request", so each error path is checked without
starting processes.
"""
from __future__ import annotations

import pytest
from helpers import make_app, sse_events

from nanopipe.cluster.leader_client import ClientError
from nanopipe.decoding import infer_strategy
from nanopipe.tokenizer import get_tokenizer
from nanopipe.web.openai import chat_prompt

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
# Stop strings, penalties and bias reach the leader from every route


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
