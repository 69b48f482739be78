"""The decode fast path (nanopipe/fast_decode.py) against model.block, the lesson's plain one.

A decode step (each sequence one new row) goes through `decode_blocks`; it runs the same float32
operations in the same order as `block` (same ufuncs, same reductions, the same matmul kernel for
the same row count), only into buffers made once per step. So the activations AND the KV caches
must come out bit for bit the same, at gpt2-small's width (the BLAS paths real weights take) and
for a member of a split stage (other widths), for one sequence and for a batch of them.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from floats import assert_close, assert_same, max_diff

from nanopipe import kernels, model
from nanopipe.fast_decode import decode_blocks
from nanopipe.model import KVCache, block, blocks_forward, shard_block, share_of


def random_blocks(n_layer: int, C: int, seed: int = 0) -> list:
    """Blocks of width C with GPT-2-like magnitudes, matrices column-major as the loader keeps them."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.02):
        return np.asfortranarray(rng.standard_normal(shape).astype(np.float32) * scale)

    def ln():
        return {"g": 1 + w(C, scale=0.1), "b": w(C, scale=0.1)}
    return [{"ln_1": ln(), "attn": {"c_attn": {"w": w(C, 3 * C), "b": w(3 * C)}, "c_proj": {"w": w(C, C), "b": w(C)}},
             "ln_2": ln(), "mlp": {"c_fc": {"w": w(C, 4 * C), "b": w(4 * C)}, "c_proj": {"w": w(4 * C, C), "b": w(C)}}}
            for _ in range(n_layer)]


def caches_after_prompts(blocks, n_head: int, head_dim: int, lengths, seed: int = 1) -> list:
    """One cache per sequence, each filled by a prompt of its length (prompts take model.block)."""
    rng = np.random.default_rng(seed)
    C = blocks[0]["ln_1"]["g"].shape[0]
    out = []
    for n in lengths:
        cache = KVCache(len(blocks), n_head, head_dim, 256)
        blocks_forward(rng.standard_normal((n, C)).astype(np.float32), blocks, n_head=n_head, segments=[(cache, n)])
        out.append(cache)
    return out


def plain_blocks(x, blocks, *, n_head: int, segments):
    """model.blocks_forward's loop over model.block, as the lesson reads it."""
    for layer, p in enumerate(blocks):
        x = block(x, **p, n_head=n_head, layer=layer, segments=segments)   # (T, C)
    return x


def both_ways(blocks, n_head: int, head_dim: int, lengths):
    """One decode step of len(lengths) sequences, through decode_blocks and through block, each on
    its own copy of the same caches: (fast x, plain x, fast caches, plain caches)."""
    caches = caches_after_prompts(blocks, n_head, head_dim, lengths)
    twins = copy.deepcopy(caches)
    C = blocks[0]["ln_1"]["g"].shape[0]
    x = np.random.default_rng(2).standard_normal((len(lengths), C)).astype(np.float32)   # (T, C)
    for c in caches + twins:
        c.reserve(1)
    fast = decode_blocks(x, blocks, n_head=n_head, segments=[(c, 1) for c in caches])
    plain = plain_blocks(x, blocks, n_head=n_head, segments=[(c, 1) for c in twins])
    return fast, plain, caches, twins


@pytest.fixture
def gemv_rows(monkeypatch):
    def pin(n):
        monkeypatch.setattr(kernels.kernels, "gemv_rows", n)
        monkeypatch.setattr(kernels.kernels, "chosen", True)
    return pin


@pytest.mark.parametrize("lengths", [[5], [5, 9], [3, 4, 17], [2, 3, 4, 5, 6, 7]],
                         ids=["1 sequence", "2 (a gemv each)", "3 (a gemv each)", "6 (one gemm)"])
def test_a_decode_step_equals_the_plain_blocks_bit_for_bit(lengths, gemv_rows):
    """gpt2-small's width and heads (C=768, H=12, D=64), 2 blocks: x and every cache row the same."""
    gemv_rows(4)
    blocks = random_blocks(2, 768)
    fast, plain, caches, twins = both_ways(blocks, 12, 64, lengths)
    print(f"{len(lengths)} sequence(s): largest difference fast vs plain {max_diff(fast, plain):.2e}")
    assert_close(fast, plain, "decode step, fast path vs block")
    assert_same(fast, plain, "decode_blocks runs block's very operations in the same order")
    for c, t in zip(caches, twins):
        assert_same(c.k[:, :, :c.length + 1], t.k[:, :, :t.length + 1], "the keys written")
        assert_same(c.v[:, :, :c.length + 1], t.v[:, :, :t.length + 1], "the values written")


def test_a_split_member_decodes_its_share_equal_to_the_plain_share(gemv_rows):
    """A member of a split stage (model.shard_block: 5 of 12 heads, its hidden columns, a zero bias)
    runs the fast path on its narrower matrices: equal to `block` over the same share."""
    gemv_rows(4)
    share = share_of(1, 3, 12, 768)
    blocks = [shard_block(p, share) for p in random_blocks(2, 768, seed=3)]
    fast, plain, caches, twins = both_ways(blocks, share.n_head, 64, [6, 11])
    assert_same(fast, plain, "a member's share through decode_blocks and through block")
    assert_same(caches[0].k[:, :, :7], twins[0].k[:, :, :7], "the member's keys")


def test_blocks_forward_takes_the_fast_path_for_decode_steps_only(monkeypatch):
    """A step whose sequences each bring one row goes to decode_blocks; a prompt, or a step mixing a
    prompt chunk with decode rows, goes through block (the causal mask over several rows)."""
    blocks = random_blocks(1, 48)
    seen = []

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return decode_blocks(x, *args, **kwargs)
    monkeypatch.setattr(model, "decode_blocks", spy)
    a, b = caches_after_prompts(blocks, 4, 12, [3, 4])
    assert seen == [], "prompts take block"
    x = np.ones((2, 48), np.float32)
    blocks_forward(x, blocks, n_head=4, segments=[(a, 1), (b, 1)])
    assert seen == [2], "two sequences of one new row each: the fast path"
    blocks_forward(np.ones((3, 48), np.float32), blocks, n_head=4, segments=[(a, 1), (b, 2)])
    assert seen == [2], "a step with a 2-row chunk: block"
    assert (a.length, b.length) == (5, 7)


def test_the_fast_path_leaves_its_input_alone():
    """The residual stream is updated in place inside the step's own copy: the caller's x is unchanged."""
    blocks = random_blocks(1, 48)
    (cache,) = caches_after_prompts(blocks, 4, 12, [3])
    x = np.random.default_rng(5).standard_normal((1, 48)).astype(np.float32)
    before = x.copy()
    cache.reserve(1)
    y = decode_blocks(x, blocks, n_head=4, segments=[(cache, 1)])
    assert_same(x, before, "the input row after the step")
    assert y is not x and max_diff(y, x) > 0


@pytest.mark.parametrize("lengths", [[6], [6, 11]], ids=["1 sequence", "2 sequences"])
def test_a_split_members_decode_step_takes_the_fast_path_bit_for_bit(lengths, gemv_rows, monkeypatch):
    """blocks_forward_member (a split stage's member, summing with the others after each c_proj)
    sends a decode step through decode_blocks with its `reduce`: the same partials go to reduce in
    the same order, and x and the caches come out as the lesson's loop (attn_share, mlp_share)
    makes them. The other member's partials are stood in for by fixed rows, one per all-reduce."""
    gemv_rows(4)
    share = share_of(0, 2, 12, 768)
    blocks = [shard_block(p, share) for p in random_blocks(2, 768, seed=4)]
    rng = np.random.default_rng(9)
    others = [rng.standard_normal((len(lengths), 768)).astype(np.float32) for _ in range(2 * len(blocks))]

    def reducer(seen):
        def reduce(partial):
            seen.append(partial.copy())
            return model.all_reduce([partial, others[len(seen) - 1]])
        return reduce
    caches = caches_after_prompts(blocks, share.n_head, 64, lengths)
    twins = copy.deepcopy(caches)
    x = np.random.default_rng(2).standard_normal((len(lengths), 768)).astype(np.float32)
    fast_seen, plain_seen, used = [], [], []

    def spy(*args, **kwargs):
        used.append(kwargs.get("reduce") is not None)
        return decode_blocks(*args, **kwargs)
    monkeypatch.setattr(model, "decode_blocks", spy)
    fast = model.blocks_forward_member(x, blocks, n_head=share.n_head, segments=[(c, 1) for c in caches],
                                       reduce=reducer(fast_seen))
    assert used == [True], "a member's decode step goes through decode_blocks, with its reduce"
    plain, reduce = x, reducer(plain_seen)
    for c in twins:
        c.reserve(1)
    for layer, p in enumerate(blocks):
        plain = plain + reduce(model.attn_share(plain, p, n_head=share.n_head, layer=layer,
                                                segments=[(c, 1) for c in twins]))
        plain = plain + reduce(model.mlp_share(plain, p))
    assert len(fast_seen) == len(plain_seen) == 2 * len(blocks)
    for i, (f, p) in enumerate(zip(fast_seen, plain_seen)):
        assert_same(f, p, f"the partial handed to all-reduce number {i + 1}")
    assert_same(fast, plain, "a member's decode step, fast path vs the lesson's loop")
    for c, t in zip(caches, twins):
        assert_same(c.k[:, :, :c.length], t.k[:, :, :c.length], "the member's keys")
        assert_same(c.v[:, :, :c.length], t.v[:, :, :c.length], "the member's values")
