"""Whether `partition: auto` makes workers one split stage: one conversation's time, predicted.

A pipeline cannot make one conversation faster: its token visits every stage in turn. A split stage
(cluster/group.py) can: its m members each compute 1/m of every block at once, then add their
partial sums over the link, 2 all-reduces per block. So for one conversation, per token:

    pipeline     rank 0 (its blocks + the LM head) + each worker's blocks, in turn + a hop per stage
    split stage  rank 0 (its blocks + the LM head) + the slowest member's share of the stage's blocks
                 + 2 all-reduces per block on the link (group.predict_split) + 2 hops

and the rule is one sentence: among the runs of consecutive workers (2 or more, at most one per
head, each on a machine of its own, every figure known, each holding its share within its memory)
sharing every block after rank 0's, the best is chosen only if it predicts a token at least
SPLIT_GAIN (10%) sooner than the fastest pipeline for one conversation (placement.solve, objective
latency); else the pipeline `placement.decide` chose stays. The rule weighs one conversation only:
many at once are served by a pipeline's batches in flight as well.
`split_stages: false` in cluster_config.yaml keeps the guide's pure pipeline.

Where the LM head goes is part of the choice. With `split_lm_head: true` (the default) each
candidate is predicted twice, the head on rank 0 and the head split by vocabulary over the members
(group.predict_head_split: 1/m each, the gather, the logits frame), and takes the sooner
(head_placed); the 10% rule then weighs the best of all. Slow members with a big head split the
blocks and leave the head on rank 0; fast ones take it. `split_lm_head: false`: rank 0 only. The
choice is the plan's (Conversation.head_on), and the running cluster follows it (head_on_members).

Worked example: gpt2-medium shape (24 blocks of 50.4 MB, a 206 MB LM head), three machines at
8 GB/s, 1 GbE (0.2 ms, 940 Mbit/s, hops 0.5 ms):

    pipeline (latency)  rank 0 all 24 blocks and the head: 176.9 ms (a hop costs more than it saves)
    split ranks 1-2     rank 0 block 0 + head 32.0 ms, members 23 blocks / 2 = 72.4 ms,
                        46 all-reduces x 0.235 ms = 10.8 ms, 2 hops 1.0 ms -> 116.3 ms: 1.52x
      head on members   rank 0 6.3 ms; each member 12.9 ms of the head, gather 1.06, logits 1.68
                        -> 106.1 ms: 1.67x, chosen (and the head goes to the members)
    the same on WiFi    (5 ms, 100 Mbit/s): 46 x 5.33 ms = 245 ms of all-reduces alone: pipeline stays

Members on one address share one machine's memory bus, so the split is predicted no gain there
(docs/PERFORMANCE.md measured two cores of one machine at 0.6-0.8x): such runs are not candidates.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from .. import placement  # placement.decide looked up at the call: tests count the calls
from ..model import split_evenly
from ..partition import groups, layers_text
from ..placement import GB, MB, Decision
from .group import GIGABIT, predict_head_split, predict_split, reduce_how

SPLIT_GAIN = 0.10       # a split stage must predict a token at least this much sooner than the pipeline
MEMBERS = "the members"  # Conversation.head_on when the last split stage's members run the LM head


def member_fraction(n_head: int, n_embd: int, member: int, members: int) -> float:
    """The part of a block's matmul weights `member` of `members` holds (model.share_of): its heads'
    part of attention (c_attn and c_proj, 4 C^2) and its columns of the MLP (8 C^2).

        member_fraction(4, 64, 0, 3) -> (4 * 2/4 + 8 * 86/256) / 12 = 0.3906  (2 of 4 heads, 86 of 256 columns)
    """
    h0, h1 = split_evenly(n_head, members)[member]
    f0, f1 = split_evenly(4 * n_embd, members)[member]
    return (4 * (h1 - h0) / n_head + 8 * (f1 - f0) / (4 * n_embd)) / 12


def split_link(cluster, transit_ms: list | None = None) -> tuple:
    """(delay ms, Mbit/s, where from) the all-reduces are predicted on: the cluster's simulated
    link (link_delay_ms, link_mbps) when it sets one; else the median hop transit measured on
    real traffic (batching's transit_ms), when there is some; else 1 GbE (group.GIGABIT)."""
    if cluster is not None and (cluster.link_delay_ms or cluster.link_mbps):
        return cluster.link_delay_ms, cluster.link_mbps, "link_delay_ms/link_mbps"
    if transit_ms:
        return round(statistics.median(transit_ms), 3), 0.0, "measured hop transit"
    return GIGABIT[0], GIGABIT[1], "1 GbE assumed"


@dataclass(frozen=True)
class Stage:
    """One stage's predicted share of a token: its ranks and layers, its ms; for a split stage each
    member's heads and compute ms, and its all-reduces."""
    ranks: list
    layers: tuple
    ms: float
    member_ms: list = dataclasses.field(default_factory=list)
    heads: list = dataclasses.field(default_factory=list)
    all_reduces: int = 0
    all_reduce_ms: float = 0.0
    how: str = ""


@dataclass(frozen=True)
class Conversation:
    """One conversation's predicted ms per token through a split: `stages` in ring order (rank 0's
    first, its ms including the LM head's `head_ms`), `hops_ms`, and `ms`, their sum; `link` the
    all-reduces were predicted on; `pipeline_ms`: the pipeline it was chosen over, if it was."""
    stages: list
    head_ms: float
    hops_ms: float
    ms: float
    link: tuple
    pipeline_ms: float | None = None
    head_on: str = "rank 0"        # or MEMBERS: the last split stage's members run the LM head
    other_ms: float | None = None  # the same split with the LM head in the other place, when both were weighed

    @property
    def split(self):
        """The split stage, or None for a pipeline."""
        return next((s for s in self.stages if len(s.ranks) > 1), None)

    @property
    def head_on_members(self) -> bool:
        """The LM head runs on the members of the ring's last (split) stage, each its share of the vocabulary."""
        return self.head_on == MEMBERS

    def head_text(self) -> str:
        """Where the LM head runs, and the other place's prediction when both were weighed:
        "on rank 0 (on the members: 120.4 ms)"."""
        other = "rank 0" if self.head_on_members else "the members"
        return f"on {self.head_on}" + (f" (on {other}: {self.other_ms:.1f} ms)" if self.other_ms is not None else "")


def conversation_ms(shape, caps: list, ranges: list, link: tuple, hop_s: float, ips: list | None = None,
                    n_head: int | None = None, head_split: bool = False) -> Conversation:
    """The predicted ms per token of one conversation through `ranges` (split stages included):
    each stage in turn, one hop each (none when rank 0 is alone). `caps`: each rank's Capacity,
    speeds known; `link`: (delay ms, Mbit/s, ...) for the all-reduces; `ips`: each rank's address.
    `head_split` (split_lm_head): a ring that ends in a split stage runs the LM head there, 1/m on
    each member plus the gather and the logits frame (group.predict_head_split), not on rank 0."""
    n_head = n_head or shape.n_head or max(1, shape.n_embd // 64)
    delay, mbps = link[0], link[1]
    stages, head_ms = [], 0.0
    for g in groups(ranges):
        lo, hi = ranges[g[0]]
        if g[0] > 0 and hi == lo:
            continue                                        # left out of the ring
        if len(g) == 1:
            ms = (hi - lo) * shape.block_bytes / (caps[g[0]].speed_gbps * GB) * 1000
            if g[0] == 0:
                head_ms = shape.head_stream_bytes / (caps[0].speed_gbps * GB) * 1000
                ms += head_ms
            stages.append(Stage(g, (lo, hi), ms))
            continue
        m = len(g)
        each = [(hi - lo) * shape.block_bytes * member_fraction(n_head, shape.n_embd, i, m) / (caps[r].speed_gbps * GB)
                * 1000 for i, r in enumerate(g)]
        how = reduce_how(m, ips is not None and len({ips[r] for r in g}) == 1)
        # predict_split divides one node's stage time by m: give it m x the slowest member's share
        p = predict_split(max(each) * m, m, hi - lo, shape.n_embd, delay, mbps, how=how)
        heads = [b - a for a, b in split_evenly(n_head, m)]
        stages.append(Stage(g, (lo, hi), p["stage_ms"], each, heads, p["all_reduces"], p["all_reduce_ms"], how))
    head_on = "rank 0"
    last = stages[-1]
    if head_split and len(last.ranks) > 1 and head_ms:
        slowest = min(caps[r].speed_gbps for r in last.ranks)
        h = predict_head_split(shape.head_stream_bytes / (slowest * GB) * 1000, len(last.ranks), shape.n_vocab,
                               shape.n_embd, delay, mbps)
        stages[0] = dataclasses.replace(stages[0], ms=stages[0].ms - head_ms)
        stages[-1] = dataclasses.replace(last, ms=last.ms + h["member_ms"] + h["gather_ms"] + h["logits_ms"])
        head_ms, head_on = h["member_ms"], MEMBERS
    hops = hop_s * 1000 * len(stages) if len(stages) > 1 else 0.0
    return Conversation(stages, head_ms, hops, sum(s.ms for s in stages) + hops, tuple(link), head_on=head_on)


def head_placed(shape, caps: list, ranges: list, link: tuple, hop_s: float, ips: list | None = None,
                n_head: int | None = None, may_split: bool = True) -> Conversation:
    """conversation_ms with the LM head where the token is predicted sooner: on rank 0, or (when
    `may_split`: split_lm_head) on the members of the split stage that ends the ring; the other
    place's prediction kept as `other_ms`. Slow members with a big head keep it on rank 0 while
    they split the blocks; fast ones take it over. A ring that ends in no split stage: rank 0.

        gpt2-medium, 3 nodes at 8 GB/s, 1 GbE: members 106.1 ms/token, rank 0 116.3 -> the members
    """
    on_rank0 = conversation_ms(shape, caps, ranges, link, hop_s, ips, n_head, head_split=False)
    if not may_split:
        return on_rank0
    on_members = conversation_ms(shape, caps, ranges, link, hop_s, ips, n_head, head_split=True)
    if not on_members.head_on_members:
        return on_rank0
    best, other = (on_members, on_rank0) if on_members.ms <= on_rank0.ms else (on_rank0, on_members)
    return dataclasses.replace(best, other_ms=round(other.ms, 3))


def _fits(shape, cap, blocks: float, rank0: bool, sessions: int) -> bool:
    """`blocks` (a member: its fraction of them) with their KV cache fit the node's known memory."""
    if cap.memory_mb is None:
        return False                # an unknown memory is never room for a split
    need = blocks * (shape.block_bytes + shape.kv_bytes(sessions)) + (shape.rank0_bytes if rank0 else 0)
    return need <= cap.memory_mb * MB


def split_stage(shape, caps: list, pipeline_ms: float, *, link: tuple, hop_s: float, sessions: int,
                ips: list | None = None, margin: float = SPLIT_GAIN, head_split: bool = False):
    """The split the rule chooses (module docstring): (ranges, Conversation), or None when no split
    of consecutive workers predicts a token `margin` sooner than `pipeline_ms`, or none fits. Each
    candidate is weighed with the LM head in its best place (head_placed; `head_split`:
    split_lm_head, the head may go to the members), and the best of them all meets the margin."""
    n, L = len(caps), shape.n_layer
    n_head = shape.n_head or max(1, shape.n_embd // 64)
    if n < 3 or L < 2 or any(c is None or c.speed_gbps is None for c in caps):
        return None
    best = None
    for a in range(1, n):
        for b in range(a + 1, min(n, a + n_head)):
            members = list(range(a, b + 1))
            if ips is not None and len({ips[r] for r in members}) < len(members):
                continue                # two members on one machine share its memory bus: no gain
            for c0 in range(1, L):
                if not _fits(shape, caps[0], c0, True, sessions):
                    break
                if not all(_fits(shape, caps[r], (L - c0) * member_fraction(n_head, shape.n_embd, i, len(members)),
                                 False, sessions) for i, r in enumerate(members)):
                    continue
                ranges = [(0, c0)] + [(c0, c0) if r < a else (c0, L) if r <= b else (L, L) for r in range(1, n)]
                pred = head_placed(shape, caps, ranges, link, hop_s, ips, n_head, may_split=head_split)
                if best is None or pred.ms < best[1].ms:
                    best = (ranges, pred)
    if best is None or best[1].ms > (1 - margin) * pipeline_ms:
        return None
    return best


def decide_with_split(shape, caps: list, ranges: list, model, cluster=None, partition: str | None = None,
                      transit_ms: list | None = None) -> Decision:
    """placement.decide, then with `partition: auto` the split-stage rule: the one decision of the
    leader, its re-plans and `nanopipe plan`. A chosen split comes as a Decision whose `split` is
    its Conversation (its `placement` None: the placement model runs stages in turn)."""
    d = placement.decide(shape, caps, ranges, model, cluster, partition)
    if (partition or model.partition) != "auto" or not d.solved or d.placement is None \
            or (cluster is not None and not cluster.split_stages):
        return d
    ips = [n.ip for n in cluster.nodes][:len(caps)] if cluster is not None else None
    link = split_link(cluster, transit_ms)
    # the pipeline to beat: the fastest for one conversation, whatever the objective chose
    pipeline_ms = min(d.placement.cycle_s(1), placement.fastest_one_stream_s(
        shape, caps, sessions=d.sessions, hop_s=d.hop_s)) * 1000
    weigh = dict(link=link, hop_s=d.hop_s, sessions=d.sessions, ips=ips,
                 head_split=cluster is None or cluster.split_lm_head)
    found = split_stage(shape, caps, pipeline_ms, **weigh)
    if found is None:
        if len(caps) < 3:           # nothing to weigh: the guide's 2 nodes keep their log line as it was
            return d
        best = split_stage(shape, caps, pipeline_ms, margin=-math.inf, **weigh)
        return dataclasses.replace(d, no_split=no_split_why(pipeline_ms, ips, best))
    chosen, pred = found
    s = pred.split
    note = (f"{d.note}; split stage ranks {s.ranks[0]}-{s.ranks[-1]} (layers {layers_text(*s.layers)}), predicted "
            f"{pred.ms:.1f} ms/token vs pipeline {pipeline_ms:.1f} for one conversation, "
            f"the LM head {pred.head_text()}")
    return dataclasses.replace(d, ranges=[tuple(r) for r in chosen], note=note, placement=None,
                               split=dataclasses.replace(pred, pipeline_ms=round(pipeline_ms, 3)))


def no_split_why(pipeline_ms: float, ips: list | None, best) -> str:
    """Why `partition: auto` kept the pipeline, in words for the leader's log and `nanopipe plan`:
    `best` is split_stage's best candidate with no margin (None: there was none to weigh).

        no_split_why(...) -> "the best, ranks 1-2 (layers 1-23), predicts 62.0 ms/token against the
                              pipeline's 64.1: not 10% sooner"
    """
    if best is not None:
        s = best[1].split
        return (f"the best, ranks {s.ranks[0]}-{s.ranks[-1]} (layers {layers_text(*s.layers)}), predicts "
                f"{best[1].ms:.1f} ms/token against the pipeline's {pipeline_ms:.1f}: not {SPLIT_GAIN:.0%} sooner")
    if ips is not None and len(set(ips[1:])) < 2:
        return ("the workers share one address, so members would share one machine's memory bus (give each "
                "its host_ip, or write the split in layer_mapping to run it anyway)")
    return "no run of workers has the memory for its share beside rank 0's blocks"


def members_run_head(d: Decision, cluster) -> bool:
    """Do the members of a split stage that ends the ring run the LM head under decision `d`? The
    plan's choice when `partition: auto` chose the split (its Conversation.head_on); else, for a
    hand-written layer_mapping, cluster_config's split_lm_head (true: they do). What the leader's
    registry holds as the head's place in force (WorkerRegistry.assign)."""
    if d.split is not None:
        return d.split.head_on_members
    return cluster is None or cluster.split_lm_head


def split_lines(pred: Conversation, names: list, pipeline_ms: float | None = None,
                against: str = "the pipeline") -> list:
    """What `nanopipe plan` says of a split: each split stage's members, heads, compute each, its
    all-reduces and their cost on the link; then the token's total, rank 0's LM head among it.

        Split stage node1+node2 (layers 1-23, all-reduce direct): heads 8+8; compute node1 72.4 ms,
            node2 72.4 ms; 46 all-reduces x 0.235 ms = 10.8 ms (0.2 ms, 940 Mbit/s, 1 GbE assumed)
        One conversation: 106.1 ms/token (9.4 tok/s): rank 0 6.3 ms (LM head on the members, 12.9
            each), split stage 98.8 ms, 2 hops 1.0 ms; the pipeline: 176.9 ms (1.67x)
        LM head: on the members (on rank 0: 116.3 ms)
    """
    delay, mbps, where = (list(pred.link) + ["", ""])[:3]
    out = []
    for s in pred.stages:
        if len(s.ranks) < 2:
            continue
        who = "+".join(names[r] for r in s.ranks)
        out.append(f"Split stage {who} (layers {layers_text(*s.layers)}, all-reduce {s.how}): heads "
                   f"{'+'.join(map(str, s.heads))}; compute "
                   + ", ".join(f"{names[r]} {ms:.1f} ms" for r, ms in zip(s.ranks, s.member_ms))
                   + f"; {s.all_reduces} all-reduces x {s.all_reduce_ms:.3f} ms = "
                   f"{s.all_reduces * s.all_reduce_ms:.1f} ms ({delay:g} ms, {mbps:g} Mbit/s"
                   + (f", {where})" if where else ")"))
    parts = [f"rank 0 {pred.stages[0].ms:.1f} ms" + (f" (LM head on the members, {pred.head_ms:.1f} each)"
                                                      if pred.head_on_members else f" (LM head {pred.head_ms:.1f})")]
    parts += [("split stage" if len(s.ranks) > 1 else f"rank {s.ranks[0]}") + f" {s.ms:.1f} ms"
              for s in pred.stages[1:]]
    if pred.hops_ms:
        parts.append(f"{len(pred.stages)} hops {pred.hops_ms:.1f} ms")
    line = f"One conversation: {pred.ms:.1f} ms/token ({1000 / pred.ms:.1f} tok/s): " + ", ".join(parts)
    pipeline_ms = pipeline_ms or pred.pipeline_ms
    if pipeline_ms:
        line += f"; {against}: {pipeline_ms:.1f} ms ({pipeline_ms / pred.ms:.2f}x)"
    return out + [line, "LM head: " + pred.head_text()]
