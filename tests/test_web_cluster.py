"""The web app against a real local cluster: 3 processes on 127.0.0.1, the tiny synthetic model;
its answers equal a single process's."""
from __future__ import annotations

import pytest
from helpers import EOT, parse_metrics, sse_events, status, wait_status

from nanopipe.tokenizer import get_tokenizer
from nanopipe.web.app import create_app, settings_from_configs

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
