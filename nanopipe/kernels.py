"""How this process runs the matrix products of a step of a few rows, and how it decided.

model.py is the math; this module owns what the math leaves to the machine:

    product                        x @ w as the BLAS call that reads w in the memory order it is kept
    gemv_per_row, head_in_slices   the two ways of running a few rows besides one gemm
    Kernels, kernels               this process's choice: the memory order the loader keeps the block
                                   matrices and the LM head in, up to how many rows each way is taken,
                                   and how many rows a lone prompt prefills per step (rank 0)
    choose_layout                  the memory orders, chosen first, before the weights load (the
                                   loader keeps them: weights.load_stage(choose_order=True)): pinned by
                                   NANOPIPE_BLOCK_ORDER / NANOPIPE_HEAD_ORDER (C or F; the blocks' also
                                   one letter per matrix, CCCF), else measured on synthetic matrices of
                                   the model's shapes, each of a block's four matrices on its own
    matrix_order                   the order one block matrix is kept in
    choose_head_order              the LM head's order, when a process first holds a share of the head
                                   after its start (a worker a re-plan puts in a split stage that runs
                                   the head): pinned or measured as choose_layout would have
    choose_*                       the rest, made once per process at start by whoever runs the
                                   model (engine.Scheduler, cluster.worker, bench), after the weights
                                   load in the chosen order (the crossovers depend on it): pinned by
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
when every process is pinned alike (the tests pin all five). Measurements: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from .gpt2_tensors import MATRICES
from .pages import Arena, describe_pages

# ---------------------------------------------------------------------------------------------
# the kernels


def product(x, w, out=None):
    """x @ w, (T, in) @ (in, out) -> (T, out), written so that BLAS reads the weight w as the
    row-major matrix its memory holds, never as a transposed one:

        w kept row-major (in, out)                      x @ w
        w kept column-major: w.T is row-major (out, in) (w.T @ x.T).T

    Which order streams faster depends on the CPU, its BLAS kernels and the thread count, so
    `choose_layout` picks it per process and the loader keeps it; the expression follows the order
    because a gemm of a few rows on a weight passed transposed packs it more slowly (both measured:
    docs/PERFORMANCE.md). The LM head is product(h, wte.T). `out` (T, out): written in place.
    """
    if w.flags.c_contiguous:
        return np.matmul(x, w, out=out)                         # (T, in) @ (in, out)
    return np.matmul(w.T, x.T, out=None if out is None else out.T).T   # (out, in) @ (in, T) -> (T, out)


def gemv_per_row(x, w):
    """x @ w as one matrix-vector product (gemv) per row: (T, in) @ (in, out) -> (T, out).

    OpenBLAS's sgemm packs the whole matrix on every call, so for a few rows one gemv each is
    cheaper than one gemm, up to a crossover that depends on the CPU and BLAS build. Each row is the
    very call `model.linear` makes for a lone row, so its result is the lone row's, bit for bit,
    whatever else is in the batch.
    """
    return np.concatenate([product(x[t:t + 1], w) for t in range(x.shape[0])])   # T x (1, out) -> (T, out)


HEAD_SLICE_BYTES = 4 << 20     # a slice of wte that stays in cache while every row of a step uses it


def head_in_slices(h, lm_head):
    """h @ lm_head.T through wte (V, C) slice by slice, 4 MB at a time, each slice taking every row's
    gemv while it is still in cache: wte is read from memory once, not once per row, and never
    packed as one gemm packs it. (T, C) -> (T, V). A slice's gemv sums in a different order than a
    whole-wte gemv, so these logits differ from a lone row's in the last bits (greedy tokens do not
    change: tested). wte kept column-major works as well: a slice of its rows is then a strided
    view (step, C) that BLAS reads in place, not a copy (tested)."""
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
    whole number >= 1, or NANOPIPE_BLOCK_ORDER / NANOPIPE_HEAD_ORDER something other than C or F."""


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
    # the block matrices w (in, out): "F" column-major, "C" row-major, or one letter for each of
    # gpt2_tensors.MATRICES (c_attn, attn.c_proj, c_fc, mlp.c_proj): "CCCF" (matrix_order)
    block_order: str = "F"
    head_order: str = "C"           # the LM head wte (V, C): "C" as stored, "F" the bytes of a (C, V) row-major
    layout_how: str | None = None   # how both orders were decided; None: not yet (weights.load_stage asks)
    # how head_order was decided for an LM head this process holds; None: it has held none yet (a
    # plain worker keeps the untimed or pinned order, unused, until a re-plan gives it a share: choose_head_order)
    head_order_how: str | None = None
    block_order_how: str | None = None  # how block_order was decided (choose_layout), for the log
    layout_timed: bool = False          # either order was measured (not pinned), for the log


kernels = Kernels()                 # one per process: decided once, before the first step

GEMV_ROWS_ENV = "NANOPIPE_GEMV_ROWS"
PREFILL_ROWS_ENV = "NANOPIPE_PREFILL_ROWS"
HEAD_ROWS_ENV = "NANOPIPE_HEAD_ROWS"
MAX_GEMV_ROWS = 16          # never try more rows than this one by one
PREFILL_CANDIDATES = (64, 128, 256)
MEASURE_BUDGET_S = 1.0      # a loaded machine makes timing slow: stop trying larger sizes after this
BLOCK_ORDER_ENV = "NANOPIPE_BLOCK_ORDER"
HEAD_ORDER_ENV = "NANOPIPE_HEAD_ORDER"
UNTIMED_ORDERS = ("F", "C")     # blocks column-major, wte as stored: what nobody-chose keeps (and nanopipe kept before)
LAYOUT_PROBE_BYTES = 64 << 20   # each probe's matrices: twice this machine's 32 MB L3, so they stream from memory


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


def _pinned_order(name: str) -> str | None:
    """"C" or "F" from the environment variable `name` (the blocks': also four letters, one per
    matrix, "CCCF"); None if unset or 'auto'."""
    raw = os.environ.get(name, "auto").strip()
    if raw.lower() in ("", "auto"):
        return None
    order = raw.upper()
    if order in ("C", "F") or (name == BLOCK_ORDER_ENV and len(order) == len(MATRICES) and set(order) <= {"C", "F"}):
        return _one_letter_if_alike(order)
    each = (", or one letter per block matrix (c_attn, attn.c_proj, c_fc, mlp.c_proj) such as CCCF"
            if name == BLOCK_ORDER_ENV else "")
    raise KernelChoiceError(f"{name}={raw!r} is not a memory order: give C (row-major), F (column-major){each}, "
                            "or 'auto' to measure which is faster at start")


def _one_letter_if_alike(order: str) -> str:
    """"CCCC" -> "C": four matrices in one order are said with one letter; "CCCF" stays."""
    return order[0] if len(set(order)) == 1 else order


def matrix_order(block_order: str, name: str) -> str:
    """The memory order block matrix `name` (one of gpt2_tensors.MATRICES) is kept in, from a block
    order: one letter for all four matrices, or one each in MATRICES' order.

        >>> matrix_order("CCCF", "mlp.c_proj.weight"), matrix_order("C", "mlp.c_proj.weight")
        ('F', 'C')
    """
    return block_order if len(block_order) == 1 else block_order[MATRICES.index(name)]


def _layout_untimed():
    """The orders with nothing timed: each pinned by its variable, else nanopipe's old ones (F, C)."""
    pins = (_pinned_order(BLOCK_ORDER_ENV), _pinned_order(HEAD_ORDER_ENV))
    kernels.block_order, kernels.head_order = (p or d for p, d in zip(pins, UNTIMED_ORDERS))
    named = [env for env, p in zip((BLOCK_ORDER_ENV, HEAD_ORDER_ENV), pins) if p]
    kernels.block_order_how = f"blocks pinned by {BLOCK_ORDER_ENV}" if pins[0] else \
        "blocks: nobody chose at start, the untimed default"
    kernels.head_order_how = f"head pinned by {HEAD_ORDER_ENV}" if pins[1] else None     # (choose_head_order)
    kernels.layout_how = (f"pinned by {' and '.join(named)}" if len(named) == 2 else
                          "nobody chose at start: the untimed default" + (f", {named[0]} pinned" if named else ""))


def layout_orders() -> tuple:
    """(block order, head order) for the loader: this process's choice (`choose_layout`), else, when
    nobody chose (a unit test, a notebook calling load_stage), the pinned or untimed ones, never timed."""
    if kernels.layout_how is None:
        _layout_untimed()
    return kernels.block_order, kernels.head_order


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
    layout_orders()
    return kernels


def choose_layout(n_embd: int, n_vocab: int | None = None, *, time_pass=None) -> Kernels:
    """Decide, once per process and before the weights load, the memory order the loader keeps the
    block matrices in and (n_vocab given: this process holds the LM head) wte's.

    NANOPIPE_BLOCK_ORDER / NANOPIPE_HEAD_ORDER = C or F pin them (every node of a cluster, and every
    test process, then runs the same BLAS calls: bit for bit); unset or "auto", `measure_layout`
    times both orders on synthetic matrices of the model's shapes (`time_pass`: its timer, for tests)
    and each block matrix keeps the faster of its own (one thread may read c_fc (C, 4C) faster
    row-major and mlp.c_proj (4C, C) faster column-major: docs/PERFORMANCE.md). Without the head
    (a worker) the head keeps "C". Later calls return the first decision.
    """
    if kernels.layout_how is not None:
        return kernels
    pins = {"blocks": _pinned_order(BLOCK_ORDER_ENV), "head": _pinned_order(HEAD_ORDER_ENV)}
    todo = [w for w in ("blocks", "head") if pins[w] is None and (w == "blocks" or n_vocab)]
    times = {}
    if todo:
        with measuring_alone():
            times = measure_layout(n_embd, n_vocab, todo, time_pass=time_pass)
    hows, orders = {}, {}
    for what, env, untimed in zip(("blocks", "head"), (BLOCK_ORDER_ENV, HEAD_ORDER_ENV), UNTIMED_ORDERS):
        if pins[what]:
            orders[what], hows[what] = pins[what], f"{what} pinned by {env}"
        elif what in times:
            orders[what], hows[what] = (_faster_blocks if what == "blocks" else _faster)(what, times[what])
        else:
            orders[what], hows[what] = untimed, None             # no LM head here (yet): choose_head_order
    kernels.block_order, kernels.head_order = orders["blocks"], orders["head"]
    kernels.block_order_how, kernels.head_order_how = hows["blocks"], hows["head"]
    kernels.layout_timed = bool(times)
    _say_layout()
    return kernels


def choose_head_order(n_embd: int, n_vocab: int, *, time_pass=None) -> Kernels:
    """Decide the LM head's memory order the first time this process holds a head, or a share of one
    (a split stage's members run the head by vocabulary, weights.load_head_share), as choose_layout
    decides it for a process that holds the head from the start: pinned by NANOPIPE_HEAD_ORDER, else
    timed on synthetic matrices of the head's shape (`measure_layout`, one process at a time).

    A worker decides its orders at start; one that held no head then keeps the untimed head order
    ("C"), never measured: when a re-plan first gives it a share of the head it is decided here,
    before the share loads. Later calls keep the first decision (`head_order_how` says it was made).
    """
    if kernels.layout_how is None:
        return choose_layout(n_embd, n_vocab, time_pass=time_pass)
    if kernels.head_order_how is not None:
        return kernels
    pin = _pinned_order(HEAD_ORDER_ENV)
    if pin:
        kernels.head_order, kernels.head_order_how = pin, f"head pinned by {HEAD_ORDER_ENV}"
    else:
        with measuring_alone():
            t = measure_layout(n_embd, n_vocab, ("head",), time_pass=time_pass)["head"]
        kernels.head_order, kernels.head_order_how = _faster("head", t)
        kernels.layout_timed = True
    _say_layout()
    return kernels


def _faster(what: str, t: dict) -> tuple:
    """(the faster order, how it was decided) from {"C": ms, "F": ms}; a tie keeps C."""
    return min(("C", "F"), key=t.get), f"{what} C {t['C']:.2f} vs F {t['F']:.2f} ms"


def _faster_blocks(what: str, t: dict) -> tuple:
    """(the block order, how it was decided) from {matrix name: {"C": ms, "F": ms}}: each matrix
    its faster order, a tie keeping C. One order for all four is said as before, with the sums
    ("blocks C 10.00 vs F 13.00 ms"); mixed ones name each matrix's times ("blocks CCCF: c_attn
    C 3.00 vs F 4.50, ..., mlp.c_proj C 5.20 vs F 4.30 ms")."""
    order = _one_letter_if_alike("".join(min(("C", "F"), key=t[name].get) for name in MATRICES))
    if len(order) == 1:
        return order, _faster(what, {o: sum(m[o] for m in t.values()) for o in ("C", "F")})[1]
    each = ", ".join(f"{_short(name)} C {t[name]['C']:.2f} vs F {t[name]['F']:.2f}" for name in MATRICES)
    return order, f"{what} {order}: {each} ms"


def _short(name: str) -> str:
    """"attn.c_attn.weight" -> "c_attn", "mlp.c_proj.weight" -> "mlp.c_proj": the matrix, said briefly."""
    stem = name.removesuffix(".weight")
    return stem if stem.endswith("c_proj") else stem.split(".")[-1]


def _say_layout():
    """kernels.layout_how, the log's words for both orders, from how each was decided:
    "measured, one row: blocks C 10.00 vs F 13.00 ms; head: no LM head in this process"."""
    k = kernels
    hows = [k.block_order_how or "blocks: nobody chose at start, the untimed default",
            k.head_order_how or "head: no LM head in this process"]
    k.layout_how = ("measured, one row: " if k.layout_timed else "") + "; ".join(hows)


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
    if k.layout_how is not None:
        blocks = _ORDER_NAMES.get(k.block_order) or \
            ", ".join(f"{_short(n)} {matrix_order(k.block_order, n)}" for n in MATRICES)
        line += f"; weights kept: block matrices {blocks}, the LM head {_ORDER_NAMES[k.head_order]} ({k.layout_how})"
    said = describe_pages()
    return line if said is None else f"{line}; {said}"


_ORDER_NAMES = {"C": "row-major (C)", "F": "column-major (F)"}


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
            gemv_per_row(x, w) if one_by_one else product(x, w)   # (T, in) -> (T, out)
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
        head_in_slices(hs[:T], lm_head) if sliced else product(hs[:T], lm_head.T)   # (T, C) -> (T, V)
        return (time.perf_counter() - t0) * 1000

    return _crossover(run, max_rows, repeats)


def layout_probe(n_embd: int, n_vocab: int | None, what: str, budget: int = LAYOUT_PROBE_BYTES) -> dict:
    """Synthetic weight matrices for `measure_layout`, as `product` takes them, in both orders:
    {"C": [...], "F": [...]}, each order a view of the same bytes (one probe's memory, not two):

        "blocks"  GPT-2 blocks of width C = n_embd, each c_attn (C, 3C), attn.c_proj (C, C),
                  mlp.c_fc (C, 4C), mlp.c_proj (4C, C), as many as make `budget` bytes (at most 8:
                  a tiny test model's stay in cache anyway); gpt2: 3 blocks, 85 MB
        "head"    wte.T (C, V') for V' <= n_vocab rows of wte (V', C) kept in that order, making
                  `budget` bytes; gpt2: 21845 of its 50257 rows, 64 MB

    Every page is written (an untouched page reads as zeros from one shared page: cache, not memory),
    and the pages are the loader's kind (2 MB where the OS allows: pages.Arena), so the probe streams
    its matrices as the weights will be streamed.
    """
    C = n_embd
    arena = Arena()

    def filled(n):
        a = arena.empty((n,), np.float32)
        a[...] = 0.01
        return a
    if what == "head":
        V = min(n_vocab, max(1, budget // (4 * C)))
        wte = filled(V * C)
        return {"C": [wte.reshape(V, C).T], "F": [wte.reshape(C, V)]}      # wte (V, C) C / F -> wte.T (C, V)
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * min(8, max(1, -(-budget // (4 * 12 * C * C))))
    bufs = [filled(i * o) for i, o in shapes]
    return {"C": [b.reshape(i, o) for b, (i, o) in zip(bufs, shapes)],
            "F": [b.reshape(o, i).T for b, (i, o) in zip(bufs, shapes)]}       # (in, out), column-major


def _time_pass(mats, xs) -> list:
    """ms of each `product` in one pass over the matrices, each with the rows of xs of its input
    width: one pass over all of them, so every matrix is read from memory as in a decode step,
    and each timed on its own."""
    ms = []
    for w in mats:
        t0 = time.perf_counter()
        product(xs[w.shape[0]], w)                              # (T, in) @ (in, out) -> (T, out)
        ms.append((time.perf_counter() - t0) * 1000)
    return ms


def measure_layout(n_embd: int, n_vocab: int | None, which=("blocks", "head"), repeats: int = 5,
                   time_pass=None, budget_s: float = 0.5) -> dict:
    """{"blocks": {matrix name: {"C": ms, "F": ms}}, "head": {"C": ms, "F": ms}} for what is in
    `which`: one row through the products a decode step runs (`product`) on `layout_probe`'s
    matrices kept in each order, each block matrix (gpt2_tensors.MATRICES) timed on its own within
    passes over all of them, the best of `repeats` passes or more (they go on while `budget_s`
    lasts, at most 50: on a busy machine more samples give each order a better chance of an
    undisturbed one), both orders interleaved.

    One row because that is a lone conversation's decode step, and what a step of a few rows runs
    for each of its rows (`gemv_per_row`, up to the crossover measured next, on the loaded weights);
    the gemms of many rows differ less between the orders (docs/PERFORMANCE.md). One probe at a time
    (64-85 MB for gpt2, freed before the next), at the process's own BLAS thread count.
    `time_pass(mats, xs) -> [ms of each matrix]` times one pass (the tests pass a fake)."""
    time_pass = time_pass or _time_pass
    out = {}
    for what in which:
        mats = layout_probe(n_embd, n_vocab, what)
        xs = {w.shape[0]: np.full((1, w.shape[0]), 0.01, np.float32) for w in mats["C"]}   # (1, in)
        kinds = MATRICES if what == "blocks" else ("head",)       # the probe's blocks: MATRICES, repeated
        best = {(k, o): float("inf") for k in kinds for o in mats}
        for o in mats:                                          # warm-up: BLAS threads, page faults
            time_pass(mats[o], xs)
        t_start = time.perf_counter()
        for i in range(50):
            if i >= repeats and time.perf_counter() - t_start > budget_s:
                break
            for o in mats:
                ms = time_pass(mats[o], xs)
                for j, k in enumerate(kinds):
                    best[k, o] = min(best[k, o], sum(ms[j::len(kinds)]))
        each = {k: {o: round(best[k, o], 3) for o in mats} for k in kinds}
        out[what] = each if what == "blocks" else each["head"]
        del mats
    return out
