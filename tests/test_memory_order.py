"""The memory order this process keeps its weights in (kernels.choose_layout): block matrices and the
LM head row-major (C) or column-major (F), pinned by NANOPIPE_BLOCK_ORDER / NANOPIPE_HEAD_ORDER or
measured at start, before the weights load. Every order gives the same model: logits within float
tolerance of each other (BLAS sums in another order), a cluster bit for bit one process when both
are pinned alike; the loader keeps the order everywhere without a second copy; a bad setting is a
clear error; the measurement picks the faster order, for each block matrix on its own (CCCF: a fake
timer, nothing here is timed)."""
from __future__ import annotations

import dataclasses
import os
import sys
import tracemalloc

import numpy as np
import pytest
from floats import assert_close, assert_same, max_diff
from helpers import log_of

from nanopipe import kernels
from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.fast_decode import decode_blocks
from nanopipe.gpt2_tensors import MATRICES
from nanopipe.kernels import (
    KernelChoiceError,
    choose_layout,
    describe_kernels,
    head_in_slices,
    layout_orders,
    matrix_order,
)
from nanopipe.model import KVCache, block, blocks_forward, gpt2, shard_block, share_of
from nanopipe.weights import init_weights, load_stage

# (blocks, head); the first is the untimed default; CFCF: each block matrix in an order of its own
ORDERS = [("F", "C"), ("C", "F"), ("C", "C"), ("F", "F"), ("CFCF", "F")]


@pytest.fixture
def fresh(monkeypatch):
    """This process's kernel choice as at start, nothing decided yet; restored after the test."""
    for f in dataclasses.fields(kernels.Kernels):
        monkeypatch.setattr(kernels.kernels, f.name, f.default)
    return kernels.kernels


@pytest.fixture
def pin(monkeypatch, fresh):
    """pin(blocks, head): this process (and the nodes it starts) keep those orders, decided afresh."""
    def set_orders(block_order: str, head_order: str):
        for f in dataclasses.fields(kernels.Kernels):
            monkeypatch.setattr(kernels.kernels, f.name, f.default)
        monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, block_order)
        monkeypatch.setenv(kernels.HEAD_ORDER_ENV, head_order)
        assert layout_orders() == (block_order, head_order)
    return set_orders


def is_order(a, order: str) -> bool:
    return bool(a.flags.c_contiguous if order == "C" else a.flags.f_contiguous)


def matrices(blocks) -> list:
    return [p[g][n]["w"] for p in blocks for g, n in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                                                       ("mlp", "c_proj"))]


def kept_in(blocks, block_order: str) -> bool:
    """Every block matrix in its order: one letter for all, or one each (kernels.matrix_order)."""
    return all(is_order(w, matrix_order(block_order, MATRICES[i % 4])) for i, w in enumerate(matrices(blocks)))


# ---------------------------------------------------------------------------------------------
# the choice


def fake_timer(ms: dict, seen: list):
    """A time_pass that times nothing: ms[what][order] a pass (the blocks': spread evenly over the
    matrices, or {matrix name: ms} for each block matrix's own, spread over that matrix's copies),
    told apart by the matrices' own memory order (the head's probe is wte.T: wte column-major is
    wte.T row-major). Returns each matrix's ms, as kernels._time_pass does."""
    def time_pass(mats, xs):
        w = mats[0]
        what = "head" if len(mats) == 1 else "blocks"
        order = ("C" if w.flags.c_contiguous else "F") if what == "blocks" else ("F" if w.flags.c_contiguous else "C")
        seen.append((what, order))
        assert all(x.shape[0] == 1 for x in xs.values()), "one row: a decode step"
        per = ms[what][order]
        if not isinstance(per, dict):
            return [per / len(mats)] * len(mats)
        assert len(mats) % 4 == 0, "the probe's blocks: c_attn, attn.c_proj, c_fc, mlp.c_proj, repeated"
        return [per[MATRICES[i % 4]] / (len(mats) // 4) for i in range(len(mats))]
    return time_pass


@pytest.mark.parametrize("fast", [("C", "F"), ("F", "C")], ids=["C blocks, F head faster", "F blocks, C head faster"])
def test_the_measured_choice_picks_the_faster_order(monkeypatch, fresh, fast):
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "auto")
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "auto")
    slow = {"C": "F", "F": "C"}
    ms = {"blocks": {fast[0]: 10.0, slow[fast[0]]: 13.0}, "head": {fast[1]: 5.0, slow[fast[1]]: 7.5}}
    seen = []
    k = choose_layout(64, 1000, time_pass=fake_timer(ms, seen))
    assert (k.block_order, k.head_order) == fast, k.layout_how
    assert {(w, o) for w, o in seen} == {(w, o) for w in ("blocks", "head") for o in "CF"}, "both orders timed, each"
    line = describe_kernels()
    print(line)
    assert "measured" in line and f"blocks C {ms['blocks']['C']:.2f} vs F {ms['blocks']['F']:.2f} ms" in line
    assert f"head C {ms['head']['C']:.2f} vs F {ms['head']['F']:.2f} ms" in line
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, slow[fast[0]])
    assert choose_layout(64, 1000, time_pass=fake_timer(ms, seen)) is k and k.block_order == fast[0], \
        "a process decides once and keeps it"


def test_each_block_matrix_keeps_the_order_measured_faster_for_it(monkeypatch, fresh, tiny_weights):
    """One BLAS thread may read c_fc (C, 4C) faster row-major and mlp.c_proj (4C, C) faster
    column-major: each matrix keeps its own faster order, the log names each one's times, the loader
    keeps each matrix so, and NANOPIPE_BLOCK_ORDER pins four letters as it pins one."""
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "auto")
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "auto")
    each = {"attn.c_attn.weight": {"C": 3.0, "F": 3.5}, "attn.c_proj.weight": {"C": 1.25, "F": 1.0},
            "mlp.c_fc.weight": {"C": 4.0, "F": 5.0}, "mlp.c_proj.weight": {"C": 5.5, "F": 4.5}}
    ms = {"blocks": {o: {n: t[o] for n, t in each.items()} for o in "CF"}, "head": {"C": 5.0, "F": 6.0}}
    k = choose_layout(64, 1000, time_pass=fake_timer(ms, []))
    assert (k.block_order, k.head_order) == ("CFCF", "C"), k.layout_how
    line = describe_kernels()
    print(line)
    assert ("blocks CFCF: c_attn C 3.00 vs F 3.50, attn.c_proj C 1.25 vs F 1.00, c_fc C 4.00 vs F 5.00, "
            "mlp.c_proj C 5.50 vs F 4.50 ms") in line
    assert "block matrices c_attn C, attn.c_proj F, c_fc C, mlp.c_proj F, the LM head row-major (C)" in line
    assert kept_in(load_stage(tiny_weights).blocks, "CFCF") and not kept_in(load_stage(tiny_weights).blocks, "C")
    assert kept_in(load_stage(tiny_weights, rank0=False, share=(0, 2)).blocks, "CFCF"), "a member's share too"
    for pinned, kept in (("cccf", "CCCF"), ("FFFF", "F"), ("C", "C")):
        for f in dataclasses.fields(kernels.Kernels):
            monkeypatch.setattr(kernels.kernels, f.name, f.default)
        monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, pinned)
        k = choose_layout(64, 1000, time_pass=fake_timer(ms, []))
        assert k.block_order == kept and "blocks pinned by NANOPIPE_BLOCK_ORDER" in k.layout_how, (pinned, k)


def test_pinned_orders_time_nothing_and_a_worker_keeps_the_heads_untimed(monkeypatch, fresh):
    def never(*args):
        raise AssertionError("timed although pinned")
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "c")
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "F")
    k = choose_layout(64, 1000, time_pass=never)
    assert (k.block_order, k.head_order) == ("C", "F") and "pinned by NANOPIPE_BLOCK_ORDER" in k.layout_how
    assert "block matrices row-major (C), the LM head column-major (F)" in describe_kernels()
    for f in dataclasses.fields(kernels.Kernels):
        monkeypatch.setattr(kernels.kernels, f.name, f.default)
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "auto")
    seen = []
    k = choose_layout(64, None, time_pass=fake_timer({"blocks": {"C": 1.0, "F": 2.0}}, seen))   # no head here
    assert (k.block_order, k.head_order) == ("C", "F") and {w for w, _ in seen} == {"blocks"}, "the pinned head"
    for f in dataclasses.fields(kernels.Kernels):
        monkeypatch.setattr(kernels.kernels, f.name, f.default)
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "auto")
    k = choose_layout(64, None, time_pass=fake_timer({"blocks": {"C": 3.0, "F": 2.0}}, seen))
    assert (k.block_order, k.head_order) == ("F", "C") and "no LM head in this process" in k.layout_how


def test_the_real_measurement_runs_both_orders_on_matrices_of_the_models_shapes(fresh):
    """The probe's matrices: the model's widths, both orders views of the same bytes (no second copy)."""
    probe = kernels.layout_probe(64, 1000, "blocks", budget=1 << 20)
    assert [w.shape for w in probe["C"][:4]] == [(64, 192), (64, 64), (64, 256), (256, 64)]
    assert all(c.flags.c_contiguous and f.flags.f_contiguous and np.shares_memory(c, f)
               for c, f in zip(probe["C"], probe["F"]))
    head = kernels.layout_probe(64, 1000, "head", budget=1 << 20)
    assert head["C"][0].shape == (64, 1000) and head["F"][0].flags.c_contiguous, "wte.T; wte F is wte.T C"
    times = kernels.measure_layout(64, 1000, repeats=1)
    assert set(times) == {"blocks", "head"} and set(times["blocks"]) == set(MATRICES), "each block matrix on its own"
    assert all(ms > 0 for t in [times["head"], *times["blocks"].values()] for ms in t.values())


@pytest.mark.parametrize("value", ["G", "row-major", "1", "CF", "CCCX", "CCCFC"])
@pytest.mark.parametrize("env", ["NANOPIPE_BLOCK_ORDER", "NANOPIPE_HEAD_ORDER"])
def test_a_bad_order_setting_is_a_clear_error(monkeypatch, fresh, tiny_weights, env, value):
    monkeypatch.setenv(env, value)
    each = r", or one letter per block matrix \(c_attn, attn.c_proj, c_fc, mlp.c_proj\) such as CCCF" \
        if env == "NANOPIPE_BLOCK_ORDER" else ""
    want = rf"{env}='{value}' is not a memory order: give C \(row-major\), F \(column-major\){each}, or 'auto'"
    with pytest.raises(KernelChoiceError, match=want):
        choose_layout(64, 1000)
    with pytest.raises(KernelChoiceError, match=want):
        load_stage(tiny_weights, 0, 1)                           # untimed, and still refused


def test_a_node_with_a_bad_order_setting_says_so_and_exits(tiny_weights, tmp_path):
    """A real `nanopipe join` whose NANOPIPE_BLOCK_ORDER is wrong: the message, exit 2, no traceback."""
    import os
    import subprocess

    from nanopipe.tools.localcluster import LocalCluster
    cl = LocalCluster(tiny_weights, nodes=2, workdir=str(tmp_path))
    env = dict(os.environ, NANOPIPE_BLOCK_ORDER="rows")
    r = subprocess.run(cl.command(1), capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "NANOPIPE_BLOCK_ORDER='rows' is not a memory order" in out and "Traceback" not in out, out


# ---------------------------------------------------------------------------------------------
# the loader keeps it, everywhere, without a second copy


@pytest.mark.parametrize("orders", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_the_loader_keeps_the_chosen_order_whole_and_shared(tiny_weights, pin, orders):
    pin(*orders)
    st = load_stage(tiny_weights)
    assert kept_in(st.blocks, orders[0]), "every block matrix"
    assert is_order(st.lm_head, orders[1]) and st.lm_head is st.wte, "wte, tied: one array"
    assert st.wpe.flags.c_contiguous and st.blocks[0]["ln_1"]["g"].flags.c_contiguous
    share = share_of(1, 2, st.config.n_head, st.config.n_embd)
    part = load_stage(tiny_weights, rank0=False, share=(1, 2))
    cut = [shard_block(p, share) for p in st.blocks]
    assert kept_in(part.blocks, orders[0]) and kept_in(cut, orders[0]), "a member's share too"
    for got, want in zip(matrices(part.blocks), matrices(cut)):
        assert_same(got, want, "the file's share and the cut block: the same bytes")
    pin("F", "C")
    ref = load_stage(tiny_weights)
    for got, want in zip(matrices(st.blocks) + [st.wte], matrices(ref.blocks) + [ref.wte]):
        assert_same(got, want, "the same values in either order")


@pytest.mark.parametrize("orders", ORDERS[1:], ids=["-".join(o) for o in ORDERS[1:]])
def test_the_placement_probe_runs_the_loaders_order(pin, orders):
    from nanopipe.placement import probe_blocks
    pin(*orders)
    assert kept_in(probe_blocks(64, min_bytes=1 << 20), orders[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status (Linux)")
@pytest.mark.parametrize("orders", [("C", "F"), ("F", "F")], ids=["C-F", "F-F"])
def test_rank0_with_a_column_major_head_peaks_near_what_it_keeps(tmp_path_factory, monkeypatch, orders, capsys):
    """wte (50257 x 768, 154 MB) kept column-major is laid out on the way through read_part's 4 MB
    buffer: the load's peak RSS growth stays near what the stage keeps, not a second 154 MB."""
    from nanopipe.tools.bench import load_rss
    path = str(tmp_path_factory.mktemp("onelayer") / "gpt2-1.safetensors")
    init_weights(path, size="gpt2", n_layer=1, seed=0)
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, orders[0])      # the child process inherits them
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, orders[1])
    m = load_rss(path, 0, 1, rank0=True)
    with capsys.disabled():
        print(f"\nrank 0 of gpt2 (1 block), orders {orders}: holds {m['held_mb']} MB, peak growth {m['peak_mb']} MB")
    assert m["peak_mb"] <= m["held_mb"] + 20, "the load held more than its arrays plus a buffer"


def test_a_slice_of_a_column_major_wte_is_read_in_place():
    """head_in_slices on wte kept column-major: each slice of rows is a strided view BLAS reads as
    it is; tracemalloc (numpy reports its buffers to it) sees no copy, only the logits. A view BLAS
    cannot take (every other column) is copied, and seen: the check can fail."""
    rng = np.random.default_rng(0)
    wte_c = rng.standard_normal((50257, 64)).astype(np.float32)
    wte_f = np.asfortranarray(wte_c)
    h = rng.standard_normal((3, 64)).astype(np.float32)
    head_in_slices(h, wte_f)                                    # warm-up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        got = head_in_slices(h, wte_f)
        peak = tracemalloc.get_traced_memory()[1]
        strided = np.asfortranarray(np.repeat(wte_c, 2, axis=1))[:, ::2]
        tracemalloc.reset_peak()
        head_in_slices(h, strided)
        copied = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"column-major wte: peak {peak / 1e6:.2f} MB for {got.nbytes / 1e6:.2f} MB of logits; "
          f"a view BLAS cannot read: {copied / 1e6:.2f} MB")
    assert peak < got.nbytes + (1 << 20), "a slice of wte was copied"
    assert copied > got.nbytes + kernels.HEAD_SLICE_BYTES // 2, "the check does not see copies"
    assert_close(got, head_in_slices(h, wte_c), "sliced head, F vs C wte")


# ---------------------------------------------------------------------------------------------
# the same model in every order


def gpt2_small_width(order: str, head_order: str, n_layer: int = 2, V: int = 8000, seed: int = 0):
    """Blocks at gpt2-small's width (C=768, H=12: the BLAS paths real weights take) and a wte of V
    rows, GPT-2-like magnitudes, the matrices kept in `order` (kernels.matrix_order) and wte in `head_order`."""
    rng = np.random.default_rng(seed)
    C = 768

    def w(*shape, scale=0.02, keep="C"):
        a = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
        return np.asfortranarray(a) if keep == "F" else a

    def ln():
        return {"g": 1 + w(C, scale=0.1), "b": w(C, scale=0.1)}
    kept = [matrix_order(order, n) for n in MATRICES]
    blocks = [{"ln_1": ln(), "attn": {"c_attn": {"w": w(C, 3 * C, keep=kept[0]), "b": w(3 * C)},
                                      "c_proj": {"w": w(C, C, keep=kept[1]), "b": w(C)}},
               "ln_2": ln(), "mlp": {"c_fc": {"w": w(C, 4 * C, keep=kept[2]), "b": w(4 * C)},
                                     "c_proj": {"w": w(4 * C, C, keep=kept[3]), "b": w(C)}}}
              for _ in range(n_layer)]
    return blocks, w(V, C, scale=0.1, keep=head_order), w(64, C, scale=0.01), ln()


@pytest.mark.parametrize("orders", ORDERS[1:], ids=["-".join(o) for o in ORDERS[1:]])
def test_every_order_gives_the_logits_of_the_default_within_tolerance(monkeypatch, fresh, orders):
    """A 5-row prompt, then decode steps of 1 and of 3 sequences (a gemv each, then one gemm at 6),
    through gpt2(): each order's logits within 1e-4 of the default order's (largest difference printed)."""
    monkeypatch.setattr(kernels.kernels, "gemv_rows", 4)
    monkeypatch.setattr(kernels.kernels, "chosen", True)
    monkeypatch.setattr(kernels.kernels, "head_rows", 4)
    monkeypatch.setattr(kernels.kernels, "head_how", "pinned")
    logits = {}
    for o in (ORDERS[0], orders):
        blocks, wte, wpe, ln_f = gpt2_small_width(*o)
        caches = [KVCache(len(blocks), 12, 64, 64) for _ in range(6)]
        out = [gpt2(np.array([5, 6, 7, 8, 9]), np.arange(5), wte, wpe, blocks, ln_f, wte, n_head=12,
                    segments=[(caches[0], 5)])]                                    # (5, V) a prompt
        for c in caches[1:]:
            gpt2(np.array([1, 2]), np.arange(2), wte, wpe, blocks, ln_f, wte, n_head=12, segments=[(c, 2)])
        for T in (1, 3, 6):                                                        # decode steps
            ids = np.arange(T) + 10
            pos = np.array([c.length for c in caches[:T]])
            out.append(gpt2(ids, pos, wte, wpe, blocks, ln_f, wte, n_head=12, segments=[(c, 1) for c in caches[:T]]))
        logits[o] = out
    diffs = [max_diff(a, b) for a, b in zip(logits[orders], logits[ORDERS[0]])]
    print(f"orders {orders} vs {ORDERS[0]}: largest logit difference per step {['%.1e' % d for d in diffs]}")
    for step, (a, b) in enumerate(zip(logits[orders], logits[ORDERS[0]])):
        assert_close(a, b, f"step {step}, orders {orders}", tol=1e-4)
        assert (a.argmax(-1) == b.argmax(-1)).all(), f"step {step}: greedy tokens differ"


@pytest.mark.parametrize("order", ["C", "F", "CFCF"])
@pytest.mark.parametrize("lengths", [[5], [5, 9, 3], [2, 3, 4, 5, 6, 7]], ids=["1", "3 (a gemv each)", "6 (one gemm)"])
def test_the_decode_fast_path_equals_block_bit_for_bit_in_either_order(monkeypatch, fresh, order, lengths):
    monkeypatch.setattr(kernels.kernels, "gemv_rows", 4)
    monkeypatch.setattr(kernels.kernels, "chosen", True)
    blocks = gpt2_small_width(order, "C")[0]
    rng = np.random.default_rng(1)
    caches = []
    for n in lengths:
        c = KVCache(len(blocks), 12, 64, 64)
        blocks_forward(rng.standard_normal((n, 768)).astype(np.float32), blocks, n_head=12, segments=[(c, n)])
        caches.append(c)
    import copy
    twins = copy.deepcopy(caches)
    x = rng.standard_normal((len(lengths), 768)).astype(np.float32)
    for c in caches + twins:
        c.reserve(1)
    fast = decode_blocks(x, blocks, n_head=12, segments=[(c, 1) for c in caches])
    plain = x
    for layer, p in enumerate(blocks):
        plain = block(plain, **p, n_head=12, layer=layer, segments=[(c, 1) for c in twins])
    assert_same(fast, plain, f"decode_blocks runs block's calls, {order} order")
    for a, b, n in zip(caches, twins, lengths):                  # the filled rows: n cached + the new one
        assert_same(a.k[:, :, :n + 1], b.k[:, :, :n + 1], "keys")
        assert_same(a.v[:, :, :n + 1], b.v[:, :, :n + 1], "values")


def test_greedy_tokens_are_the_same_in_every_order(tiny_weights, pin):
    got = {}
    for orders in ORDERS:
        pin(*orders)
        eng = Engine.load(tiny_weights)
        assert kept_in(eng.stage.blocks, orders[0]) and is_order(eng.stage.wte, orders[1])
        got[orders] = eng.generate([15496, 995, 11], SamplingParams("greedy", max_tokens=12))
    want = got[ORDERS[0]]
    for orders, r in got.items():
        assert r["token_ids"] == want["token_ids"], orders
        assert_close(r["logprobs"], want["logprobs"], f"logprobs, orders {orders}", tol=1e-4)


@pytest.mark.parametrize("orders", [("C", "F")], ids=["C blocks, F head"])
def test_a_cluster_pinned_alike_equals_one_process_bit_for_bit(tiny_weights, pin, orders, tmp_path):
    """Real `nanopipe serve` + 2 `join` processes keeping the non-default orders (the environment
    they inherit): the same tokens and the very same logprobs as one process pinned alike."""
    from nanopipe.tools.localcluster import LocalCluster
    pin(*orders)
    engine = Engine.load(tiny_weights)
    cases = [SamplingParams("greedy", max_tokens=10),
             SamplingParams("sampling", temperature=0.8, max_tokens=10, seed=3)]
    want = [engine.generate([15496, 995, 11, 616], p) for p in cases]
    env = {kernels.BLOCK_ORDER_ENV: orders[0], kernels.HEAD_ORDER_ENV: orders[1]}
    with LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), env=env, ready_timeout=60) as cl:
        with cl.client() as c:
            got = [c.generate([15496, 995, 11, 616], p) for p in cases]
        logs = [log_of(cl, r) for r in range(3)]
    for g, w, p in zip(got, want, cases):
        assert g["token_ids"] == w["token_ids"], p
        assert_same(g["logprobs"], w["logprobs"], f"{p}: a stage is a slice of the model, pinned alike")
    kept = "weights kept: block matrices row-major (C), the LM head column-major (F)"
    assert all(kept in log for log in logs), "every node says which orders it keeps:\n" + logs[1][-1500:]


def test_the_crossovers_are_measured_after_the_layout_on_weights_kept_in_it(tiny_weights, monkeypatch, fresh):
    """Engine.load decides the orders first (before the weights load), then the gemv and head
    crossovers on the loaded weights, which are in the chosen orders (fakes stand for the timing)."""
    for env in (kernels.BLOCK_ORDER_ENV, kernels.HEAD_ORDER_ENV, kernels.GEMV_ROWS_ENV, kernels.HEAD_ROWS_ENV):
        monkeypatch.setenv(env, "auto")
    calls = []
    monkeypatch.setattr(kernels, "measure_layout", lambda *a, **k: calls.append("layout") or
                        {"blocks": {n: {"C": 1.0, "F": 2.0} for n in MATRICES}, "head": {"C": 2.0, "F": 1.0}})

    def gemv_rows(blocks, *a, **k):
        calls.append(("gemv", "C" if blocks[0]["mlp"]["c_fc"]["w"].flags.c_contiguous else "F"))
        return 3, {}

    def head_rows(lm_head, *a, **k):
        calls.append(("head", "F" if lm_head.flags.f_contiguous else "C"))
        return 2, {}
    monkeypatch.setattr(kernels, "measure_gemv_rows", gemv_rows)
    monkeypatch.setattr(kernels, "measure_head_rows", head_rows)
    eng = Engine.load(tiny_weights)
    assert calls == ["layout", ("gemv", "C"), ("head", "F")], calls
    assert is_order(eng.stage.blocks[0]["attn"]["c_attn"]["w"], "C") and is_order(eng.stage.lm_head, "F")


def test_the_bench_runs_each_order_and_the_measured_one_side_by_side(tmp_path, monkeypatch, fresh):
    """bench.compare_orders (`make bench`, part "orders"): the four one-letter layouts, plus the one
    this process measures (each block matrix its own: a fake timer makes it CFCF here), decode steps
    of each in turn; the process's own choice and the pinned settings are as they were after."""
    from nanopipe.tools.bench import compare_orders
    path = str(tmp_path / "tiny.safetensors")
    init_weights(path, n_layer=2, n_embd=64, n_head=4, n_ctx=64, seed=0)
    each = {"attn.c_attn.weight": {"C": 1.0, "F": 2.0}, "attn.c_proj.weight": {"C": 2.0, "F": 1.0},
            "mlp.c_fc.weight": {"C": 1.0, "F": 2.0}, "mlp.c_proj.weight": {"C": 2.0, "F": 1.0}}
    ms = {"blocks": {o: {n: t[o] for n, t in each.items()} for o in "CF"}, "head": {"C": 1.0, "F": 2.0}}
    real = kernels.measure_layout
    monkeypatch.setattr(kernels, "measure_layout", lambda *a, **k: real(*a, **dict(k, time_pass=fake_timer(ms, []))))
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "F")
    layout = ("block_order", "head_order", "layout_how", "block_order_how", "head_order_how", "layout_timed")
    choose_layout(64, 1000)                                     # pinned: F blocks, the tests' head
    before = {name: getattr(kernels.kernels, name) for name in layout}
    lines = []
    got = compare_orders(path, steps=2, position=4, echo=lines.append)
    assert set(got) == {("F", "C"), ("C", "C"), ("F", "F"), ("C", "F"), ("CFCF", "C")}, got
    assert all(row["wall_min"] > 0 for row in got.values())
    assert any(ln.startswith("the orders this process measures faster: measured, one row: blocks CFCF: c_attn C 1.00")
               for ln in lines), lines
    assert any("blocks CFCF, head C: CPU ms min" in ln for ln in lines), lines
    assert {name: getattr(kernels.kernels, name) for name in layout} == before and layout_orders()[0] == "F"
    assert os.environ[kernels.BLOCK_ORDER_ENV] == "F"
