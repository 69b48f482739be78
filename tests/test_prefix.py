"""Prefix reuse (nanopipe/prefix.py): a finished session's KV cache stays on every stage, and a new
request that starts the same way prefills only the rest.

Reuse is a different batching of the same computation (the kept positions were computed in
other chunks than a full prefill would use), so float results may move by rounding: greedy tokens
must be identical, logprobs within 1e-4 (the largest difference is printed). The reference is the
same model with reuse off (prefix_cache_bytes=0), i.e. every prompt prefilled in full.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pytest
from helpers import status

from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.model import KVCache
from nanopipe.prefix import PrefixCache, common_prefix, fork_cache
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

SHAPE = dict(n_layer=7, n_embd=64, n_head=4, n_ctx=256)     # 3 nodes: layers 3, 2, 2
HEARTBEAT_S = 0.2
READY_S = 30
GREEDY = SamplingParams("greedy", max_tokens=10)
SEEDED = SamplingParams("sampling", temperature=0.9, max_tokens=10, seed=7)
SYSTEM = list(range(300, 340))                              # a 40-token "system prompt" chats share


def turns(first: list, n: int, params, run) -> list:
    """A conversation of n turns: each prompt is the previous prompt + its reply + 3 new tokens."""
    prompt, out = list(first), []
    for i in range(n):
        r = run(prompt, params)
        out.append(r)
        prompt = prompt + r["token_ids"] + [1000 + 10 * i, 1001 + 10 * i, 1002 + 10 * i]
    return out


def assert_close(got: dict, want: dict, what: str):
    assert got["token_ids"] == want["token_ids"], \
        f"{what}: with reuse {got['token_ids']}, without {want['token_ids']}"
    diff = float(np.max(np.abs(np.subtract(got["logprobs"], want["logprobs"]))))
    assert diff <= 1e-4, f"{what}: logprobs differ with and without reuse by up to {diff:.3g}"


# ---------------------------------------------------------------------------------------------
# the index, by hand


def test_common_prefix_worked_examples():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([9], [1]) == 0
    assert common_prefix([], [1]) == 0


def filled(n: int, value: float, n_ctx: int = 256) -> KVCache:
    c = KVCache(2, 2, 4, n_ctx)
    c.reserve(n)
    c.k[:, :, :n] = value
    c.v[:, :, :n] = -value
    c.length = n
    return c


def test_fork_copies_the_first_n_positions_and_leaves_the_source():
    src = filled(10, 1.0)
    src.k[:, :, 5:10] = 2.0
    new = fork_cache(src, 5)
    assert new.length == 5 and np.all(new.k[:, :, :5] == 1.0) and np.all(new.v[:, :, :5] == -1.0)
    new.k[:, :, :5] = 7.0
    assert np.all(src.k[:, :, :5] == 1.0) and src.length == 10, "the fork wrote into the kept cache"
    with pytest.raises(ValueError, match="cannot fork 11 positions of a cache holding 10"):
        fork_cache(src, 11)


def test_match_takes_the_longest_prefix_and_always_leaves_one_token():
    one_pos = 2 * 2 * 2 * 4 * 4                 # bytes of one position in filled(): L=2, H=2, D=4, k and v
    pc = PrefixCache([(one_pos, 1 << 30)])
    pc.keep("a", [1, 2, 3], filled(3, 1.0))
    pc.keep("b", [1, 2, 9, 9, 9], filled(5, 1.0))
    assert pc.match([1, 2, 9, 9, 9, 4]) == ("b", 5)
    assert pc.match([1, 2, 3, 4]) == ("a", 3)
    assert pc.match([1, 2, 3]) == ("a", 2), "a prompt equal to a kept sequence must recompute its last token"
    assert pc.match([5, 6]) == (None, 0)


def test_keep_drops_covered_caches_and_evicts_least_recently_used_over_budget():
    per = 100                                   # bytes per position; a cache's capacity is 128 positions
    pc = PrefixCache([(per, 2 * 128 * per)])    # room for two caches
    assert pc.keep("a", [1, 2], filled(2, 1.0)) == []
    assert pc.keep("b", [5, 6], filled(2, 1.0)) == []
    assert pc.keep("a2", [1, 2, 3, 4], filled(4, 1.0)) == ["a"], "a's tokens are a prefix of a2's: drop it"
    pc.match([5, 6, 7])                         # b is now the most recently used
    assert pc.keep("c", [8, 9], filled(2, 1.0)) == ["a2"]
    assert list(pc.kept) == ["b", "c"] and pc.stats["evictions"] == 1
    assert pc.keep("d", [7, 7], filled(2, 1.0), pinned={"b"}) == ["c"], "a pinned cache must stay"
    assert pc.used_bytes() == [2 * 128 * per]
    tiny = PrefixCache([(per, 128 * per - 1)])  # not even one cache fits: nothing is kept
    assert tiny.keep("x", [1], filled(1, 1.0)) == ["x"] and not tiny.kept


# ---------------------------------------------------------------------------------------------
# one process


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("prefix") / "tiny7.safetensors")
    init_weights(path, **SHAPE, seed=0)
    return path


@pytest.fixture(scope="module")
def full_prefill(weights):
    """The same model with reuse off: every prompt prefilled from position 0."""
    engine = Engine.load(weights)
    engine = Engine(engine.stage, prefix_cache_bytes=0)
    return lambda prompt, params: engine.generate(list(prompt), params)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded sampling"])
def test_engine_multi_turn_reuses_the_conversation_and_answers_the_same(weights, full_prefill, params):
    engine = Engine.load(weights)
    got = turns(SYSTEM, 4, params, lambda p, sp: engine.generate(p, sp))
    want = turns(SYSTEM, 4, params, full_prefill)
    assert got[0]["cached_tokens"] == 0
    for i in range(1, 4):
        # turn i's prompt = turn i-1's prompt + reply + 3 tokens; the kept cache holds the prompt
        # and every reply token but the last (sampled, never fed)
        prev = got[i - 1]
        assert got[i]["cached_tokens"] == prev["prompt_tokens"] + len(prev["token_ids"]) - 1, f"turn {i + 1}"
        assert got[i]["prompt_tokens"] == want[i]["prompt_tokens"]
        assert_close(got[i], want[i], f"turn {i + 1}")
    assert engine.scheduler.stats["prompt_tokens_cached"] == sum(r["cached_tokens"] for r in got)
    assert len(engine.scheduler.prefix.kept) == 1, "each turn's cache covers the one before: only the last stays"


def test_engine_echo_prefills_in_full(weights):
    engine = Engine.load(weights)
    engine.generate(SYSTEM, GREEDY)
    r = engine.generate(SYSTEM + [5, 6], GREEDY, echo=True)
    assert r["cached_tokens"] == 0 and len(r["prompt_logprobs"]) == len(SYSTEM) + 1


# ---------------------------------------------------------------------------------------------
# a real local cluster: 3 nodes, layers 3, 2, 2


def wait_agree(cl, timeout: float = 5) -> dict:
    """Wait until every worker holds exactly the caches the leader keeps (and no live session):
    neither side holds a cache the other thinks is gone. Reports read after 3 heartbeats were sent
    after the last generation ended."""
    time.sleep(3 * HEARTBEAT_S)
    deadline = time.time() + timeout
    while True:
        st = status(cl)
        ws = [n for n in st["nodes"] if n["rank"] > 0]
        if st["live_sessions"] == 0 and all(n["sessions"] == st["prefix_kept"] for n in ws):
            return st
        if time.time() > deadline:
            raise AssertionError(f"workers' caches never matched the leader's index:\n{json.dumps(st, indent=1)}")
        time.sleep(0.05)


def generate(cl, prompt, params) -> dict:
    with cl.client() as c:
        return c.generate(list(prompt), params)


@pytest.fixture(scope="module")
def cluster(weights):
    with LocalCluster(weights, ready_timeout=READY_S, nodes=3, cluster_extra={"heartbeat_s": HEARTBEAT_S}) as cl:
        yield cl


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded sampling"])
def test_cluster_multi_turn_reuses_every_stage_and_answers_the_same(cluster, full_prefill, params):
    before = status(cluster)
    first = [7, 8, 9] + SYSTEM if params is GREEDY else [4, 5] + SYSTEM     # not a prefix of the other test's
    got = turns(first, 4, params, lambda p, sp: generate(cluster, p, sp))
    want = turns(first, 4, params, full_prefill)
    for i in range(4):
        assert_close(got[i], want[i], f"turn {i + 1}")
    assert [r["cached_tokens"] > 0 for r in got] == [False, True, True, True], [r["cached_tokens"] for r in got]
    st = wait_agree(cluster)
    assert st["prompt_tokens_cached"] - before["prompt_tokens_cached"] == sum(r["cached_tokens"] for r in got)
    assert st["prompt_tokens_computed"] - before["prompt_tokens_computed"] == \
        sum(r["prompt_tokens"] - r["cached_tokens"] for r in got)


def test_cluster_prefix_shared_by_two_concurrent_chats(cluster, full_prefill):
    seed_run = generate(cluster, [1, 2] + SYSTEM, GREEDY)         # leaves the shared start on every stage
    chats = [[1, 2] + SYSTEM + [50, 51, 52], [1, 2] + SYSTEM + [60, 61]]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def run(i):
        try:
            with cluster.client() as c:
                barrier.wait(10)
                results[i] = c.generate(chats[i], GREEDY)
        except Exception as e:      # re-raised in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seed_run["cached_tokens"] == 0
    for i in range(2):
        assert results[i]["cached_tokens"] == len(SYSTEM) + 2, f"chat {i} did not reuse the shared start"
        assert_close(results[i], full_prefill(chats[i], GREEDY), f"concurrent chat {i}")
    wait_agree(cluster)


def test_cluster_evicts_under_memory_pressure(weights, full_prefill):
    # rank 0 holds 3 layers: one position is 3 * 2 * 64 * 4 = 1536 bytes, and a cache of < 128
    # positions has capacity 128: 192 KiB. 0.3 MB holds one such cache, not two.
    extra = {"heartbeat_s": HEARTBEAT_S, "prefix_cache_mb": 0.3}
    with LocalCluster(weights, ready_timeout=READY_S, nodes=3, cluster_extra=extra) as cl:
        a1 = generate(cl, [11] + SYSTEM, GREEDY)
        b1 = generate(cl, [12] + SYSTEM, GREEDY)                  # evicts a's cache
        st = wait_agree(cl)
        assert st["prefix_kept"] == 1 and st["prefix_evictions"] >= 1, st
        a2_prompt = [11] + SYSTEM + a1["token_ids"] + [70]
        a2 = generate(cl, a2_prompt, GREEDY)
        assert a2["cached_tokens"] == 0, "a's cache was evicted, yet a's second turn reused something"
        assert_close(a2, full_prefill(a2_prompt, GREEDY), "after eviction")
        b2_prompt = [12] + SYSTEM + b1["token_ids"] + [71]
        b2 = generate(cl, b2_prompt, GREEDY)                      # b's cache went when a2 was kept
        assert b2["cached_tokens"] == 0
        a3_prompt = a2_prompt + a2["token_ids"] + [72]
        a3 = generate(cl, a3_prompt, GREEDY)
        assert a3["cached_tokens"] == 0
        st = wait_agree(cl)
        assert st["prefix_kept"] == 1


def test_cluster_worker_killed_between_turns_falls_back_to_full_prefill(weights, full_prefill):
    with LocalCluster(weights, ready_timeout=READY_S, nodes=3, cluster_extra={"heartbeat_s": HEARTBEAT_S}) as cl:
        t1 = generate(cl, [13] + SYSTEM, GREEDY)
        wait_agree(cl)
        cl.kill_rank(2, signal.SIGKILL)
        deadline = time.time() + 10
        while status(cl)["ready"]:              # the leader sees the control link close at once
            assert time.time() < deadline, "the leader never noticed rank 2 was killed"
            time.sleep(0.05)
        cl.start_rank(2)
        cl.wait_ready(READY_S)
        p2 = [13] + SYSTEM + t1["token_ids"] + [80]
        t2 = generate(cl, p2, GREEDY)
        assert t2["cached_tokens"] == 0, "the restarted worker lost its caches: turn 2 must prefill in full"
        assert_close(t2, full_prefill(p2, GREEDY), "turn 2 after the worker restart")
        p3 = p2 + t2["token_ids"] + [81]
        t3 = generate(cl, p3, GREEDY)
        assert t3["cached_tokens"] == len(p2) + len(t2["token_ids"]) - 1, "turn 3 should reuse turn 2 again"
        assert_close(t3, full_prefill(p3, GREEDY), "turn 3")
        wait_agree(cl)


def test_openai_chat_reports_cached_tokens_and_metrics_count_them(cluster):
    from nanopipe.web.app import create_app
    app = create_app({"LEADER": cluster.leader_addr, "LEADER_TOKEN": None,
                      "MODEL_DEFAULTS": status(cluster)["defaults"]})
    web = app.test_client()
    messages = [{"role": "system", "content": "You answer about boats, rivers and the sea, briefly."},
                {"role": "user", "content": "What floats?"}]
    first = web.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert first.status_code == 200, first.json
    assert first.json["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    messages += [{"role": "assistant", "content": first.json["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And what sinks?"}]
    second = web.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert second.status_code == 200, second.json
    usage = second.json["usage"]
    # the system line and the first question at least (the reply's re-tokenized text may differ)
    assert first.json["usage"]["prompt_tokens"] <= usage["prompt_tokens_details"]["cached_tokens"] \
        < usage["prompt_tokens"], usage
    metrics = web.get("/metrics").get_data(as_text=True)
    line = next(ln for ln in metrics.splitlines() if ln.startswith("nanopipe_leader_prompt_tokens_cached_total "))
    assert float(line.split()[1]) >= usage["prompt_tokens_details"]["cached_tokens"], line


def test_openai_completions_batch_reports_cached_tokens(cluster):
    """A batch of prompts (and n > 1) reports prompt_tokens_details.cached_tokens too, each prompt
    counted once: a second batch that extends the first batch's prompts reuses their caches."""
    from nanopipe.web.app import create_app
    app = create_app({"LEADER": cluster.leader_addr, "LEADER_TOKEN": None,
                      "MODEL_DEFAULTS": status(cluster)["defaults"]})
    web = app.test_client()
    a, b = [15496, 995, 11, 314, 716], [464, 1893, 286, 262, 995, 318]
    first = web.post("/v1/completions", json={"prompt": [a, b], "max_tokens": 2, "temperature": 0})
    assert first.status_code == 200, first.json
    assert first.json["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}, first.json["usage"]
    second = web.post("/v1/completions", json={"prompt": [a + [257], b + [257]], "max_tokens": 2, "temperature": 0,
                                               "n": 2, "seed": 3})
    assert second.status_code == 200, second.json
    usage = second.json["usage"]
    assert usage["prompt_tokens"] == len(a) + len(b) + 2, usage
    # each prompt's first batch left its cache (prompt + 2 generated tokens, the last one never fed):
    # the extended prompt reuses at least the old prompt, at most all but its last token
    assert len(a) + len(b) <= usage["prompt_tokens_details"]["cached_tokens"] <= len(a) + len(b), usage


def test_trace_then_shows_the_reused_prefix(cluster):
    from nanopipe.tools.trace import format_trace, run_trace
    report = run_trace("The river ran past the old mill and", leader=cluster.leader_addr, max_tokens=3,
                       then=" then the boat", log=lambda _msg: None)
    n = len(report["prompt_ids"])
    assert 0 < report["cached_tokens"] < n, report["cached_tokens"]
    first = report["tokens"][0]["hops"][0]["shape"][0]
    assert first <= n - report["cached_tokens"], "the first step prefilled rows that were reused"
    text = format_trace(report)
    assert f"prefix: {report['cached_tokens']} of {n} prompt tokens reused" in text, text
