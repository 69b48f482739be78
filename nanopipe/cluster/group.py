"""A split stage: two or more workers that share the same layers, each holding part of every block.

A layer_mapping that gives ranks the very same layers makes them one stage (partition.groups), a
group of members in rank order. Each member holds its heads and MLP columns of every block
(model.share_of); the first member is the ring's hop:

    rank before --ACT--> member 0 --ACT (the same rows, forwarded)--> members 1 .. m-1
                         every member: x = blocks_forward_member(x, its part, reduce=all_reduce)
                         member 0 --ACT--> rank after

Per block each member's two c_proj outputs are PARTIAL sums of the block's; `GroupLinks.all_reduce`
sums them across the members (2 per block), over member links: authenticated connections like the
data links (the same handshake, HMAC and frames), made for every ring epoch, member j dialling each
member i < j. The sum is always p0 + p1 + ... in member order, so every member gets the same bits
(their residual streams stay equal) and the result equals model.all_reduce in one process:

    "direct" (two members, and the default): each member sends its partial to every other member
              and adds all m up itself. One hop of latency; m-1 frames out per member.
    "gather": members send their partials to member 0, which adds them up and sends the sum back.
              Two hops; member 0 sends and receives m-1 frames, the others one each.

Which is faster for m >= 3 depends on what costs most (docs/PERFORMANCE.md, "Tensor parallelism").
Members on one machine (loopback, cores shared): CPU time per frame, and gather moves 2(m-1) frames
against direct's m(m-1); measured, gather was faster for 3 and 4 members (160 against 185-240 us
for one row of 3; 200 against 410-460 us for 4). Members on separate machines: the link's latency,
paid once by direct and twice by gather (the link model, all_reduce_ms). `reduce_how`
picks by group size and by whether the members share a machine.

The leader's side is small: `place(...)` says what a worker is told of its place (its layers, its
group, and, for the first member only, the ranks either side in the ring); `hops(...)` are the
ranks the ring's activations pass through (one per stage).
"""
from __future__ import annotations

import os
import queue
import socket
import ssl
import threading
import time

import numpy as np

from ..model import combine_tops, gather_logits
from ..partition import groups
from .net import close_now
from .wire import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ConnectionClosed,
    Frame,
    Msg,
    ProtocolError,
    TruncatedFrame,
    WireError,
    decode_frame,
    encode_frame,
    frame_array,
    recv_frame,
)

DEFAULT_HOW = "direct"
INLINE_BYTES = 64 * 1024            # a frame this small is sent by the caller; bigger ones by the link's sender
LINK_TIMEOUT_S = 20.0               # every member must link up within this, once the ring is being built
# How long a member polls for another's partial before it sleeps (Link.recv_into). Measured on a
# 2-core machine that other jobs loaded (docs/PERFORMANCE.md, "Where a member's time goes"): 2 ms
# of polling cut the sleeps per token from ~25 to 4-13 but cost more CPU and no wall time there; so
# 0: one read that does not wait, then sleep. A member alone on its machine may gain from polling.
SPIN_S = 0.0
_yield = getattr(os, "sched_yield", lambda: None)


def reduce_how(members: int, one_machine: bool) -> str:
    """How a group of `members` all-reduces (module docstring): two members exchange directly; more
    gather at member 0 when they share one machine (fewer frames), else exchange directly (one
    latency, not two).

        reduce_how(2, True) -> "direct"    reduce_how(3, True) -> "gather"    reduce_how(3, False) -> "direct"
    """
    return "gather" if members > 2 and one_machine else "direct"


# ---------------------------------------------------------------------------------------------
# the leader's side: who is a hop, and what each member is told


def stages_in_ring(ranges: list, ring: list) -> list:
    """The stages the ring passes through, each its ranks: `ring` is [0] + the workers in it.

        stages_in_ring([(0, 4), (4, 12), (4, 12)], [0, 1, 2]) -> [[0], [1, 2]]
    """
    return [g for g in groups(ranges) if g[0] in ring]


def splits_head(ranges: list, ring: list, enabled: bool = True) -> bool:
    """Does the ring end in a split stage (whose output returns to rank 0), so that its members run
    the LM head, each for its share of the vocabulary? Rank 0 cannot be a member of a group
    (partition refuses it), so the head is split where the last all-reduce leaves the whole rows.

        splits_head([(0, 1), (1, 24), (1, 24)], [0, 1, 2]) -> True     [(0, 12), (12, 24)] -> False
    """
    stages = stages_in_ring(ranges, ring)
    return enabled and len(stages) > 1 and len(stages[-1]) > 1


def hops(ranges: list, ring: list) -> list:
    """The ranks activations pass through, one per stage (a group's first member): [0, 1] above."""
    return [g[0] for g in stages_in_ring(ranges, ring)]


def place(ranges: list, ring: list, rank: int, node, head: bool = True) -> dict:
    """What worker `rank` is told of its place in the ring: its layers; for a stage's first member
    (every plain stage's only one) the ranks either side and the next one's address; for a member
    of a group its group: [[rank, ip, port], ...] in member order, its index, how it all-reduces,
    and, when the group is the ring's last stage and `head` (cluster_config's split_lm_head), that
    its members run the LM head too, each for its share of the vocabulary (`head: true`).
    `node(rank)` -> the cluster's NodeConfig (ip, port)."""
    stages = stages_in_ring(ranges, ring)
    group = next(g for g in stages if rank in g)
    out: dict = {"layers": list(ranges[rank])}
    if len(group) > 1:
        out["group"] = {"members": [[r, node(r).ip, node(r).port] for r in group], "member": group.index(rank),
                        "how": reduce_how(len(group), len({node(r).ip for r in group}) == 1)}
        if head and splits_head(ranges, ring):
            out["group"]["head"] = True
    if rank != group[0]:
        out["prev_rank"] = None                 # it takes no activations from the ring: member 0 forwards them
        return out
    path = [g[0] for g in stages]
    i = path.index(rank)
    nxt = node(path[i + 1] if i + 1 < len(path) else 0)
    out.update({"next": [nxt.ip, nxt.port], "next_rank": nxt.rank, "prev_rank": path[i - 1]})
    return out


# ---------------------------------------------------------------------------------------------
# the link model for a split stage: what `nanopipe plan` predicts


def all_reduce_ms(members: int, rows: int, n_embd: int, delay_ms: float, mbps: float, how: str = "direct") -> float:
    """One all-reduce of (rows, C) float32 partials over links of `delay_ms` latency and `mbps`:

        direct: every member sends m-1 frames at once (one latency; its m-1 frames share its link)
        gather: m-1 frames into member 0, the sum back out to m-1 members (two latencies)

    all_reduce_ms(2, 1, 1024, 0.2, 940) = 0.2 + 4096 * 8 / 940e3 = 0.2349 ms (one gpt2-medium row, 1 GbE).
    """
    send = rows * n_embd * 4 * 8 / (mbps * 1e3) if mbps > 0 else 0.0                # ms for one frame's payload
    if how == "direct" or members == 2:
        return delay_ms + (members - 1) * send
    return 2 * (delay_ms + (members - 1) * send)


def predict_split(stage_ms: float, members: int, n_blocks: int, n_embd: int, delay_ms: float, mbps: float,
                  rows: int = 1, how: str = "direct") -> dict:
    """A split stage's time per step, from the same stage's time on one node (`stage_ms`): each
    member computes 1/m of it, then 2 all-reduces per block.

        predict_split(300, 2, 24, 1024, 0.2, 940) -> compute 150 ms + 48 x 0.235 ms = 161.3 ms
    """
    reduce = all_reduce_ms(members, rows, n_embd, delay_ms, mbps, how)
    compute = stage_ms / members
    return {"compute_ms": round(compute, 3), "all_reduces": 2 * n_blocks, "all_reduce_ms": round(reduce, 4),
            "stage_ms": round(compute + 2 * n_blocks * reduce, 3)}


def predict_head_split(head_ms: float, members: int, n_vocab: int, n_embd: int, delay_ms: float, mbps: float,
                       rows: int = 1) -> dict:
    """The LM head split by vocabulary over the last split stage's members, from the head's time on
    one node (`head_ms`, rank 0's today): each member computes 1/m of it; the m-1 other shares reach
    member 0 (one latency, their (m-1)/m of V floats a row over its link); the hop back to rank 0
    then carries V logits a row instead of C activations (its latency is paid either way). A greedy
    step sends each row's top instead (about TOP_ROW_BYTES a row, both hops): `top_less_ms` less.

        predict_head_split(25.7, 2, 50257, 1024, 0.2, 940): each member 12.9 ms, gather 0.2 + 100514
        bytes = 1.06 ms, logits 50257 x 4 - 4096 = 197 KB more: 1.68 ms; rank 0 saves 25.7 ms;
        greedy: a 24-byte top a row both ways, gathered in 0.2 ms, and back 4072 bytes fewer than
        the C activations (-0.035 ms): top_less_ms = 1.055 + 1.676 - 0.2 + 0.035 = 2.57 ms
    """
    per_ms = rows * 4 * 8 / (mbps * 1e3) if mbps > 0 else 0.0          # ms per float32 column of the rows
    gather = delay_ms + (members - 1) / members * n_vocab * per_ms
    logits = (n_vocab - n_embd) * per_ms
    member = head_ms / members
    # a greedy step's compact reply (Msg.TOP): each row's top, TOP_ROW_BYTES, from every member and
    # back to rank 0 instead of logits; the hop back then carries less than the C activations it replaces
    top_gather = delay_ms + (members - 1) * TOP_ROW_BYTES / 4 * per_ms
    top = (TOP_ROW_BYTES / 4 - n_embd) * per_ms
    return {"member_ms": round(member, 3), "gather_ms": round(gather, 3), "logits_ms": round(logits, 3),
            "logits_bytes": rows * n_vocab * 4, "saved_ms": round(head_ms - member - gather - logits, 3),
            "greedy_saved_ms": round(head_ms - member - top_gather - top, 3),
            "top_less_ms": round(gather + logits - top_gather - top, 3)}


TOP_ROW_BYTES = 24          # a row of a TOP frame: its max and logsumexp (float64), and its argmax in the meta


GIGABIT = (0.2, 940.0)     # the link a split stage is predicted on when the cluster sets none: 1 GbE


def plan_lines(ranges: list, names: list, speeds: list, n_embd: int, link: tuple | None = None,
               ips: list | None = None, n_vocab: int | None = None, head: bool = True) -> list:
    """What `nanopipe plan` says of each split stage: its members, and the link model's time per
    decode step beside one node's. `speeds`: each rank's GB/s for one row (None: unknown); `link`:
    (delay ms, Mbit/s), the cluster's simulated link or else 1 GbE; `ips`: each rank's address.
    With `n_vocab` and `head` (split_lm_head), a ring that ends in a split stage gets a line for
    the LM head split by vocabulary over its members (predict_head_split).

        Split stage node1+node2 (layers 1-23, 2 members, all-reduce direct): one node 300.0 ms per
        decode step; each member 150.0 ms + 46 all-reduces x 0.235 ms (0.2 ms, 940 Mbit/s) = 160.8 ms: 1.87x
    """
    from ..partition import block_params, layers_text
    delay, mbps = link if link and (link[0] or link[1]) else GIGABIT
    out = []
    for g in groups(ranges):
        if len(g) < 2:
            continue
        lo, hi = ranges[g[0]]
        m, n = len(g), hi - lo
        how = reduce_how(m, ips is not None and len({ips[r] for r in g}) == 1)
        who = "+".join(names[r] for r in g)
        title = f"Split stage {who} (layers {layers_text(lo, hi)}, {m} members, all-reduce {how}): "
        reduce = all_reduce_ms(m, 1, n_embd, delay, mbps, how)
        known = [speeds[r] for r in g if speeds[r]]
        if len(known) < m:
            out.append(title + f"each member computes 1/{m} of the stage; its {2 * n} all-reduces add "
                       f"{2 * n} x {reduce:.3f} ms = {2 * n * reduce:.1f} ms per decode step ({delay:g} ms, "
                       f"{mbps:g} Mbit/s); the compute is predicted once every member's speed is known")
            continue
        one = n * block_params(n_embd) * 4 / (min(known) * 1e9) * 1000        # ms: the stage's bytes, streamed once
        p = predict_split(one, m, n, n_embd, delay, mbps, how=how)
        out.append(title + f"one node {one:.1f} ms per decode step; each member {p['compute_ms']:.1f} ms + "
                   f"{p['all_reduces']} all-reduces x {p['all_reduce_ms']:.3f} ms ({delay:g} ms, {mbps:g} Mbit/s) "
                   f"= {p['stage_ms']:.1f} ms: {one / p['stage_ms']:.2f}x")
    last = groups(ranges)[-1]
    if n_vocab and splits_head(ranges, list(range(len(ranges))), head):
        m, who = len(last), "+".join(names[r] for r in last)
        known = [speeds[r] for r in last if speeds[r]]
        head_ms = n_vocab * n_embd * 4 / (min(known) * 1e9) * 1000 if len(known) == m else None
        h = predict_head_split(head_ms or 0.0, m, n_vocab, n_embd, delay, mbps)
        out.append(f"LM head split by vocabulary over {who} (split_lm_head): "
                   + (f"each member {h['member_ms']:.1f} ms of one node's {head_ms:.1f} ms, " if head_ms else
                      f"each member 1/{m} of the head, ")
                   + f"gathered at the first member ({h['gather_ms']:.2f} ms), logits back to rank 0 "
                   f"{h['logits_bytes'] / 1e3:.0f} KB a row (+{h['logits_ms']:.2f} ms over {delay:g} ms, "
                   f"{mbps:g} Mbit/s)"
                   + (f": rank 0 saves {h['saved_ms']:.1f} ms per decode step" if head_ms else "")
                   + f"; a greedy step sends each row's top instead ({TOP_ROW_BYTES} bytes): "
                   f"{h['top_less_ms']:.2f} ms less")
    return out


# ---------------------------------------------------------------------------------------------
# a member's side: its links to the other members, and the all-reduce over them


class GroupPlace:
    """A worker's group as its WELCOME says: members [(rank, ip, port)], its index, how it reduces."""

    def __init__(self, meta: dict):
        members = meta["members"]
        if not (isinstance(members, list) and len(members) >= 2
                and all(isinstance(m, list) and len(m) == 3 for m in members)):
            raise ValueError(f"a group needs a list of [rank, ip, port] members, got {members!r}")
        self.members = [(int(r), str(ip), int(port)) for r, ip, port in members]
        self.member = int(meta["member"])
        self.how = meta.get("how", DEFAULT_HOW)
        self.head = meta.get("head", False)         # the members run the LM head too, by vocabulary
        if self.how not in ("direct", "gather") or not 0 <= self.member < len(self.members) \
                or not isinstance(self.head, bool):
            raise ValueError(f"a bad group place {meta!r}")

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def ranks(self) -> list:
        return [r for r, _, _ in self.members]

    @property
    def first(self) -> bool:
        return self.member == 0

    def index_of(self, rank) -> int | None:
        return self.ranks.index(rank) if rank in self.ranks else None


class Link:
    """One member link: frames out through `send` (a big one by a sender thread, so two members
    sending each other megabytes at once never both block with full buffers), frames in by `recv`,
    and an all-reduce's partials in by `recv_into` (polling before it sleeps: see `recv_into`).
    Frames go out in the order `send` was called."""

    def __init__(self, sock, name: str, max_payload: int):
        self.sock, self.name, self.max_payload = sock, name, max_payload
        self.q: queue.Queue = queue.Queue()
        self.error: Exception | None = None
        self._sender = None
        # a plain blocking socket can be polled (MSG_DONTWAIT; with a timeout Python would wait in
        # poll() first); a TLS one is read as it is, sleeping
        self.pollable = (isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)
                         and sock.gettimeout() is None)
        self.buf = bytearray(0)         # where GroupLinks reads partials into (reused, grown as needed)

    def send(self, data: bytes):
        if self.error is not None:
            raise WireError(f"the link to {self.name} failed: {self.error}")
        if len(data) <= INLINE_BYTES and self.q.unfinished_tasks == 0:
            self.sock.sendall(data)
            return
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, daemon=True, name=f"to {self.name}")
            self._sender.start()
        self.q.put(data)

    def _send_loop(self):
        while True:
            data = self.q.get()
            try:
                if data is None:
                    return
                if self.error is None:
                    self.sock.sendall(data)
            except OSError as e:
                self.error = e
            finally:
                self.q.task_done()

    def recv(self):
        return recv_frame(self.sock, self.name, max_payload=self.max_payload)

    def recv_into(self, view, spin_s: float | None = None, at_boundary: bool = False) -> bool:
        """Fill `view` (a writable memoryview) with the next len(view) bytes from the link; True if
        it had to sleep for them.

        An all-reduce waits for the other members at every c_proj, 46 times a gpt2-medium token,
        usually for well under a millisecond. Sleeping in recv for that long can cost more than the
        wait: the kernel must wake this process again (on a virtual machine, an interrupt to a
        halted core), and on a shared core it then waits for its next time slice, milliseconds
        under load. So it can first poll (recv with MSG_DONTWAIT) for up to `spin_s` (SPIN_S),
        giving the core to anything else runnable between polls (sched_yield: on a core of its own
        that returns at once), and only then sleep in recv as usual. With spin_s 0 it reads once
        without waiting, then sleeps. Returns whether it slept: the heartbeat's reduce_sleeps, a
        count that depends less on how loaded the machine is than any time does."""
        n, got, sock = len(view), 0, self.sock
        spin_s = SPIN_S if spin_s is None else spin_s
        if self.pollable:
            deadline = None
            while got < n:
                try:
                    k = sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    now = time.perf_counter()
                    if deadline is None:
                        deadline = now + spin_s
                    if now >= deadline:
                        break
                    _yield()            # a core shared with others: let them run meanwhile
                    continue
                if k == 0:
                    self._closed(got, n, at_boundary)
                got += k
        slept = got < n
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                self._closed(got, n, at_boundary)
            got += k
        return slept

    def _closed(self, got: int, n: int, at_boundary: bool):
        if got == 0 and at_boundary:
            raise ConnectionClosed(f"{self.name} closed the connection")
        raise TruncatedFrame(f"truncated frame from {self.name}: connection closed after {got} of {n} bytes")

    def flush(self, timeout: float = 30.0):
        """Wait until every frame given to `send` is out (before closing a link on purpose)."""
        deadline = time.monotonic() + timeout
        while self.q.unfinished_tasks and self.error is None and time.monotonic() < deadline:
            time.sleep(0.001)

    def close(self):
        close_now(self.sock)
        if self._sender is not None:
            self.q.put(None)


class GroupLinks:
    """This member's links to the others for one ring epoch, and the all-reduce over them.

    `offer(epoch, index, sock)` takes a link a higher member dialled (the data port's accept loop
    calls it); `connect(epoch, dial)` dials the lower members and waits for the higher ones.
    """

    def __init__(self, place: GroupPlace, max_payload: int):
        self.place, self.max_payload = place, max_payload
        self.epoch = None
        self.links: dict = {}           # member index -> Link, for self.epoch
        self.offered: dict = {}         # (epoch, member index) -> (sock, name): dialled in, not yet taken
        self.cond = threading.Condition()
        self.seq = 0                    # all-reduces done in this epoch: both sides must agree
        self.reduce_s = 0.0             # time spent in all_reduce (waiting for the others, and adding)
        self.wait_s = 0.0               # of it, reading the others' partials (mostly waiting for them)
        self.sleeps = 0                 # reads of a partial that slept (it took longer than SPIN_S to come)
        self.reduces = 0

    def offer(self, epoch, index: int, sock, name: str):
        with self.cond:
            old = self.offered.pop((epoch, index), None)
            if old is not None:
                close_now(old[0])
            self.offered[(epoch, index)] = (sock, name)
            self.cond.notify_all()

    def connect(self, epoch, dial, timeout: float = LINK_TIMEOUT_S):
        """Link up for `epoch`: dial(rank, ip, port) -> sock for each lower member, then wait for
        each higher one to dial in. Raises WireError if one does not within `timeout`."""
        self.close()
        links = {}
        me = self.place.member
        try:
            for i, (rank, ip, port) in enumerate(self.place.members[:me]):
                links[i] = Link(dial(rank, ip, port), f"member {i} (rank {rank})", self.max_payload)
            deadline = time.monotonic() + timeout
            with self.cond:
                for i in range(me + 1, self.place.size):
                    while (epoch, i) not in self.offered:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise WireError(f"member {i} (rank {self.place.members[i][0]}) of this split stage did "
                                            f"not link up within {timeout:g}s (ring epoch {epoch})")
                        self.cond.wait(min(left, 0.5))
                    sock, name = self.offered.pop((epoch, i))
                    links[i] = Link(sock, name, self.max_payload)
                for key in [k for k in self.offered if k[0] != epoch]:   # older epochs' leftovers
                    close_now(self.offered.pop(key)[0])
        except BaseException:
            for link in links.values():
                link.close()
            raise
        self.links, self.epoch, self.seq = links, epoch, 0

    def close(self):
        """Drop every link: a thread blocked reading one wakes with an error."""
        links, self.links = self.links, {}
        for link in links.values():
            link.close()

    @property
    def first_link(self) -> Link:
        """A later member's link to member 0, which forwards it the ring's frames."""
        return self.links[0]

    def forward(self, msg: Msg, meta: dict, payload: bytes = b""):
        """Member 0: pass a frame from the ring (an ACT's rows, a FREE) on to every other member."""
        data = encode_frame(msg, meta, payload)
        for i in range(1, self.place.size):
            self.links[i].send(data)

    def gather_logits(self, share: np.ndarray | None, why_not: str = "") -> np.ndarray | None:
        """The LM head split by vocabulary: every member's logits for its rows of the vocabulary,
        (R, v1-v0) float32, go to member 0, which puts them side by side in member order
        (model.gather_logits) -> (R, V); the others get None. A member that has no share (its file
        holds no head) sends `why_not` instead, and member 0 then gets None too: it passes the
        hidden rows on and rank 0 runs the head, as without the split."""
        me, m = self.place.member, self.place.size
        if me != 0:
            meta = {"seq": self.seq, "missing": why_not} if share is None else \
                {"seq": self.seq, "dtype": "float32", "shape": list(share.shape)}
            self.links[0].send(encode_frame(Msg.LOGITS, meta, b"" if share is None else np.ascontiguousarray(share)))
            return None
        parts = [share]
        for i in range(1, m):                       # every share is read, so the links stay in step
            link, frame = self._share_frame(i, Msg.LOGITS)
            if "missing" in frame.meta:
                parts.append(None)
                continue
            x = frame_array(frame, peer=link.name)
            if x.dtype != np.float32 or x.ndim != 2 or share is not None and len(x) != len(share):
                raise ProtocolError(f"{link.name}: a LOGITS share of {x.dtype} {list(x.shape)}, expected float32 "
                                    f"({'?' if share is None else len(share)}, its share of the vocabulary)")
            parts.append(x)
        if any(p is None for p in parts):
            return None
        return gather_logits(parts)                                             # (R, V)

    def gather_tops(self, top: tuple | None, why_not: str = "") -> tuple | None:
        """The split head's compact reply for greedy rows: every member's rows of its share reduced
        to (max, argmax, logsumexp) (model.share_top: (R,) each) go to member 0, which combines them
        in member order (model.combine_tops) into the whole rows' -> (max, argmax, logsumexp); the
        others get None. A member without a share sends `why_not`, and member 0 gets None (as
        gather_logits). On the link: TOP, `argmax` in the meta, (R, 2) float64 [max, logsumexp]."""
        me, m = self.place.member, self.place.size
        if me != 0:
            meta = {"seq": self.seq, "missing": why_not} if top is None else {"seq": self.seq, **top_meta(top)}
            self.links[0].send(encode_frame(Msg.TOP, meta, b"" if top is None else top_payload(top)))
            return None
        parts = [top]
        for i in range(1, m):                       # every share is read, so the links stay in step
            link, frame = self._share_frame(i, Msg.TOP)
            parts.append(None if "missing" in frame.meta else
                         read_top(frame, link.name, None if top is None else len(top[0])))
        if any(p is None for p in parts):
            return None
        return combine_tops(parts)                                              # (R,) each

    def _share_frame(self, i: int, msg: Msg):
        """Member i's share of the head after this step's last all-reduce: (its link, a `msg` frame)."""
        link = self.links[i]
        frame = link.recv()
        if frame.msg is not msg or frame.meta.get("seq") != self.seq:
            raise ProtocolError(f"{link.name}: expected its {msg.name} share after all-reduce {self.seq}, got "
                                f"{frame.msg.name} (seq {frame.meta.get('seq')!r}): the members are out of step")
        return link, frame

    def all_reduce(self, partial: np.ndarray) -> np.ndarray:
        """partial (T, C) float32, this member's -> the sum of every member's, added in member order
        (model.all_reduce's order: the same bits on every member).

        Every member's PARTIAL frame of one all-reduce has the very same header and meta bytes
        (seq, dtype, shape), so a member builds its own once (`partial_head`, equal to what
        encode_frame makes) and reads the others' partials straight into a buffer kept per link,
        checking their header and meta against its own: one send and two reads a frame, no JSON."""
        t0 = time.perf_counter()
        self.seq += 1
        partial = np.ascontiguousarray(partial, "<f4")
        me, m = self.place.member, self.place.size
        head = partial_head(self.seq, partial.shape)
        if self.place.how == "direct" or m == 2:
            data = head + partial.tobytes()
            for i in range(m):
                if i != me:
                    self.links[i].send(data)
            total = _sum([partial if i == me else self._recv_partial(i, head, partial.shape) for i in range(m)])
        elif me == 0:                                       # gather at member 0, then broadcast the sum
            total = _sum([partial] + [self._recv_partial(i, head, partial.shape) for i in range(1, m)])
            data = head + np.ascontiguousarray(total, "<f4").tobytes()
            for i in range(1, m):
                self.links[i].send(data)
        else:
            self.links[0].send(head + partial.tobytes())
            total = _sum([self._recv_partial(0, head, partial.shape)])
        self.reduce_s += time.perf_counter() - t0
        self.reduces += 1
        return total

    def _recv_partial(self, i: int, head: bytes, shape) -> np.ndarray:
        """Member i's PARTIAL for this all-reduce, (T, C) float32: a view into its link's buffer,
        good until the next read from that link. `head`: this member's own frame's header and meta."""
        link = self.links[i]
        n = len(head) + 4 * shape[0] * shape[1]
        if len(link.buf) < n:
            link.buf = bytearray(max(n, 2 * len(link.buf)))
        view = memoryview(link.buf)
        t0 = time.perf_counter()
        self.sleeps += link.recv_into(view[:HEADER.size], at_boundary=True)
        if view[:HEADER.size] != head[:HEADER.size]:        # another frame, or framed otherwise: read it whole
            return self._read_whole(link, bytes(view[:HEADER.size]), shape)
        self.sleeps += link.recv_into(view[HEADER.size:n])
        self.wait_s += time.perf_counter() - t0
        if view[HEADER.size:len(head)] != head[HEADER.size:]:
            # the same lengths but other meta: checked as any frame is (this member's own meta is
            # compact JSON; another sender's may be spelt otherwise and still say the same)
            self._check_partial(link, decode_frame(bytes(view[:n]), link.name, link.max_payload), shape)
        return np.frombuffer(link.buf, "<f4", count=shape[0] * shape[1], offset=len(head)).reshape(shape)

    def _read_whole(self, link: Link, header: bytes, shape) -> np.ndarray:
        """A frame whose header is not this member's own PARTIAL's: read as any frame is, then
        either a PARTIAL of this all-reduce (spelt otherwise) or a ProtocolError saying what it is."""
        try:
            decode_frame(header, link.name, link.max_payload)     # a bad header: ProtocolError saying why
        except TruncatedFrame:
            pass                                                    # a good one: its meta and payload follow
        rest = bytearray(sum(HEADER.unpack(header)[-2:]))
        link.recv_into(memoryview(rest), spin_s=0)
        frame = decode_frame(header + bytes(rest), link.name, link.max_payload)
        self._check_partial(link, frame, shape)
        return frame_array(frame)

    def _check_partial(self, link: Link, frame: Frame, shape):
        if frame.msg is not Msg.PARTIAL:
            raise ProtocolError(f"{link.name}: expected a PARTIAL in the all-reduce, got {frame.msg.name}")
        if frame.meta.get("seq") != self.seq:
            raise ProtocolError(f"{link.name}: PARTIAL number {frame.meta.get('seq')!r}, expected {self.seq}: "
                                "the members are out of step")
        x = frame_array(frame, expect_cols=shape[-1], peer=link.name)
        if x.dtype != np.float32 or tuple(x.shape) != tuple(shape):
            raise ProtocolError(f"{link.name}: PARTIAL of {x.dtype} {list(x.shape)}, expected float32 {list(shape)}")


def partial_head(seq: int, shape) -> bytes:
    """The header and meta of a PARTIAL frame, as encode_frame(Msg.PARTIAL, {"seq": seq, "dtype":
    "float32", "shape": [T, C]}, (T, C) float32) begins: compact JSON, keys in that order."""
    meta = b'{"seq":%d,"dtype":"float32","shape":[%d,%d]}' % (seq, shape[0], shape[1])
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(Msg.PARTIAL), 0, len(meta), 4 * shape[0] * shape[1]) + meta


def _sum(parts: list) -> np.ndarray:
    """parts[0] + parts[1] + ..., in that order (model.all_reduce)."""
    total = np.array(parts[0], np.float32)                      # (T, C), a copy
    for p in parts[1:]:
        total += p
    return total


def top_meta(top: tuple) -> dict:
    """A TOP frame's meta for rows reduced to (max, argmax, logsumexp): the tokens, and the payload's
    dtype and shape (top_payload)."""
    return {"argmax": [int(t) for t in top[1]], "dtype": "float64", "shape": [len(top[0]), 2]}


def top_payload(top: tuple) -> np.ndarray:
    """(R, 2) float64: each row's max and logsumexp (its token's logprob is their difference)."""
    return np.stack([np.asarray(top[0], np.float64), np.asarray(top[2], np.float64)], axis=1)


def read_top(frame: Frame, peer: str, rows: int | None = None) -> tuple:
    """A TOP frame's (max, argmax, logsumexp), (R,) each, checked: float64 (R, 2) (R = `rows` when
    given) and `argmax` R ints. Raises ProtocolError saying what is wrong. (Whether each token is
    in the vocabulary, each max and logsumexp finite, is the reader's to judge: it fails that row.)"""
    x = frame_array(frame, peer=peer)                                               # (R, 2)
    idx = frame.meta.get("argmax")
    if x.dtype != np.float64 or x.ndim != 2 or x.shape[1] != 2 or rows is not None and len(x) != rows:
        raise ProtocolError(f"{peer}: TOP of {x.dtype} {list(x.shape)}, expected float64 "
                            f"({'R' if rows is None else rows}, 2): each row's max and logsumexp")
    if not (isinstance(idx, list) and len(idx) == len(x) and all(type(t) is int for t in idx)):
        raise ProtocolError(f"{peer}: TOP's \"argmax\" must list {len(x)} token ids, got {shown_list(idx)}")
    return x[:, 0], np.array(idx, np.int64), x[:, 1]


def shown_list(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
