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


# ---------------------------------------------------------------------------------------------
# how a member reads a partial: its own frame's header and meta as the pattern, polling first


@pytest.mark.parametrize("seq, shape", [(1, (1, 1024)), (47, (3, 768)), (123456, (16, 64))])
def test_a_members_partial_frame_is_what_encode_frame_makes(seq, shape):
    """The all-reduce builds its PARTIAL's header and meta without JSON (partial_head); a member
    reads the others' by comparing with its own, so they must be encode_frame's very bytes."""
    from nanopipe.cluster.group import partial_head
    from nanopipe.cluster.wire import Msg, encode_frame
    x = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    want = encode_frame(Msg.PARTIAL, {"seq": seq, "dtype": "float32", "shape": list(shape)}, x)
    assert partial_head(seq, shape) + x.tobytes() == want


def test_a_partial_whose_meta_is_spelt_otherwise_is_still_taken():
    """A sender whose JSON differs (its key order) but says the same, in as many bytes:
    checked as any frame is, and summed."""
    from nanopipe.cluster.wire import HEADER, MAGIC, PROTOCOL_VERSION, Msg
    a, b = make_group(2, "direct")
    other = np.full((1, 8), 2.0, np.float32)
    meta = b'{"shape":[1,8],"seq":1,"dtype":"float32"}'
    assert len(meta) == len(b'{"seq":1,"dtype":"float32","shape":[1,8]}')
    b.links[0].sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, int(Msg.PARTIAL), 0, len(meta), 32) + meta
                            + other.tobytes())
    mine = np.full((1, 8), 1.0, np.float32)
    assert np.array_equal(a.all_reduce(mine), all_reduce([mine, other]))


@pytest.mark.parametrize("what", ["another message", "out of step, longer meta", "another shape"])
def test_a_frame_that_is_not_the_expected_partial_is_a_clear_protocol_error(what):
    """The fast read compares headers; anything else is read whole and said plainly, never a hang
    (a later seq has a longer meta: the header differs in its meta length)."""
    from nanopipe.cluster.wire import Msg, encode_frame
    a, b = make_group(2, "direct")
    frame = {"another message": encode_frame(Msg.ACT, {"dtype": "float32", "shape": [1, 8]},
                                             np.zeros((1, 8), np.float32)),
             "out of step, longer meta": encode_frame(Msg.PARTIAL, {"seq": 10, "dtype": "float32", "shape": [1, 8]},
                                                      np.zeros((1, 8), np.float32)),
             "another shape": encode_frame(Msg.PARTIAL, {"seq": 1, "dtype": "float32", "shape": [2, 8]},
                                           np.zeros((2, 8), np.float32))}[what]
    b.links[0].sock.sendall(frame)
    with pytest.raises(ProtocolError) as e:
        a.all_reduce(np.zeros((1, 8), np.float32))
    said = {"another message": "expected a PARTIAL in the all-reduce, got ACT",
            "out of step, longer meta": "out of step", "another shape": "expected float32 [1, 8]"}[what]
    assert said in str(e.value), str(e.value)


def test_a_member_polls_for_a_partial_before_it_sleeps(monkeypatch):
    """A partial already there is read without sleeping; one that comes a second late, after the
    poll window, is waited for asleep (reduce_sleeps counts those: a count, not a time)."""
    import time

    from nanopipe.cluster import group
    monkeypatch.setattr(group, "SPIN_S", 0.05)
    a, b = make_group(2, "direct")
    x = np.ones((1, 16), np.float32)
    b.links[0].send(group.partial_head(1, x.shape) + x.tobytes())       # b's partial waits in a's socket
    assert np.array_equal(a.all_reduce(x), all_reduce([x, x])) and a.sleeps == 0
    b.seq = 1
    b._recv_partial(0, group.partial_head(1, x.shape), x.shape)            # (b takes a's, as it would)
    late = threading.Timer(1.0, lambda: b.all_reduce(x))
    late.start()
    t0 = time.monotonic()
    a.all_reduce(x)
    late.join()
    assert time.monotonic() - t0 >= 0.9 and a.sleeps >= 1, (a.sleeps, time.monotonic() - t0)


def test_a_partial_framed_with_a_longer_meta_is_read_whole_and_taken():
    """Meta that says the same in more bytes (a space): the header differs, so it is read as any
    frame is and, being this all-reduce's PARTIAL, summed."""
    from nanopipe.cluster.wire import HEADER, MAGIC, PROTOCOL_VERSION, Msg
    a, b = make_group(2, "direct")
    other = np.full((1, 8), 3.0, np.float32)
    meta = b'{"seq": 1, "dtype": "float32", "shape": [1, 8]}'
    b.links[0].sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, int(Msg.PARTIAL), 0, len(meta), 32) + meta
                            + other.tobytes())
    mine = np.full((1, 8), 1.0, np.float32)
    assert np.array_equal(a.all_reduce(mine), all_reduce([mine, other]))
