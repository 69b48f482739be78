"""The workers the leader knows: who registered, from where, what each said, when it was last heard.

A worker's control connection, as the leader serves it (`WorkerRegistry.serve`):

    worker --HELLO {role "worker", rank, host}-->  leader    refused if the rank is unknown or taken
    worker <--WELCOME {its layers, next hop}--     leader    (layers null: its place comes once planned)
    worker --CAPACITY-->                           leader    what it measured (the planner's input)
    worker --READY-->                              leader    its slice is loaded, its data port listens
    worker --STATS-->  ... every heartbeat_s       leader    a worker silent for 3 of them is dropped

The registry records all of that in one WorkerState per rank and reports what happened through the
callbacks the leader gave it; it decides nothing about the ring or the plan.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from ..decoding import is_number
from ..logs import shown
from ..partition import layers_text
from . import group
from .net import close_now, welcome
from .wire import Msg, read_capacity, read_epoch, read_ready, recv_frame, send_frame

WARNING = logging.WARNING

ENROL_HOLD_S = 30.0            # a rank given to `join --leader` waits this long for that worker to register
# a worker's heartbeat (STATS): each of these is a finite number >= 0 or null; anything else is
# logged once (naming the rank) and left out, so monitoring never computes with a lie
STATS_NUMBERS = ("rank", "rss_mb", "compute_ms", "frames", "sessions", "gemv_rows", "decode_ms", "decode_samples",
                 "kv_cache_bytes", "reduce_ms", "head_ms", "compute_cpu_ms", "reduce_wait_ms", "reduce_sleeps",
                 "logits_frames", "logits_bytes", "top_frames", "top_bytes")
STATS_TEXTS = {"blas": 200}     # text a STATS may carry, and its longest accepted length


@dataclass
class WorkerState:
    rank: int
    host: str
    layers: tuple
    addr: str = ""
    status: str = "down"            # down | joined | ready
    last_seen: float = 0.0
    stats: dict = field(default_factory=dict)
    sock: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)    # one sender at a time on sock
    ring_epoch: object = None       # the ring epoch it last confirmed (dialed its next hop for)
    synthetic: object = None        # its weights are random (said in its READY); None until known
    prefix_cache_bytes: object = None   # its budget for kept caches (said in its READY); None: ours
    capacity: object = None         # placement.Capacity it measured (sent at registration), config applied
    excluded: str | None = None     # why the plan left it out of the ring (it holds no layers), else None
    # why it holds no share of the LM head although its place says its split stage runs it (said in
    # its READY): the head then runs on rank 0 (WorkerRegistry.splits_head); None: it holds its share, or needs none
    lm_head_missing: str | None = None
    lm_head_warned: str | None = None   # the lm_head_missing already logged, so a rejoin does not repeat it
    warned: set = field(default_factory=set)   # the bad STATS fields already logged for this rank


def finite(x) -> bool:
    """A number a peer sent that arithmetic can use: finite, not a bool. 3, 0.5 yes; NaN, "3", True no."""
    return is_number(x) and math.isfinite(x)


def checked_stats(w: WorkerState, meta: dict, log) -> dict:
    """A worker's STATS, with only the numbers that are finite and >= 0 (or null) and the texts
    (its BLAS) that are short printable strings: a bad one is logged once per rank and field, and
    left out, as if the worker had not said it.

        {"decode_ms": "abc", "rss_mb": 12.5} -> {"rss_mb": 12.5}, and one log line about decode_ms
    """
    out = {}
    for key in STATS_NUMBERS:
        if key not in meta:
            continue
        v = meta[key]
        if v is None or (finite(v) and v >= 0):
            out[key] = v
        elif key not in w.warned:
            w.warned.add(key)
            log(f"Worker {w.rank} sent a bad {key} in its heartbeat ({shown(v)}; expected a number >= 0); "
                "ignoring it", WARNING)
    for key, longest in STATS_TEXTS.items():
        v = meta.get(key)
        if v is None:
            continue
        if isinstance(v, str) and len(v) <= longest and v.isprintable():
            out[key] = v
        elif key not in w.warned:
            w.warned.add(key)
            log(f"Worker {w.rank} sent a bad {key} in its heartbeat ({shown(v)}; expected text of at most "
                f"{longest} characters); ignoring it", WARNING)
    return out


class WorkerRegistry:
    """Owns `workers` ({rank: WorkerState}) and every worker's control connection: registration (and
    `join --leader` enrolment), READY, the capacity it measured, heartbeats, and dropping a worker
    that went silent. It knows the ring's order (`ring_ranks`, `place_of`) because that is who is in
    and who is left out; it builds no ring and makes no plan.

    What it learns goes to the callbacks it is given (the leader wires them to its other parts):

        on_ready(w)                     w loaded its layers and listens (READY)
        on_capacity(w, data, peer)      w measured itself (CAPACITY); data as sent
        on_joined(w)                    w registered (again): a rank is back
        on_lost(w, reason)              w disconnected or went silent; it is marked down already
        on_ring_error(reason, epoch)    w closed a data link of the ring of `epoch`
        plan_pending() -> bool          True while the plan waits for measurements (WELCOME says layers null)

    `lock` is the leader's lock, shared with the ring builder and the planner: membership and the
    ring change together. `count(kind)` counts a cluster event (joined, rejoined, left).
    """

    def __init__(self, cluster, config, ranges: list, lock, log, *, model_name: str, count=lambda kind, *about: None,
                 weights_source: dict | None = None, stopped=lambda: False):
        self.cluster, self.config, self.lock, self.log, self.count = cluster, config, lock, log, count
        self.model_name, self.weights_source, self.stopped = model_name, weights_source, stopped
        self.workers = {r: WorkerState(r, cluster.node(r).host, ranges[r]) for r in range(1, len(ranges))}
        # the split in force is each worker's layers and this: do the members of a split stage that
        # ends the ring run the LM head? A hand-written layer_mapping: split_lm_head says; a plan
        # (partition auto, a re-plan) says its own with `assign` (split_plan.members_run_head)
        self.head_on_members = cluster.split_lm_head
        self._enrol_hold: dict = {}     # rank -> until when it is held for a worker that enrolled
        self.on_ready = self.on_joined = lambda w: None
        self.on_capacity = lambda w, data, peer: None
        self.on_lost = lambda w, reason: None
        self.on_ring_error = lambda reason, epoch: None
        self.plan_pending = lambda: False

    # -- the ring's order ---------------------------------------------------------------------

    def ring_ranks(self) -> list:
        """The workers in the ring, in order: every worker the plan did not leave out."""
        return [r for r, w in self.workers.items() if not w.excluded]

    def _ranges(self) -> list:
        """Every rank's layers as the registry knows them (rank 0 never shares its own: (0, 0) here)."""
        return [(0, 0)] + [tuple(self.workers[r].layers) for r in sorted(self.workers)]

    def ring_hops(self) -> list:
        """The workers activations pass through, in order: one per stage (a split stage's first
        member; the others get its rows from it, cluster/group.py)."""
        return group.hops(self._ranges(), [0] + self.ring_ranks())[1:]

    def splits_head(self) -> bool:
        """Does the ring end in a split stage whose members run the LM head (group.splits_head), as
        the split in force says (`head_on_members`), and does every member hold its share of it?
        One that said in its READY it holds none (`lm_head_missing`: a file of blocks only) leaves
        the head to rank 0: the ring then asks the stage for no logits, and the status says rank 0."""
        return (group.splits_head(self._ranges(), [0] + self.ring_ranks(), self.head_on_members)
                and not self.head_missing())

    def head_missing(self) -> dict:
        """{rank: why} for the members of the ring's last stage that hold no share of the LM head."""
        stages = self.stages()
        last = stages[-1] if stages else []
        return {r: self.workers[r].lm_head_missing for r in last if self.workers[r].lm_head_missing is not None}

    def stages(self) -> list:
        """The ring's worker stages, each its ranks: [[1, 2], [3]] when ranks 1 and 2 share layers."""
        return group.stages_in_ring(self._ranges(), [0] + self.ring_ranks())[1:]

    def place_of(self, rank: int) -> dict:
        """What a worker is told of its place: its layers, the ranks either side (its split stage's
        members, if it is one), or why it is left out."""
        w = self.workers[rank]
        if w.excluded:
            return {"layers": list(w.layers), "excluded": w.excluded, "prev_rank": None}
        return group.place(self._ranges(), [0] + self.ring_ranks(), rank, self.cluster.node,
                           head=self.head_on_members)

    def assign(self, ranges: list, excluded: list, head_on_members: bool) -> dict:
        """The plan's split: each worker's layers (ranges[rank]), why it is left out (or None), and
        whether a split stage that ends the ring runs the LM head (split_plan.members_run_head).
        Returns {rank: its place} to tell it."""
        with self.lock:
            self.head_on_members = head_on_members
            for r, w in self.workers.items():
                w.layers, w.excluded = ranges[r], excluded[r]
            return {r: self.place_of(r) for r in self.workers}

    # -- what is known of them ------------------------------------------------------------------

    def not_ready(self, left_out_too: bool = True) -> list:
        """The workers that are not (yet, or no longer) ready; `left_out_too` False: only those in the ring."""
        return [w for w in self.workers.values() if w.status != "ready" and (left_out_too or not w.excluded)]

    def any_down(self) -> bool:
        """A worker the ring needs is down (not merely registering)."""
        return any(w.status == "down" and not w.excluded for w in self.workers.values())

    def peers(self) -> list:
        """Where a worker may ask for blocks the leader holds no file for: every worker that is
        connected and not standing by (one holds no blocks), at its data port (cluster/slices.py):
        [{"rank": 1, "ip": "10.0.0.2", "port": 5001}]."""
        with self.lock:
            up = [r for r, w in self.workers.items() if w.status != "down" and not w.excluded]
        return [{"rank": r, "ip": self.cluster.node(r).ip, "port": self.cluster.node(r).port} for r in up]

    def synthetic_flags(self) -> dict:
        """{rank: its weights are random (True/False), None until it said}."""
        return {r: w.synthetic for r, w in self.workers.items()}

    def capacities(self) -> list:
        """The workers' measured Capacity in rank order (None where not known yet)."""
        return [w.capacity for w in self.workers.values()]

    def tell(self, w: WorkerState, msg: Msg, meta: dict) -> bool:
        """Send one frame on w's control connection; False if it has none (it left) or the send failed."""
        try:
            with w.lock:
                send_frame(w.sock, msg, meta)
            return True
        except (OSError, AttributeError):       # AttributeError: its sock is None, it just left
            return False

    # -- a worker's control connection ------------------------------------------------------------

    def serve(self, sock, peer: str, hello):
        """One worker's control connection, from its HELLO until it goes away."""
        if hello.get("enrol") is True:
            return self._enrol(sock, peer, hello)
        w = self._register(sock, peer, hello)
        if w is None:
            return
        rank, name = w.rank, f"worker {w.rank} ({peer})"
        try:
            while True:
                frame = recv_frame(sock, name, max_payload=0)
                w.last_seen = time.time()
                if frame.msg is Msg.RING_JOINED:
                    w.ring_epoch = read_epoch(frame, name)      # it has dialed its next hop for that ring
                elif frame.msg is Msg.READY:
                    self._on_ready(w, read_ready(frame))
                elif frame.msg is Msg.CAPACITY:
                    self.on_capacity(w, read_capacity(frame), peer)
                elif frame.msg is Msg.STATS:
                    w.stats = checked_stats(w, frame.meta, self.log)
                elif frame.msg is Msg.ERROR:
                    self.log(f"Worker {rank} reports: {frame.meta.get('message')}", WARNING)
                    if frame.meta.get("epoch") is not None:     # it closed a data link of that ring
                        self.on_ring_error(f"worker {rank} reported: {frame.meta.get('message')}",
                                           frame.meta["epoch"])
        finally:
            with self.lock:
                current = w.sock is sock     # not if the watchdog already dropped this connection
                if current:
                    w.status, w.sock = "down", None
            if current:
                self._lost(w, f"worker {rank} ({w.host}, {peer}) disconnected")

    def _register(self, sock, peer: str, hello) -> WorkerState | None:
        """Check a worker's HELLO, mark its rank joined and WELCOME it with its place; None: refused."""
        rank = hello.get("rank")
        w = self.workers.get(rank) if type(rank) is int else None
        if w is None:
            send_frame(sock, Msg.REJECT, {"reason": f"no worker rank {rank!r} in this cluster (ranks "
                                                    f"{', '.join(map(str, self.workers)) or 'none'})"})
            self.log(f"Rejected worker from {peer}: unknown rank {rank!r}", WARNING)
            return None
        with self.lock:
            if w.status != "down":
                send_frame(sock, Msg.REJECT, {"reason": f"rank {rank} is already connected from {w.addr}"})
                self.log(f"Rejected worker from {peer}: rank {rank} is already connected from {w.addr}", WARNING)
                return None
            if hello.get("host") not in (None, w.host):
                send_frame(sock, Msg.REJECT, {"reason": f"rank {rank} is host '{w.host}' in the cluster config, "
                                                        f"not '{hello.get('host')}'"})
                self.log(f"Rejected worker from {peer}: rank {rank} claims host {hello.get('host')!r}, "
                         f"config says {w.host!r}", WARNING)
                return None
            kind = "rejoined" if w.addr else "joined"       # addr: it registered before
            self.count(kind, rank, f"Worker {rank} ({w.host}) {kind} from {peer}")
            w.status, w.addr, w.sock, w.last_seen, w.ring_epoch = "joined", peer, sock, time.time(), None
            self._enrol_hold.pop(rank, None)
            self.on_joined(w)
            w.stats = {}                    # until its first STATS, nothing is known of this process
        c = self.config
        with self.lock:
            pending = self.plan_pending()
            place = None if pending else self.place_of(rank)
        welcome(sock, hello, {
            "rank": rank, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "n_ctx": c.n_ctx, "n_vocab": c.n_vocab, "model": self.model_name, "heartbeat_s": self.cluster.heartbeat_s,
            **(place or {"layers": None})})
        self.log(f"Worker {rank} registered from {peer} (host {w.host}, "
                 + ("layers once every node is measured)" if pending else
                    f"standing by: {place['excluded']})" if place.get("excluded") else
                    f"layers {layers_text(*w.layers)})"))
        return w

    def _enrol(self, sock, peer, hello):
        """`nanopipe join --leader HOST:PORT`: a worker that knows only our address. Give it a free
        rank (one whose host_ip address is the worker's own, if any), the cluster, the model and
        where the weights come from; it then registers with that rank like any worker."""
        ip = peer.rsplit(":", 1)[0]
        now = time.time()
        with self.lock:
            # a rank given out in the last ENROL_HOLD_S is held for that worker (it registers next),
            # so two workers enrolling at once never get the same rank
            free = [r for r, w in self.workers.items() if w.status == "down" and self._enrol_hold.get(r, 0) < now]
            mine = [r for r in free if self.cluster.node(r).ip == ip]
            if free:
                self._enrol_hold[(mine or free)[0]] = now + ENROL_HOLD_S
        if not free:
            send_frame(sock, Msg.REJECT, {"reason": f"every worker rank ({', '.join(map(str, self.workers))}) is "
                                                    "already connected; add one to cluster_config.yaml first"})
            self.log(f"Rejected a worker from {peer}: no free rank", WARNING)
            return
        rank = (mine or free)[0]
        cc = self.cluster
        node = cc.node(rank)
        welcome(sock, hello, {"enrol": {
            "rank": rank, "host": node.host, "cluster": cc.to_wire(for_host=node.host),     # ClusterConfig.from_wire
            "model": self.model_name, "n_head": self.config.n_head, "weights": self.weights_source}})
        self.log(f"Worker from {peer} enrolled as rank {rank} ({node.host})")

    def _on_ready(self, w: WorkerState, said: dict):
        """w's READY (wire.read_ready: what it said, checked)."""
        with self.lock:
            w.status = "ready"
            w.synthetic, w.prefix_cache_bytes = said["synthetic"], said["prefix_cache_bytes"]
            w.lm_head_missing = missing = said["lm_head_missing"]
            warn, w.lm_head_warned = missing is not None and missing != w.lm_head_warned, missing
        self.log(f"Worker {w.rank} ready: loaded layers {layers_text(*w.layers)}")
        if warn:            # once per reason: a member restarted with the same file says it again
            self.log(f"Member rank {w.rank} of the split stage holds no share of the LM head ({missing}): the LM "
                     f"head runs on rank 0. To split it over the members, give rank {w.rank} the whole weights "
                     "file (`nanopipe pull` without --layers); to keep it on rank 0, set split_lm_head: false "
                     "in cluster_config.yaml", WARNING)
        self.on_ready(w)

    def _lost(self, w: WorkerState, reason: str):
        if self.stopped():
            return
        if w.excluded:      # it holds no layers (drained, or left out by the plan): the ring does not miss it
            self.count("left", w.rank, f"Worker {w.rank} ({w.host}), out of the ring, is gone: {reason}")
            self.log(f"Worker {w.rank} (left out of the ring) is gone: {reason}")
            return
        # counted as "left" (/metrics); logged as "died": it went without being told to
        self.count("left", w.rank, f"Worker {w.rank} ({w.host}) is down: {reason}", "died")
        self.log(f"Worker {w.rank} is down: {reason}", WARNING)
        self.on_lost(w, reason)

    def drop_silent(self, now: float):
        """Drop the workers not heard from for 3 heartbeats (at least 3 s): a cut cable sends no FIN."""
        timeout = max(3.0, 3 * self.cluster.heartbeat_s)
        for w in list(self.workers.values()):
            sock = w.sock
            if w.status == "down" or sock is None or now - w.last_seen <= timeout:
                continue
            with self.lock:
                if w.sock is not sock:
                    continue
                w.status, w.sock = "down", None
            self.log(f"Worker {w.rank} ({w.host}, {w.addr}) silent for {now - w.last_seen:.1f}s "
                     f"(heartbeat_s={self.cluster.heartbeat_s:g}); dropping it", WARNING)
            close_now(sock)                    # wakes its connection thread, which then exits
            self._lost(w, f"worker {w.rank} ({w.host}) stopped answering")
