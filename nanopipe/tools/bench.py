"""How fast nanopipe decodes, and how fast it could decode on this machine.

Decoding one token multiplies a single row (1, C) by every weight matrix of every block and by
the LM head (C, V). Each weight is used for one multiply-add per token, so the CPU spends its time
waiting for memory: a token cannot come faster than memory delivers those bytes. For gpt2-small
in float32:

    blocks   12 x 7.08 M parameters x 4 bytes  =  340 MB
    LM head  768 x 50257 x 4 bytes             =  154 MB
    read per token                                494 MB
    bound = memory bandwidth / bytes per token:  29 GB/s / 494 MB = 59 tokens/s

`nanopipe bench` measures the bandwidth and nanopipe's decode and prefill speed in one process, and
prints one short table: each figure, what it is compared with, and a verdict where there is a target
(`quick_bench`, well under a minute for gpt2). `nanopipe bench --full` adds where a decode step's time
goes (`profile_decode`), the kernels' alternatives, and, under `make bench`, HF transformers and
llama.cpp on the same weights (`run_bench`). Each part returns a plain dict, so more rows (a cluster, many
concurrent clients) can be added to the same table.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

from .. import batching, fast_decode, model, pages  # batching.Batcher.back runs the head; timing_decode_blocks
from ..config import WEIGHTS_DIR
from ..decoding import SamplingParams, log_softmax, make_rng, sample
from ..engine import Engine, Request
from ..kernels import BLOCK_ORDER_ENV, HEAD_ORDER_ENV, describe_kernels, kernels, product
from ..model import KVCache, blocks_forward, embed, gpt2, head, layer_norm
from ..weights import ensure_synthetic, is_synthetic, load_stage, synthetic_name

DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, synthetic_name("gpt2"))   # shared with demo, trace, init-weights
TARGET_VS_HF = 1.8          # decode tokens/s relative to transformers
TARGET_VS_BOUND = 0.85      # decode tokens/s relative to the memory-bandwidth bound


def ensure_weights(path: str = DEFAULT_WEIGHTS, echo=print) -> str:
    """gpt2-small-shaped synthetic weights at `path`, written once (about 550 MB, a few seconds).

    The default path is the one synthetic gpt2 file every command shares; another path that
    already exists is used as it is."""
    if os.path.abspath(path) == os.path.abspath(DEFAULT_WEIGHTS) or not os.path.exists(path):
        return ensure_synthetic(path, os.path.dirname(path) or ".", "gpt2", seed=0, log=echo)
    return path


def blas_threads() -> int:
    """The threads numpy's BLAS uses: threadpoolctl's answer if installed, else the usual variables."""
    try:    # imported here: threadpoolctl is optional (not a nanopipe package), the variables are the fallback
        from threadpoolctl import threadpool_info
        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if counts:
            return int(counts[0])
    except ImportError:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def bench_prompt(prompt_len: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).integers(0, 50000, prompt_len).tolist()


# ---------------------------------------------------------------------------------------------
# the bound


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """This machine's memory read bandwidth in GB/s, as a decode step sees it.

    The measurement is a decode step's own operation, one row times a matrix, (1, in) @ (in, out)
    as in `model.linear`, on a matrix far larger than any cache: every byte comes from memory once,
    and BLAS uses all its threads. Best of `repeats`.
    """
    n_in = 1024
    n_out = max(1, nbytes // (4 * n_in))
    w = np.full((n_in, n_out), 0.5, np.float32)             # (in, out), touched once so it is resident
    x = np.ones((1, n_in), np.float32)                      # (1, in)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ w                                               # (1, in) @ (in, out) -> (1, out)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9


def bytes_per_token(stage) -> int:
    """Weight bytes one decode step reads: every block matrix and bias, and the LM head (C, V).

    The embeddings contribute one row each, which is negligible, so they are left out.
    """
    def leaves(d):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]
    blocks = sum(a.nbytes for p in stage.blocks for a in leaves(p))
    return blocks + (stage.lm_head.nbytes if stage.lm_head is not None else 0)


def compare_orders(weights: str | None = None, steps: int = 100, position: int = 32, echo=print) -> dict:
    """The weights' memory orders (kernels.choose_layout) side by side in one process: the model loaded
    once per (blocks, head) order, each block matrix in one order (C or F) and then as this process
    measures them (each block matrix its own faster order, "CCCF"; a fifth copy only when that is
    not one of the four), then one decode step of each in turn (`step_by_step`).
    {(blocks, head): {"cpu_min", "cpu_median", "wall_min", ...}}

        OPENBLAS_NUM_THREADS=1 python -c "from nanopipe.tools.bench import compare_orders; compare_orders()"
    """
    weights = ensure_weights(weights or DEFAULT_WEIGHTS, echo=echo)
    saved = {k: os.environ.get(k) for k in (BLOCK_ORDER_ENV, HEAD_ORDER_ENV)}
    layout = ("block_order", "head_order", "layout_how", "block_order_how", "head_order_how", "layout_timed")
    saved_layout = {name: getattr(kernels, name) for name in layout}
    stages, measured = {}, None
    try:
        for orders in (("F", "C"), ("C", "C"), ("F", "F"), ("C", "F"), ("auto", "auto")):
            os.environ[BLOCK_ORDER_ENV], os.environ[HEAD_ORDER_ENV] = orders
            kernels.layout_how = None                               # decided again: pinned to these, or measured
            st = load_stage(weights, choose_order=True)
            if orders == ("auto", "auto"):
                measured, orders = kernels.layout_how, (kernels.block_order, kernels.head_order)
            stages.setdefault(orders, st)
    finally:
        for name, value in saved_layout.items():
            setattr(kernels, name, value)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    echo(f"the orders this process measures faster: {measured}")
    return step_by_step(stages, steps, position, lambda o: f"blocks {o[0]}, head {o[1]}", echo)


def compare_pages(weights: str | None = None, steps: int = 100, position: int = 32, echo=print) -> dict:
    """The weights in huge pages (pages.Arena, what the loader does) against the same weights where
    numpy's own allocator puts them (what it did before: numpy asks for huge pages only for arrays of
    4 MB and more, and a malloc'd array's first and last partial 2 MB stay in 4 KB pages), side by
    side in one process, one decode step of each in turn (`step_by_step`), and each one's matmul
    floor, interleaved. {"huge": {...}, "numpy": {...}} with "pages_mb" (how much of each copy is
    in huge pages) and "floor_ms".

        OPENBLAS_NUM_THREADS=1 python -c "from nanopipe.tools.bench import compare_pages; compare_pages()"
    """
    weights = ensure_weights(weights or DEFAULT_WEIGHTS, echo=echo)
    stages, held = {}, {}
    for name, possible in (("numpy", lambda: False), ("huge", pages.huge_pages_possible)):
        before = pages.huge_page_bytes() or 0
        with _swapped(pages, "huge_pages_possible", possible):
            stages[name] = load_stage(weights, choose_order=True)
        held[name] = round(((pages.huge_page_bytes() or 0) - before) / 1e6, 1)
    out = step_by_step(stages, steps, position, lambda name: f"weights in {name}'s pages", echo)
    floors = {name: [] for name in stages}
    for _ in range(max(5, steps // 10)):
        for name, st in stages.items():
            floors[name].append(matmul_floor(st, repeats=3)["ms_per_token"])
    for name in stages:
        out[name].update(pages_mb=held[name], floor_ms=round(float(np.median(floors[name])), 2))
        echo(f"  weights in {name}'s pages: {held[name]} MB of them in huge pages; matmuls alone "
             f"{out[name]['floor_ms']} ms a token (median)")
    return out


@contextlib.contextmanager
def _swapped(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def step_by_step(stages: dict, steps: int, position: int, label, echo=print) -> dict:
    """One decode step of each stage in turn (embed, the blocks through `decode_blocks`, the LM head;
    one row at `position` after a `position`-token prompt), `steps` rounds, each step timed in wall ms
    and in this thread's CPU ms (all of it with one BLAS thread). Step by step, so every variant sees
    the same moments of a busy machine. {key: {"cpu_min", "cpu_median", "wall_min", "wall_median"}}"""
    runs = {}
    for key, st in stages.items():
        cache = KVCache.for_model(st.config, len(st.blocks))
        blocks_forward(embed(np.arange(position) % st.config.n_vocab, np.arange(position), st.wte, st.wpe),
                       st.blocks, n_head=st.config.n_head, segments=[(cache, position)])
        runs[key] = (st, cache)
    times = {key: ([], []) for key in runs}
    load = os.getloadavg()[0]
    for _ in range(steps):
        for key, (st, cache) in runs.items():
            cache.length = position                                 # the same position every round
            w0, c0 = time.perf_counter(), time.thread_time()
            x = embed(np.array([7]), np.array([position]), st.wte, st.wpe)                 # (1, C)
            x = blocks_forward(x, st.blocks, n_head=st.config.n_head, segments=[(cache, 1)])
            head(x, st.ln_f, st.lm_head)                                                    # (1, V)
            times[key][0].append((time.perf_counter() - w0) * 1000)
            times[key][1].append((time.thread_time() - c0) * 1000)
    out = {}
    echo(f"decode steps, {blas_threads()} BLAS thread(s), load average {load:.2f} -> {os.getloadavg()[0]:.2f}:")
    for key, (wall, cpu) in times.items():
        out[key] = {"cpu_min": round(min(cpu), 2), "cpu_median": round(float(np.median(cpu)), 2),
                    "wall_min": round(min(wall), 2), "wall_median": round(float(np.median(wall)), 2)}
        echo(f"  {label(key)}: CPU ms min {out[key]['cpu_min']} median {out[key]['cpu_median']}; "
             f"wall ms min {out[key]['wall_min']} median {out[key]['wall_median']}")
    return out


def matmul_floor(stage, repeats: int = 20) -> dict:
    """The time one token's weight matmuls alone take, nothing else: (1, C) @ every block matrix,
    then @ the LM head. Median of `repeats`, in ms, with the GB/s that is.

    This is the floor for any numpy implementation with these matrices: between it and
    `memory_bandwidth`'s bound lies BLAS's efficiency on 2-9 MB matrices; between it and the
    measured decode lies everything else a step does (LayerNorm, attention, GELU, biases, sampling).
    """
    C = stage.config.n_embd
    x, x4 = np.ones((1, C), np.float32), np.ones((1, 4 * C), np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in stage.blocks:                              # the products model.linear runs, bias aside
            product(x, p["attn"]["c_attn"]["w"]), product(x, p["attn"]["c_proj"]["w"])
            product(x, p["mlp"]["c_fc"]["w"]), product(x4, p["mlp"]["c_proj"]["w"])
        if stage.lm_head is not None:
            product(x, stage.lm_head.T)                     # (1, C) @ (C, V): a gemv on wte as kept
        times.append(time.perf_counter() - t)
    ms = float(np.median(times)) * 1000
    return {"ms_per_token": round(ms, 3), "gb_s": round(bytes_per_token(stage) / ms / 1e6, 2),
            "tokens_per_s": round(1000 / ms, 2)}


# ---------------------------------------------------------------------------------------------
# nanopipe in one process


def generate_fixed(engine: Engine, prompt_ids: list, n_tokens: int) -> dict:
    """Greedy generation of exactly n_tokens (no stop at <|endoftext|>), through the real scheduler.

    The result also has "token_times": when each token was emitted (perf_counter seconds), and
    "t_start": when the request was submitted.
    """
    box, times = {}, []

    def emit(kind, data):
        if kind == "token":
            times.append(time.perf_counter())
        box[kind] = data
    params = SamplingParams("greedy", max_tokens=n_tokens).validate(engine.config.n_ctx, len(prompt_ids))
    t_start = time.perf_counter()
    engine.scheduler.submit(Request(list(prompt_ids), params, emit, stop_at_eot=False))
    engine.scheduler.run_until_idle()
    if "error" in box:
        raise RuntimeError(box["error"]["error"])
    return dict(box["done"], token_times=times, t_start=t_start)


def decode_rate(runs: list) -> tuple:
    """(median tokens/s, mean tokens/s of the best run) from runs with "token_times".

    The median of the gaps between consecutive tokens, pooled over every run, is what a token costs
    when nothing else competes for the cores: a burst of other work on a shared machine stretches
    a few gaps, not the median. The best run's mean is reported beside it.
    """
    gaps = np.concatenate([np.diff(r["token_times"]) for r in runs])
    means = [(len(r["token_times"]) - 1) / (r["token_times"][-1] - r["token_times"][0]) for r in runs]
    return 1.0 / float(np.median(gaps)), max(means)


def bench_single(weights: str, prompt_len: int = 32, n_tokens: int = 64, repeats: int = 5,
                 between=None) -> dict:
    """Prefill and decode speed of one process on `weights`, after one warm-up run.

    prefill tokens/s = prompt_len / the shortest time to first token of `repeats` runs;
    decode tokens/s = 1 / the median time between two generated tokens (see `decode_rate`).
    `between()`, when given, is called before each run and its results are returned as "between":
    run_bench measures the memory bandwidth there, so that speed and bound see the same machine
    (on a shared host the bandwidth alone swings by half within minutes: docs/PERFORMANCE.md, "One process").
    """
    t = time.perf_counter()
    engine = Engine.load(weights, prefix_cache_bytes=0)   # every prompt computed in full
    load_s = time.perf_counter() - t
    ids = bench_prompt(prompt_len)
    generate_fixed(engine, ids, 2)                                      # warm-up: BLAS threads, caches
    runs, probes, cpu = [], [], []
    for _ in range(repeats):
        if between is not None:
            probes.append(between())
        c = time.process_time()                                         # every thread of this process
        runs.append(generate_fixed(engine, ids, n_tokens))
        cpu.append((time.process_time() - c) * 1000 / n_tokens)
    ttft = min(r["token_times"][0] - r["t_start"] for r in runs)
    median, best_mean = decode_rate(runs)
    return {
        "between": probes, "name": "nanopipe (1 process)", "prompt_len": prompt_len, "tokens": n_tokens,
        "load_s": round(load_s, 3), "prefill_ms": round(ttft * 1000, 2),
        "prefill_tokens_per_s": round(prompt_len / ttft, 1),
        "decode_tokens_per_s": round(median, 2), "decode_tokens_per_s_best_run": round(best_mean, 2),
        "run_tokens_per_s": [round((len(r["token_times"]) - 1) / (r["token_times"][-1] - r["token_times"][0]), 2)
                             for r in runs],                # each run's mean, as llama-bench reports its runs
        "ms_per_token": round(1000 / median, 2),
        "run_cpu_ms_per_token": [round(c, 2) for c in cpu],   # each run's CPU time (all threads) per token
        "threads": blas_threads(), "bytes_per_token": bytes_per_token(engine.stage),
        "token_ids": runs[-1]["token_ids"],
    }


@contextlib.contextmanager
def kernels_as(gemv_rows: int, prefill_rows: int, head_rows: int | None = None):
    """Run this process's steps with the given kernel choice (kernels.kernels), then restore it."""
    k = kernels
    saved = (k.gemv_rows, k.prefill_rows, k.head_rows)
    k.gemv_rows, k.prefill_rows = gemv_rows, prefill_rows
    k.head_rows = k.head_rows if head_rows is None else head_rows
    try:
        yield
    finally:
        k.gemv_rows, k.prefill_rows, k.head_rows = saved


def bench_prefill(engine: Engine, prompt_len: int = 512, repeats: int = 3) -> dict:
    """A lone prompt's prefill, tokens/s (best of `repeats`): in 64-row chunks (the old fixed
    choice) and in the chunks this process chose (kernels.prefill_rows), alternately, in this one run."""
    ids = bench_prompt(min(prompt_len, engine.config.n_ctx - 1), seed=1)
    k = engine.scheduler.kernels
    out = {"prompt_len": len(ids), "prefill_rows": k.prefill_rows}
    generate_fixed(engine, ids[:8], 1)                                  # warm-up
    best = {"before": float("inf"), "after": float("inf")}
    for _ in range(repeats):
        for mode, rows in (("before", 64), ("after", k.prefill_rows)):
            with kernels_as(k.gemv_rows, rows):
                r = generate_fixed(engine, ids, 1)
            best[mode] = min(best[mode], r["token_times"][0] - r["t_start"])
    for mode, t in best.items():
        out[f"{mode}_tokens_per_s"] = round(len(ids) / t, 1)
    return out


def bench_lm_head(engine: Engine, prompt_len: int = 32, n_tokens: int = 48, repeats: int = 3) -> dict:
    """Decode tokens/s with the old LM head (a transposed contiguous copy of wte,
    `x @ copy` (C, V), 154 MB more for gpt2) and as now (a gemv on wte as stored), alternately in
    this one run, through the real scheduler; also whether the greedy tokens are identical."""
    st = engine.stage
    copy = np.ascontiguousarray(st.lm_head.T)                            # (C, V): the old copy

    def old_head(x, ln_f, lm_head):
        return layer_norm(x, **ln_f) @ copy                             # (T, C) @ (C, V) -> (T, V)

    @contextlib.contextmanager
    def head_as(fn):
        saved = batching.head
        batching.head = fn
        try:
            yield
        finally:
            batching.head = saved

    ids = bench_prompt(prompt_len)
    runs = {"before": [], "after": []}
    for _ in range(repeats):
        for mode, fn in (("before", old_head), ("after", head)):
            with head_as(fn):
                runs[mode].append(generate_fixed(engine, ids, n_tokens))
    out = {mode: round(decode_rate(r)[0], 2) for mode, r in runs.items()}
    out["tokens_identical"] = runs["before"][-1]["token_ids"] == runs["after"][-1]["token_ids"]
    out["copy_mb"] = round(copy.nbytes / 1e6, 1)
    return out


@contextlib.contextmanager
def timing_decode_blocks(steps: list):
    """While inside, each decode step's blocks (model.decode_blocks) appends to `steps` a dict:
    "position" (what its first sequence's cache held before it), "blocks_s" (the call's time) and
    "matmul_s" (the part inside its weight matmuls, fast_decode.product); blocks_s - matmul_s is
    "the rest": attention over the KV cache, LayerNorm, GELU, the adds."""
    inner, blocks = fast_decode.product, model.decode_blocks
    spent = [0.0]

    def timed_product(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    def timed_blocks(x, *args, segments, **kwargs):
        spent[0], position = 0.0, segments[0][0].length
        t = time.perf_counter()
        out = blocks(x, *args, segments=segments, **kwargs)
        steps.append({"position": position, "blocks_s": time.perf_counter() - t, "matmul_s": spent[0]})
        return out
    fast_decode.product, model.decode_blocks = timed_product, timed_blocks
    try:
        yield steps
    finally:
        fast_decode.product, model.decode_blocks = inner, blocks


def decode_by_position(engine: Engine, at=(1, 64, 128, 256, 512, 900), n_tokens: int = 8) -> list:
    """Decode time per token against the position (the tokens already in the cache), through the real
    scheduler, and where it goes: the blocks' weight matmuls (which do not grow with the position),
    the rest of the blocks (attention reads every cached key and value: `kv_mb` per token, which
    does), and the step outside the blocks (embed, the LM head, sampling, the scheduler).

    Per position p: a p-token prompt of its own (no prefix to reuse), then n_tokens greedy tokens;
    each figure is the median over those decode steps. Positions past n_ctx - n_tokens are skipped.
    Worked example, gpt2-small (12 layers, C = 768): at p = 900 attention reads
    12 x 2 x 900 x 768 x 4 bytes = 66 MB per token, some 3 ms at 20 GB/s."""
    c, L = engine.config, len(engine.stage.blocks)
    generate_fixed(engine, bench_prompt(8, seed=1), 2)                          # warm-up
    rows = []
    for p in at:
        if p + n_tokens >= c.n_ctx:
            continue
        steps = []
        with timing_decode_blocks(steps):
            r = generate_fixed(engine, bench_prompt(p, seed=1000 + p), n_tokens)
        steps = [s for s in steps if s["position"] >= p]                       # the decode steps
        gaps = np.diff(r["token_times"])
        blocks = np.array([s["blocks_s"] for s in steps])
        matmul = np.array([s["matmul_s"] for s in steps])
        rows.append({"position": p, "ms_per_token": round(float(np.median(gaps)) * 1000, 3),
                     "blocks_ms": round(float(np.median(blocks)) * 1000, 3),
                     "matmul_ms": round(float(np.median(matmul)) * 1000, 3),
                     "rest_ms": round(float(np.median(blocks - matmul)) * 1000, 3),
                     "kv_mb": round(L * 2 * (p + 1) * c.n_embd * 4 / 1e6, 2)})
    return rows


def profile_decode(weights_or_engine, prompt_len: int = 32, n_tokens: int = 32) -> dict:
    """Where one decode step's time goes: median ms per token of embed, blocks, head, log_softmax, sample.

    The pieces are timed one by one outside the scheduler; what `bench_single`'s ms/token has on top
    of their sum is the scheduler's own bookkeeping. log_softmax is timed although the scheduler
    now only takes a logsumexp per token: it is what top_logprobs and traces pay.
    """
    engine = weights_or_engine if isinstance(weights_or_engine, Engine) \
        else Engine.load(weights_or_engine, prefix_cache_bytes=0)
    st, c = engine.stage, engine.config
    params, rng = SamplingParams("greedy", max_tokens=n_tokens), make_rng(0)
    cache = KVCache.for_model(c, len(st.blocks))
    ids = bench_prompt(prompt_len)
    logits = gpt2(np.asarray(ids), np.arange(prompt_len), st.wte, st.wpe, st.blocks, st.ln_f, st.lm_head,
                  n_head=c.n_head, segments=[(cache, prompt_len)], rows=slice(-1, None))   # (1, V)
    tok = int(np.argmax(logits[0]))
    # then each decode step through gpt2's three parts, timed one by one
    parts = {k: [] for k in ("embed", "blocks", "head", "log_softmax", "sample")}
    for i in range(n_tokens):
        t0 = time.perf_counter()
        x = embed(np.array([tok]), np.array([prompt_len + i]), st.wte, st.wpe)         # (1, C)
        t1 = time.perf_counter()
        x = blocks_forward(x, st.blocks, n_head=c.n_head, segments=[(cache, 1)])      # (1, C)
        t2 = time.perf_counter()
        logits = head(x, st.ln_f, st.lm_head)[0]                                        # (V,)
        t3 = time.perf_counter()
        log_softmax(logits)
        t4 = time.perf_counter()
        tok = sample(logits, params, rng)
        t5 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[k].append(dt)
    return {k: round(float(np.median(v)) * 1000, 3) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# the reference: HF transformers on the same weights (only if torch and transformers are installed)


# ---------------------------------------------------------------------------------------------
# the table


def verdict(ratio: float, target: float) -> str:
    """0.9 against 0.85 -> "meets the target (>= 0.85x)"; 0.12 -> "BELOW the target (>= 0.85x)"."""
    return f"{'meets' if ratio >= target else 'BELOW'} the target (>= {target}x)"


def format_rows(rows: list) -> str:
    """[(what, measured, compared with, verdict)] as a table with a header line."""
    rows = [("what was measured", "figure", "compared with", "verdict")] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3]).rstrip() for r in rows)


def quick_bench(weights: str | None = None, n_tokens: int = 24, prompt_len: int = 16, bandwidth_mb: int = 256,
                echo=print) -> dict:
    """`nanopipe bench`: one process's decode and prefill speed and this machine's memory bound, as one
    short table with verdicts (gpt2-small: some 10-30 s). The long measurements are `--full` and the
    other options."""
    weights = weights or ensure_weights(DEFAULT_WEIGHTS, echo)
    echo(f"measuring {weights}{' (synthetic: as fast as real weights)' if is_synthetic(weights) else ''}: "
         f"a {prompt_len}-token prompt, {n_tokens} tokens generated (greedy), twice ...")
    ours = bench_single(weights, prompt_len, n_tokens, repeats=2,
                        between=lambda: memory_bandwidth(bandwidth_mb << 20, 3))
    bandwidths = ours.pop("between")
    gbps = float(np.median(bandwidths))
    bound = gbps * 1e9 / ours["bytes_per_token"]
    vs_bound = ours["decode_tokens_per_s"] / bound
    rows = [
        (f"decode, 1 stream, {ours['threads']} BLAS threads", f"{ours['decode_tokens_per_s']:.1f} tok/s",
         f"the memory bound {bound:.1f} tok/s: {vs_bound:.2f}x", verdict(vs_bound, TARGET_VS_BOUND)),
        ("  time per token", f"{ours['ms_per_token']:.1f} ms", "", ""),
        (f"prefill, a {prompt_len}-token prompt", f"{ours['prefill_tokens_per_s']:.0f} tok/s",
         f"decode: {ours['prefill_tokens_per_s'] / ours['decode_tokens_per_s']:.0f}x faster per token", ""),
        ("memory bandwidth (1 row x matrix)", f"{gbps:.1f} GB/s",
         f"weights read per token {ours['bytes_per_token'] / 1e6:.0f} MB -> the bound above", ""),
        ("loading the weights", f"{ours['load_s']:.1f} s", "", ""),
    ]
    echo(format_rows(rows))
    busy = machine_busy()
    if busy:
        echo(busy)
    echo("more: --full (where a step's time goes, kernel choices, LM head, long prompts), --nodes 3 (a local "
         "cluster vs one process), --sweep, --positions, --links, --placement, --conversation; "
         "`make bench` adds HF transformers and llama.cpp")
    return {"rows": [ours], "bandwidth_gb_s": round(gbps, 2), "bound_tokens_per_s": round(bound, 2),
            "vs_bound": round(vs_bound, 3)}


def machine_busy(load=None, cores=None) -> str | None:
    """A warning when something else ran during the benchmark (the load average above half the
    cores), since every figure above is then low for reasons of its own:

        machine_busy(4.8, 2) -> "note: this machine was busy (load average 4.8 on 2 cores): ..."
        machine_busy(0.3, 2) -> None
    """
    try:
        load = os.getloadavg()[0] if load is None else load
    except (OSError, AttributeError):       # not on every OS
        return None
    cores = cores or os.cpu_count() or 1
    if load <= cores / 2:
        return None
    return (f"note: this machine was busy (load average {load:.1f} on {cores} cores): other programs shared it, "
            "so these figures are low; measure again when it is quiet")


def format_table(rows: list) -> str:
    """One line per measured configuration. decode: median over every token gap; best run: its mean."""
    lines = [f"{'':<40} {'prefill tok/s':>13} {'decode tok/s':>13} {'(best run)':>10} {'ms/token':>9} {'threads':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<40} {r.get('prefill_tokens_per_s', ''):>13} {r['decode_tokens_per_s']:>13} "
                     f"{r.get('decode_tokens_per_s_best_run', ''):>10} {r.get('ms_per_token', ''):>9} "
                     f"{r.get('threads', ''):>7}")
    return "\n".join(lines)


def write_csv(rows: list, path: str):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "token_ids"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def prompt_logits(engine: Engine, ids: list) -> np.ndarray:
    """(V,) logits after `ids`, one forward pass in this process (to check another program's)."""
    st, c = engine.stage, engine.config
    cache = KVCache.for_model(c, len(st.blocks))
    return gpt2(np.asarray(ids), np.arange(len(ids)), st.wte, st.wpe, st.blocks, st.ln_f, st.lm_head,
                n_head=c.n_head, segments=[(cache, len(ids))], rows=slice(-1, None))[0]


def run_bench(weights: str | None = None, n_tokens: int = 64, prompt_len: int = 32, reference=None,
              csv_path: str | None = None, bandwidth_mb: int = 1024, llama=None, echo=print) -> dict:
    """Measure, print the table and the ratios to the targets; return every number measured.

    `reference` (HF transformers) and `llama` (llama.cpp float32) are passed in by the bench
    tooling (tests/parity): nanopipe itself imports neither."""
    weights = weights or ensure_weights(DEFAULT_WEIGHTS, echo)
    ours = bench_single(weights, prompt_len, n_tokens, between=lambda: memory_bandwidth(bandwidth_mb << 20, 3))
    bandwidths = ours.pop("between")
    gbps, best_gbps = float(np.median(bandwidths)), max(bandwidths)
    bound = gbps * 1e9 / ours["bytes_per_token"]
    engine = Engine.load(weights, prefix_cache_bytes=0)   # every prompt computed in full
    prefill = bench_prefill(engine)
    parts = profile_decode(engine, prompt_len, min(n_tokens, 32))
    floor = matmul_floor(engine.stage)
    lm_head = bench_lm_head(engine, prompt_len, min(n_tokens, 48))
    check = prompt_logits(engine, bench_prompt(prefill["prompt_len"], seed=1)) if llama else None
    del engine
    rows = [ours]
    # the reference (HF transformers, see tests/parity/hf_bench.py) is passed in: nanopipe never imports torch
    ref = reference(weights, prompt_len, n_tokens, threads=ours["threads"]) if reference else None
    if ref is not None:
        rows.append(ref)
    lcpp = llama(weights, prefill["prompt_len"], n_tokens, threads=ours["threads"], check_against=check) \
        if llama else None
    if lcpp is not None:
        rows.append(lcpp)

    echo(f"weights {weights}: prompt {prompt_len} tokens, {n_tokens} generated (greedy)")
    echo(format_table(rows))
    echo("decode step, ms per token: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
         + f"; scheduler and the rest {max(0.0, ours['ms_per_token'] - sum(parts.values())):.2f}")
    echo(f"memory bandwidth {gbps:.1f} GB/s (median of {len(bandwidths)}, measured between the runs; best "
         f"{best_gbps:.1f}); weights read per token {ours['bytes_per_token'] / 1e6:.1f} MB -> bound {bound:.1f} tok/s "
         f"(at the best bandwidth {best_gbps * 1e9 / ours['bytes_per_token']:.1f})")
    echo(f"matmuls alone (this model's matrices, nothing else): {floor['ms_per_token']:.2f} ms/token = "
         f"{floor['gb_s']:.1f} GB/s -> {floor['tokens_per_s']:.1f} tok/s")
    echo(f"a lone {prefill['prompt_len']}-token prompt: prefill {prefill['before_tokens_per_s']} tok/s in 64-row "
         f"chunks, {prefill['after_tokens_per_s']} tok/s in {prefill['prefill_rows']}-row chunks (chosen at start)"
         + ("" if lcpp else "; llama.cpp float32: not measured here (`make bench` builds llama-cpp-python)"))
    if lcpp is not None:
        prefill["llama_cpp_tokens_per_s"] = lcpp["prefill_tokens_per_s"]
        prefill["vs_llama_cpp"] = round(prefill["after_tokens_per_s"] / lcpp["prefill_tokens_per_s"], 3)
        echo(f"  llama.cpp float32, same weights (GGUF export), same prompt, {lcpp['threads']} threads: "
             f"{lcpp['prefill_tokens_per_s']} tok/s -> nanopipe {prefill['vs_llama_cpp']:.2f}x (target >= 0.95x); "
             f"its logits vs nanopipe's: largest difference {lcpp.get('max_logit_diff_vs_nanopipe', float('nan')):.2e},"
             f" next token {'the same' if lcpp.get('same_next_token') else 'DIFFERENT'}")
        echo(f"  decode: nanopipe {ours['decode_tokens_per_s']} tok/s, llama.cpp f32 {lcpp['decode_tokens_per_s']} "
             f"tok/s ({ours['decode_tokens_per_s'] / lcpp['decode_tokens_per_s']:.2f}x); greedy tokens "
             f"{'identical' if lcpp['token_ids'] == ours['token_ids'] else 'differ'}")
    echo(f"LM head: decode {lm_head['before']} tok/s with a transposed copy of wte ({lm_head['copy_mb']} MB, the "
         f"old way), {lm_head['after']} tok/s with a gemv on wte as stored (now), alternately in this run; greedy "
         f"tokens {'identical' if lm_head['tokens_identical'] else 'DIFFER'}")
    echo(f"kernels: {describe_kernels()}")
    summary = {"rows": rows, "profile_ms": parts, "prefill": prefill, "matmul_floor": floor, "lm_head": lm_head,
               "bandwidth_gb_s": round(gbps, 2),
               "bandwidth_samples_gb_s": [round(b, 2) for b in bandwidths],
               "bound_tokens_per_s": round(bound, 2), "vs_bound": round(ours["decode_tokens_per_s"] / bound, 3)}
    echo(f"decode vs bound:        {summary['vs_bound']:.2f}x: {verdict(summary['vs_bound'], TARGET_VS_BOUND)}")
    if ref is not None:
        summary["vs_hf"] = round(ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3)
        same = ours["token_ids"] == ref["token_ids"]
        echo(f"decode vs transformers: {summary['vs_hf']:.2f}x: {verdict(summary['vs_hf'], TARGET_VS_HF)}; "
             f"greedy tokens {'identical' if same else 'differ'}")
    else:
        echo("transformers: not compared here (`make bench` runs this next to HF transformers)")
    if csv_path:
        write_csv(rows, csv_path)
        echo(f"wrote {csv_path}")
    return summary


# ---------------------------------------------------------------------------------------------
# a member of a split stage loads only its share: peak memory

_LOAD_RSS_CHILD = """
import json, sys
from nanopipe.weights import load_stage

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
try:
    with open("/proc/self/clear_refs", "w") as f:    # reset the peak to what is resident now
        f.write("5")
except OSError:
    pass
base = status("VmRSS")
lo, hi, share, rank0 = int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5:] == ["rank0"]
stage = load_stage(sys.argv[1], lo, hi, rank0=rank0, share=tuple(share) if share else None)
print(json.dumps({"base": base, "peak": status("VmHWM"), "held": stage.nbytes}))
"""


def load_rss(weights: str, lo: int, hi: int, share: tuple | None = None, rank0: bool = False) -> dict:
    """Peak RSS growth of a fresh process loading blocks lo..hi-1 of `weights`, whole or one member's
    share=(r, m) of them, and with rank0 wte, wpe and ln_f too (in the memory orders its environment
    pins: kernels.layout_orders) (Linux: /proc/self/status VmHWM after resetting it with clear_refs).
    Returns {"held_mb": what the stage keeps, "peak_mb": how far RSS rose on the way}, and the same
    in bytes ("held", "growth") with the RSS after imports ("base")."""
    out = subprocess.run([sys.executable, "-c", _LOAD_RSS_CHILD, weights, str(lo), str(hi),
                          json.dumps(list(share) if share else None)] + (["rank0"] if rank0 else []),
                         capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(out.stdout)
    mb, growth = 2 ** 20, m["peak"] - m["base"]
    return {"held_mb": round(m["held"] / mb, 1), "peak_mb": round(growth / mb, 1),
            "held": m["held"], "growth": growth, "base": m["base"]}


def bench_share_load(folder: str = WEIGHTS_DIR, size: str = "gpt2-medium", n_layer: int = 4, members: int = 2,
                     echo=print) -> list:
    """Peak RSS of loading `n_layer` blocks of `size`-shaped synthetic weights whole, against each of
    `members` members' share of them (model.share_of; weights.load_stage(share=...)).

        python -c "from nanopipe.tools.bench import bench_share_load; bench_share_load()"
    """
    path = ensure_synthetic(folder=folder, size=size, n_layer=n_layer, log=echo)
    rows = [{"what": f"blocks 0..{n_layer - 1} whole", **load_rss(path, 0, n_layer)}]
    rows += [{"what": f"member {r} of {members}", **load_rss(path, 0, n_layer, (r, members))} for r in range(members)]
    echo(f"peak RSS loading {n_layer} blocks of {size}-shaped weights ({path}):")
    for row in rows:
        echo(f"  {row['what']:<22} holds {row['held_mb']:7.1f} MB, RSS rose by {row['peak_mb']:7.1f} MB on the way")
    return rows
