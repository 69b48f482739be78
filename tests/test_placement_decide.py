"""One placement decision: `nanopipe plan` (tools/planning.plan_placement) and the leader
(cluster/planner.Planner._plan) both ask placement.decide, so for the same nodes and configs they
choose the same split with the same prediction; and the hop's cost is written in one place.

The leader's side runs Planner._plan itself, on an object carrying only what _plan reads (the
configs, the capacities, the current split) and recording what it would send the workers.
"""
from __future__ import annotations

import ast
import dataclasses
import os
from pathlib import Path

import pytest

import nanopipe.placement as placement
from nanopipe.cluster.planner import Planner
from nanopipe.config import load_cluster_config, load_model_config
from nanopipe.model import GPTConfig
from nanopipe.partition import even
from nanopipe.placement import Capacity, ModelShape
from nanopipe.tools.planning import SetupError, plan_placement

REPO = Path(__file__).resolve().parent.parent
GPT2 = GPTConfig(n_layer=12, n_embd=768, n_head=12)
SHAPE = ModelShape(n_layer=12, n_embd=768, n_ctx=1024, n_vocab=50257)


class PlanningLeader(Planner):
    """The leader's Planner with only what _plan reads; _apply_plan records the split instead of sending it."""

    def __init__(self, model, cluster, caps, shape=SHAPE):
        self.model, self.cluster, self._caps, self.count = model, cluster, caps, lambda kind, *about: None
        self.scheduler = None           # no traffic: no hop transit measured
        self._shape = shape
        self.ranges = even(shape.n_layer, len(caps))
        self.placement, self.plan_note, self.applied, self.refused, self.logged = None, "", None, None, []
        self.excluded = self.head_on_members = None

    def capacities(self):
        return list(self._caps)

    def shape(self):
        return self._shape

    def log(self, message, level=None):
        self.logged.append(message)

    def _apply_plan(self, ranges, excluded, head_on_members):
        self.applied = self.ranges = [tuple(r) for r in ranges]
        self.excluded, self.head_on_members = excluded, head_on_members

    def _refuse(self, message):
        self.refused = message


def cap(name, speed, memory=8000.0):
    return Capacity(name, speed, None if speed is None else 2 * speed, memory, "config")


def configs(partition=None, ips=("10.0.0.1", "10.0.0.2", "10.0.0.3"), link_delay_ms=0.7, max_sessions=16):
    """The shipped configs, with the model's partition and the nodes' addresses (three machines
    unless told) set: the capacities are given, so nothing is measured."""
    mc = load_model_config(str(REPO / "configs"))
    cc = load_cluster_config(str(REPO / "configs"))
    nodes = tuple(dataclasses.replace(n, ip=ip) for n, ip in zip(cc.nodes, ips))
    return (dataclasses.replace(mc, partition=partition, layer_mapping=None),
            dataclasses.replace(cc, nodes=nodes, link_delay_ms=link_delay_ms, max_sessions=max_sessions,
                                node_overrides={}))


ONE_MACHINE = ("127.0.0.1",) * 3
# case -> (partition, addresses, capacities, solved?, the decision's `why`)
CASES = {
    "the nodes differ: auto": (None, None, [cap("mini1", 20), cap("mini2", 20), cap("pi1", 5)],
                               True, "speeds 5.0-20.0 GB/s (pi1 slowest) are more than 25% apart"),
    "partition auto on equal nodes": ("auto", None, [cap("mini1", 20), cap("mini2", 20), cap("pi1", 20)],
                                      True, "partition: auto"),
    "within 25%: even": (None, None, [cap("mini1", 20), cap("mini2", 18), cap("pi1", 17)],
                         False, "the nodes measure within 25%"),
    "a memory unknown": (None, None, [cap("mini1", 20), cap("mini2", 20, None), cap("pi1", 5)],
                         True, "speeds 5.0-20.0 GB/s (pi1 slowest) are more than 25% apart"),
    "a speed unknown: even, unpredicted": (None, None, [cap("mini1", 20), cap("mini2", None, None), cap("pi1", 5)],
                                           False, "a node's speed is unknown"),
    "one machine: even": (None, ONE_MACHINE, [cap("mini1", 20), cap("mini2", 20), cap("pi1", 5)],
                          False, "every node on one machine"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_and_the_leader_decide_the_same_split_through_one_function(case, monkeypatch):
    partition, ips, caps, solved, why = CASES[case]
    mc, cc = configs(partition, **({"ips": ips} if ips else {}))
    decided = []
    real = placement.decide

    def spy(*args, **kwargs):
        decided.append(real(*args, **kwargs))
        return decided[-1]
    monkeypatch.setattr(placement, "decide", spy)

    placed, lines = plan_placement(mc, cc, GPT2, caps, even(12, 3), partition)
    leader = PlanningLeader(mc, cc, caps)
    leader._plan()

    assert len(decided) == 2, f"{case}: plan and the leader must each ask placement.decide once ({len(decided)})"
    cli, lead = decided
    assert cli == lead, f"{case}: the same inputs must give the same decision:\n{cli}\n{lead}"
    assert leader.refused is None, leader.refused
    assert leader.applied == [tuple(r) for r in (placed or even(12, 3))], (case, leader.applied, placed, lines)
    assert lead.solved == solved and lead.why == why, (case, lead)
    assert leader.placement == lead.placement, case
    if lead.placement is not None:       # plan prints the very numbers the leader will report
        assert f"this split: {lead.placement.tok_s(1):.1f} (1 stream), {lead.placement.tok_s(8):.1f}" \
            in "\n".join(lines), lines
    assert leader.plan_note == lead.note, case


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_case_goes_the_way_the_rule_says(case):
    """auto solves; partition not set solves only when the nodes differ and are not one machine;
    an unknown speed gives the even split with no prediction; an unknown memory still solves."""
    partition, ips, caps, solved, why = CASES[case]
    d = placement.decide(SHAPE, caps, even(12, 3), *configs(partition, **({"ips": ips} if ips else {})))
    assert (d.solved, d.why) == (solved, why), (case, d)
    assert d.hop_s == pytest.approx(0.001) and d.sessions == 16 and d.depth == (1 if ips else 3), d
    if not solved:
        assert d.ranges == even(12, 3), (case, d.ranges)
    assert (d.placement is None) == (case == "a speed unknown: even, unpredicted"), (case, d.placement)
    if case == "a memory unknown":
        assert d.unknown == ["mini2: memory_mb"] and any("mini2: memory unknown" in n for n in d.placement.notes), d


def test_a_model_that_does_not_fit_is_refused_alike():
    mc, cc = configs("auto", max_sessions=16)
    caps = [cap("mini1", 20, 300), cap("mini2", 20, 100), cap("pi1", 5, 100)]
    with pytest.raises(SetupError) as e:
        plan_placement(mc, cc, GPT2, caps, even(12, 3), "auto")
    leader = PlanningLeader(mc, cc, caps)
    leader._plan()
    assert leader.refused == str(e.value) and "does not fit" in leader.refused, (leader.refused, str(e.value))
    assert leader.applied is None


def test_the_hop_cost_and_the_split_rule_are_written_once():
    """0.3 ms per hop beyond the link, and the calls that choose a split (solve, differ, even
    on measured nodes), live in placement.py; nothing else in the package adds a hop by hand."""
    assert placement.hop_seconds(0.7) == pytest.approx(0.001)
    assert placement.hop_seconds() == placement.HOP_OVERHEAD_S == 0.0003
    pkg = REPO / "nanopipe"
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        rel = os.path.relpath(path, REPO)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == 0.0003 and rel != "nanopipe/placement.py":
                offenders.append(f"{rel}:{node.lineno}: the hop overhead written again")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("solve", "differ")
                    and rel != "nanopipe/placement.py"):
                offenders.append(f"{rel}:{node.lineno}: {node.func.id}() called outside placement.decide")
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Attribute)
                    and node.left.attr == "link_delay_ms" and rel != "nanopipe/placement.py"):
                offenders.append(f"{rel}:{node.lineno}: a hop's cost worked out by hand (use placement.hop_seconds)")
    assert not offenders, "\n".join(offenders)
    defs = [os.path.relpath(p, REPO) for p in pkg.rglob("*.py")
            if any(isinstance(n, ast.FunctionDef) and n.name == "planned_by_leader"
                   for n in ast.walk(ast.parse(p.read_text())))]
    assert defs == ["nanopipe/partition.py"], defs
