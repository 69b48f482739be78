"""A block split over m members by heads and MLP columns (the Megatron split) equals the block.

The model here has n_head=12 heads of D=3 columns (C=36, 4C=144), so 5 members hold 3, 3, 2, 2, 2
heads and 29, 29, 29, 29, 28 MLP columns: uneven both ways. Every comparison of the split with
`block` prints its largest difference; one member runs the very calls of `block` (bit for bit).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from floats import assert_close, assert_same, max_diff
from helpers import read_tensors

from nanopipe.kernels import layout_orders, matrix_order
from nanopipe.model import (
    KVCache,
    SplitError,
    all_reduce,
    block,
    block_split,
    blocks_forward,
    blocks_forward_split,
    head,
    shard_block,
    share_of,
    split_evenly,
)
from nanopipe.safetensors_io import read_header, read_part, write_safetensors
from nanopipe.tools.bench import load_rss
from nanopipe.weights import WeightsError, init_weights, load_stage

N_LAYER, C, H, N_CTX, V = 3, 36, 12, 64, 300
D = C // H


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Synthetic weights in the hub layout, with biases and LayerNorms made to count (init_weights
    writes biases 0 and gains 1, which would hide a bias added twice or sliced wrongly)."""
    path = str(tmp_path_factory.mktemp("split") / "h12.safetensors")
    init_weights(path, n_layer=N_LAYER, n_embd=C, n_head=H, n_ctx=N_CTX, n_vocab=V, seed=3)
    raw = read_tensors(path)
    rng = np.random.default_rng(7)
    for name, arr in raw.items():
        if name.startswith("h.") and name.endswith((".bias", "ln_1.weight", "ln_2.weight")) \
                and not name.endswith("attn.bias"):                   # attn.bias: the causal-mask buffer
            arr += rng.standard_normal(arr.shape).astype(np.float32) * np.float32(0.1)
    write_safetensors(path, raw, read_header(path).metadata)
    return path


@pytest.fixture(scope="module")
def stage(weights):
    return load_stage(weights)


def members(stage, m):
    """Each member's share and its blocks (the block parameters sliced in memory)."""
    shares = [share_of(r, m, H, C) for r in range(m)]
    parts = [[shard_block(p, s) for p in stage.blocks] for s in shares]
    return shares, parts


def rows(n, seed):
    return np.random.default_rng(seed).standard_normal((n, C)).astype(np.float32)   # (n, C)


# ---------------------------------------------------------------------------------------------
# who holds what


def test_split_evenly_gives_the_remainder_to_the_first_members():
    assert split_evenly(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert split_evenly(144, 5) == [(0, 29), (29, 58), (58, 87), (87, 116), (116, 144)]
    assert split_evenly(7, 1) == [(0, 7)]


def test_share_of_worked_examples():
    """The docstring's: gpt2-small over 5 members."""
    s0, s4 = share_of(0, 5, 12, 768), share_of(4, 5, 12, 768)
    assert (s0.heads, s0.hidden, s0.n_head) == ((0, 3), (0, 615), 3)
    assert (s4.heads, s4.hidden, s4.n_head) == ((10, 12), (2458, 3072), 2)
    assert share_of(1, 2, 2, 16).qkv_columns == [(8, 16), (24, 32), (40, 48)]
    assert s4.attn_rows == (640, 768)


@pytest.mark.parametrize("member, m, match", [
    (0, 13, "13 members but only 12 heads"),
    (5, 5, "member 5 of 5 does not exist"),
    (-1, 2, "member -1 of 2 does not exist"),
])
def test_a_split_that_cannot_be_is_a_clear_error(member, m, match):
    with pytest.raises(SplitError, match=match):
        share_of(member, m, 12, 36)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 12])
def test_the_shares_tile_the_block_and_the_bias_is_added_once(stage, m):
    """Laid side by side, the members' columns and rows are the block's matrices, exactly; each
    c_proj bias is held by member 0 and zeros by the others, so the sum adds it once."""
    shares, parts = members(stage, m)
    p = stage.blocks[1]
    got = [q[1] for q in parts]
    for i in range(3):                                   # q, k, v: each member's heads, in member order
        joined = np.concatenate([g["attn"]["c_attn"]["w"][:, i * s.n_head * D:(i + 1) * s.n_head * D]
                                 for g, s in zip(got, shares)], axis=1)                  # (C, C)
        assert_same(joined, p["attn"]["c_attn"]["w"][:, i * C:(i + 1) * C], "a slice is a copy")
    assert_same(np.concatenate([g["attn"]["c_proj"]["w"] for g in got]), p["attn"]["c_proj"]["w"], "a copy")
    assert_same(np.concatenate([g["mlp"]["c_fc"]["w"] for g in got], axis=1), p["mlp"]["c_fc"]["w"], "a copy")
    assert_same(np.concatenate([g["mlp"]["c_fc"]["b"] for g in got]), p["mlp"]["c_fc"]["b"], "a copy")
    assert_same(np.concatenate([g["mlp"]["c_proj"]["w"] for g in got]), p["mlp"]["c_proj"]["w"], "a copy")
    for name in ("attn", "mlp"):
        biases = [g[name]["c_proj"]["b"] for g in got]
        assert_same(biases[0], p[name]["c_proj"]["b"], "member 0 holds the bias")
        assert all(not b.any() for b in biases[1:]), "the other members hold zeros"
    assert all(g["ln_1"]["g"] is p["ln_1"]["g"] for g in got), "LayerNorms are the same arrays"
    kept = "f_contiguous" if matrix_order(layout_orders()[0], "attn.c_attn.weight") == "F" else "c_contiguous"
    assert all(getattr(g["attn"]["c_attn"]["w"].flags, kept) for g in got), "in the order the loader keeps"
    assert [s.n_head for s in shares] == [b - a for a, b in split_evenly(H, m)]


def test_all_reduce_sums_in_member_order():
    assert all_reduce([[[1.0, 2.0]], [[10.0, 20.0]]]).tolist() == [[11.0, 22.0]]
    parts = [rows(4, s) for s in range(3)]
    assert_same(all_reduce(parts), (parts[0] + parts[1]) + parts[2], "the same additions in the same order")
    one = rows(2, 9)
    assert_same(all_reduce([one]), one, "one member: its own partial")


# ---------------------------------------------------------------------------------------------
# the split block equals the block


def test_one_member_is_block_bit_for_bit(stage):
    """m = 1: shard_block copies the block whole, block_split calls mha and mlp as block does."""
    (share,), parts = members(stage, 1)
    x = rows(5, 0)
    want_cache, got_cache = KVCache(1, H, D, N_CTX), KVCache(1, share.n_head, D, N_CTX)
    want_cache.reserve(5), got_cache.reserve(5)
    want = block(x, **stage.blocks[0], n_head=H, layer=0, segments=[(want_cache, 5)])
    got = block_split(x, [parts[0][0]], n_heads=[H], layer=0, segments=[[(got_cache, 5)]])
    assert_same(got, want, "one member runs block's calls in block's order")
    assert_same(got_cache.k[0, :, :5], want_cache.k[0, :, :5], "the same keys")


@pytest.mark.parametrize("m", [2, 3, 5, 7, 12])
def test_m_members_equal_the_block_prompt_then_decode(stage, m, capsys):
    """A 6-row prompt, then 4 decode steps of one row, through all 3 blocks: the split stage's rows
    stay within tolerance of the whole stage's, and each member's KV cache holds its heads of the
    whole cache (computed by a narrower c_attn matmul: compared with a tolerance)."""
    shares, parts = members(stage, m)
    whole = KVCache(N_LAYER, H, D, N_CTX)
    mine = [KVCache(N_LAYER, s.n_head, D, N_CTX) for s in shares]
    worst = 0.0
    for step, n in enumerate([6, 1, 1, 1, 1]):
        x = rows(n, 100 + step)
        want = blocks_forward(x, stage.blocks, n_head=H, segments=[(whole, n)])                  # (n, C)
        got = blocks_forward_split(x, parts, n_heads=[s.n_head for s in shares],
                                   segments=[[(c, n)] for c in mine])                            # (n, C)
        assert_close(got, want, f"{m} members, step {step}")
        worst = max(worst, max_diff(got, want))
    for s, c in zip(shares, mine):
        assert c.length == whole.length == 10
        h0, h1 = s.heads
        assert_close(c.k[:, :, :10], whole.k[:, h0:h1, :10], f"member {s.member}'s keys")
        assert_close(c.v[:, :, :10], whole.v[:, h0:h1, :10], f"member {s.member}'s values")
    with capsys.disabled():
        print(f"\n{m} members ({[s.n_head for s in shares]} heads), 3 blocks, 5 steps: "
              f"largest difference from the whole block {worst:.2e} (tolerance 1e-05)")


@pytest.mark.parametrize("m", [1, 2, 5])
def test_batched_sessions_through_the_split_equal_the_block(stage, m, capsys):
    """Two sequences in one step (prompts of 4 and 7 rows), then 3 decode steps taking one row of
    each: each member keeps a cache per sequence for its heads; the head's logits agree too."""
    shares, parts = members(stage, m)
    whole = [KVCache(N_LAYER, H, D, N_CTX) for _ in range(2)]
    mine = [[KVCache(N_LAYER, s.n_head, D, N_CTX) for _ in range(2)] for s in shares]
    ln_f = {"g": np.ones(C, np.float32), "b": np.zeros(C, np.float32)}
    lm_head = np.random.default_rng(5).standard_normal((V, C)).astype(np.float32)              # (V, C)
    worst = 0.0
    for step, (na, nb) in enumerate([(4, 7), (1, 1), (1, 1), (1, 1)]):
        x = rows(na + nb, 200 + step)                                                            # (na+nb, C)
        want = blocks_forward(x, stage.blocks, n_head=H, segments=[(whole[0], na), (whole[1], nb)])
        got = blocks_forward_split(x, parts, n_heads=[s.n_head for s in shares],
                                   segments=[[(c[0], na), (c[1], nb)] for c in mine])
        if m == 1:
            assert_same(got, want, "one member runs block's calls in block's order")
        assert_close(got, want, f"{m} members, batched step {step}")
        assert_close(head(got, ln_f, lm_head), head(want, ln_f, lm_head), f"{m} members, logits", tol=1e-4)
        worst = max(worst, max_diff(got, want))
    assert [c.length for c in mine[-1]] == [w.length for w in whole] == [7, 10]
    with capsys.disabled():
        print(f"\n{m} members, 2 sessions batched, 4 steps: largest difference {worst:.2e} (tolerance 1e-05)")


# ---------------------------------------------------------------------------------------------
# a member loads only its part


def test_read_part_worked_example(tmp_path):
    """read_part's docstring: rows of a (4, 6) tensor holding 0..23, and column ranges of each row."""
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, {"t": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.arange(6, dtype=np.float16)})
    info = read_header(path).tensors
    with open(path, "rb") as f:
        assert read_part(f, info["t"], rows=(1, 3)).tolist() == [list(range(6, 12)), list(range(12, 18))]
        got = read_part(f, info["t"], cols=[(0, 1), (4, 6)], chunk_bytes=30)      # one row per chunk
        assert got.tolist() == [[r * 6, r * 6 + 4, r * 6 + 5] for r in range(4)]
        assert read_part(f, info["t"], rows=(2, 4), cols=[(3, 5)]).tolist() == [[15, 16], [21, 22]]
        f_order = read_part(f, info["t"], rows=(1, 4), order="F")                    # column-major on the way
        assert f_order.flags.f_contiguous and f_order.tolist() == np.arange(6, 24).reshape(3, 6).tolist()
        b = read_part(f, info["b"], cols=[(1, 3)])
        assert b.dtype == np.float16 and b.tolist() == [1, 2]
        with pytest.raises(ValueError, match=r"'t' has shape \[4, 6\]: rows 0\.\.4 and columns \[\(5, 7\)\]"):
            read_part(f, info["t"], cols=[(5, 7)])


def as_bytes(part, prefix="") -> dict:
    """Every array of a block's (or a member's) parameters: "attn.c_attn.w" -> (dtype, shape, bytes)."""
    out = {}
    for k, v in part.items():
        if isinstance(v, dict):
            out.update(as_bytes(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = (v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes())
    return out


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_a_member_loads_the_very_bytes_of_its_slices(weights, stage, m):
    """load_stage(share=(r, m)) reads, for blocks 1..2, the bytes shard_block cuts from the whole
    block: the same float32 values, shapes and column-major layout. And shard_block's arrays are the
    file's tensors sliced by hand (checked here against the raw file, not the loader)."""
    raw = read_tensors(weights)
    for r in range(m):
        share = share_of(r, m, H, C)
        got = load_stage(weights, 1, 3, rank0=False, share=(r, m))
        assert got.share == share and not got.has_head and len(got.blocks) == 2
        for i, part in zip((1, 2), got.blocks):
            want = shard_block(stage.blocks[i], share)
            assert as_bytes(part) == as_bytes(want), f"member {r} of {m}, block {i}"
            kept = {n: "f_contiguous" if matrix_order(layout_orders()[0], n) == "F" else "c_contiguous"
                    for n in ("attn.c_attn.weight", "mlp.c_proj.weight")}
            assert getattr(part["attn"]["c_attn"]["w"].flags, kept["attn.c_attn.weight"]) and \
                getattr(part["mlp"]["c_proj"]["w"].flags, kept["mlp.c_proj.weight"])
            (a0, a1), (f0, f1) = share.attn_rows, share.hidden
            qkv = np.concatenate([np.arange(a, b) for a, b in share.qkv_columns])
            t = {k: raw[f"h.{i}.{k}"] for k in ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "ln_2.bias")}
            by_hand = {"attn.c_attn.w": t["attn.c_attn.weight"][:, qkv], "attn.c_attn.b": t["attn.c_attn.bias"][qkv],
                       "attn.c_proj.w": t["attn.c_proj.weight"][a0:a1], "mlp.c_fc.w": t["mlp.c_fc.weight"][:, f0:f1],
                       "mlp.c_fc.b": t["mlp.c_fc.bias"][f0:f1], "mlp.c_proj.w": t["mlp.c_proj.weight"][f0:f1],
                       "ln_2.b": t["ln_2.bias"]}
            loaded = as_bytes(part)
            for name, arr in by_hand.items():
                assert loaded[name][1:] == (arr.shape, np.ascontiguousarray(arr).tobytes()), f"{name}, {r} of {m}"


def test_a_members_stage_runs_the_split(weights, stage):
    """Two members loaded from the file, blocks 0..2, run as a split stage: within tolerance of the
    whole stage, on a prompt and two decode steps."""
    shares = [share_of(r, 2, H, C) for r in range(2)]
    parts = [load_stage(weights, rank0=False, share=(r, 2)).blocks for r in range(2)]
    whole, mine = KVCache(N_LAYER, H, D, N_CTX), [KVCache(N_LAYER, s.n_head, D, N_CTX) for s in shares]
    for step, n in enumerate([5, 1, 1]):
        x = rows(n, 300 + step)
        want = blocks_forward(x, stage.blocks, n_head=H, segments=[(whole, n)])
        got = blocks_forward_split(x, parts, n_heads=[6, 6], segments=[[(c, n)] for c in mine])
        assert_close(got, want, f"2 members loaded from the file, step {step}")


def test_a_float16_file_gives_float32_shares(weights, tmp_path):
    """Half-precision files are converted once, at load, member by member as for a whole stage."""
    raw = {k: v.astype(np.float16) for k, v in read_tensors(weights).items()}
    path = str(tmp_path / "half.safetensors")
    write_safetensors(path, raw, read_header(weights).metadata)
    whole = load_stage(path, rank0=False)
    for r in range(3):
        part = load_stage(path, rank0=False, share=(r, 3))
        assert part.blocks[0]["mlp"]["c_fc"]["w"].dtype == np.float32
        assert as_bytes(part.blocks[2]) == as_bytes(shard_block(whole.blocks[2], share_of(r, 3, H, C)))


def test_a_wrong_tensor_or_share_is_named(weights, tmp_path):
    raw = read_tensors(weights)
    raw["h.1.attn.c_proj.weight"] = raw["h.1.attn.c_proj.weight"][:30].copy()
    del raw["h.2.mlp.c_proj.bias"]
    path = str(tmp_path / "bad.safetensors")
    write_safetensors(path, raw, read_header(weights).metadata)
    with pytest.raises(WeightsError, match=r"'h\.1\.attn\.c_proj\.weight' has shape \[30, 36\], expected \[36, 36\]"):
        load_stage(path, 1, 2, rank0=False, share=(1, 2))
    with pytest.raises(WeightsError, match=r"missing tensor 'h\.2\.mlp\.c_proj\.bias'"):
        load_stage(path, 2, 3, rank0=False, share=(1, 2))      # member 1 adds no bias, but it must be there
    with pytest.raises(WeightsError, match=r"cannot load share 0 of 13: 13 members but only 12 heads"):
        load_stage(weights, rank0=False, share=(0, 13))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status (Linux)")
def test_a_member_of_two_peaks_near_its_half(tmp_path, capsys):
    """gpt2-medium-shaped blocks (C=1024): a member of 2 never holds the whole tensors on the way,
    so its peak RSS growth stays near what it keeps (about half the blocks), far below loading them
    whole. The numbers for 4 blocks: `bench_share_load` (docs/PERFORMANCE.md)."""
    path = str(tmp_path / "medium2.safetensors")
    init_weights(path, size="gpt2-medium", n_layer=2, n_vocab=1000, seed=0)
    whole = load_rss(path, 0, 2)
    half = load_rss(path, 0, 2, (1, 2))
    with capsys.disabled():
        print(f"\n2 gpt2-medium blocks: whole holds {whole['held_mb']} MB, peak growth {whole['peak_mb']} MB; "
              f"member 1 of 2 holds {half['held_mb']} MB, peak growth {half['peak_mb']} MB")
    assert abs(half["held_mb"] - whole["held_mb"] / 2) < 1, "a member of 2 keeps half the blocks"
    # what it keeps plus the 4 MB row buffer and slack; reading each tensor whole and slicing it
    # would add the largest one, mlp.c_fc (16 MB), on top
    assert half["peak_mb"] <= half["held_mb"] + 10, "a member's load held more than its part plus a buffer"
    assert half["peak_mb"] < 0.6 * whole["peak_mb"]


def test_a_member_loads_from_a_pulled_slice_and_the_transformers_layout(weights, stage, tmp_path):
    """A slice file holding blocks 1..2 only (what `pull --layers 1-2` writes), in save_pretrained's
    layout (`transformer.` prefix, no mask buffers): a member reads its part of it all the same."""
    raw = read_tensors(weights)
    part = {"transformer." + k: v for k, v in raw.items()
            if k.startswith(("h.1.", "h.2.")) and not k.endswith(".attn.bias")}           # no mask buffers
    path = str(tmp_path / "slice.safetensors")
    write_safetensors(path, part, {"n_head": str(H), "n_layer": str(N_LAYER), "n_ctx": str(N_CTX), "n_vocab": str(V)})
    for r in range(3):
        got = load_stage(path, 1, 3, rank0=False, share=(r, 3))
        for i, block_part in zip((1, 2), got.blocks):
            assert as_bytes(block_part) == as_bytes(shard_block(stage.blocks[i], share_of(r, 3, H, C))), (r, i)
    with pytest.raises(WeightsError, match=r"lacks layers 0\.\.0"):
        load_stage(path, 0, 2, rank0=False, share=(0, 3))
