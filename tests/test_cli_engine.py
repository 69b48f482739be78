"""The single-process CLI: `nanopipe init-weights`, `generate`, `plan` and `bench`, through click's CliRunner."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import CONFIG_DIR

from nanopipe.decoding import log_softmax
from nanopipe.engine import Engine
from nanopipe.tools.cli import main

PROMPT = "Hello world, distributed computing!"
PROMPT_IDS = [15496, 995, 11, 9387, 14492, 0]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def weights(runner, tmp_path_factory):
    """Tiny synthetic weights, written by the CLI itself."""
    path = str(tmp_path_factory.mktemp("cli") / "tiny.safetensors")
    result = runner.invoke(main, ["init-weights", path, "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
                                  "--n-ctx", "64", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "n_layer=2 n_embd=32 n_head=2 n_ctx=64 n_vocab=50257" in result.output
    assert "gibberish" in result.output
    return path


@pytest.fixture(scope="module")
def engine(weights):
    return Engine.load(weights)


def generate(runner, weights, *args, prompt=PROMPT):
    return runner.invoke(main, ["generate", prompt, "--weights", weights, "--config-dir", CONFIG_DIR, *args])


def generate_json(runner, weights, *args, prompt=PROMPT) -> dict:
    result = generate(runner, weights, "--json", *args, prompt=prompt)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_json_keys(runner, weights):
    out = generate_json(runner, weights, "--max-tokens", "5", "--strategy", "greedy")
    for key in ("text", "token_ids", "prompt_ids", "tokens_generated", "decoding_strategy", "prefill_ms",
                "decode_tokens_per_s", "logprobs"):
        assert key in out, key
    assert out["prompt_ids"] == PROMPT_IDS
    assert out["tokens_generated"] == len(out["token_ids"]) == len(out["logprobs"]) == 5
    assert out["decoding_strategy"] == "greedy"
    assert "top_logprobs" not in out and "prompt_logprobs" not in out
    assert isinstance(out["text"], str) and out["text"]


def test_default_strategy_comes_from_model_config(runner, weights):
    assert generate_json(runner, weights, "--max-tokens", "2")["decoding_strategy"] == "top_p"


def test_top_logprobs(runner, weights):
    out = generate_json(runner, weights, "--max-tokens", "4", "--strategy", "greedy", "--top-logprobs", "3")
    top = out["top_logprobs"]
    assert len(top) == 4 and all(len(pos) == 3 for pos in top)
    for i, pos in enumerate(top):
        assert pos[0]["id"] == out["token_ids"][i], "greedy picks the most likely token"
        assert pos[0]["logprob"] == pytest.approx(out["logprobs"][i])
        assert pos[0]["logprob"] >= pos[1]["logprob"] >= pos[2]["logprob"]


def test_echo_prompt_logprobs_equal_recomputed_log_softmax(runner, weights, engine):
    out = generate_json(runner, weights, "--max-tokens", "2", "--strategy", "greedy", "--echo")
    assert len(out["prompt_logprobs"]) == len(PROMPT_IDS) - 1
    lp = log_softmax(engine.logits(PROMPT_IDS))                         # (T, V)
    want = [lp[t, PROMPT_IDS[t + 1]] for t in range(len(PROMPT_IDS) - 1)]
    np.testing.assert_allclose(out["prompt_logprobs"], want, atol=1e-5)


def test_greedy_logprobs_equal_recomputed_log_softmax(runner, weights, engine):
    out = generate_json(runner, weights, "--max-tokens", "6", "--strategy", "greedy")
    lp = log_softmax(engine.logits(PROMPT_IDS + out["token_ids"]))
    n = len(PROMPT_IDS)
    want = [lp[n - 1 + i, t] for i, t in enumerate(out["token_ids"])]
    np.testing.assert_allclose(out["logprobs"], want, atol=1e-5)
    assert out["token_ids"] == [int(np.argmax(lp[n - 1 + i])) for i in range(6)]


@pytest.mark.parametrize("strategy", ["sampling", "top_k", "top_p"])
def test_seed_reproduces_and_different_seeds_differ(runner, weights, strategy):
    def tokens(seed):
        return generate_json(runner, weights, "--strategy", strategy, "--temperature", "1.0", "--max-tokens", "12",
                             "--seed", str(seed))["token_ids"]
    first = tokens(7)
    assert tokens(7) == first
    assert tokens(8) != first


@pytest.mark.parametrize("args, field", [
    (["--temperature", "0", "--strategy", "sampling"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--strategy", "nope"], "strategy"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--max-tokens", "100"], "--max-tokens 58 or less"),   # 6 prompt tokens + 100 > n_ctx=64
    (["--top-k", "0", "--strategy", "top_k"], "top_k"),
])
def test_bad_values_are_clean_errors(runner, weights, args, field):
    result = generate(runner, weights, *args)
    assert result.exit_code != 0
    assert "Error:" in result.output and field in result.output, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), f"an exception escaped: {result.exception!r}"


def test_missing_weights_file_is_a_clean_error(runner, tmp_path):
    result = generate(runner, str(tmp_path / "nope.safetensors"))
    assert result.exit_code != 0 and "Error:" in result.output
    assert "nope.safetensors" in result.output and "init-weights" in result.output


def test_generate_streams_prompt_then_text(runner, weights):
    out = generate_json(runner, weights, "--max-tokens", "5", "--strategy", "greedy")
    result = generate(runner, weights, "--max-tokens", "5", "--strategy", "greedy")
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + out["text"] + "\n"


def test_plan_prints_the_shipped_split(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # no weights/ here: the plan comes from the config
    result = runner.invoke(main, ["plan", "--config-dir", CONFIG_DIR])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.split("\n\n")[0].strip().splitlines()]   # the layer table
    assert rows[0][:4] == ["Node", "Rank", "Layers", "Count"]
    assert [r[:4] for r in rows[1:]] == [["mini1", "0", "0-3", "4"], ["mini2", "1", "4-7", "4"],
                                         ["pi1", "2", "8-11", "4"]]


def test_bench_smoke(runner, weights, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(main, ["bench", "--weights", weights, "--tokens", "4", "--prompt-len", "8",
                                  "--bandwidth-mb", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "decode" in result.output and "tok/s" in result.output
    lines = (out / "single.csv").read_text().splitlines()
    assert lines[0].startswith("name,") and len(lines) >= 2


def test_bench_times_every_prompt_in_full(weights, monkeypatch):
    """The benchmarks send the same prompt again and again: each repeat must be prefilled in full,
    not served from the first one's kept KV cache (prefix reuse would time almost nothing)."""
    from nanopipe import engine as engine_module
    from nanopipe.tools import bench
    engines = []
    real = engine_module.Engine.load.__func__

    def spy(cls, *a, **kw):
        engines.append(real(cls, *a, **kw))
        return engines[-1]
    monkeypatch.setattr(bench.Engine, "load", classmethod(spy))
    bench.bench_single(weights, prompt_len=8, n_tokens=3, repeats=3)
    bench.bench_prefill(bench.Engine.load(weights, prefix_cache_bytes=0), prompt_len=40, repeats=2)
    for e in engines:
        st = e.scheduler.stats
        assert st["prompt_tokens_computed"] > 0 and st["prompt_tokens_cached"] == 0, st


def test_bench_positions_and_sweep_measure_what_they_say(weights):
    """The context-position rows cover each position asked for; the sweep reports each stream count with
    a token count equal to streams x tokens (every stream generated all of its tokens)."""
    from nanopipe.tools.bench_cluster import positions, sweep, sweep_summary
    rows = positions(weights, at=(8, 32), n_tokens=4)
    assert [r["position"] for r in rows] == [8, 32] and all(r["ms_per_token"] > 0 for r in rows)
    rows = sweep(weights, counts=(1, 3), nodes=1, prompt_len=4, n_tokens=5, echo=lambda *_: None)
    assert [(r["streams"], r["tokens"], r["kernels"]) for r in rows] == \
        [(1, 5, "before"), (1, 5, "after"), (3, 15, "before"), (3, 15, "after")]
    assert [r["gemv_rows"] for r in rows if r["kernels"] == "before"] == [1, 1], "before = always one gemm"
    assert all(r["p95_ms_per_token"] >= r["p50_ms_per_token"] > 0 for r in rows)
    summary = sweep_summary(rows)
    assert any(line.startswith("1 process, after / before: 1: ") and "3: " in line for line in summary), summary


# ---------------------------------------------------------------------------------------------
# The fields choose the strategy, as in the web API; stop, penalties and bias


def test_temperature_zero_is_greedy(runner, weights):
    # it used to be an error here while the APIs treated it as greedy
    out = generate_json(runner, weights, "--max-tokens", "5", "--temperature", "0")
    assert out["decoding_strategy"] == "greedy"
    assert out["token_ids"] == generate_json(runner, weights, "--max-tokens", "5", "--strategy", "greedy")["token_ids"]


def test_top_k_alone_means_top_k(runner, weights):
    out = generate_json(runner, weights, "--max-tokens", "2", "--top-k", "5", "--temperature", "0.7")
    assert out["decoding_strategy"] == "top_k"


@pytest.mark.parametrize("args, field", [
    (["--strategy", "greedy", "--top-k", "40"], "top_k"),
    (["--top-k", "40", "--top-p", "0.5"], "top_p"),
    (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "stop"),
    (["--frequency-penalty", "3"], "frequency_penalty"),
    (["--logit-bias", "50256"], "logit-bias"),
    (["--logit-bias", "99999=1"], "logit_bias"),
])
def test_conflicting_or_bad_fields_are_clean_errors(runner, weights, args, field):
    result = generate(runner, weights, "--max-tokens", "3", *args)
    assert result.exit_code != 0 and "Error:" in result.output and field in result.output, result.output
    assert isinstance(result.exception, SystemExit), f"an exception escaped: {result.exception!r}"


def test_stop_ends_the_reply_before_the_stop_string(runner, weights, engine):
    full = generate_json(runner, weights, "--max-tokens", "12", "--strategy", "greedy")
    ids = full["token_ids"]
    from nanopipe.tokenizer import get_tokenizer
    tok = get_tokenizer()
    stop = tok.decode(ids[4:6])                 # a stop string made of the 5th and 6th tokens
    assert stop.strip() and "\ufffd" not in stop, "pick weights whose greedy tokens decode cleanly"
    want = full["text"][:full["text"].index(stop)]
    out = generate_json(runner, weights, "--max-tokens", "12", "--strategy", "greedy", "--stop", stop)
    assert out["text"] == want and out["finish_reason"] == "stop"
    assert out["token_ids"] == ids[:len(out["token_ids"])] and len(out["token_ids"]) <= 6
    printed = generate(runner, weights, "--max-tokens", "12", "--strategy", "greedy", "--stop", stop)
    assert printed.exit_code == 0 and printed.stdout == PROMPT + want + "\n"


def greedy_with_penalties(engine, prompt, n, rep=1.0, freq=0.0, pres=0.0, bias=None) -> list:
    """Greedy decoding written out by hand from the definitions, one full forward per token."""
    out = []
    for _ in range(n):
        x = engine.logits(prompt + out)[-1].astype(np.float64)          # (V,)
        for t, b in (bias or {}).items():
            x[t] += b
        for t in set(prompt + out):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        for t in set(out):
            x[t] -= out.count(t) * freq + pres
        out.append(int(np.argmax(x)))
    return out


@pytest.mark.parametrize("args, kw", [
    (["--repetition-penalty", "1.5"], {"rep": 1.5}),
    (["--frequency-penalty", "1.5"], {"freq": 1.5}),
    (["--presence-penalty", "2"], {"pres": 2.0}),
    (["--logit-bias", "13=-100", "--logit-bias", "11=7.5"], {"bias": {13: -100, 11: 7.5}}),
])
def test_greedy_with_penalties_equals_the_definition(runner, weights, engine, args, kw):
    out = generate_json(runner, weights, "--max-tokens", "10", "--strategy", "greedy", *args)
    plain = generate_json(runner, weights, "--max-tokens", "10", "--strategy", "greedy")["token_ids"]
    want = greedy_with_penalties(engine, PROMPT_IDS, 10, **kw)
    assert out["token_ids"] == want
    assert want != plain, "the penalty must change the answer, or this test proves nothing"


def test_bench_says_when_the_machine_was_busy():
    from nanopipe.tools.bench import machine_busy
    assert "busy (load average 4.8 on 2 cores)" in machine_busy(4.8, 2)
    assert machine_busy(0.3, 2) is None and machine_busy(1.0, 2) is None
