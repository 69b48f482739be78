"""The web app's page and POST /chat: answers, streaming, conversations (web/chat.py, api.py).

The fake leader (helpers.FakeLeader, fixtures `leader`, `app`, `client` in conftest.py) stands in for
the cluster behind the app's CLIENT_FACTORY: it streams scripted tokens, answers status, and can be
switched to "down", "fails mid-reply" or "refuses the request", so each error path is checked without
starting processes.
"""
from __future__ import annotations

import json

import pytest
from helpers import DEFAULTS, EOT, NODE_MS, sse_events

from nanopipe.cluster.leader_client import ClientError
from nanopipe.tokenizer import get_tokenizer
from nanopipe.web.app import create_app
from nanopipe.web.openai import chat_prompt

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
