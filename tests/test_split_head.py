"""The LM head split by vocabulary over the members of the ring's last split stage.

When the ring ends in a split stage, its members hold the whole rows after their last all-reduce;
each computes the logits of its rows of the vocabulary (wte's rows v0..v1-1, read alone from the
file), member 0 gathers them in vocabulary order and sends LOGITS back, and rank 0 only samples
(cluster/group.py; `split_lm_head: false` keeps the head on rank 0). GPT-2's 50257 tokens split
unevenly over 2 members (25129 + 25128) and over 3 (16753 + 16752 + 16752).

Real `nanopipe serve` / `join` processes (LocalCluster), compared with one process (Engine): the
tokens, greedy and seeded, must be the very same; logprobs within a tolerance (a share's gemv may
block its sums unlike the whole head's), the largest difference printed. The tests of
tests/test_split_cluster.py that take a `split_cluster` run here too, on clusters that end in a
split stage (imported below: the same checks, this module's fixture).
"""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import test_split_cluster as plain
from helpers import log_of, read_tensors, status, wait_log
from test_split_cluster import CASES, PROMPT, READY_S, assert_same

from nanopipe.cluster.group import GroupLinks, GroupPlace, Link, place, plan_lines, predict_head_split, splits_head
from nanopipe.decoding import SamplingParams
from nanopipe.model import gather_logits, head, head_share, vocab_share
from nanopipe.safetensors_io import read_header, write_safetensors
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import WeightsError, load_head_share, load_stage

# the fixtures of tests/test_split_cluster.py, and its tests that take a split_cluster, run again here
weights, reference = plain.weights, plain.reference
test_split_stage_gives_the_tokens_of_one_process = plain.test_split_stage_gives_the_tokens_of_one_process
test_batched_sessions_through_the_split_stage = plain.test_batched_sessions_through_the_split_stage
test_prefix_reuse_through_the_split_stage = plain.test_prefix_reuse_through_the_split_stage
test_stop_sequence_ends_the_answer_and_the_members_free_it = \
    plain.test_stop_sequence_ends_the_answer_and_the_members_free_it

V = 50257
# name -> layer_mapping (inclusive), the ring the leader's log shows, each member's rows of the vocabulary
ENDS_SPLIT = {
    "2 members end the ring": ({0: [0, 0], 1: [1, 4], 2: [1, 4]}, "ring 0 -> 1+2 -> 0",
                               {1: (0, 25129), 2: (25129, V)}),
    "3 members after a plain stage": ({0: [0, 0], 1: [1, 1], 2: [2, 4], 3: [2, 4], 4: [2, 4]},
                                      "ring 0 -> 1 -> 2+3+4 -> 0",
                                      {2: (0, 16753), 3: (16753, 33505), 4: (33505, V)}),
}


@pytest.fixture(scope="module", params=list(ENDS_SPLIT))
def split_cluster(request, weights):
    mapping, path, vocab = ENDS_SPLIT[request.param]
    cl = LocalCluster(weights, nodes=len(mapping), layer_mapping=mapping, ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2})
    cl.ring_path, cl.vocab = path, vocab
    with cl:
        yield cl


def test_each_member_runs_its_rows_of_the_head(split_cluster, reference):
    """Every member loaded its rows of the vocabulary (uneven: the first member one more) and spent
    time on the head; the answer is one process's."""
    for rank, (v0, v1) in split_cluster.vocab.items():
        wait_log(split_cluster, rank, f"Loaded the LM head's rows {v0}-{v1 - 1} of {V}", timeout=10)
    with split_cluster.client() as c:
        got = c.generate(PROMPT, CASES["greedy"])
    assert_same(got, reference(PROMPT, CASES["greedy"]), "greedy")
    time.sleep(0.6)                     # the next heartbeats carry the head's time
    head_ms = {n["rank"]: n["head_ms"] for n in status(split_cluster)["nodes"] if n["rank"] > 0}
    assert all(head_ms[r] and head_ms[r] > 0 for r in split_cluster.vocab), head_ms
    assert all(head_ms[r] is None for r in head_ms if r not in split_cluster.vocab), head_ms


def test_echo_scores_every_prompt_row_through_the_split_head(split_cluster, reference, weights):
    """An echo request asks logits of every prompt row: several rows of logits in one LOGITS frame."""
    from nanopipe.engine import Engine
    params = SamplingParams("greedy", max_tokens=3)
    want = Engine.load(weights).generate(PROMPT, params, echo=True, top_logprobs=2)
    with split_cluster.client() as c:
        got = c.generate(PROMPT, params, echo=True, top_logprobs=2)
    assert got["token_ids"] == want["token_ids"]
    diff = float(np.max(np.abs(np.subtract(got["prompt_logprobs"][1:], want["prompt_logprobs"][1:]))))
    print(f"echo: prompt logprobs within {diff:.3g} of one process")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("victim", [2, 1], ids=["the second member", "the first member (the ring's hop)"])
def test_a_member_killed_mid_answer_rejoins_and_the_answer_is_unchanged(weights, reference, tmp_path, victim):
    """A member of the last split stage dies while an answer streams: the stage drops out, the
    member restarts, the ring and the member links are rebuilt, the session is replayed, and the
    answer is one process's, the head split again."""
    mapping = {0: [0, 0], 1: [1, 4], 2: [1, 4]}
    cl = LocalCluster(weights, nodes=3, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2, "rejoin_grace_s": 60, "link_delay_ms": 15})
    with cl:
        plain.kill_member_mid_answer(cl, victim, reference)
        assert "replaying 1 interrupted session" in log_of(cl, 0), log_of(cl, 0)[-3000:]
        cl.vocab = {1: (0, 25129), 2: (25129, V)}
        replies = wait_replies(cl, lambda r: (r["top_frames"] or 0) > 0)     # the answer is greedy: tops only
        assert replies["top_frames"] > 0 and replies["logits_frames"] == 0, replies
        assert log_of(cl, victim).count("Loaded the LM head's rows") == 2, "the restarted member runs no head"


def test_split_lm_head_false_keeps_the_head_on_rank_0(weights, reference, tmp_path):
    """The switch off: the members load no head and send their rows back, as before."""
    mapping = {0: [0, 0], 1: [1, 4], 2: [1, 4]}
    cl = LocalCluster(weights, nodes=3, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2, "split_lm_head": False})
    with cl:
        with cl.client() as c:
            for case in ("greedy", "sampling"):
                assert_same(c.generate(PROMPT, CASES[case]), reference(PROMPT, CASES[case]), f"{case}, head on rank 0")
        nodes = status(cl)["nodes"]
        assert all(n["head_ms"] is None for n in nodes if n["rank"] > 0), nodes
        assert not any("Loaded the LM head's rows" in log_of(cl, r) for r in (1, 2))


# ---------------------------------------------------------------------------------------------
# the pieces, in one process


def test_head_shares_side_by_side_are_the_head(weights):
    """model.head_share over 2 and 3 uneven shares of the vocabulary, gathered, is model.head."""
    st = load_stage(weights)
    x = np.random.default_rng(0).standard_normal((3, st.config.n_embd)).astype(np.float32)      # (T, C)
    want = head(x, st.ln_f, st.lm_head)                                                          # (T, V)
    for m in (2, 3):
        shares = [vocab_share(r, m, V) for r in range(m)]
        assert shares[0][0] == 0 and shares[-1][1] == V and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        got = gather_logits([head_share(x, st.ln_f, st.lm_head[v0:v1]) for v0, v1 in shares])
        diff = float(np.max(np.abs(got - want)))
        print(f"{m} shares {shares}: logits within {diff:.3g} of the whole head")
        assert got.shape == want.shape and diff <= 1e-4
        assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def test_load_head_share_reads_its_rows_only(weights, tmp_path):
    part = load_head_share(weights, (25129, V))
    raw = read_tensors(weights)
    assert part["lm_head"].shape == (V - 25129, raw["wte.weight"].shape[1])
    assert np.array_equal(part["lm_head"], raw["wte.weight"][25129:])
    assert np.array_equal(part["ln_f"]["g"], raw["ln_f.weight"])
    blocks_only = str(tmp_path / "blocks.safetensors")
    write_safetensors(blocks_only, {k: v for k, v in raw.items() if k.startswith("h.")}, read_header(weights).metadata)
    with pytest.raises(WeightsError, match="wte|ln_f"):
        load_head_share(blocks_only, (0, 10))
    with pytest.raises(WeightsError, match="vocabulary rows"):
        load_head_share(weights, (0, V + 1))


def test_only_the_last_split_stage_runs_the_head():
    class Node:
        def __init__(self, r):
            self.ip, self.port, self.rank = "10.0.0.1", 7000 + r, r
    last = [(0, 1), (1, 5), (1, 5)]
    middle = [(0, 1), (1, 3), (1, 3), (3, 5)]
    assert splits_head(last, [0, 1, 2]) and not splits_head(last, [0, 1, 2], enabled=False)
    assert not splits_head(middle, [0, 1, 2, 3]) and not splits_head([(0, 3), (3, 5)], [0, 1])
    assert place(last, [0, 1, 2], 2, Node)["group"]["head"] is True
    assert "head" not in place(last, [0, 1, 2], 2, Node, head=False)["group"]
    assert "head" not in place(middle, [0, 1, 2, 3], 1, Node)["group"]


def test_plan_prints_the_split_head_with_the_link_model():
    """gpt2-medium's head (50257 x 1024 float32, 205.9 MB) on 4 GB/s nodes: 51.5 ms on one node,
    25.7 ms per member of 2; gathering member 1's 25128 columns over 1 GbE 0.2 + 25128 x 32 / 940e3
    = 1.055 ms; logits back 50257 x 4 bytes a row instead of 4096: (50257 - 1024) x 32 / 940e3 = 1.676 ms; rank 0 saves
    51.46 - 25.73 - 1.06 - 1.68 = 23.0 ms."""
    h = predict_head_split(51.47, 2, V, 1024, 0.2, 940)
    assert (h["member_ms"], h["gather_ms"], h["logits_ms"], h["logits_bytes"]) == (25.735, 1.055, 1.676, 201028), h
    lines = plan_lines([(0, 1), (1, 25), (1, 25)], ["pi0", "pi1", "pi2"], [None, 4.0, 4.0], 1024, None,
                       ["a", "b", "c"], n_vocab=V)
    assert len(lines) == 2 and lines[1].startswith("LM head split by vocabulary over pi1+pi2 (split_lm_head): "
                                                   "each member 25.7 ms of one node's 51.5 ms"), lines
    assert "201 KB a row (+1.68 ms over 0.2 ms, 940 Mbit/s): rank 0 saves 23.0 ms" in lines[1], lines[1]
    # greedy: 24 bytes a row both ways: 1.055 + 1.676 - (0.2 + 24 x 8 / 940e3) + (4096 - 24) x 8 / 940e3 = 2.566
    assert h["top_less_ms"] == 2.566 and lines[1].endswith("a greedy step sends each row's top instead (24 bytes): "
                                                           "2.57 ms less"), (h, lines[1])
    assert len(plan_lines([(0, 1), (1, 25), (1, 25)], ["a", "b", "c"], [None, 4.0, 4.0], 1024, n_vocab=V,
                          head=False)) == 1


def member_links(m: int):
    """m members' GroupLinks joined by socket pairs (member 0 to each other member), no listening
    port: (links per member, the socket pairs by member)."""
    members = [[r, "127.0.0.1", 7000 + r] for r in range(m)]
    pairs = {i: socket.socketpair() for i in range(1, m)}
    g = [GroupLinks(GroupPlace({"members": members, "member": i}), 1 << 24) for i in range(m)]
    g[0].links = {i: Link(pairs[i][0], f"member {i}", 1 << 24) for i in range(1, m)}
    for i in range(1, m):
        g[i].links = {0: Link(pairs[i][1], "member 0", 1 << 24)}
    return g, pairs


def test_a_member_without_a_share_sends_why_and_member_0_gets_none():
    """gather_logits over real socket pairs: 3 members, shares in member order side by side; when
    one member has no share (its file holds no head) member 0 gets None (it then passes its rows on
    and rank 0 runs the head), and every link is still read to the end of the step."""
    g, pairs = member_links(3)
    x = np.arange(2 * 7, dtype=np.float32).reshape(2, 7)                     # (R, V): 2 rows, V = 7
    cuts = [vocab_share(r, 3, 7) for r in range(3)]                          # (0, 3), (3, 5), (5, 7)
    try:
        for i in (1, 2):
            assert g[i].gather_logits(x[:, slice(*cuts[i])]) is None
        assert np.array_equal(g[0].gather_logits(x[:, slice(*cuts[0])]), x)
        g[1].gather_logits(None, why_not="its file holds no head")
        g[2].gather_logits(x[:, slice(*cuts[2])])
        assert g[0].gather_logits(x[:, slice(*cuts[0])]) is None
        g[1].gather_logits(x[:, slice(*cuts[1])])
        g[2].gather_logits(x[:, slice(*cuts[2])])
        assert np.array_equal(g[0].gather_logits(x[:, slice(*cuts[0])]), x), "the links are out of step"
    finally:
        for a, b in pairs.values():
            a.close()
            b.close()


def test_rank_0_samples_from_split_logits_and_a_bad_row_fails_its_session_alone(tiny_engine):
    """Rank 0's side in one process: a ring that answers with SplitLogits (the head run by "the
    members", here model.head on the rows the ACT asked for, in 2 uneven shares) gives every session
    the tokens and logprobs it gets without a ring; a row the stage reports non-finite fails its
    session alone, naming the sender."""
    from nanopipe.batching import SplitLogits
    from nanopipe.engine import Request, Scheduler
    st = tiny_engine.stage
    V_ = st.config.n_vocab
    cuts = [vocab_share(r, 2, V_) for r in range(2)]

    class HeadSplitRing:
        depth, source = 1, "rank 2 (node2)"

        def __init__(self):
            self.inbox, self.asked = [], []

        def send(self, batch_id, sessions, x, logits=None, greedy=False):
            self.asked.append(list(logits))
            shares = [head_share(x[logits], st.ln_f, st.lm_head[v0:v1]) for v0, v1 in cuts]
            bad, row = [], 0
            for s in sessions:
                if s["id"] == "poisoned":
                    bad += list(range(row, row + s["n"]))
                row += s["n"]
            self.inbox.append((batch_id, SplitLogits(gather_logits(shares), list(logits), bad), []))

        def recv(self, timeout):
            return self.inbox.pop(0) if self.inbox else None

        def free(self, ids):
            pass

    greedy, seeded = SamplingParams("greedy", max_tokens=8), SamplingParams("sampling", max_tokens=8, seed=3)
    prompts = {1: [11, 22, 33], 2: [5, 6, 7, 8], 3: [40, 41]}
    want = {1: tiny_engine.generate(prompts[1], greedy), 3: tiny_engine.generate(prompts[3], seeded)}
    ring = HeadSplitRing()
    sched = Scheduler(st, ring=ring)
    got = {}
    for i, sid, params in ((1, "a", greedy), (2, "poisoned", greedy), (3, "b", seeded)):
        sched.submit(Request(prompts[i], params, lambda kind, data, i=i: kind in ("done", "error")
                             and got.setdefault(i, (kind, data)), id=sid))
    for _ in range(200):
        if not (sched.busy or sched.in_flight):
            break
        sched.step()
    assert got[2][0] == "error" and got[2][1]["error"].startswith("rank 2 (node2) sent non-finite"), got[2]
    for i in (1, 3):
        assert got[i][0] == "done" and got[i][1]["token_ids"] == want[i]["token_ids"], (got[i], want[i])
        diff = float(np.max(np.abs(np.subtract(got[i][1]["logprobs"], want[i]["logprobs"]))))
        print(f"session {i}: tokens equal, logprobs within {diff:.3g} of one process")
        assert diff <= 1e-5
    assert ring.asked[0] == [2, 6, 8], ring.asked[0]          # each prompt's last row of the first step


def test_the_ring_asks_for_logits_that_fit_and_refuses_logits_it_did_not_ask_for():
    import socket

    from nanopipe.batching import SplitLogits
    from nanopipe.cluster.ring import Ring
    from nanopipe.cluster.wire import Msg, ProtocolError, decode_frame, encode_frame, recv_frame
    a, b = socket.socketpair()
    try:
        ring = Ring(a, 4, depth=1, epoch=7, on_break=lambda *args: None, n_vocab=10, max_logits_bytes=80)
        x = np.zeros((3, 4), np.float32)
        sessions = [{"id": "s", "pos": 0, "n": 3}]
        ring.send(1, sessions, x, logits=[2])
        ring.send(2, sessions, x, logits=[0, 1, 2])             # 3 x 10 x 4 = 120 bytes > 80: rows back
        assert recv_frame(b, "ring").meta["logits"] == [2]
        assert "logits" not in recv_frame(b, "ring").meta

        def logits(batch, rows, nonfinite=()):
            meta = {"batch": batch, "epoch": 7, "trace": [], "nonfinite": list(nonfinite), "dtype": "float32",
                    "shape": [rows, 10]}
            return decode_frame(encode_frame(Msg.LOGITS, meta, np.ones((rows, 10), np.float32)))
        with pytest.raises(ProtocolError, match="does not answer a batch in flight"):
            ring.deliver(logits(2, 3), "rank 2")                # batch 2 asked for no logits
        with pytest.raises(ProtocolError, match="nonfinite"):
            ring.send(3, sessions, x, logits=[2])
            ring.deliver(logits(3, 1, nonfinite=[5]), "rank 2")   # there is no row 5
        with pytest.raises(ProtocolError, match="does not answer"):
            ring.send(4, sessions, x, logits=[2])
            ring.deliver(logits(4, 2), "rank 2")                # 2 rows of logits, 1 asked
        ring.deliver(logits(1, 1, nonfinite=[0]), "rank 2")
        batch, got, _ = ring.recv(1)
        assert batch == 1 and isinstance(got, SplitLogits) and got.rows == [2] and got.nonfinite == [0]
        assert got.logits.shape == (1, 10)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------
# the compact greedy reply: each row's top (max, argmax, logsumexp) instead of its logits


def head_replies(cl) -> dict:
    """Member 0 of the last split stage's count of LOGITS and TOP answers to rank 0, and their bytes
    (its heartbeat, in the status)."""
    first = min(cl.vocab)
    node = next(n for n in status(cl)["nodes"] if n["rank"] == first)
    return {k: node[k] for k in ("logits_frames", "logits_bytes", "top_frames", "top_bytes")}


def wait_replies(cl, done, timeout: float = 10.0) -> dict:
    """The counts once a heartbeat says `done(counts)` (they only grow), or the last seen after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        now = head_replies(cl)
        if done(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def settled_replies(cl, timeout: float = 10.0) -> dict:
    """The counts once two heartbeats 0.6 s apart agree (what earlier tests sent has been counted)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        now = head_replies(cl)
        if (now == last and now["top_frames"] is not None) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.6)


def test_greedy_answers_come_back_as_tops_and_sampled_ones_as_logits(split_cluster, reference):
    """Greedy: every step's rows need only their argmax and its logprob, so member 0 sends TOP
    frames (24 bytes a row and the meta) and no LOGITS; the tokens are one process's, the logprobs
    within the tolerance. Sampling needs whole rows: LOGITS, ~201 KB a row. Bytes per token on the
    link from member 0 to rank 0 are printed for both."""
    before = settled_replies(split_cluster)
    n = CASES["greedy"].max_tokens
    with split_cluster.client() as c:
        got = c.generate(PROMPT, CASES["greedy"])
    assert_same(got, reference(PROMPT, CASES["greedy"]), "greedy through the compact reply")
    greedy = wait_replies(split_cluster, lambda r: r["top_frames"] >= before["top_frames"] + n)
    assert greedy["logits_frames"] == before["logits_frames"], (before, greedy)
    assert greedy["top_frames"] - before["top_frames"] == n, (before, greedy)     # one step a token
    top_per_token = (greedy["top_bytes"] - before["top_bytes"]) / n
    with split_cluster.client() as c:
        got = c.generate(PROMPT, CASES["sampling"])
    assert_same(got, reference(PROMPT, CASES["sampling"]), "sampling through whole logits")
    sampled = wait_replies(split_cluster, lambda r: r["logits_frames"] >= greedy["logits_frames"] + n)
    assert sampled["top_frames"] == greedy["top_frames"], (greedy, sampled)
    assert sampled["logits_frames"] - greedy["logits_frames"] == n, (greedy, sampled)
    logits_per_token = (sampled["logits_bytes"] - greedy["logits_bytes"]) / n
    print(f"member 0 -> rank 0 per token: LOGITS {logits_per_token:.0f} bytes, TOP {top_per_token:.0f} bytes")
    assert logits_per_token > V * 4 > 400 * top_per_token     # the meta (sessions, trace) is most of a TOP


def test_a_greedy_and_a_sampled_session_at_once_both_stay_correct(split_cluster, reference):
    """Two clients at once, one greedy and one seeded sampling: whatever steps they share (a
    step that mixes them asks whole logits of every row), both get one process's answer."""
    import threading
    got = {}

    def run(case):
        with split_cluster.client() as c:
            got[case] = c.generate(PROMPT, CASES[case])
    threads = [threading.Thread(target=run, args=(case,)) for case in ("greedy", "sampling")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for case in ("greedy", "sampling"):
        assert_same(got[case], reference(PROMPT, CASES[case]), f"{case}, beside the other")


def test_share_tops_combined_are_the_whole_rows_argmax_and_logsumexp(weights):
    """model.share_top over 2 and 3 uneven shares, combined (model.combine_tops): the token is
    np.argmax of the whole row, also when the max is tied across a share boundary (the lower id
    wins, as np.argmax), and the logprob max - logsumexp is decoding's of the whole row."""
    from floats import assert_close

    from nanopipe.decoding import logsumexp
    from nanopipe.model import combine_tops, share_top
    st = load_stage(weights)
    x = np.random.default_rng(1).standard_normal((4, st.config.n_embd)).astype(np.float32)      # (T, C)
    logits = head(x, st.ln_f, st.lm_head)                                                        # (T, V)
    logits[1, [7, 30000, 40000]] = logits[1].max() + 1      # a tie across shares: 7 < 30000 < 40000
    logits[2, [25128, 25129]] = logits[2].max() + 1         # a tie across the 2-member boundary
    want_tok = np.argmax(logits, axis=1)
    want_lp = [float(logits[r, t]) - logsumexp(logits[r]) for r, t in enumerate(want_tok)]
    for m in (2, 3):
        shares = [vocab_share(r, m, V) for r in range(m)]
        top, tok, lse = combine_tops([share_top(logits[:, v0:v1], v0) for v0, v1 in shares])
        assert tok.tolist() == want_tok.tolist() and tok[1] == 7 and tok[2] == 25128, (m, tok, want_tok)
        assert_close(top - lse, want_lp, f"{m} shares: logprobs")
        print(f"{m} shares: logprobs within {float(np.max(np.abs(top - lse - want_lp))):.3g} of the whole row's")
    bad = logits[:2].copy()
    bad[0, 5], bad[1, 9] = np.nan, -np.inf
    assert np.isnan(share_top(bad)[2]).all(), "a row holding NaN or inf must not give a usable logsumexp"


def test_gather_tops_over_member_links():
    """GroupLinks.gather_tops over real socket pairs, 3 members: member 0 gets the combined tops,
    the others None; a member without a share sends why and member 0 gets None, the links in step."""
    from nanopipe.model import share_top
    g, pairs = member_links(3)
    x = np.array([[0., 5., 1., 2., 9., 3., 9.], [4., 1., 2., 0., 1., 3., 2.]], np.float32)   # (R, V): V = 7
    cuts = [vocab_share(r, 3, 7) for r in range(3)]                          # (0, 3), (3, 5), (5, 7)
    tops = [share_top(x[:, v0:v1], v0) for v0, v1 in cuts]
    try:
        for i in (1, 2):
            assert g[i].gather_tops(tops[i]) is None
        top, tok, lse = g[0].gather_tops(tops[0])
        assert tok.tolist() == [4, 0] and top.tolist() == [9., 4.], (tok, top)
        assert np.allclose(lse, np.log(np.exp(x.astype(np.float64)).sum(axis=1)))
        g[1].gather_tops(None, why_not="its file holds no head")
        g[2].gather_tops(tops[2])
        assert g[0].gather_tops(tops[0]) is None
        g[1].gather_tops(tops[1])
        g[2].gather_tops(tops[2])
        assert g[0].gather_tops(tops[0])[1].tolist() == [4, 0], "the links are out of step"
    finally:
        for a, b in pairs.values():
            a.close()
            b.close()


class HeadSplitStage:
    """The ring's last split stage, played in this process behind rank 0's real Ring (over a socket
    pair): it reads each ACT rank 0 sends and answers as 2 members would, LOGITS or, when the ACT
    says `greedy`, TOP (model.share_top per share, combined); `corrupt(meta, payload)` spoils the
    answers of session "poisoned". Notes each ACT's `greedy`."""

    def __init__(self, stage, sock, ring, corrupt=None):
        import threading
        self.st, self.sock, self.ring, self.corrupt = stage, sock, ring, corrupt
        self.cuts = [vocab_share(r, 2, stage.config.n_vocab) for r in range(2)]
        self.greedy: list = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        from nanopipe.cluster.wire import Msg, WireError, recv_frame
        while True:
            try:
                frame = recv_frame(self.sock, "rank 0")
            except (WireError, OSError):
                return
            if frame.msg is Msg.ACT:
                self.ring.deliver(self.answer(frame), "rank 2 (node2)")

    def answer(self, frame):
        from nanopipe.cluster.group import top_meta, top_payload
        from nanopipe.cluster.wire import Msg, decode_frame, encode_frame, frame_array
        from nanopipe.model import combine_tops, share_top
        st, rows, greedy = self.st, frame.meta["logits"], frame.meta.get("greedy", False)
        self.greedy.append(greedy)
        x = frame_array(frame)[rows]                                                  # (R, C)
        shares = [head_share(x, st.ln_f, st.lm_head[v0:v1]) for v0, v1 in self.cuts]
        meta = {"batch": frame.meta["batch"], "epoch": frame.meta["epoch"], "trace": [], "nonfinite": []}
        if greedy:
            top = combine_tops([share_top(s, v0) for s, (v0, _) in zip(shares, self.cuts)])
            msg, payload = Msg.TOP, top_payload(top)
            meta.update(top_meta(top))
        else:
            msg, payload = Msg.LOGITS, gather_logits(shares)
            meta.update(dtype="float32", shape=list(payload.shape))
        if self.corrupt and any(s["id"] == "poisoned" for s in frame.meta["sessions"]):
            payload = self.corrupt(meta, payload.copy())
        return decode_frame(encode_frame(msg, meta, payload))


def run_behind_ring(engine, jobs: dict, depth: int, corrupt=None):
    """Rank 0's scheduler with a real Ring whose far end is a HeadSplitStage; `jobs`: {session id:
    (prompt, params)} submitted at once -> ({id: (kind, data)}, the stage)."""
    import socket

    from nanopipe.cluster.ring import Ring
    from nanopipe.engine import Request, Scheduler
    st = engine.stage
    a, b = socket.socketpair()
    ring = Ring(a, st.config.n_embd, depth=depth, epoch=7, on_break=lambda *args: None, source="rank 2 (node2)",
                n_vocab=st.config.n_vocab, max_logits_bytes=1 << 24)
    stage = HeadSplitStage(st, b, ring, corrupt)
    sched = Scheduler(st, ring=ring)
    got = {}
    try:
        for sid, (prompt, params) in jobs.items():
            sched.submit(Request(prompt, params, lambda kind, data, sid=sid: kind in ("done", "error")
                                 and got.setdefault(sid, (kind, data)), id=sid))
        deadline = time.monotonic() + 60
        while (sched.busy or sched.in_flight) and time.monotonic() < deadline:
            sched.step()
    finally:
        a.close()
        b.close()
    return got, stage


def test_a_step_mixing_greedy_and_sampled_rows_asks_whole_logits(tiny_engine):
    """One step holding a greedy and a seeded sampling session (a ring of depth 1 batches them
    together) asks whole logits of both rows; two greedy sessions get tops only. Every answer is
    the one process's."""
    greedy, seeded = SamplingParams("greedy", max_tokens=6), SamplingParams("sampling", max_tokens=6, seed=3)
    jobs = {"g": ([11, 22, 33], greedy), "s": ([40, 41], seeded)}
    for mixed in (True, False):
        if not mixed:
            jobs["s"] = ([40, 41], greedy)
        got, stage = run_behind_ring(tiny_engine, jobs, depth=1)
        assert stage.greedy == [not mixed] * 6, stage.greedy        # 6 steps, each holding both sessions
        for sid, (prompt, params) in jobs.items():
            want = tiny_engine.generate(prompt, params)
            assert got[sid][0] == "done" and got[sid][1]["token_ids"] == want["token_ids"], (got[sid], want)
            diff = float(np.max(np.abs(np.subtract(got[sid][1]["logprobs"], want["logprobs"]))))
            print(f"{'mixed' if mixed else 'all greedy'}, {sid}: tokens equal, logprobs within {diff:.3g}")
            assert diff <= 1e-5


def _wrong_shape(meta, payload):
    meta["shape"] = [len(payload), 1]
    return payload[:, :1].copy()


def _nan_logprob(meta, payload):
    payload[:, 1] = np.nan
    return payload


def _outside_vocabulary(meta, payload):
    meta["argmax"] = [meta["argmax"][0] + 10 ** 6] + meta["argmax"][1:]
    return payload


@pytest.mark.parametrize("corrupt, says", [
    (_wrong_shape, "malformed greedy reply (TOP) for this request: TOP of float64 [1, 1], expected float64 (1, 2)"),
    (_nan_logprob, "rank 2 (node2) sent non-finite activations (NaN or inf) for this request"),
    (_outside_vocabulary, "not a token of the vocabulary 0..")],
    ids=["wrong shape", "NaN logprob", "index out of vocabulary"])
def test_a_malformed_top_fails_its_session_alone(tiny_engine, corrupt, says):
    """A TOP answer that is malformed (a wrong shape), says NaN or names no token of the vocabulary
    fails the session it answers, with a message naming the sender; the other session (another
    step in flight on the same ring) goes on to one process's answer."""
    greedy = SamplingParams("greedy", max_tokens=6)
    got, stage = run_behind_ring(tiny_engine, {"a": ([11, 22, 33], greedy), "poisoned": ([5, 6, 7], greedy)},
                                 depth=2, corrupt=corrupt)
    assert all(stage.greedy), stage.greedy
    kind, data = got["poisoned"]
    assert kind == "error" and says in data["error"], data
    print(data["error"])
    assert got["a"][0] == "done" and got["a"][1]["token_ids"] == tiny_engine.generate([11, 22, 33], greedy)["token_ids"]


def test_the_ring_asks_tops_of_greedy_steps_whatever_their_size_and_refuses_tops_it_did_not_ask_for():
    """A greedy step asks tops even where its rows' logits would not fit a frame (24 bytes a row);
    a TOP answering a step that asked logits closes the link (ProtocolError); logits answering a
    step that asked tops (a member that does not know TOP) are used as they are."""
    import socket

    from nanopipe.batching import SplitLogits, SplitTop
    from nanopipe.cluster.group import top_meta, top_payload
    from nanopipe.cluster.ring import Ring
    from nanopipe.cluster.wire import Msg, ProtocolError, decode_frame, encode_frame, recv_frame
    a, b = socket.socketpair()
    try:
        ring = Ring(a, 4, depth=1, epoch=7, on_break=lambda *args: None, n_vocab=10, max_logits_bytes=80)
        x = np.zeros((3, 4), np.float32)
        sessions = [{"id": "s", "pos": 0, "n": 3}]
        ring.send(1, sessions, x, logits=[0, 1, 2], greedy=True)   # logits 120 bytes > 80: tops all the same
        ring.send(2, sessions, x, logits=[2])
        ring.send(3, sessions, x, logits=[2], greedy=True)
        first = recv_frame(b, "ring").meta
        assert first["logits"] == [0, 1, 2] and first["greedy"] is True, first
        assert "greedy" not in recv_frame(b, "ring").meta
        top = (np.array([1.0, 2.0, 3.0]), np.array([4, 5, 6]), np.array([1.5, 2.5, 3.5]))

        def reply(msg, batch, payload, extra):
            meta = {"batch": batch, "epoch": 7, "trace": [], "nonfinite": [], **extra}
            return decode_frame(encode_frame(msg, meta, payload))
        with pytest.raises(ProtocolError, match="TOP for batch 2 does not answer"):
            ring.deliver(reply(Msg.TOP, 2, top_payload(top)[:1], top_meta([t[:1] for t in top])), "rank 2")
        ring.deliver(reply(Msg.TOP, 1, top_payload(top), top_meta(top)), "rank 2")
        ring.deliver(reply(Msg.LOGITS, 3, np.ones((1, 10), np.float32), {"dtype": "float32", "shape": [1, 10]}),
                     "rank 2")
        (_, got, _), (_, old, _) = ring.recv(1), ring.recv(1)
        assert isinstance(got, SplitTop) and got.bad is None and got.token.tolist() == [4, 5, 6]
        assert got.rows == [0, 1, 2] and (got.top - got.lse).tolist() == [-0.5] * 3
        assert isinstance(old, SplitLogits) and old.rows == [2]
    finally:
        a.close()
        b.close()
