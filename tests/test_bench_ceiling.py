"""The split stage's ceiling bench (bench_tp.compare_ceiling) runs what a member runs.

`make bench-tp` ends with it: blocks with no exchange, whole on one core, each member's half alone
and both halves at once. These tests run it on the tiny model: real spawned processes, each loading
its share from the file, so a change that breaks a member's load or decode fails here, not only in
a bench nobody runs in CI. The times themselves are not checked (speed is the bench's business).
"""
import math

from nanopipe.tools.bench_tp import blocks_bench, compare_ceiling


def test_blocks_bench_times_each_member(tiny_weights):
    whole = blocks_bench(tiny_weights, 1, 4, 1, at_once=False, repeats=5, position=3)
    alone = blocks_bench(tiny_weights, 1, 4, 2, at_once=False, repeats=5, position=3)
    together = blocks_bench(tiny_weights, 1, 4, 2, at_once=True, repeats=5, position=3)
    assert len(whole) == 1 and len(alone) == 2 and len(together) == 2
    assert all(math.isfinite(t) and t > 0 for t in whole + alone + together), (whole, alone, together)


def test_compare_ceiling_row(tiny_weights):
    lines = []
    rows = compare_ceiling(tiny_weights, rounds=1, echo=lines.append)
    (row,) = rows
    assert row["ceiling_this_machine"] > 0 and row["ceiling_two_machines"] > 0
    assert len(row["halves_alone_ms"].split()) == 2 and len(row["halves_at_once_ms"].split()) == 2
    assert lines and "no exchange" in lines[0]
