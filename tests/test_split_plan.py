"""`partition: auto` chooses a split stage only when the link model predicts one conversation faster
(cluster/split_plan.py); `nanopipe plan` prints that prediction; a re-plan keeps a split stage's members.

The nodes are given (no measuring): gpt2-medium's shape (24 blocks of 50.4 MB, 16 heads, a 206 MB
LM head) on three machines at 8 GB/s, the worked example of split_plan's docstring, checked by hand.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_placement_decide import PlanningLeader  # the leader's Planner, recording what it applies

import nanopipe.placement as placement
from nanopipe.cluster.replan import ReplanFailed, check_memory, without
from nanopipe.cluster.split_plan import (
    conversation_ms,
    decide_with_split,
    split_lines,
    split_link,
    split_stage,
)
from nanopipe.config import load_cluster_config, load_model_config
from nanopipe.model import GPTConfig
from nanopipe.partition import even, groups
from nanopipe.placement import Capacity, ModelShape

REPO = Path(__file__).resolve().parent.parent
MEDIUM = ModelShape(n_layer=24, n_embd=1024, n_ctx=1024, n_vocab=50257, n_head=16)
GIGABIT = (0.2, 940.0, "1 GbE")
WIFI = (5.0, 100.0, "WiFi-like")
THREE = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def cap(name, speed=8.0, memory=64000.0):
    return Capacity(name, speed, 2 * speed, memory, "config")


def nodes(*speeds, memory=64000.0):
    return [cap(f"n{i}", s, memory) for i, s in enumerate(speeds)]


def configs(partition="auto", link_delay_ms=0.2, link_mbps=940.0, ips=THREE, **cluster):
    mc = load_model_config(str(REPO / "configs"))
    cc = load_cluster_config(str(REPO / "configs"))
    return (dataclasses.replace(mc, partition=partition, layer_mapping=None),
            dataclasses.replace(cc, nodes=tuple(dataclasses.replace(n, ip=ip) for n, ip in zip(cc.nodes, ips)),
                                link_delay_ms=link_delay_ms, link_mbps=link_mbps, node_overrides={}, **cluster))


def fastest_ms(caps, link_ms):
    return placement.fastest_one_stream_s(MEDIUM, caps, hop_s=placement.hop_seconds(link_ms)) * 1000


def test_the_worked_example_by_hand():
    """Rank 0 holds block 0 and the head, ranks 1 and 2 share blocks 1-23: every term written out."""
    caps = nodes(8, 8, 8)
    got = conversation_ms(MEDIUM, caps, [(0, 1), (1, 24), (1, 24)], GIGABIT, placement.hop_seconds(0.2), THREE)
    block, head = MEDIUM.block_bytes / 8e9 * 1000, MEDIUM.head_stream_bytes / 8e9 * 1000     # ms at 8 GB/s
    reduce = 0.2 + 1024 * 4 * 8 / 940e3                                                       # one row, 1 GbE
    want = (block + head) + 23 * block / 2 + 46 * reduce + 2 * 0.5
    assert got.ms == pytest.approx(want, rel=1e-3), (got.ms, want)
    assert got.head_ms == pytest.approx(head) and got.split.heads == [8, 8] and got.split.all_reduces == 46
    assert got.split.member_ms == pytest.approx([23 * block / 2] * 2)
    print(f"split: {got.ms:.1f} ms per token, by hand {want:.1f}")


def test_a_plain_pipeline_is_predicted_as_the_placement_model_does():
    caps = nodes(8, 6, 4)
    ranges = [(0, 6), (6, 15), (15, 24)]
    hop = placement.hop_seconds(0.2)
    got = conversation_ms(MEDIUM, caps, ranges, GIGABIT, hop)
    want = placement.predict(MEDIUM, caps, ranges, hop_s=hop).cycle_s(1) * 1000
    assert got.split is None and got.ms == pytest.approx(want), (got.ms, want)


def test_a_fast_link_gives_the_split():
    caps = nodes(8, 8, 8)
    pipeline = fastest_ms(caps, 0.2)
    ranges, pred = split_stage(MEDIUM, caps, pipeline, link=GIGABIT, hop_s=placement.hop_seconds(0.2),
                               sessions=16, ips=THREE)
    assert ranges == [(0, 1), (1, 24), (1, 24)], ranges
    assert pred.ms <= 0.9 * pipeline and pipeline / pred.ms == pytest.approx(1.52, abs=0.01), (pred.ms, pipeline)


def test_a_wifi_like_link_keeps_the_pipeline():
    """5 ms per all-reduce x 46 per token: more than the split saves."""
    caps = nodes(8, 8, 8)
    pipeline = fastest_ms(caps, 5.0)
    assert split_stage(MEDIUM, caps, pipeline, link=WIFI, hop_s=placement.hop_seconds(5.0), sessions=16,
                       ips=THREE) is None
    # and the prediction it turned down really is slower
    no = conversation_ms(MEDIUM, caps, [(0, 1), (1, 24), (1, 24)], WIFI, placement.hop_seconds(5.0), THREE)
    assert no.ms > pipeline, (no.ms, pipeline)


def test_too_little_memory_for_a_members_share_keeps_the_pipeline():
    """Rank 0 has room for its head and 2 blocks, rank 2 for 5 blocks: a pipeline fits (rank 1 takes
    the rest), a split does not (each member holds about half of 22 blocks); with room, it is chosen."""
    per_block = (MEDIUM.block_bytes + MEDIUM.kv_bytes(16)) / 1e6           # MB, weights and KV at 16 sessions
    rank0 = cap("n0", 8, MEDIUM.rank0_bytes / 1e6 + 2.5 * per_block)
    for memory, fits in ((5.5 * per_block, False), (13 * per_block, True)):
        caps = [rank0, cap("n1", 8), cap("n2", 8, memory)]
        got = split_stage(MEDIUM, caps, fastest_ms(caps, 0.2), link=GIGABIT, hop_s=placement.hop_seconds(0.2),
                          sessions=16, ips=THREE)
        assert (got is not None) == fits, (memory, got and got[0])
    mc, cc = configs()
    d = decide_with_split(MEDIUM, [rank0, cap("n1", 8), cap("n2", 8, 5.5 * per_block)], even(24, 3), mc, cc)
    assert d.split is None and d.placement is not None and d.ranges[2][1] - d.ranges[2][0] <= 5, d.ranges


def test_members_on_one_address_are_not_a_split():
    """Two members on one machine share its memory bus: predicted no gain, not a candidate."""
    caps = nodes(8, 8, 8)
    assert split_stage(MEDIUM, caps, fastest_ms(caps, 0.2), link=GIGABIT, hop_s=placement.hop_seconds(0.2),
                       sessions=16, ips=["10.0.0.1", "10.0.0.2", "10.0.0.2"]) is None


def test_a_slow_member_paces_the_stage_and_the_rule_takes_the_fast_ones():
    """Four workers, the last a tenth as fast: it would pace a split of all four, so the split is of
    ranks 1-3 and rank 4 is left out."""
    caps = nodes(8, 8, 8, 8, 0.8)
    ips = [f"10.0.0.{i}" for i in range(1, 6)]
    ranges, pred = split_stage(MEDIUM, caps, fastest_ms(caps, 0.2), link=GIGABIT, hop_s=placement.hop_seconds(0.2),
                               sessions=16, ips=ips)
    assert groups(ranges) == [[0], [1, 2, 3], [4]] and ranges[4][0] == ranges[4][1], ranges
    assert pred.split.heads == [6, 5, 5], pred.split


def test_decide_with_split_says_it_in_the_plans_words_and_can_be_forbidden():
    caps = nodes(8, 8, 8)
    mc, cc = configs()
    d = decide_with_split(MEDIUM, caps, even(24, 3), mc, cc)
    assert d.ranges == [(0, 1), (1, 24), (1, 24)] and d.placement is None and d.split is not None, d
    # split_lm_head (the default): the ring ends in the split stage, so its members run the LM head.
    # By hand: 116.3 with the head on rank 0 (below), less rank 0's 25.7 ms head, plus each member's
    # half 12.9, the gather 0.2 + 100514 B at 940 Mbit/s = 1.06 and the logits frame's 197 KB more 1.68
    assert "split stage ranks 1-2 (layers 1-23), predicted 106.1 ms/token vs pipeline 176.9" in d.note, d.note
    assert d.split.head_on_members and "the LM head on the members (on rank 0: 116.3 ms)" in d.note, d.split
    mc, cc = configs(split_lm_head=False)
    d = decide_with_split(MEDIUM, caps, even(24, 3), mc, cc)
    assert "split stage ranks 1-2 (layers 1-23), predicted 116.3 ms/token vs pipeline 176.9" in d.note, d.note
    assert d.split.head_on == "rank 0", d.split
    # split_stages: false: the guide's pure pipeline, as placement.decide alone gives it
    mc, cc = configs(split_stages=False)
    d = decide_with_split(MEDIUM, caps, even(24, 3), mc, cc)
    assert d.split is None and d == placement.decide(MEDIUM, caps, even(24, 3), mc, cc), d
    # only partition auto splits: not set (the nodes alike) stays even
    mc, cc = configs(partition=None)
    assert decide_with_split(MEDIUM, caps, even(24, 3), mc, cc).split is None


def test_the_link_the_all_reduces_are_predicted_on():
    _, cc = configs(link_delay_ms=3.0, link_mbps=0.0)
    assert split_link(cc, [0.1, 0.2]) == (3.0, 0.0, "link_delay_ms/link_mbps")
    _, cc = configs(link_delay_ms=0.0, link_mbps=0.0)
    assert split_link(cc, [0.4, 0.1, 0.3]) == (0.3, 0.0, "measured hop transit")
    assert split_link(cc, []) == (0.2, 940.0, "1 GbE assumed") == split_link(None)


def test_the_leader_applies_the_split_and_logs_the_prediction():
    mc, cc = configs()
    caps = nodes(8, 8, 8)
    leader = PlanningLeader(mc, cc, caps, shape=MEDIUM)
    leader._plan()
    assert leader.applied == [(0, 1), (1, 24), (1, 24)] and leader.excluded == [None, None, None]
    line = [m for m in leader.logged if "planned:" in m]
    assert line and "split stage ranks 1-2 (layers 1-23), predicted 106.1 ms/token vs pipeline 176.9" in line[0], \
        leader.logged
    assert line[0].startswith("Plan: rank 0 (n0) 0-0, rank 1 (n1) 1-23, rank 2 (n2) 1-23"), line[0]


def test_plan_prints_members_heads_compute_all_reduces_and_the_head():
    from nanopipe.tools.planning import plan_placement
    mc, cc = configs()
    placed, lines = plan_placement(mc, cc, GPTConfig(n_layer=24, n_embd=1024, n_head=16), nodes(8, 8, 8),
                                   even(24, 3), "auto")
    text = "\n".join(lines)
    assert placed == [(0, 1), (1, 24), (1, 24)], placed
    assert ("Split stage n1+n2 (layers 1-23, all-reduce direct): heads 8+8; compute n1 72.4 ms, n2 72.4 ms; "
            "46 all-reduces x 0.235 ms = 10.8 ms (0.2 ms, 940 Mbit/s, link_delay_ms/link_mbps)") in text, text
    # the head on the split stage (split_lm_head): rank 0 32.0 - 25.7; the stage 83.2 + 12.9 + 1.06 + 1.68
    assert ("One conversation: 106.1 ms/token (9.4 tok/s): rank 0 6.3 ms (LM head on the members, 12.9 each), "
            "split stage 98.8 ms, 2 hops 1.0 ms; the pipeline: 176.9 ms (1.67x)") in text, text


def test_split_lines_of_three_members_with_uneven_heads():
    caps = nodes(8, 8, 8, 8)
    pred = conversation_ms(MEDIUM, caps, [(0, 4), (4, 24), (4, 24), (4, 24)], GIGABIT, 0.0005,
                           ["a", "b", "c", "d"])
    [stage, total, head] = split_lines(pred, ["r0", "r1", "r2", "r3"])
    assert "heads 6+5+5" in stage and "40 all-reduces" in stage and "r3 " in stage, stage
    assert total.startswith(f"One conversation: {pred.ms:.1f} ms/token"), total
    assert head == "LM head: on rank 0", head           # predicted there alone: nothing to weigh it against


def test_a_replan_keeps_a_split_stages_remaining_members_while_every_layer_is_held():
    assert without([(0, 1), (1, 5), (1, 5)], [1], 5) == [(0, 1), (1, 5)]
    assert without([(0, 1), (1, 5), (1, 5), (1, 5)], [1, 3], 5) == [(0, 1), (1, 5), (1, 5)]
    assert without([(0, 1), (1, 3), (3, 5)], [1], 5) is None            # layers 3-4 were rank 2's alone
    assert without([(0, 1), (1, 3), (1, 3), (3, 5)], [2, 3], 5) == [(0, 1), (1, 3), (3, 5)]


def test_memory_is_checked_against_a_members_share():
    """A member holds about half of every block: room for 12 whole blocks is room for a 2-member
    share of 23, and not for all 23 whole."""
    tiny = dataclasses.replace(MEDIUM, n_ctx=16)
    per_block = (tiny.block_bytes + tiny.kv_bytes(1)) / 1e6
    caps = [cap("n0"), cap("n1", memory=12.2 * per_block), cap("n2", memory=12.2 * per_block)]
    check_memory(tiny, caps, [(0, 1), (1, 24), (1, 24)], 1)
    with pytest.raises(ReplanFailed, match="n1 would hold 23 blocks"):
        check_memory(tiny, caps[:2], [(0, 1), (1, 24)], 1)


def test_a_rank_holding_nothing_does_not_part_a_split_stage():
    """Rank 2 gone (no layers) between two members: ranks 1 and 3 are still one stage."""
    assert groups([(0, 4), (4, 12), (0, 0), (4, 12)]) == [[0], [1, 3], [2]]
    assert groups([(0, 1), (1, 1), (1, 5), (1, 5), (5, 5)]) == [[0], [1], [2, 3], [4]]
    assert groups([(0, 4), (4, 8), (8, 8), (8, 12)]) == [[0], [1], [2], [3]]


def test_a_running_clusters_split_stage_is_one_row_of_the_plan():
    from nanopipe.partition import format_plan
    from nanopipe.tools.planning import cluster_stages
    nodes = [{"rank": 0, "host": "mini1", "layers": [0, 0]},
             {"rank": 1, "host": "pi1", "layers": None},                           # left out
             {"rank": 2, "host": "pi2", "layers": [1, 4], "heads": [0, 1]},
             {"rank": 4, "host": "pi4", "layers": [1, 4], "heads": [2, 3]}]        # rank 3 gone: not listed
    stages = cluster_stages(nodes)
    assert stages == ([(0, 1), (0, 0), (1, 5)], ["mini1", "pi1", "pi2+pi4"], ["0", "1", "2+4"],
                      ["", "", "0-1 + 2-3"]), stages
    ranges, names, ranks, heads = stages
    assert format_plan(ranges, names=names, ranks=ranks, heads=heads).splitlines() == [
        "Node     Rank  Layers  Count  Heads",
        "mini1       0  0-0         1",
        "pi1         1  none        0",
        "pi2+pi4   2+4  1-4         4  0-1 + 2-3"]
    # a pipeline's table is what it was
    plain = [{"rank": r, "host": f"n{r}", "layers": [4 * r, 4 * r + 3]} for r in range(3)]
    assert format_plan(*cluster_stages(plain)[:2]) == format_plan([(0, 4), (4, 8), (8, 12)], ["n0", "n1", "n2"])


@pytest.mark.parametrize("given", [True, False], ids=["speeds given", "speeds unknown"])
def test_plan_of_a_layer_mapping_with_a_split_stage(tmp_path, given):
    """`nanopipe plan` on a configured split stage: with every node's figures, one conversation
    predicted beside the even pipeline; without, what the all-reduces alone cost on the link."""
    from nanopipe.config import Configs
    from nanopipe.tools.localcluster import write_configs
    from nanopipe.tools.planning import plan_table
    from nanopipe.weights import init_weights
    weights = str(tmp_path / "tiny5.safetensors")
    init_weights(weights, n_layer=5, n_embd=64, n_head=4, n_ctx=256, seed=0)
    nodes = {f"node{i}": {"speed_gbps": 1.0, "memory_mb": 4000} for i in range(3)} if given else {}
    write_configs(str(tmp_path / "configs"), weights=weights, nodes=3, n_layer=5, partition="even",
                  layer_mapping={0: [0, 0], 1: [1, 4], 2: [1, 4]}, hosts=THREE,
                  cluster_extra={"link_delay_ms": 0.2, "link_mbps": 940, **({"nodes": nodes} if nodes else {})})
    p = plan_table(Configs(str(tmp_path / "configs")), weights)      # unknown: node0 measured, the others not
    text = "\n".join(p.lines)
    assert p.ranges == [(0, 1), (1, 5), (1, 5)], p.ranges
    if given:
        assert "Split stage node1+node2 (layers 1-4, all-reduce direct): heads 2+2; compute node1 " in text, text
        assert "8 all-reduces x 0.202 ms" in text and "the even pipeline: " in text, text
        assert "Predicted tok/s" not in text, "the placement model cannot predict a split stage"
    else:
        assert ("Split stage node1+node2 (layers 1-4, 2 members, all-reduce direct): each member computes 1/2"
                in text), text
    # what each member holds: half of 4 blocks (C=64: 12C^2 + 13C floats each, LayerNorms whole, so
    # a few hundred bytes off) and, running the LM head (split_lm_head's default), its rows of wte
    # and ln_f; 50257 rows split 25129 + 25128
    block = (12 * 64 * 64 + 13 * 64) * 4
    for rank, rows in ((1, 25129), (2, 25128)):
        want = 4 * block / 2 + (rows * 64 + 2 * 64) * 4
        assert abs(p.bytes_per_rank[rank] - want) <= 4 * 64 * 4, (rank, p.bytes_per_rank[rank], want)


def test_auto_says_why_it_kept_the_pipeline():
    """A split weighed and turned down is said, with the best candidate's prediction (checked
    against conversation_ms for the layers named) and the pipeline's; members that would share an
    address are said as such; `nanopipe plan` prints the same reason."""
    import re

    from nanopipe.tools.planning import plan_placement
    caps = nodes(8, 8, 8)
    mc, cc = configs(link_delay_ms=5.0, link_mbps=100.0)
    d = decide_with_split(MEDIUM, caps, even(24, 3), mc, cc)
    assert d.split is None, d
    m = re.search(r"^the best, ranks 1-2 \(layers (\d+)-23\), predicts ([\d.]+) ms/token against "
                  r"the pipeline's ([\d.]+): not 10% sooner$", d.no_split)
    assert m, d.no_split
    first, best_ms, pipeline_ms = int(m.group(1)), float(m.group(2)), float(m.group(3))
    ranges = [(0, first), (first, 24), (first, 24)]
    again = min(conversation_ms(MEDIUM, caps, ranges, split_link(cc), d.hop_s, THREE, head_split=h).ms
                for h in (False, True))                 # the LM head in its better place, as auto weighs it
    assert best_ms == pytest.approx(again, abs=0.05) and best_ms > 0.9 * pipeline_ms, (again, d.no_split)
    # the same machine for both workers: not weighed at all, and the reason names the address
    mc, cc = configs(ips=["10.0.0.1", "10.0.0.2", "10.0.0.2"])
    d = decide_with_split(MEDIUM, caps, even(24, 3), mc, cc)
    assert d.split is None and d.no_split.startswith("the workers share one address"), d.no_split
    cfg = GPTConfig(n_vocab=MEDIUM.n_vocab, n_ctx=MEDIUM.n_ctx, n_embd=MEDIUM.n_embd, n_head=16, n_layer=24)
    _, lines = plan_placement(mc, cc, cfg, caps, even(24, 3), "auto")
    assert any(ln.startswith("Split stage: none, the workers share one address") for ln in lines), lines
