"""How a process runs a step of a few rows (nanopipe/kernels.py): chosen once at start, pinned by the
environment or measured, never timed by the math itself; processes on one machine take turns timing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nanopipe import kernels
from nanopipe.engine import prefill_step
from nanopipe.kernels import (
    KernelChoiceError,
    choose_gemv_rows,
    choose_head_rows,
    choose_prefill_rows,
    describe_kernels,
    measure_gemv_rows,
    measure_prefill_rows,
    measuring_alone,
)
from nanopipe.model import KVCache, blocks_forward, embed, gpt2, head
from nanopipe.weights import load_stage


@pytest.fixture(scope="module")
def stage(tiny_weights):
    return load_stage(tiny_weights)


@pytest.fixture
def fresh(monkeypatch):
    """This process's kernel choice as at start, nothing decided yet; restored after the test."""
    for f in dataclasses.fields(kernels.Kernels):
        monkeypatch.setattr(kernels.kernels, f.name, f.default)
    return kernels.kernels


def test_choose_head_rows_pinned_or_measured_on_wte(stage, monkeypatch, fresh):
    """The head's crossover is its own: pinned by NANOPIPE_HEAD_ROWS, else measured on wte itself
    (sliced vs one gemm, T = 2, 3, ...), and kept once decided."""
    monkeypatch.setenv(kernels.HEAD_ROWS_ENV, "5")
    k = choose_head_rows(stage.lm_head)
    assert (k.head_rows, "pinned" in k.head_how) == (5, True)
    monkeypatch.setattr(kernels.kernels, "head_how", None)
    monkeypatch.setenv(kernels.HEAD_ROWS_ENV, "auto")
    k = choose_head_rows(stage.lm_head)
    assert k.head_rows >= 1 and k.head_how.startswith("measured (gemm vs slices: 2 rows"), k.head_how
    assert "the LM head" in describe_kernels()
    monkeypatch.setenv(kernels.HEAD_ROWS_ENV, "0")
    assert choose_head_rows(stage.lm_head) is k, "a process decides once and keeps it"
    monkeypatch.setattr(kernels.kernels, "head_how", None)
    with pytest.raises(KernelChoiceError, match="NANOPIPE_HEAD_ROWS"):
        choose_head_rows(stage.lm_head)


def test_choose_gemv_rows_pinned_by_the_environment_measured_otherwise_and_kept(stage, monkeypatch, fresh):
    monkeypatch.setenv(kernels.GEMV_ROWS_ENV, "3")
    k = choose_gemv_rows(stage.blocks)
    assert (k.gemv_rows, k.chosen) == (3, True) and "pinned" in k.how
    monkeypatch.setenv(kernels.GEMV_ROWS_ENV, "7")
    assert choose_gemv_rows(stage.blocks).gemv_rows == 3, "a process decides once and keeps it"
    assert "2-3 rows" in describe_kernels()

    monkeypatch.setattr(kernels.kernels, "chosen", False)
    monkeypatch.setenv(kernels.GEMV_ROWS_ENV, "auto")
    k = choose_gemv_rows(stage.blocks)
    assert 1 <= k.gemv_rows <= kernels.MAX_GEMV_ROWS and k.how.startswith("measured")
    n, times = measure_gemv_rows(stage.blocks, max_rows=4, repeats=1)
    assert 1 <= n <= 4 and list(times)[0] == 2 and all(g > 0 and v > 0 for g, v in times.values())


@pytest.mark.parametrize("value", ["0", "-2", "four", "2.5"])
def test_a_bad_gemv_rows_setting_is_a_clear_error(stage, monkeypatch, fresh, value):
    monkeypatch.setenv(kernels.GEMV_ROWS_ENV, value)
    with pytest.raises(KernelChoiceError, match=r"NANOPIPE_GEMV_ROWS=.* whole number >= 1.*'auto'"):
        choose_gemv_rows(stage.blocks)


def test_choose_prefill_rows_pinned_or_measured(stage, monkeypatch, fresh):
    monkeypatch.setenv(kernels.PREFILL_ROWS_ENV, "128")
    choose_gemv_rows(stage.blocks)
    k = choose_prefill_rows(prefill_step(stage.blocks, stage.config.n_head))
    assert k.prefill_rows == 128 and k.chosen and "pinned by NANOPIPE_PREFILL_ROWS" in describe_kernels()
    n, per_row = measure_prefill_rows(prefill_step(stage.blocks, stage.config.n_head), candidates=(16, 32, 64),
                                      repeats=1)
    assert n in (16, 32, 64) and set(per_row) <= {16, 32, 64} and all(ms > 0 for ms in per_row.values())
    assert measure_prefill_rows(prefill_step([], stage.config.n_head)) == (64, {}), "no blocks: nothing to time"
    monkeypatch.setattr(kernels.kernels, "prefill_how", None)
    monkeypatch.setenv(kernels.PREFILL_ROWS_ENV, "none")
    with pytest.raises(KernelChoiceError, match="NANOPIPE_PREFILL_ROWS='none' is not a whole number"):
        choose_prefill_rows(prefill_step(stage.blocks, stage.config.n_head))


def _never(*args, **kwargs):
    raise AssertionError("the math timed the machine: only the caller's choice at start may")


@pytest.mark.parametrize("pins, want", [({}, (1, 1, 64)), ({"GEMV": "3", "HEAD": "5", "PREFILL": "32"}, (3, 5, 32))])
def test_the_math_never_times_the_machine_when_nobody_chose(stage, monkeypatch, fresh, pins, want):
    """gpt2(), blocks_forward() and head() called with no choice made at start (a unit test, a
    notebook) take the pinned values, else the conservative default (one gemm for 2+ rows, 64-row
    chunks): no measurement runs, so the result is the same however loaded the machine is."""
    for name in ("GEMV", "HEAD", "PREFILL"):
        monkeypatch.setenv(f"NANOPIPE_{name}_ROWS", pins.get(name, "auto"))
    for f in ("measure_gemv_rows", "measure_head_rows", "measure_prefill_rows", "measuring_alone"):
        monkeypatch.setattr(kernels, f, _never)
    c = stage.config
    cache = KVCache(c.n_layer, c.n_head, c.head_dim, c.n_ctx)
    logits = gpt2(np.array([5, 6, 7]), np.arange(3), stage.wte, stage.wpe, stage.blocks, stage.ln_f,
                  stage.lm_head, n_head=c.n_head, segments=[(cache, 3)])                   # (3, V)
    assert logits.shape == (3, c.n_vocab)
    k = kernels.kernels
    assert (k.gemv_rows, k.head_rows, k.prefill_rows) == want, describe_kernels()
    assert k.chosen and ("pinned" if pins else "nobody chose at start") in k.how, k.how


def test_head_alone_never_times_the_machine(stage, monkeypatch, fresh):
    monkeypatch.setenv(kernels.HEAD_ROWS_ENV, "auto")
    monkeypatch.setattr(kernels, "measure_head_rows", _never)
    h = embed(np.array([1, 2]), np.arange(2), stage.wte, stage.wpe)                        # (2, C)
    assert head(h, stage.ln_f, stage.lm_head).shape == (2, stage.config.n_vocab)
    assert kernels.kernels.head_rows == 1


def test_blocks_forward_keeps_a_choice_made_at_start(stage, monkeypatch, fresh):
    """The engine chooses at start; the math then runs that choice, never a second decision."""
    monkeypatch.setenv(kernels.GEMV_ROWS_ENV, "6")
    choose_gemv_rows(stage.blocks)
    monkeypatch.setenv(kernels.GEMV_ROWS_ENV, "2")
    c = stage.config
    x = embed(np.array([1, 2, 3]), np.arange(3), stage.wte, stage.wpe)
    blocks_forward(x, stage.blocks, n_head=c.n_head, segments=[(KVCache(c.n_layer, c.n_head, c.head_dim, 8), 3)])
    assert kernels.kernels.gemv_rows == 6


def test_processes_on_one_machine_take_turns_measuring(tmp_path, monkeypatch):
    """kernels.measuring_alone: while another holder has the machine's timing lock, a measurement
    waits; it starts as soon as the lock is released."""
    import fcntl
    import os
    import tempfile
    import threading
    import time

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    other = os.open(tmp_path, os.O_RDONLY)                     # another process holding the lock
    fcntl.flock(other, fcntl.LOCK_EX)
    entered = threading.Event()

    def measure():
        with measuring_alone():
            entered.set()
    t = threading.Thread(target=measure)
    t.start()
    assert not entered.wait(0.3), "measured while another process held the lock"
    os.close(other)                                             # the other process is done
    assert entered.wait(5), "still waiting after the lock was released"
    t.join()
    with measuring_alone(timeout_s=0.1):                        # free again: enters at once
        pass
    assert os.listdir(tmp_path) == [], "the lock leaves nothing behind"
    t0 = time.monotonic()
    with measuring_alone(), measuring_alone(timeout_s=30):     # re-entrant: a probe may choose kernels inside
        pass
    assert time.monotonic() - t0 < 5, "a nested measurement waited for its own process's lock"
