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
    differ,
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


def key_of(shape, nodes, counts, objective, hop_s, depth):
    """(time per token at 8 streams, at 1 stream) for throughput, (1 stream,) for latency, computed
    here from the stage times: 8 streams in g = min(depth, 8) batches of ceil(8 / g) rows; a batch
    visits every stage in turn, every stage serves all g batches."""
    p = predict(shape, nodes, ranges_of(counts), hop_s=hop_s)
    used = [i for i, c in enumerate(counts) if c or i == 0]
    hop = hop_s if len(used) > 1 else 0
    one = sum(p.stage_s[i] + hop for i in used)
    g = min(depth or len(nodes), 8)
    rows = -(-8 // g)
    t = [min(rows * p.stage_s[i], -(-rows // 8) * p.stage8_s[i]) + hop for i in used]
    return (max(sum(t), g * max(t)), one) if objective == "throughput" else (one,)


def brute(shape, nodes, objective, sessions, hop_s, depth=None):
    best = None
    for counts in splits(shape.n_layer, len(nodes)):
        if not fits(shape, nodes, counts, sessions):
            continue
        key = key_of(shape, nodes, counts, objective, hop_s, depth)
        if best is None or key < best[0]:
            best = (key, counts)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_solver_matches_brute_force(seed):
    rnd = random.Random(seed)
    shape = ModelShape(n_layer=rnd.randint(3, 9), n_embd=rnd.choice([64, 128, 768]), n_ctx=rnd.choice([64, 1024]))
    n = rnd.randint(1, 4)
    nodes = [Capacity(f"n{i}", speed_gbps=rnd.uniform(1, 30), speed8_gbps=rnd.uniform(1, 60),
                      memory_mb=rnd.uniform(50, 2000)) for i in range(n)]
    sessions, hop_s = rnd.choice([1, 4, 16]), rnd.choice([0.0, 0.0005, 0.01])
    depth = rnd.choice([1, 2, None])          # one machine, two, or one per node
    for objective in ("throughput", "latency"):
        want = brute(shape, nodes, objective, sessions, hop_s, depth)
        if want is None:
            with pytest.raises(PlacementError):
                solve(shape, nodes, sessions=sessions, hop_s=hop_s, objective=objective, depth=depth)
            continue
        got = solve(shape, nodes, sessions=sessions, hop_s=hop_s, objective=objective, depth=depth)
        counts = [hi - lo for lo, hi in got.ranges]
        assert fits(shape, nodes, counts, sessions), (counts, got.notes)
        key = key_of(shape, nodes, counts, objective, hop_s, depth)
        assert key == pytest.approx(want[0], rel=1e-9), f"{objective}: solver {counts} {key} vs brute {want}"
        assert got.cycle_s(8 if objective == "throughput" else 1) == pytest.approx(want[0][0], rel=1e-9)


def test_worked_example_in_the_docstring():
    nodes = [Capacity("mini1", 20, 40, 8000), Capacity("mini2", 20, 40, 8000), Capacity("pi5", 5, 10, 8000)]
    even = predict(GPT2, nodes, [(0, 4), (4, 8), (8, 12)], hop_s=0.001)
    assert [round(t * 1e3, 2) for t in even.stage_s] == [13.39, 5.67, 22.68]
    assert round(even.tok_s(1), 1) == 22.4 and round(even.tok_s(8)) == 216
    thr = solve(GPT2, nodes, hop_s=0.001, objective="throughput")
    assert thr.ranges == [(0, 2), (2, 10), (10, 12)]
    assert round(thr.tok_s(1), 1) == 27.6 and round(thr.tok_s(8)) == 400
    one_machine = solve(GPT2, nodes, hop_s=0.001, objective="throughput", depth=1)
    assert round(predict(GPT2, nodes, even.ranges, hop_s=0.001, depth=1).tok_s(8)) == 335
    assert one_machine.ranges == [(0, 12), (12, 12), (12, 12)] and round(one_machine.tok_s(8)) == 647
    # why each is left out: mini2 is as fast as mini1 (the hop and the turn-taking decide), pi5 is slow
    assert ("mini2: left out — as fast as the nodes that hold blocks (20 vs 20 GB/s), but a stage of its own "
            "adds a hop (1 ms per token), and nodes on one machine take turns, so splitting gains nothing"
            in one_machine.notes), one_machine.notes
    assert "pi5: left out — at 5 GB/s its blocks would only slow the others" in one_machine.notes, one_machine.notes
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


@pytest.mark.parametrize("bad, field", [
    ({"speed_gbps": "fast", "memory_mb": 900}, "speed_gbps"),
    ({"speed_gbps": float("nan"), "memory_mb": 900}, "speed_gbps"),
    ({"speed_gbps": 5, "memory_mb": -1}, "memory_mb"),
    ({"speed_gbps": 5, "memory_mb": True}, "memory_mb"),
    ({"speed_gbps": 5}, "memory_mb"),
])
def test_a_peers_capacity_is_checked_field_by_field(bad, field):
    with pytest.raises(ValueError, match=f"capacity field '{field}' must be a positive number"):
        Capacity.from_dict(dict(bad, name="pi5"))
    with pytest.raises(ValueError, match="must be a JSON object"):
        Capacity.from_dict([1, 2])


def test_config_overrides_replace_what_a_node_measured():
    measured = Capacity("pi5", 4.0, 8.0, 900, "measured")
    assert measured.overridden({"speed_gbps": 9, "memory_mb": 3000}) == Capacity("pi5", 9.0, 18.0, 3000.0, "config")
    assert measured.overridden({"memory_mb": 500}) == Capacity("pi5", 4.0, 8.0, 500.0, "config+measured")
    assert measured.overridden({}) is measured


def test_nodes_differ_when_speed_or_memory_is_more_than_25_percent_apart():
    alike = [Capacity("a", 10, 20, 4000), Capacity("b", 8.1, 16, 3300)]
    assert differ(alike) is None
    assert differ([Capacity("a", 10, 20, 4000), Capacity("b", 7.9, 16, 4000)]).startswith("speeds 7.9-10.0 GB/s (b")
    assert differ([Capacity("a", 10, 20, 4000), Capacity("pi", 10, 20, 900)]) == \
        "memory 900-4000 MB (pi smallest) are more than 25% apart"


def test_plan_shows_speeds_the_chosen_split_and_predictions_beside_the_even_split(tmp_path):
    """Every node's figures from cluster_config.yaml's `nodes:` (so nothing is measured and the
    output is exact): the docstring's worked example, hops of 1 ms (0.7 ms link + 0.3 ms)."""
    import os
    import shutil

    import yaml
    from click.testing import CliRunner

    from nanopipe.tools.cli import main
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path / "configs"
    shutil.copytree(os.path.join(repo, "configs"), d)
    cc = yaml.safe_load((d / "cluster_config.yaml").read_text())
    cc["link_delay_ms"] = 0.7
    cc["host_ip"] = {"mini1": "10.0.0.1", "mini2": "10.0.0.2", "pi1": "10.0.0.3"}   # three machines: depth 3
    cc["nodes"] = {"mini1": {"speed_gbps": 20, "speed8_gbps": 40, "memory_mb": 8000},
                   "mini2": {"speed_gbps": 20, "speed8_gbps": 40, "memory_mb": 8000},
                   "pi1": {"speed_gbps": 5, "speed8_gbps": 10, "memory_mb": 8000}}
    (d / "cluster_config.yaml").write_text(yaml.safe_dump(cc))
    out = CliRunner().invoke(main, ["plan", "--config-dir", str(d), "--partition", "auto"])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.output.splitlines()]
    assert ["mini1", "0", "0-1", "2"] == lines[1][:4] and ["pi1", "2", "10-11", "2"] == lines[3][:4], out.output
    assert ["pi1", "5.0", "10.0", "8000", "config"] in lines, out.output
    assert ("Split: auto (partition: auto), objective throughput; max_sessions 16, hops 1.0 ms, 3 batches in flight"
            in out.output), out.output
    assert ("Predicted tok/s   this split: 27.6 (1 stream), 399.8 (8 streams)   even split: 22.4, 216.1"
            in out.output), out.output

    even = CliRunner().invoke(main, ["plan", "--config-dir", str(d), "--partition", "even"])
    assert "Split: even;" in even.output and "this split: 22.4 (1 stream), 216.1 (8 streams)" in even.output


def test_plan_with_unknown_nodes_says_so(tmp_path):
    import os
    import shutil

    from click.testing import CliRunner

    from nanopipe.tools.cli import main
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(repo, "configs"), tmp_path / "configs")
    cluster = tmp_path / "configs" / "cluster_config.yaml"      # the workers on machines of their own
    cluster.write_text(cluster.read_text().replace('mini2: "127.0.0.1"', 'mini2: "10.9.0.2"')
                       .replace('pi1: "127.0.0.1"', 'pi1: "10.9.0.3"'))
    out = CliRunner().invoke(main, ["plan", "--config-dir", str(tmp_path / "configs")])
    assert out.exit_code == 0, out.output
    assert "measured here" in out.output and out.output.count("unknown: measured when it joins") == 2
    assert "Predicted tok/s: not until every node's speed and memory are known (2 unknown; " in out.output
    assert "`nanopipe plan --from-cluster HOST:PORT` asks a running leader" in out.output


def test_plan_on_the_shipped_single_machine_configs_measures_once_and_predicts(monkeypatch):
    """Every node of the shipped configs is this machine (127.0.0.1): measured once, for all three."""
    import os

    from click.testing import CliRunner

    from nanopipe import placement
    from nanopipe.tools.cli import main
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    calls = []
    real = placement.measure
    monkeypatch.setattr(placement, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = CliRunner().invoke(main, ["plan", "--config-dir", os.path.join(repo, "configs")])
    assert out.exit_code == 0, out.output
    assert len(calls) == 1, calls
    assert "unknown" not in out.output, out.output
    assert out.output.count("measured here (same machine as mini1)") == 2, out.output
    assert "Predicted tok/s   this split: " in out.output, out.output


def test_measure_node_counts_the_loaded_stage_as_the_models_memory_and_logs_it(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from nanopipe import placement
    monkeypatch.setattr(placement, "measure", lambda name, n_embd, override=None, n_head=None:
                        placement.Capacity(name, 9.0, 18.0, 1000.0, "measured"))
    shape, stage, logger = SimpleNamespace(n_embd=64, n_head=4), SimpleNamespace(nbytes=500e6), logging.getLogger("t")
    with caplog.at_level(logging.INFO, logger="t"):
        cap = placement.measure_node("mini1", shape, logger, holding=stage, note="; partition: auto")
    assert cap.memory_mb == 1500.0 and cap.speed_gbps == 9.0
    assert "Measured this node: 9.0 GB/s (1 row), 18.0 GB/s (8 rows), 1500 MB usable (measured); partition: auto" \
        in caplog.text
    # memory_mb set in the config is the answer as it stands; nothing loaded, nothing added
    assert placement.measure_node("mini1", shape, logger, override={"memory_mb": 800}, holding=stage).memory_mb \
        == 1000.0
    assert placement.measure_node("mini1", shape, logger).memory_mb == 1000.0
