"""Where the LM head goes when `partition: auto` makes the ring end in a split stage: on rank 0, or
split by vocabulary over the members. Both are predicted and the sooner one is the plan's; the
running cluster's registry then follows the plan (cluster/split_plan.py, cluster/registry.py).

Every expected figure is worked out here from the model's shape, the nodes' speeds and the link,
term by term, not read off the code:

    block   4 (12 C^2 + 13 C) bytes        head   4 V C bytes (wte, tied)
    a stage streams its bytes once a token at its node's GB/s; a member of 2 streams half of each block
    all-reduce  delay + C x 4 x 8 bits / link  (2 per block)
    head on the members: 1/m of the head each, + gather (delay + (m-1)/m V floats), + the logits
                         frame back to rank 0 ((V - C) floats more than a row of activations)
    hop     link delay + 0.3 ms, one per stage (none when rank 0 is alone)
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from nanopipe.cluster.registry import WorkerRegistry
from nanopipe.cluster.split_plan import SPLIT_GAIN, decide_with_split, members_run_head
from nanopipe.config import load_cluster_config, load_model_config
from nanopipe.model import GPTConfig
from nanopipe.partition import even
from nanopipe.placement import Capacity, ModelShape

REPO = Path(__file__).resolve().parent.parent
THREE = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def configs(partition="auto", layer_mapping=None, link_delay_ms=0.2, link_mbps=940.0, **cluster):
    mc = load_model_config(str(REPO / "configs"))
    cc = load_cluster_config(str(REPO / "configs"))
    return (dataclasses.replace(mc, partition=partition, layer_mapping=layer_mapping),
            dataclasses.replace(cc, nodes=tuple(dataclasses.replace(n, ip=ip) for n, ip in zip(cc.nodes, THREE)),
                                link_delay_ms=link_delay_ms, link_mbps=link_mbps, node_overrides={}, **cluster))


def by_hand(C, V, L0, L, rank0_gbps, member_gbps, delay_ms, mbps):
    """ms per token of rank 0 holding blocks 0..L0-1 and 2 members sharing blocks L0..L-1 (half of
    every head and MLP column each): (head on rank 0, head on the members)."""
    block, head = 4 * (12 * C * C + 13 * C), 4 * V * C                      # bytes
    bits = (lambda floats: floats * 4 * 8 / (mbps * 1e3)) if mbps else (lambda floats: 0.0)     # ms on the link
    rank0 = L0 * block / (rank0_gbps * 1e6)                                  # ms: bytes / (GB/s x 1e6)
    members = (L - L0) * block / 2 / (member_gbps * 1e6)
    reduces = 2 * (L - L0) * (delay_ms + bits(C))
    hops = 2 * (delay_ms + 0.3)
    on_rank0 = rank0 + head / (rank0_gbps * 1e6) + members + reduces + hops
    on_members = (rank0 + members + reduces + hops + head / 2 / (member_gbps * 1e6)
                  + delay_ms + bits(V / 2) + bits(V - C))
    return on_rank0, on_members


# The cluster of tests/test_split_replan.py: 5 blocks of C=64 (0.2 MB each) and a 12.9 MB head;
# rank 0 at 1 GB/s with room for its head and one block only, the workers 2000x slower, 50 ms links.
TINY = ModelShape(n_layer=5, n_embd=64, n_ctx=256, n_vocab=50257, n_head=4)
FAST0 = Capacity("node0", 1.0, 1.0, 16.5, "config")


def slow(name):
    return Capacity(name, 0.0005, 0.0005, 4000.0, "config")


def test_slow_members_split_the_blocks_and_leave_the_heavy_head_on_rank_0():
    mc, cc = configs(link_delay_ms=50.0, link_mbps=0.0)
    d = decide_with_split(TINY, [FAST0, slow("node1"), slow("node2")], even(5, 3), mc, cc)
    on_rank0, on_members = by_hand(64, 50257, 1, 5, 1.0, 0.0005, 50.0, 0.0)
    # the pipeline: rank 0 one block and the head, one worker the other 4 blocks, 2 hops (a second
    # worker would add a hop and take no time off: its blocks are as slow)
    block, head = 4 * (12 * 64 * 64 + 13 * 64), 4 * 50257 * 64
    pipeline = (block + head) / 1e6 + 4 * block / 0.0005e6 + 2 * 50.3
    print(f"head on rank 0 {on_rank0:.1f} ms, on the members {on_members:.1f}, pipeline {pipeline:.1f}")
    assert (round(on_rank0, 1), round(on_members, 1), round(pipeline, 1)) == (1313.4, 14216.3, 1713.2)
    assert on_rank0 <= (1 - SPLIT_GAIN) * pipeline < on_members     # only the split with the head on rank 0 gains
    assert d.ranges == [(0, 1), (1, 5), (1, 5)] and d.split is not None, d
    assert not d.split.head_on_members and not members_run_head(d, cc), d.split
    assert d.split.ms == pytest.approx(on_rank0, rel=1e-6) and d.split.other_ms == pytest.approx(on_members, rel=1e-6)
    assert d.split.pipeline_ms == pytest.approx(pipeline, rel=1e-6)
    assert d.split.head_ms == pytest.approx(head / 1e6)                  # rank 0 streams all of wte
    assert d.note.endswith(f"predicted {on_rank0:.1f} ms/token vs pipeline {pipeline:.1f} for one conversation, "
                           f"the LM head on rank 0 (on the members: {on_members:.1f} ms)"), d.note


MEDIUM = ModelShape(n_layer=24, n_embd=1024, n_ctx=1024, n_vocab=50257, n_head=16)


@pytest.mark.parametrize("rank0_gbps", [8.0, 4.0])
def test_fast_members_take_the_head(rank0_gbps):
    """gpt2-medium's shape, 3 machines, 1 GbE: members as fast as rank 0 (or faster) split the head
    too: half of its 206 MB each, plus 2.7 ms on the link, beats the whole head on rank 0."""
    caps = [Capacity("n0", rank0_gbps, 2 * rank0_gbps, 64000.0, "config")] + \
        [Capacity(f"n{i}", 8.0, 16.0, 64000.0, "config") for i in (1, 2)]
    mc, cc = configs()
    d = decide_with_split(MEDIUM, caps, even(24, 3), mc, cc)
    on_rank0, on_members = by_hand(1024, 50257, 1, 24, rank0_gbps, 8.0, 0.2, 940.0)
    block, head = 4 * (12 * 1024 ** 2 + 13 * 1024), 4 * 50257 * 1024
    # the best pipeline: rank 0 alone (no hop), or rank 0 one block (it keeps at least one) and the head,
    # a worker the other 23, two hops of 0.5 ms (a second worker would only add a hop)
    pipeline = min((24 * block + head) / (rank0_gbps * 1e6),
                   (block + head) / (rank0_gbps * 1e6) + 23 * block / 8e6 + 2 * 0.5)
    print(f"rank 0 at {rank0_gbps} GB/s: head on rank 0 {on_rank0:.1f} ms, on the members {on_members:.1f}, "
          f"pipeline {pipeline:.1f}")
    assert on_members < on_rank0 and on_members <= (1 - SPLIT_GAIN) * pipeline
    assert d.ranges == [(0, 1), (1, 24), (1, 24)] and d.split.head_on_members and members_run_head(d, cc), d
    assert d.split.ms == pytest.approx(on_members, rel=1e-5) and d.split.other_ms == pytest.approx(on_rank0, rel=1e-5)
    assert d.split.pipeline_ms == pytest.approx(pipeline, rel=1e-5)
    if rank0_gbps == 8.0:               # the worked example of split_plan's docstring
        assert (round(on_members, 1), round(on_rank0, 1), round(pipeline, 1)) == (106.1, 116.3, 176.9)


@pytest.mark.parametrize("speeds", [(8.0, 8.0, 8.0), (4.0, 8.0, 8.0), (1.0, 0.0005, 0.0005)])
def test_split_lm_head_false_never_puts_the_head_on_the_members(speeds):
    """Where the members would take the head (above), `split_lm_head: false` keeps it on rank 0:
    the split is predicted with the head there only, nothing else weighed."""
    shape, L = (TINY, 5) if speeds[1] < 0.01 else (MEDIUM, 24)
    link = (50.0, 0.0) if shape is TINY else (0.2, 940.0)
    memory = 16.5 if shape is TINY else 64000.0
    caps = [Capacity("n0", speeds[0], speeds[0], memory, "config")] + \
        [Capacity(f"n{i}", speeds[i], speeds[i], 64000.0, "config") for i in (1, 2)]
    mc, cc = configs(link_delay_ms=link[0], link_mbps=link[1], split_lm_head=False)
    d = decide_with_split(shape, caps, even(L, 3), mc, cc)
    on_rank0, _ = by_hand(shape.n_embd, 50257, 1, L, speeds[0], speeds[1], *link)
    assert d.split is not None and d.ranges == [(0, 1), (1, L), (1, L)], d
    assert not d.split.head_on_members and not members_run_head(d, cc) and d.split.other_ms is None, d.split
    assert d.split.ms == pytest.approx(on_rank0, rel=1e-5)
    assert d.note.endswith("the LM head on rank 0"), d.note


def test_a_pipeline_or_a_hand_written_mapping_leaves_the_head_to_split_lm_head():
    """No split chosen by the plan (a layer_mapping, or auto keeping a pipeline): split_lm_head says
    whether a split stage ending the ring runs the head (true: a mapping's members do)."""
    caps = [Capacity(f"n{i}", 8.0, 16.0, 64000.0, "config") for i in range(3)]
    mapping = {0: [0, 0], 1: [1, 23], 2: [1, 23]}
    for flag in (True, False):
        mc, cc = configs(partition="even", layer_mapping=mapping, split_lm_head=flag)
        d = decide_with_split(MEDIUM, caps, [(0, 1), (1, 24), (1, 24)], mc, cc)
        assert d.split is None and members_run_head(d, cc) is flag, (flag, d)


def registry(split_lm_head: bool, ranges: list) -> WorkerRegistry:
    _, cc = configs(split_lm_head=split_lm_head)
    return WorkerRegistry(cc, GPTConfig(n_layer=5, n_embd=64, n_head=4), ranges, threading.Lock(),
                          lambda *a: None, model_name="tiny")


def test_the_registry_runs_the_head_where_the_split_in_force_says():
    """A hand-written mapping: split_lm_head (true: the members). A plan's split: what it chose,
    whatever split_lm_head is; every reader (splits_head, each member's place) agrees."""
    split = [(0, 1), (1, 5), (1, 5)]
    reg = registry(True, split)
    assert reg.splits_head() and all(reg.place_of(r)["group"].get("head") is True for r in (1, 2))
    reg.assign(split, [None, None, None], head_on_members=False)       # the plan: the head on rank 0
    assert not reg.splits_head() and all("head" not in reg.place_of(r)["group"] for r in (1, 2))
    reg.assign(split, [None, None, None], head_on_members=True)
    assert reg.splits_head() and reg.place_of(2)["group"]["head"] is True
    assert not registry(False, split).splits_head()
    # a pipeline ends in no split stage: no head on any worker, whatever the flag
    reg.assign([(0, 1), (1, 3), (3, 5)], [None, None, None], head_on_members=True)
    assert not reg.splits_head() and "group" not in reg.place_of(2)
