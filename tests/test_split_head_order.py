"""The LM head's memory order (C or F) in a process that first holds a share of the head after its start.

Every process decides its weights' memory orders once, at start (kernels.choose_layout): rank 0
times the head's two orders, a plain worker holds no head and keeps the untimed one. A re-plan can
make that worker a member of a split stage that runs the head by vocabulary: the head's order is
then decided there, before the share loads (kernels.choose_head_order), as choose_layout would have
decided it (pinned by NANOPIPE_HEAD_ORDER, else timed), and said in the log as the start says it.

The choice itself is checked with a fake timer (nothing timed); the re-plan with real processes, the
workers' head order left to measurement (`auto`), whichever order wins: the share is kept in it.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
from helpers import log_of, status, wait_log
from test_memory_order import fake_timer
from test_split_replan import FAST, LONG, PROMPT, READY_S, machines, reference, started_without_rank_2, weights  # noqa: F401

from nanopipe import kernels
from nanopipe.kernels import choose_head_order, choose_layout, describe_kernels


@pytest.fixture
def fresh(monkeypatch):
    """This process's kernel choice as at start, nothing decided yet; restored after the test."""
    for f in dataclasses.fields(kernels.Kernels):
        monkeypatch.setattr(kernels.kernels, f.name, f.default)
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "auto")
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "auto")
    return kernels.kernels


def never(*args):
    raise AssertionError("timed again")


@pytest.mark.parametrize("fast", ["C", "F"])
def test_a_worker_given_its_first_head_share_times_the_heads_orders_once(fresh, fast):
    seen = []
    k = choose_layout(64, None, time_pass=fake_timer({"blocks": {"C": 2.0, "F": 1.0}}, seen))   # a plain worker
    assert (k.block_order, k.head_order) == ("F", "C") and k.head_order_how is None
    assert "head: no LM head in this process" in describe_kernels()
    slow = {"C": "F", "F": "C"}[fast]
    ms = {"head": {fast: 3.0, slow: 4.5}}
    k = choose_head_order(64, 1000, time_pass=fake_timer(ms, seen))          # a re-plan gives it a share
    assert k.head_order == fast and k.block_order == "F", k.layout_how
    assert [w for w, _ in seen].count("head") >= 2 and {o for w, o in seen if w == "head"} == {"C", "F"}
    line = describe_kernels()
    print(line)
    assert f"the LM head {'row-major (C)' if fast == 'C' else 'column-major (F)'}" in line, line
    assert f"(measured, one row: blocks C 2.00 vs F 1.00 ms; head C {ms['head']['C']:.2f} vs F " \
           f"{ms['head']['F']:.2f} ms)" in line, line
    assert choose_head_order(64, 1000, time_pass=never) is k and k.head_order == fast, "decided once"
    assert choose_layout(64, 1000, time_pass=never) is k and k.head_order == fast


def test_a_pinned_head_order_is_kept_and_nothing_is_timed(fresh, monkeypatch):
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "F")
    choose_layout(64, None, time_pass=never)
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "F")     # (read at the start too: a pin holds from then on)
    k = choose_head_order(64, 1000, time_pass=never)
    assert k.head_order == "F" and "head pinned by NANOPIPE_HEAD_ORDER" in k.layout_how, k.layout_how
    assert "measured" not in k.layout_how


def test_a_head_timed_at_the_start_is_not_timed_again(fresh):
    seen = []
    k = choose_layout(64, 1000, time_pass=fake_timer({"blocks": {"C": 1.0, "F": 2.0},
                                                       "head": {"C": 5.0, "F": 4.0}}, seen))
    assert k.head_order == "F" and k.head_order_how == "head C 5.00 vs F 4.00 ms"
    assert choose_head_order(64, 1000, time_pass=never) is k and k.head_order == "F"


def test_nobody_chose_at_start_then_a_share_decides_the_head_alone(fresh, monkeypatch):
    """A process that never chose (a unit test loading weights) keeps its untimed or pinned orders; a
    share of the head then decides the head's order only, unless it is pinned."""
    monkeypatch.setenv(kernels.BLOCK_ORDER_ENV, "C")
    assert kernels.layout_orders() == ("C", "C")
    seen = []
    k = choose_head_order(64, 1000, time_pass=fake_timer({"head": {"C": 4.0, "F": 3.0}}, seen))
    assert (k.block_order, k.head_order) == ("C", "F") and {w for w, _ in seen} == {"head"}
    assert k.layout_how == "measured, one row: blocks pinned by NANOPIPE_BLOCK_ORDER; head C 4.00 vs F 3.00 ms"
    for f in dataclasses.fields(kernels.Kernels):
        monkeypatch.setattr(kernels.kernels, f.name, f.default)
    monkeypatch.setenv(kernels.HEAD_ORDER_ENV, "F")
    assert kernels.layout_orders() == ("C", "F")
    assert choose_head_order(64, 1000, time_pass=never).head_order == "F"


# ---------------------------------------------------------------------------------------------
# real processes: a plain worker becomes a member that runs a share of the head at a re-plan

HEAD_LINE = re.compile(r"the LM head (row-major \(C\)|column-major \(F\)) \(.*head C ([\d.]+) vs F ([\d.]+) ms")


def test_a_plain_worker_made_a_member_at_a_replan_times_the_heads_order_and_keeps_its_share_in_it(
        weights, reference, tmp_path):  # noqa: F811
    """partition auto, fast workers (tests/test_split_replan.py): rank 2 is absent at first, so
    rank 1 starts as a plain stage (no head: its head order untimed); rank 2 joins, the re-plan
    splits blocks 1-4 and the head over ranks 1+2, and rank 1 decides its head order then."""
    cl = machines(weights, str(tmp_path), 3, workers=FAST, extra={"link_delay_ms": 0})
    cl.wrap = {r: ["env", f"{kernels.HEAD_ORDER_ENV}=auto"] for r in (1, 2)}    # the workers measure it
    try:
        started_without_rank_2(cl)
        start = wait_log(cl, 1, "weights kept:")
        assert "head: no LM head in this process" in start, start

        cl.start_rank(2)
        wait_log(cl, 0, "Re-planned (rank 2 (node2) joined)", timeout=READY_S)
        loaded = wait_log(cl, 1, "Loaded the LM head's rows 0-25128 of 50257", timeout=30)
        lines = log_of(cl, 1).splitlines()
        said = [m for m in map(HEAD_LINE.search, lines) if m]
        assert len(said) == 1, "rank 1 said no head order when it got its share (or said it twice):\n" + \
            "\n".join(ln for ln in lines if "weights kept" in ln)
        order, c_ms, f_ms = said[0].groups()
        # the log rounds to 0.01 ms: equal figures there may still have been F ahead, so either is right
        faster = {"row-major (C)", "column-major (F)"} if float(c_ms) == float(f_ms) else \
            {"row-major (C)" if float(c_ms) < float(f_ms) else "column-major (F)"}
        print(said[0].group(0), "|", loaded)
        assert order in faster and f"kept {order}" in loaded, (said[0].group(0), loaded)
        assert lines.index(said[0].string) < lines.index(loaded), "decided after the share loaded"

        assert status(cl)["placement"]["lm_head_ranks"] == [1, 2]
        with cl.client() as c:
            got = c.generate(PROMPT, LONG)
        assert got["token_ids"] == reference, "the split head in the measured order answers differently"
    finally:
        cl.stop()
