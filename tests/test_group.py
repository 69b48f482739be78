"""A split stage's all-reduce over real sockets (cluster/group.py), and what the leader tells members.

Each member's GroupLinks runs on its own thread with socketpair links; every member must get back
exactly model.all_reduce's sum (the same additions in member order: bit for bit, on every member),
whether the members exchange directly or gather at member 0, for 1-row decode steps and for a
prefill too big to sit in a socket's buffer (both members send at once: neither may block).
"""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from nanopipe.cluster.group import GroupLinks, GroupPlace, Link, hops, place, reduce_how
from nanopipe.cluster.wire import ProtocolError
from nanopipe.model import all_reduce


def make_group(m: int, how: str) -> list:
    pairs = {(i, j): socket.socketpair() for i in range(m) for j in range(i + 1, m)}
    groups = []
    for me in range(m):
        g = GroupLinks(GroupPlace({"members": [[r + 1, "127.0.0.1", 1000 + r] for r in range(m)], "member": me,
                                   "how": how}), 1 << 30)
        links = {}
        for (i, j), (a, b) in pairs.items():
            if me == i:
                links[j] = Link(a, f"member {j}", 1 << 30)
            elif me == j:
                links[i] = Link(b, f"member {i}", 1 << 30)
        g.links, g.epoch = links, 1
        groups.append(g)
    return groups


def run_all(groups: list, partials: list, steps: int = 1) -> list:
    out, errors = [None] * len(groups), []

    def run(i):
        try:
            for _ in range(steps):
                out[i] = groups[i].all_reduce(partials[i])
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an all-reduce hung"
    assert not errors, errors
    return out


@pytest.mark.parametrize("m, how", [(2, "direct"), (3, "direct"), (3, "gather"), (4, "gather")])
@pytest.mark.parametrize("rows", [1, 4096], ids=["decode row", "16 MB prefill"])
def test_every_member_gets_model_all_reduce_bit_for_bit(m, how, rows):
    rng = np.random.default_rng(m + rows)
    partials = [rng.standard_normal((rows, 1024)).astype(np.float32) for _ in range(m)]
    want = all_reduce(partials)
    got = run_all(make_group(m, how), partials, steps=2)
    for r, total in enumerate(got):
        assert total.dtype == np.float32 and total.shape == want.shape
        assert np.array_equal(total, want), f"member {r} of {m} ({how}) got another sum than model.all_reduce"


def test_members_out_of_step_is_a_protocol_error():
    a, b = make_group(2, "direct")
    a.seq = 5                                   # a has done more all-reduces than b: the ring is out of step
    errors = []

    def run(g):
        try:
            g.all_reduce(np.zeros((1, 8), np.float32))
        except ProtocolError as e:
            errors.append(str(e))
    ts = [threading.Thread(target=run, args=(g,)) for g in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert any("out of step" in e for e in errors), errors


def test_how_a_group_reduces():
    assert reduce_how(2, True) == reduce_how(2, False) == "direct"
    assert reduce_how(3, True) == "gather" and reduce_how(3, False) == "direct"


class Node:
    def __init__(self, rank, ip="10.0.0.1"):
        self.rank, self.ip, self.port = rank, ip, 7000 + rank


def test_what_the_leader_tells_the_members_and_the_ring_hops():
    ranges = [(0, 4), (4, 12), (4, 12), (12, 24)]
    ring = [0, 1, 2, 3]
    assert hops(ranges, ring) == [0, 1, 3]
    first = place(ranges, ring, 1, Node)
    assert first["next_rank"] == 3 and first["prev_rank"] == 0 and first["layers"] == [4, 12]
    assert first["group"] == {"members": [[1, "10.0.0.1", 7001], [2, "10.0.0.1", 7002]], "member": 0, "how": "direct"}
    second = place(ranges, ring, 2, Node)
    assert second["group"]["member"] == 1 and second["prev_rank"] is None and "next" not in second
    last = place(ranges, ring, 3, Node)
    assert last["prev_rank"] == 1 and last["next_rank"] == 0 and "group" not in last


def test_plan_predicts_a_split_stage_with_the_link_model():
    """gpt2-medium's 24 blocks (12,596,224 parameters each) on 4 GB/s nodes: one node streams
    1,209,237,504 bytes per token, 302.3 ms; two members 151.2 ms each, plus 48 all-reduces of one
    4096-byte row over 1 GbE, 0.2 + 4096 * 8 / 940e3 = 0.2349 ms each: 162.4 ms, 1.86x."""
    from nanopipe.cluster.group import all_reduce_ms, plan_lines
    assert abs(all_reduce_ms(2, 1, 1024, 0.2, 940) - 0.23486) < 1e-4
    ranges = [(0, 1), (1, 25), (1, 25)]
    [line] = plan_lines(ranges, ["pi0", "pi1", "pi2"], [None, 4.0, 4.0], 1024, None, ["a", "b", "c"])
    assert line.startswith("Split stage pi1+pi2 (layers 1-24, 2 members, all-reduce direct): one node 302.3 ms"), line
    assert "each member 151.2 ms + 48 all-reduces x 0.235 ms (0.2 ms, 940 Mbit/s) = 162.4 ms: 1.86x" in line, line
    [unknown] = plan_lines(ranges, ["pi0", "pi1", "pi2"], [None, None, 4.0], 1024, (3.0, 100.0), None)
    assert "48 all-reduces add 48 x 3.328 ms" in unknown and "once every member's speed is known" in unknown, unknown
    assert plan_lines([(0, 4), (4, 8)], ["a", "b"], [1.0, 1.0], 64) == []
