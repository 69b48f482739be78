"""The decode-by-position bench (bench.decode_by_position) on the tiny model: it runs the real
scheduler, times each decode step's blocks and the weight matmuls inside them, and leaves the model's
functions as it found them. The times themselves are not checked (speed is the bench's business)."""
import math

from nanopipe import fast_decode, model
from nanopipe.tools.bench import decode_by_position, generate_fixed, timing_decode_blocks


def test_decode_by_position_rows(tiny_engine):
    n_ctx = tiny_engine.config.n_ctx                                    # 128
    rows = decode_by_position(tiny_engine, at=(1, 16, 64, n_ctx - 2), n_tokens=4)
    assert [r["position"] for r in rows] == [1, 16, 64], "a position without room for the tokens is skipped"
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ms_per_token", "blocks_ms", "matmul_ms", "rest_ms")), r
        assert r["matmul_ms"] < r["blocks_ms"] and r["rest_ms"] < r["blocks_ms"], r
    L, C = len(tiny_engine.stage.blocks), tiny_engine.config.n_embd
    assert rows[1]["kv_mb"] == round(L * 2 * 17 * C * 4 / 1e6, 2), "keys and values of 17 positions"


def test_timing_sees_each_decode_step_and_restores_the_model(tiny_engine):
    before = (model.decode_blocks, fast_decode.product)
    steps = []
    with timing_decode_blocks(steps):
        timed = generate_fixed(tiny_engine, list(range(100, 110)), 5)
    assert (model.decode_blocks, fast_decode.product) == before
    assert [s["position"] for s in steps] == [10, 11, 12, 13], "a 10-token prompt, then 4 decode steps"
    assert all(0 < s["matmul_s"] < s["blocks_s"] for s in steps), steps
    assert generate_fixed(tiny_engine, list(range(100, 110)), 5)["token_ids"] == timed["token_ids"]
