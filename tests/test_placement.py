"""Placement on mixed machines: what a node measures about itself, and the solver's split.

The solver is checked against brute force (every contiguous split) on small cases, so "exact"
is a tested claim, not a comment.
"""
from __future__ import annotations

import itertools
import random

import pytest

from nanopipe.placement import (
    Capacity,
    ModelShape,
    PlacementError,
    cgroup_memory_room,
    max_blocks,
    mem_available_bytes,
    predict,
    solve,
)

GPT2 = ModelShape(n_layer=12, n_embd=768)


def splits(n_layer, n_nodes, min_rank0=1):
    """Every contiguous split: counts per node summing to n_layer, rank 0 >= min_rank0."""
    for cuts in itertools.product(range(n_layer + 1), repeat=n_nodes - 1):
        counts = [cuts[0]] + [b - a for a, b in zip(cuts, cuts[1:])] + [n_layer - cuts[-1]] if n_nodes > 1 \
            else [n_layer]
        if all(c >= 0 for c in counts) and counts[0] >= min_rank0:
            yield counts


def ranges_of(counts):
    out, lo = [], 0
    for c in counts:
        out.append((lo, lo + c))
        lo += c
    return out


def fits(shape, nodes, counts, sessions):
    return all(c <= max_blocks(shape, nd, i == 0, sessions) for i, (nd, c) in enumerate(zip(nodes, counts)))


def brute(shape, nodes, objective, sessions, hop_s):
    best = None
    for counts in splits(shape.n_layer, len(nodes)):
        if not fits(shape, nodes, counts, sessions):
            continue
        p = predict(shape, nodes, ranges_of(counts), hop_s=hop_s)
        used = [i for i, c in enumerate(counts) if c or i == 0]
        one = sum(p.stage_s) + (hop_s * len(used) if len(used) > 1 else 0)
        slowest = max(p.stage8_s[i] + (hop_s if len(used) > 1 else 0) for i in used)
        key = (slowest, one) if objective == "throughput" else (one,)
        if best is None or key < best[0]:
            best = (key, counts)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    rnd = random.Random(seed)
    shape = ModelShape(n_layer=rnd.randint(3, 9), n_embd=rnd.choice([64, 128, 768]), n_ctx=rnd.choice([64, 1024]))
    n = rnd.randint(1, 4)
    nodes = [Capacity(f"n{i}", speed_gbps=rnd.uniform(1, 30), speed8_gbps=rnd.uniform(1, 60),
                      memory_mb=rnd.uniform(50, 2000)) for i in range(n)]
    sessions, hop_s = rnd.choice([1, 4, 16]), rnd.choice([0.0, 0.0005, 0.01])
    for objective in ("throughput", "latency"):
        want = brute(shape, nodes, objective, sessions, hop_s)
        if want is None:
            with pytest.raises(PlacementError):
                solve(shape, nodes, sessions=sessions, hop_s=hop_s, objective=objective)
            continue
        got = solve(shape, nodes, sessions=sessions, hop_s=hop_s, objective=objective)
        counts = [hi - lo for lo, hi in got.ranges]
        assert fits(shape, nodes, counts, sessions), (counts, got.notes)
        p = predict(shape, nodes, got.ranges, hop_s=hop_s)
        used = [i for i, c in enumerate(counts) if c or i == 0]
        one = sum(p.stage_s) + (hop_s * len(used) if len(used) > 1 else 0)
        slowest = max(p.stage8_s[i] + (hop_s if len(used) > 1 else 0) for i in used)
        key = (slowest, one) if objective == "throughput" else (one,)
        assert key == pytest.approx(want[0], rel=1e-9), f"{objective}: solver {counts} {key} vs brute {want}"


def test_worked_example_in_the_docstring():
    nodes = [Capacity("mini1", 20, 40, 8000), Capacity("mini2", 20, 40, 8000), Capacity("pi5", 5, 10, 8000)]
    even = predict(GPT2, nodes, [(0, 4), (4, 8), (8, 12)], hop_s=0.001)
    assert [round(t * 1e3, 2) for t in even.stage_s] == [13.39, 5.67, 22.68]
    assert round(even.tok_s(1), 1) == 22.4 and round(even.tok_s(8)) == 648
    thr = solve(GPT2, nodes, hop_s=0.001, objective="throughput")
    assert thr.ranges == [(0, 2), (2, 10), (10, 12)]
    assert round(thr.tok_s(1), 1) == 27.6 and round(thr.tok_s(8)) == 1199
    lat = solve(GPT2, nodes, hop_s=0.001, objective="latency")
    assert lat.ranges == [(0, 12), (12, 12), (12, 12)] and round(lat.tok_s(1), 1) == 40.4
    assert any("pi5: left out" in n for n in lat.notes)


def test_a_slow_node_gets_fewer_blocks_and_a_small_one_no_more_than_fits():
    nodes = [Capacity("mini1", 20, 40, 8000), Capacity("slow", 5, 10, 8000), Capacity("small", 20, 40, 400)]
    p = solve(GPT2, nodes, sessions=16)
    counts = [hi - lo for lo, hi in p.ranges]
    assert counts[1] < counts[2] or counts[2] == max_blocks(GPT2, nodes[2], False, 16)
    assert counts[2] <= max_blocks(GPT2, nodes[2], False, 16) == 3      # 400 MB / (28.4 + 100.7) MB
    assert any(n.startswith("small: 400 MB usable") and "at most 3 blocks" in n for n in p.notes), p.notes


def test_a_node_too_small_for_one_block_is_left_out_with_figures():
    nodes = [Capacity("mini1", 20, 40, 8000), Capacity("pi5", 20, 40, 100)]
    p = solve(GPT2, nodes, sessions=16)
    assert p.ranges[1] == (12, 12)
    assert any("pi5: 100 MB usable, one block needs 28 MB + 101 MB KV at 16 sessions" in n for n in p.notes)


def test_a_model_that_does_not_fit_is_refused_with_needed_vs_usable():
    xl = ModelShape(n_layer=48, n_embd=1600)
    nodes = [Capacity(f"pi{i}", 5, 10, 900) for i in range(3)]
    with pytest.raises(PlacementError) as e:
        solve(xl, nodes, sessions=16)
    msg = str(e.value)
    assert "does not fit the cluster" in msg and "MB needed" in msg and "2700 MB usable" in msg


def test_mem_available_parses_proc_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    1234567 kB\n")
    assert mem_available_bytes(str(f)) == 1234567 * 1024


def test_cgroup_room_v1_and_v2(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("536870912\n")
    (v1 / "memory" / "job" / "memory.usage_in_bytes").write_text("36870912\n")
    pc = tmp_path / "cgroup1"
    pc.write_text("4:memory:/job\n3:cpu,cpuacct:/\n0::/\n")
    assert cgroup_memory_room(str(v1), str(pc)) == 500_000_000
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_room(str(v1), str(pc)) is None              # unlimited

    v2 = tmp_path / "v2"
    (v2 / "svc").mkdir(parents=True)
    (v2 / "svc" / "memory.max").write_text("1000000000\n")
    (v2 / "svc" / "memory.current").write_text("250000000\n")
    pc2 = tmp_path / "cgroup2"
    pc2.write_text("0::/svc\n")
    assert cgroup_memory_room(str(v2), str(pc2)) == 750_000_000
    (v2 / "svc" / "memory.max").write_text("max\n")
    assert cgroup_memory_room(str(v2), str(pc2)) is None
