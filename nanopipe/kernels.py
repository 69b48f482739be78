"""How this process runs the matrix products of a step of a few rows, and how it decided.

model.py is the math; this module owns what the math leaves to the machine:

    gemv_per_row, head_in_slices   the two ways of running a few rows besides one gemm
    Kernels, kernels               this process's choice: up to how many rows each way is taken,
                                   and how many rows a lone prompt prefills per step (rank 0)
    choose_*                       the choice, made once per process at start by whoever runs the
                                   model (engine.Scheduler, cluster.worker, bench): pinned by
                                   NANOPIPE_GEMV_ROWS / NANOPIPE_HEAD_ROWS / NANOPIPE_PREFILL_ROWS,
                                   else measured on the process's own weights
    choose_untimed                 what the math falls back on when nobody chose (a unit test, a
                                   notebook calling model.gpt2): the pinned values, or one gemm
                                   and 64-row chunks: never timed, so it stays deterministic
    measuring_alone                a lock so processes on one machine take turns timing themselves
    describe_kernels               the log line

Why per process, not per cluster: each node's CPU and BLAS cross over at their own row count. The
price: two nodes may run a step's rows through different kernels, so a cluster equals one process
within float tolerance (greedy tokens the same, as across different CPUs), and bit for bit only
when every process is pinned alike (the tests pin all three). Measurements: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# the kernels


def gemv_per_row(x, w):
    """x @ w as one matrix-vector product (gemv) per row: (T, in) @ (in, out) -> (T, out).

    OpenBLAS's sgemm packs the whole matrix on every call, so for a few rows one gemv each is
    cheaper than one gemm, up to a crossover that depends on the CPU and BLAS build. Each row is the
    very call `model.linear` makes for a lone row, so its result is the lone row's, bit for bit,
    whatever else is in the batch.
    """
    return np.concatenate([(w.T @ x[t:t + 1].T).T for t in range(x.shape[0])])   # T x (1, out) -> (T, out)


HEAD_SLICE_BYTES = 4 << 20     # a slice of wte that stays in cache while every row of a step uses it


def head_in_slices(h, lm_head):
    """h @ lm_head.T through wte (V, C) slice by slice, 4 MB at a time, each slice taking every row's
    gemv while it is still in cache: wte is read from memory once, not once per row, and never
    packed as one gemm packs it. (T, C) -> (T, V). A slice's gemv sums in a different order than a
    whole-wte gemv, so these logits differ from a lone row's in the last bits (greedy tokens do not
    change: tested)."""
    T, V = h.shape[0], lm_head.shape[0]
    out = np.empty((T, V), np.float32)
    step = max(1, HEAD_SLICE_BYTES // (lm_head.shape[1] * lm_head.itemsize))
    for i in range(0, V, step):
        rows = lm_head[i:i + step]                              # (step, C), a slice of wte in cache
        for t in range(T):
            np.matmul(rows, h[t], out=out[t, i:i + step])       # (step, C) @ (C,) -> (step,)
    return out                                                  # (T, V)


# ---------------------------------------------------------------------------------------------
# this process's choice


class KernelChoiceError(ValueError):
    """NANOPIPE_GEMV_ROWS, NANOPIPE_HEAD_ROWS or NANOPIPE_PREFILL_ROWS holds something other than a
    whole number >= 1."""


@dataclass
class Kernels:
    """How `model.linear` runs a step of T rows: `gemv_per_row` while 2 <= T <= gemv_rows, else one
    gemm; how `model.head` does (`head_in_slices` while 2 <= T <= head_rows); and how many rows a
    prompt may take in a step that has spare rows (`prefill_rows`, rank 0 only). Each `*how` says
    how its value was decided, for the log; None while undecided.
    """
    gemv_rows: int = 1
    how: str | None = None
    chosen: bool = False            # gemv_rows decided (pinned, measured, or the untimed default)
    prefill_rows: int = 64          # rows of one prompt per step when no other rows wait (batching.Batcher.make)
    prefill_how: str | None = None
    head_rows: int = 1              # up to how many rows `head` runs in slices of wte (rank 0)
    head_how: str | None = None


kernels = Kernels()                 # one per process: decided once, before the first step

GEMV_ROWS_ENV = "NANOPIPE_GEMV_ROWS"
PREFILL_ROWS_ENV = "NANOPIPE_PREFILL_ROWS"
HEAD_ROWS_ENV = "NANOPIPE_HEAD_ROWS"
MAX_GEMV_ROWS = 16          # never try more rows than this one by one
PREFILL_CANDIDATES = (64, 128, 256)
MEASURE_BUDGET_S = 1.0      # a loaded machine makes timing slow: stop trying larger sizes after this


def _pinned(name: str) -> int | None:
    """A whole number >= 1 from the environment variable `name`; None if unset or 'auto'."""
    raw = os.environ.get(name, "auto").strip()
    if raw.lower() in ("", "auto"):
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise KernelChoiceError(f"{name}={raw!r} is not a whole number >= 1: give a row count, or 'auto' to "
                                "measure it at start (NANOPIPE_GEMV_ROWS=1 is the old always-gemm path)")
    return n


def choose_untimed() -> Kernels:
    """What the math uses when nobody chose at start: each undecided value pinned by its variable,
    else the conservative default (one gemm for every step of 2+ rows, 64-row prompt chunks).
    Nothing is timed. Called by model.blocks_forward and model.head before their first step."""
    default = "nobody chose at start: the untimed default"
    if not kernels.chosen:
        n = _pinned(GEMV_ROWS_ENV)
        kernels.gemv_rows, kernels.how = (1, default) if n is None else (n, f"pinned by {GEMV_ROWS_ENV}")
        kernels.chosen = True
    if kernels.head_how is None:
        n = _pinned(HEAD_ROWS_ENV)
        kernels.head_rows, kernels.head_how = (1, default) if n is None else (n, f"pinned by {HEAD_ROWS_ENV}")
    if kernels.prefill_how is None:
        n = _pinned(PREFILL_ROWS_ENV)
        kernels.prefill_rows, kernels.prefill_how = ((64, default) if n is None else
                                                     (n, f"pinned by {PREFILL_ROWS_ENV}"))
    return kernels


def choose_gemv_rows(blocks) -> Kernels:
    """Decide, once per process, up to how many rows `linear` runs a gemv per row.

    NANOPIPE_GEMV_ROWS=N pins it (every node of a cluster, and every test process, then decides the
    same; N=1 is the old always-gemm path); unset or "auto", it is measured here on `blocks`.
    Later calls return the first decision: a process never switches kernels mid-run, so a row
    count always takes the same path and generation stays deterministic.
    """
    if kernels.chosen:
        return kernels
    n = _pinned(GEMV_ROWS_ENV)
    if n is None:
        with measuring_alone():
            n, times = measure_gemv_rows(blocks)
        shown = ", ".join(f"{T} rows {g:.1f} vs {v:.1f} ms" for T, (g, v) in times.items())
        how = f"measured (gemm vs gemv per row: {shown})" if times else "no block matrices here to measure"
    else:
        how = f"pinned by {GEMV_ROWS_ENV}"
    kernels.gemv_rows, kernels.how, kernels.chosen = n, how, True
    return kernels


def choose_prefill_rows(step) -> Kernels:
    """Decide, once per process, how many rows of a lone prompt go in one step (the scheduler's
    rank 0 only: it makes the batches). NANOPIPE_PREFILL_ROWS=N pins it, else `measure_prefill_rows`
    times `step(T)`, one real prefill step of T rows (engine.prefill_step; None: no blocks here).
    The caller decides the gemv kernels first: the measured steps run them."""
    if kernels.prefill_how is not None:
        return kernels
    n = _pinned(PREFILL_ROWS_ENV)
    if n is None:
        with measuring_alone():
            n, per_row = measure_prefill_rows(step)
        shown = ", ".join(f"{T} rows {ms:.3f}" for T, ms in per_row.items())
        how = f"measured (ms per row of one block: {shown})" if per_row else "no blocks here to measure"
    else:
        how = f"pinned by {PREFILL_ROWS_ENV}"
    kernels.prefill_rows, kernels.prefill_how = n, how
    return kernels


def choose_head_rows(lm_head) -> Kernels:
    """Decide, once per process, up to how many rows the LM head runs in slices (rank 0 only: it
    holds the head). NANOPIPE_HEAD_ROWS=N pins it (1: always one gemm), else `measure_head_rows`."""
    if kernels.head_how is not None:
        return kernels
    n = _pinned(HEAD_ROWS_ENV)
    if n is None:
        with measuring_alone():
            n, times = measure_head_rows(lm_head)
        shown = ", ".join(f"{T} rows {g:.1f} vs {v:.1f} ms" for T, (g, v) in times.items())
        how = f"measured (gemm vs slices: {shown})"
    else:
        how = f"pinned by {HEAD_ROWS_ENV}"
    kernels.head_rows, kernels.head_how = n, how
    return kernels


def describe_kernels() -> str:
    """One log line: what `linear` does with a step of a few rows in this process."""
    k = kernels
    if k.gemv_rows <= 1:
        line = f"linear: one gemm for every step of 2+ rows ({k.how})"
    else:
        rows = "2" if k.gemv_rows == 2 else f"2-{k.gemv_rows}"
        line = f"linear: a gemv per row for steps of {rows} rows, one gemm above ({k.how})"
    if k.prefill_how is not None:
        line += f"; a lone prompt prefills {k.prefill_rows} rows a step ({k.prefill_how})"
    if k.head_how is not None:
        line += (f"; the LM head: one gemm for 2+ rows ({k.head_how})" if k.head_rows <= 1 else
                 f"; the LM head: a gemv per row in slices of wte for 2-{k.head_rows} rows ({k.head_how})")
    return line


# ---------------------------------------------------------------------------------------------
# measuring, one process at a time


_measuring = threading.RLock()         # this process's hold on the machine's timing lock
_measuring_depth = 0


@contextlib.contextmanager
def measuring_alone(timeout_s: float = 60.0):
    """Hold this machine's timing lock while measuring: processes on one machine (several nodes
    started together, the guide's loopback setups, a test cluster) take turns, so none times its
    kernels or speed while another is timing its own — they would measure each other.

    The lock is fcntl.flock on the temporary directory itself (nothing is created or left behind;
    the kernel drops it if the holder dies). Re-entrant within a process (a speed probe may decide
    the kernels on the way). After `timeout_s` of waiting, or where flock does not exist, it
    measures anyway.
    """
    global _measuring_depth
    with _measuring:
        if _measuring_depth:                    # this process holds it already
            _measuring_depth += 1
            try:
                yield
            finally:
                _measuring_depth -= 1
            return
        try:
            import fcntl
            import tempfile
            fd = os.open(tempfile.gettempdir(), os.O_RDONLY)
        except (ImportError, OSError):          # no flock (Windows) or no temp dir: measure anyway
            fd = None
        try:
            deadline = time.monotonic() + timeout_s
            while fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
            _measuring_depth = 1
            yield
        finally:
            _measuring_depth = 0
            if fd is not None:
                os.close(fd)                    # closing it drops the lock


def measure_gemv_rows(blocks, max_rows: int = MAX_GEMV_ROWS, repeats: int = 3, n_blocks: int = 2) -> tuple:
    """The largest row count for which a gemv per row beats one gemm, timed on `blocks`' own matrices.

    Times the four matrices of the first `n_blocks` blocks (gpt2-small: 56 MB, more than a server's
    L3, so each pass reads them from memory as a real step does) for T = 2, 3, ... rows, both ways,
    interleaved, best of `repeats`; stops at the first T where one gemm is as fast. Returns
    (gemv_rows, {T: (gemm ms, gemv ms)}).
    """
    mats = [p["attn"]["c_attn"]["w"] for p in blocks[:n_blocks]]
    mats += [p[g][n]["w"] for p in blocks[:n_blocks]
             for g, n in (("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))]
    if not mats:
        return 1, {}
    xs = {w.shape[0]: np.ones((max_rows, w.shape[0]), np.float32) for w in mats}

    def run(T, one_by_one):                                     # `model.linear`'s two paths, bias aside
        t0 = time.perf_counter()
        for w in mats:
            x = xs[w.shape[0]][:T]                              # (T, in)
            gemv_per_row(x, w) if one_by_one else (w.T @ x.T).T   # (T, in) -> (T, out)
        return (time.perf_counter() - t0) * 1000

    return _crossover(run, max_rows, repeats)


def _crossover(run, max_rows: int, repeats: int) -> tuple:
    """The largest T for which run(T, True) (row by row) beats run(T, False) (one gemm): T = 2, 3,
    ... both ways, interleaved, best of `repeats`, until one gemm is as fast or MEASURE_BUDGET_S is
    spent. Returns (T, {T: (gemm ms, row-by-row ms)}); 1 if row by row never wins."""
    run(2, False), run(2, True)                                 # warm-up: BLAS threads, page faults
    best, times, t_start = 1, {}, time.perf_counter()
    for T in range(2, max_rows + 1):
        if time.perf_counter() - t_start > MEASURE_BUDGET_S:
            break
        gemm = rows = float("inf")
        for _ in range(repeats):
            gemm = min(gemm, run(T, False))
            rows = min(rows, run(T, True))
        times[T] = (round(gemm, 3), round(rows, 3))
        if rows >= gemm:
            break
        best = T
    return best, times


def measure_prefill_rows(step, candidates=PREFILL_CANDIDATES, repeats: int = 2, within: float = 0.05) -> tuple:
    """The prompt chunk past which a larger one no longer prefills faster, per row.

    Times `step(T)` (one real prefill step of T rows: LayerNorm, both matmuls, attention over a
    fresh cache) for each candidate size, best of `repeats`, and returns (the smallest size whose
    ms per row is within `within` of the best, {size: ms per row}). Larger chunks feed BLAS better
    until its kernels saturate; beyond that they only make the others wait longer.
    """
    if step is None:
        return candidates[0], {}
    per_row, t_start = {}, time.perf_counter()
    for T in candidates:
        if per_row and time.perf_counter() - t_start > MEASURE_BUDGET_S:
            break
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(T)
            best = min(best, time.perf_counter() - t0)
        per_row[T] = round(best * 1000 / T, 4)
    fastest = min(per_row.values())
    return next(T for T in per_row if per_row[T] <= fastest * (1 + within)), per_row


def measure_head_rows(lm_head, max_rows: int = MAX_GEMV_ROWS, repeats: int = 2) -> tuple:
    """The largest row count for which `head_in_slices` beats one gemm over wte, timed on the model's
    own wte (V, C): T = 2, 3, ... rows both ways, interleaved, best of `repeats`, stopping at the
    first T where the gemm is as fast. Returns (head_rows, {T: (gemm ms, sliced ms)})."""
    C = lm_head.shape[1]
    hs = np.random.default_rng(0).standard_normal((max_rows, C)).astype(np.float32)

    def run(T, sliced):                                         # `model.head`'s two paths, LayerNorm aside
        t0 = time.perf_counter()
        head_in_slices(hs[:T], lm_head) if sliced else (lm_head @ hs[:T].T).T   # (T, C) -> (T, V)
        return (time.perf_counter() - t0) * 1000

    return _crossover(run, max_rows, repeats)
