"""The model's building blocks, on inputs small enough to check by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from floats import assert_same

from nanopipe import kernels, model
from nanopipe.model import (
    ContextOverflow,
    KVCache,
    attention,
    block,
    blocks_forward,
    embed,
    gelu,
    gpt2,
    head,
    layer_norm,
    linear,
    mlp,
    softmax,
)
from nanopipe.weights import load_stage


def gelu_reference(x: float) -> float:
    """GPT-2's tanh approximation, written out in Python floats."""
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


# ---------------------------------------------------------------------------------------------
# gelu, softmax, layer_norm


@pytest.mark.parametrize("x, approx", [(0.0, 0.0), (1.0, 0.8412), (-1.0, -0.1588)])
def test_gelu_values(x, approx):
    got = float(gelu(np.float32(x)))
    assert got == pytest.approx(gelu_reference(x), abs=1e-6)
    assert got == pytest.approx(approx, abs=1e-4)


def test_gelu_is_x_for_large_x_and_zero_for_very_negative():
    assert gelu(np.array([10.0, -10.0], np.float32)) == pytest.approx([10.0, 0.0], abs=1e-6)


def test_softmax_worked_example():
    assert softmax(np.array([1.0, 2.0, 3.0])) == pytest.approx([0.0900306, 0.2447285, 0.6652410], abs=1e-6)


def test_softmax_rows_sum_to_one_and_ignore_a_shift():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32) * 10
    p = softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(softmax(x + 100.0), p, atol=1e-6)
    assert np.all(p > 0)


def test_softmax_does_not_overflow():
    p = softmax(np.array([1000.0, 1000.0, -1000.0], np.float32))
    assert np.all(np.isfinite(p)) and p == pytest.approx([0.5, 0.5, 0.0])


def test_layer_norm_gives_mean_0_variance_1():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32) * 3 + 5
    y = layer_norm(x, g=np.ones(64, np.float32), b=np.zeros(64, np.float32))
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, atol=1e-4)


def test_layer_norm_eps_is_1e_5():
    """A row [+a, -a] has variance a^2; with a = 1e-3 the eps of 1e-5 dominates: a / sqrt(1e-6 + 1e-5)."""
    a = 1e-3
    y = layer_norm(np.array([[a, -a]], np.float32), g=np.ones(2, np.float32), b=np.zeros(2, np.float32))
    expected = a / math.sqrt(a * a + 1e-5)                      # 0.3015, not 1.0
    assert y[0] == pytest.approx([expected, -expected], rel=1e-4)


def test_layer_norm_scales_and_shifts():
    y = layer_norm(np.array([[1.0, 3.0]], np.float32), g=np.array([2.0, 2.0], np.float32),
                   b=np.array([10.0, 20.0], np.float32))
    # normalized row is [-1, 1] (up to eps), times 2, plus b
    assert y[0] == pytest.approx([8.0, 22.0], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# float32 all the way through (numpy 2's NEP 50 would upcast on any stray np.float64 scalar)


@pytest.fixture(scope="module")
def stage(tiny_weights):
    return load_stage(tiny_weights)


def test_float32_stays_float32_through_every_function(stage):
    c = stage.config
    x = embed(np.array([1, 2, 3]), np.arange(3), stage.wte, stage.wpe)      # (T, C)
    assert x.dtype == np.float32
    assert gelu(x).dtype == np.float32
    assert softmax(x).dtype == np.float32
    assert layer_norm(x, **stage.blocks[0]["ln_1"]).dtype == np.float32
    assert mlp(x, **stage.blocks[0]["mlp"]).dtype == np.float32
    cache = KVCache(c.n_layer, c.n_head, c.head_dim, c.n_ctx)
    cache.reserve(3)
    y = block(x, **stage.blocks[0], n_head=c.n_head, layer=0, segments=[(cache, 3)])
    assert y.dtype == np.float32
    assert cache.k.dtype == cache.v.dtype == np.float32
    assert head(y, stage.ln_f, stage.lm_head).dtype == np.float32


def test_float32_stays_float32_through_a_cached_decode_step(stage):
    c = stage.config
    cache = KVCache(c.n_layer, c.n_head, c.head_dim, c.n_ctx)
    for t, token in enumerate([5, 6, 7]):
        x = embed(np.array([token]), np.array([t]), stage.wte, stage.wpe)
        x = blocks_forward(x, stage.blocks, n_head=c.n_head, segments=[(cache, 1)])
        assert x.dtype == np.float32
    assert head(x, stage.ln_f, stage.lm_head).dtype == np.float32


def test_gpt2_is_embed_then_blocks_then_head_and_engine_logits_is_gpt2(stage):
    """One forward pass: gpt2() runs the same three calls in the same order as writing them out,
    so the logits are equal bit for bit; Engine.logits is gpt2() over a fresh cache."""
    from nanopipe.engine import Engine
    c = stage.config
    ids, pos = np.array([464, 3290, 318, 257]), np.arange(4)
    new = lambda: KVCache(c.n_layer, c.n_head, c.head_dim, c.n_ctx)  # noqa: E731
    x = blocks_forward(embed(ids, pos, stage.wte, stage.wpe), stage.blocks, n_head=c.n_head, segments=[(new(), 4)])
    want = head(x, stage.ln_f, stage.lm_head)                                           # (T, V)
    got = gpt2(ids, pos, stage.wte, stage.wpe, stage.blocks, stage.ln_f, stage.lm_head, n_head=c.n_head,
               segments=[(new(), 4)])                                                   # (T, V)
    assert got.shape == (4, c.n_vocab)
    assert np.array_equal(got, want), "same calls in the same order must give identical logits"
    last = gpt2(ids, pos, stage.wte, stage.wpe, stage.blocks, stage.ln_f, stage.lm_head, n_head=c.n_head,
                segments=[(new(), 4)], rows=slice(-1, None))                            # (1, V)
    assert np.array_equal(last, head(x[-1:], stage.ln_f, stage.lm_head)), "rows= feeds only those rows to the head"
    assert np.array_equal(Engine(stage).logits(ids.tolist()), want), "Engine.logits runs gpt2()"


# ---------------------------------------------------------------------------------------------
# attention


def attention_weights(H: int, T: int, start: int, seed: int = 0) -> np.ndarray:
    """With v = the identity (D = S), attention's output IS its weight matrix: (H, T, S)."""
    S = start + T
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((H, T, S)).astype(np.float32)
    k = rng.standard_normal((H, S, S)).astype(np.float32)
    v = np.broadcast_to(np.eye(S, dtype=np.float32), (H, S, S))
    return attention(q, k, v, start)


@pytest.mark.parametrize("T, start", [(5, 0), (3, 4), (1, 6)])
def test_causal_mask_gives_future_positions_zero_weight(T, start):
    w = attention_weights(H=2, T=T, start=start)                # (H, T, S)
    for t in range(T):
        seen = start + t                                        # query t sits at this position
        assert np.all(w[:, t, seen + 1:] == 0.0), f"query at position {seen} attends to the future"
        assert np.all(w[:, t, :seen + 1] > 0.0)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-6)


def test_attention_by_hand_equal_scores():
    """All scores 0: position 0 sees only v0 = 2, position 1 averages v0 and v1 = (2 + 4) / 2."""
    q = np.zeros((1, 2, 1), np.float32)                         # (H, T, D)
    k = np.zeros((1, 2, 1), np.float32)
    v = np.array([[[2.0], [4.0]]], np.float32)
    assert attention(q, k, v, start=0)[0, :, 0] == pytest.approx([2.0, 3.0])


def test_attention_by_hand_scaled_scores():
    """D = 4, so scores are q.k / 2. q = e0, k1 = 2 ln3 e0: scores [0, ln 3] -> weights [1/4, 3/4].
    v0 = 4 e0, v1 = 8 e0: the second position reads 4/4 + 3*8/4 = 7."""
    q = np.array([[[1, 0, 0, 0], [1, 0, 0, 0]]], np.float32)            # (1, 2, 4)
    k = np.array([[[0, 0, 0, 0], [2 * math.log(3), 0, 0, 0]]], np.float32)
    v = np.array([[[4, 0, 0, 0], [8, 0, 0, 0]]], np.float32)
    out = attention(q, k, v, start=0)                                   # (1, 2, 4)
    assert out[0, :, 0] == pytest.approx([4.0, 7.0], rel=1e-6)
    assert np.all(out[0, :, 1:] == 0)
    # the same second query decoding alone against the cache sees both keys
    assert attention(q[:, 1:], k, v, start=1)[0, 0, 0] == pytest.approx(7.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the KV cache


def test_kv_cache_for_a_model_has_its_heads_head_size_and_context(tiny_config):
    cache = KVCache.for_model(tiny_config, n_layers=3)
    assert (cache.k.shape, cache.n_ctx, cache.length) == ((3, 4, 0, 16), 128, 0)
    cache.reserve(5)
    assert cache.k.shape == cache.v.shape == (3, tiny_config.n_head, KVCache.CHUNK, tiny_config.head_dim)


def test_kv_cache_grows_in_chunks_and_keeps_its_rows():
    cache = KVCache(n_layers=2, n_head=2, head_dim=4, n_ctx=300)
    assert cache.capacity == 0 and cache.length == 0
    capacities = []
    for t in range(300):
        start = cache.reserve(1)
        assert start == t
        cache.k[:, :, t] = t
        cache.v[:, :, t] = -t
        cache.length += 1
        capacities.append(cache.capacity)
    grown = sorted(set(capacities))
    assert grown == [128, 256, 300], "capacity should jump by chunks and stop at n_ctx"
    assert_same(cache.k[0, 1, :, 0], np.arange(300, dtype=np.float32), "keys copied while growing")
    assert_same(cache.v[1, 0, :, 3], -np.arange(300, dtype=np.float32), "values copied while growing")
    assert cache.nbytes == 2 * 2 * 2 * 300 * 4 * 4


def test_kv_cache_a_long_prefill_reserves_at_once():
    cache = KVCache(n_layers=1, n_head=1, head_dim=2, n_ctx=1024)
    cache.reserve(200)
    assert cache.capacity == 256                                # rounded up to a chunk


def test_kv_cache_overflow_is_a_clear_error():
    cache = KVCache(n_layers=1, n_head=1, head_dim=2, n_ctx=8)
    cache.reserve(8)
    cache.length = 8
    with pytest.raises(ContextOverflow, match=r"9 tokens exceeds the context window n_ctx=8"):
        cache.reserve(1)
    assert cache.length == 8


def test_blocks_forward_past_n_ctx_raises(stage):
    c = stage.config
    cache = KVCache(c.n_layer, c.n_head, c.head_dim, c.n_ctx)
    ids = np.zeros(c.n_ctx, np.int64)
    blocks_forward(embed(ids, np.arange(c.n_ctx), stage.wte, stage.wpe), stage.blocks, n_head=c.n_head,
                   segments=[(cache, c.n_ctx)])
    assert cache.length == c.n_ctx
    x = embed(np.array([0]), np.array([0]), stage.wte, stage.wpe)
    with pytest.raises(ContextOverflow, match="n_ctx=128"):
        blocks_forward(x, stage.blocks, n_head=c.n_head, segments=[(cache, 1)])
    assert cache.length == c.n_ctx, "a refused step must not advance the cache"


# ---------------------------------------------------------------------------------------------
# linear: a gemv per row for a few rows, one gemm for more


@pytest.fixture
def pinned(monkeypatch):
    """Set kernels.gemv_rows for one test (conftest pins NANOPIPE_GEMV_ROWS=4 for the whole run)."""
    def pin(n):
        monkeypatch.setattr(kernels.kernels, "gemv_rows", n)
        monkeypatch.setattr(kernels.kernels, "chosen", True)
    return pin


def test_linear_few_rows_equal_each_row_alone_bit_for_bit(stage, pinned):
    """2..gemv_rows rows run the very call a lone row makes, so each row comes out as it would
    alone, whatever else is in the batch; above gemv_rows one gemm runs, within float tolerance."""
    p = stage.blocks[0]["mlp"]["c_fc"]
    x = np.random.default_rng(0).standard_normal((6, stage.config.n_embd)).astype(np.float32)   # (T, C)
    alone = np.concatenate([linear(x[t:t + 1], **p) for t in range(6)])                     # (T, 4C)
    pinned(6)
    assert np.array_equal(linear(x, **p), alone), "the gemv path must equal the same single-row calls exactly"
    pinned(1)
    gemm = linear(x, **p)                                                                  # one sgemm
    diff = float(np.abs(gemm - alone).max())
    assert diff <= 1e-5, f"one gemm vs a gemv per row (computed two ways): largest difference {diff:.2e}"


def test_head_few_rows_in_slices_close_to_one_gemm_and_one_row_unchanged(stage, monkeypatch):
    """2..head_rows rows go through wte slice by slice (each slice in cache for every row): the
    logits equal one gemm's within float tolerance (the sums run in another order) with the same
    argmax; one row is the plain gemv on all of wte, as before."""
    from nanopipe.model import head
    monkeypatch.setattr(kernels, "HEAD_SLICE_BYTES", 7 * stage.config.n_embd * 4)   # 7 rows of wte a slice: many slices
    h = np.random.default_rng(1).standard_normal((3, stage.config.n_embd)).astype(np.float32)   # (T, C)
    monkeypatch.setattr(kernels.kernels, "head_rows", 1)
    gemm = head(h, stage.ln_f, stage.lm_head)                                                # (T, V), one gemm
    monkeypatch.setattr(kernels.kernels, "head_rows", 4)
    sliced = head(h, stage.ln_f, stage.lm_head)
    diff = float(np.abs(sliced - gemm).max())
    assert diff <= 1e-5, f"sliced head vs one gemm (computed two ways): largest difference {diff:.2e}"
    assert np.array_equal(sliced.argmax(axis=1), gemm.argmax(axis=1))
    one = head(h[:1], stage.ln_f, stage.lm_head)
    ln = model.layer_norm(h[:1], **stage.ln_f)
    assert_same(one, (stage.lm_head @ ln.T).T, "one row takes the plain gemv on wte: the very same call")


def test_batched_decode_rows_equal_each_session_alone_exactly(stage, pinned):
    """Two sessions decoding together (2 rows a step) get the same activations, bit for bit, as each
    alone: with 2 <= gemv_rows every weight product is the single-row call (before, one gemm made
    the last bits differ)."""
    pinned(4)
    c = stage.config
    new = lambda: KVCache(c.n_layer, c.n_head, c.head_dim, c.n_ctx)  # noqa: E731
    ca, cb, ba, bb = new(), new(), new(), new()
    for cache, ids in ((ca, [5, 6, 7]), (cb, [8, 9])):
        blocks_forward(embed(np.array(ids), np.arange(len(ids)), stage.wte, stage.wpe), stage.blocks,
                       n_head=c.n_head, segments=[(cache, len(ids))])
    for cache, ids in ((ba, [5, 6, 7]), (bb, [8, 9])):
        blocks_forward(embed(np.array(ids), np.arange(len(ids)), stage.wte, stage.wpe), stage.blocks,
                       n_head=c.n_head, segments=[(cache, len(ids))])
    ya = blocks_forward(embed(np.array([11]), np.array([3]), stage.wte, stage.wpe), stage.blocks,
                        n_head=c.n_head, segments=[(ca, 1)])                                # (1, C)
    yb = blocks_forward(embed(np.array([22]), np.array([2]), stage.wte, stage.wpe), stage.blocks,
                        n_head=c.n_head, segments=[(cb, 1)])                                # (1, C)
    x = embed(np.array([11, 22]), np.array([3, 2]), stage.wte, stage.wpe)                  # (2, C)
    y = blocks_forward(x, stage.blocks, n_head=c.n_head, segments=[(ba, 1), (bb, 1)])      # (2, C)
    assert np.array_equal(y, np.concatenate([ya, yb])), \
        f"batched vs alone differ by {np.abs(y - np.concatenate([ya, yb])).max():.2e}"
