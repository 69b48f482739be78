"""Worker membership and the ring, as the leader keeps them.

Workers register over a control connection (`_worker_conn`: WELCOME with their layers and next
hop; READY once loaded; STATS as heartbeats). Once every rank is READY the leader closes the ring

    rank 0 --ACT--> worker 1 --ACT--> worker 2 --ACT--> ... --ACT--> rank 0

(`_build_ring_once`: each worker re-dials its next hop for a new epoch, the last one dials the
leader's data port, `_data_conn`; then the leader dials worker 1). A worker that leaves or goes
silent (`_watchdog`) breaks the ring (`_on_ring_break`): batches in flight are lost, generations
wait up to rejoin_grace_s for the rank to come back, and when the ring is rebuilt every session is
replayed from its tokens (Scheduler.replay_all). Past the grace period, what waited fails
(`_enforce_grace`).

`Ring` is the leader's two ends of it, the scheduler's ring.send()/ring.recv().
"""
from __future__ import annotations

import logging
import math
import queue
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..decoding import is_int, is_number
from ..engine import Scheduler
from ..logs import shown
from ..partition import first_last, layers_text
from . import group
from .net import close_now, dial, welcome
from .node import LinkModel
from .wire import (
    Msg,
    ProtocolError,
    WireError,
    encode_frame,
    frame_array,
    recv_frame,
    send_array,
    send_frame,
)

DEBUG, WARNING, ERROR = logging.DEBUG, logging.WARNING, logging.ERROR

RING_BUILD_TIMEOUT_S = 30.0    # every worker must reach its next hop within this
ENROL_HOLD_S = 30.0            # a rank given to `join --leader` waits this long for that worker to register
# a worker's heartbeat (STATS): each of these is a finite number >= 0 or null; anything else is
# logged once (naming the rank) and left out, so monitoring never computes with a lie
STATS_NUMBERS = ("rank", "rss_mb", "compute_ms", "frames", "sessions", "gemv_rows", "decode_ms", "decode_samples",
                 "kv_cache_bytes", "reduce_ms")
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
    warned: set = field(default_factory=set)   # the bad STATS fields already logged for this rank


def _count_event(membership, kind: str):
    """Count one cluster event of the kind the leader's status() reports under "events" (/metrics
    shows them). Only a Leader keeps the counts; a bare Membership (the tests') counts nothing."""
    events = getattr(membership, "events", None)
    if isinstance(events, dict):
        with membership.lock:           # an RLock: some callers hold it already
            events[kind] = events.get(kind, 0) + 1


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


class Ring:
    """The leader's two ends of the ring: it sends to worker 1 and receives from the last worker.

    A failed send marks the ring broken and reports it from another thread: the scheduler thread
    calls send() while holding its lock, and must finish its step with the ring it started with.
    """

    def __init__(self, out_sock, n_embd: int, depth: int, epoch: int, on_break, link_sleep=None,
                 source: str = "the ring", log=None):
        """`source`: who sends the final activations back (the last rank), named when they are bad;
        `log(msg, level)`: where a bad number in a trace is reported (once per rank and field)."""
        self.out_sock, self.n_embd, self.depth, self.epoch = out_sock, n_embd, depth, epoch
        self.source, self.log = source, log
        self.warned: set = set()                     # (rank, field) of bad trace numbers already logged
        self.link_sleep = link_sleep                 # a simulated slower link, for benchmarks
        self.inbox: queue.Queue = queue.Queue()
        self.on_break = on_break
        self.broken = False
        self.rows_sent: dict = {}                    # batch id -> rows, to check what comes back

    def send(self, batch_id, sessions, x):
        if self.broken:
            return                                   # the batch is replayed once the ring is rebuilt
        self.rows_sent[batch_id] = len(x)
        if self.link_sleep is not None:
            self.link_sleep(x.nbytes)
        try:
            send_array(self.out_sock, Msg.ACT, {"batch": batch_id, "epoch": self.epoch, "sessions": sessions,
                                                "trace": []}, np.ascontiguousarray(x, np.float32))
        except OSError as e:
            self._broke(f"lost the link to worker 1: {e}")

    def free(self, ids):
        if self.broken:
            return
        try:
            send_frame(self.out_sock, Msg.FREE, {"sessions": list(ids), "epoch": self.epoch})
        except OSError as e:
            self._broke(f"lost the link to worker 1: {e}")

    def _broke(self, reason: str):
        if not self.broken:
            self.broken = True
            threading.Thread(target=self.on_break, args=(reason, self.epoch), daemon=True).start()

    def recv(self, timeout: float):
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def deliver(self, frame, peer):
        """Called by the thread reading the last worker's data link. Raises ProtocolError if the
        frame cannot be the answer to a batch we sent (the caller closes that link)."""
        if frame.meta.get("epoch") != self.epoch:
            return                                   # a frame from before a rebuild
        if frame.msg is Msg.ACT:
            x = frame_array(frame, expect_cols=self.n_embd, peer=peer)                  # (N, C)
            batch = frame.meta.get("batch")
            rows = self.rows_sent.pop(batch, None) if isinstance(batch, int) else None
            if rows is None or x.ndim != 2 or x.dtype != np.float32 or len(x) != rows:
                raise ProtocolError(f"{peer}: ACT for batch {batch!r} with {x.dtype} {list(x.shape)} does not "
                                    f"answer a batch in flight ({rows} rows of float32 sent)")
            trace = self._clean_trace(_checked_trace(frame.meta.get("trace"), peer))
            if trace:   # the last hop's frame size and arrival time, for `nanopipe trace`
                nbytes = len(encode_frame(frame.msg, frame.meta)) + len(frame.payload)
                trace[-1].update(bytes_out=nbytes, t_back=time.time())
            self.inbox.put((batch, x, trace))

    def _clean_trace(self, trace: list) -> list:
        """The hops whose compute_ms is a finite number >= 0: a hop that lies (-5, NaN) is left out
        of the timings, and logged once per rank; its batch itself is fine."""
        good = []
        for hop in trace:
            ms = hop["compute_ms"]
            if finite(ms) and ms >= 0:
                good.append(hop)
            elif (hop["rank"], "compute_ms") not in self.warned:
                self.warned.add((hop["rank"], "compute_ms"))
                if self.log is not None:
                    self.log(f"Rank {hop['rank']} reported compute_ms {shown(ms)} in a trace (expected a number "
                             ">= 0); its timings are ignored", WARNING)
        return good

    def close(self):
        self.broken = True
        close_now(self.out_sock)


def _checked_trace(trace, peer: str) -> list:
    """The per-hop timings an ACT collects on its way round: [{"rank": 1, "compute_ms": 0.4}, ...]."""
    ok = isinstance(trace, list) and all(
        isinstance(h, dict) and isinstance(h.get("rank"), int) and isinstance(h.get("compute_ms"), (int, float))
        for h in trace)
    if not ok:
        raise ProtocolError(f"{peer}: ACT has a malformed trace {trace!r}")
    return trace


class Membership:
    """The Leader's part that owns the workers and the ring: registration, READY, heartbeats, ring
    build and rebuild, the watchdog and the rejoin grace period.

    It uses what Leader.__init__ sets: cluster, config, ranges, workers ({rank: WorkerState}),
    scheduler, ring, epoch, lock, ring_ready, down_since, grace_over, stop_event, tls_client,
    max_act_bytes, _building, _last_build, _ring_in_epoch, log; and Leader._weights_summary().
    """

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
            "rank": rank, "host": node.host,
            "nodes": [[n.rank, n.host, n.ip, n.port] for n in cc.nodes], "port": cc.port, "bind": cc.bind,
            "max_sessions": cc.max_sessions, "heartbeat_s": cc.heartbeat_s, "rejoin_grace_s": cc.rejoin_grace_s,
            "link_delay_ms": cc.link_delay_ms, "link_mbps": cc.link_mbps,
            "prefix_cache_mb": cc.prefix_cache_mb, "pipeline_depth": cc.pipeline_depth,
            "node_overrides": {node.host: cc.node_overrides[node.host]} if node.host in cc.node_overrides else {},
            "model": self.model.name, "n_head": self.config.n_head, "weights": self.weights_source}})
        self.log(f"Worker from {peer} enrolled as rank {rank} ({node.host})")

    def _worker_conn(self, sock, peer, hello):
        if hello.get("enrol") is True:
            return self._enrol(sock, peer, hello)
        rank = hello.get("rank")
        w = self.workers.get(rank) if type(rank) is int else None
        if w is None:
            send_frame(sock, Msg.REJECT, {"reason": f"no worker rank {rank!r} in this cluster (ranks "
                                                    f"{', '.join(map(str, self.workers)) or 'none'})"})
            self.log(f"Rejected worker from {peer}: unknown rank {rank!r}", WARNING)
            return
        with self.lock:
            if w.status != "down":
                send_frame(sock, Msg.REJECT, {"reason": f"rank {rank} is already connected from {w.addr}"})
                self.log(f"Rejected worker from {peer}: rank {rank} is already connected from {w.addr}", WARNING)
                return
            if hello.get("host") not in (None, w.host):
                send_frame(sock, Msg.REJECT, {"reason": f"rank {rank} is host '{w.host}' in the cluster config, "
                                                        f"not '{hello.get('host')}'"})
                self.log(f"Rejected worker from {peer}: rank {rank} claims host {hello.get('host')!r}, "
                         f"config says {w.host!r}", WARNING)
                return
            _count_event(self, "rejoined" if w.addr else "joined")     # addr: it registered before
            w.status, w.addr, w.sock, w.last_seen, w.ring_epoch = "joined", peer, sock, time.time(), None
            self._enrol_hold.pop(rank, None)
            self.grace_over = False             # a rank came back: new requests wait for the ring again
            w.stats = {}                    # until its first STATS, nothing is known of this process
        c = self.config
        with self.lock:
            pending = self.plan_pending
            place = None if pending else self._place_of(rank)
        welcome(sock, hello, {
            "rank": rank, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "n_ctx": c.n_ctx, "n_vocab": c.n_vocab, "model": self.model.name, "heartbeat_s": self.cluster.heartbeat_s,
            **(place or {"layers": None})})
        self.log(f"Worker {rank} registered from {peer} (host {w.host}, "
                 + ("layers once every node is measured)" if pending else f"layers {layers_text(*w.layers)})"))
        try:
            while True:
                frame = recv_frame(sock, f"worker {rank} ({peer})", max_payload=0)
                w.last_seen = time.time()
                if frame.msg is Msg.READY:
                    self._on_ready(w, frame.meta)
                elif frame.msg is Msg.STATS and "capacity" in frame.meta:
                    self._on_capacity(w, frame.meta["capacity"], peer)
                elif frame.msg is Msg.STATS:
                    w.stats = checked_stats(w, frame.meta, self.log)
                elif frame.msg is Msg.ERROR:
                    self.log(f"Worker {rank} reports: {frame.meta.get('message')}", WARNING)
                    if frame.meta.get("epoch") is not None:     # it closed a data link of that ring
                        self._on_ring_break(f"worker {rank} reported: {frame.meta.get('message')}",
                                            frame.meta["epoch"])
        finally:
            with self.lock:
                current = w.sock is sock     # not if the watchdog already dropped this connection
                if current:
                    w.status, w.sock = "down", None
            if current:
                self._on_worker_lost(rank, f"worker {rank} ({w.host}, {peer}) disconnected")

    # -- placement -------------------------------------------------------------------------------

    def ring_ranks(self) -> list:
        """The workers in the ring, in order: every worker the plan did not leave out."""
        return [r for r, w in self.workers.items() if not w.excluded]

    def ring_hops(self) -> list:
        """The workers activations pass through, in order: one per stage (a split stage's first
        member; the others get its rows from it, cluster/group.py)."""
        return group.hops(self.ranges, [0] + self.ring_ranks())[1:]

    def _place_of(self, rank: int) -> dict:
        """What a worker is told of its place: its layers, the ranks either side (its split stage's
        members, if it is one), or why it is left out."""
        w = self.workers[rank]
        if w.excluded:
            return {"layers": list(w.layers), "excluded": w.excluded, "prev_rank": None}
        return group.place(self.ranges, [0] + self.ring_ranks(), rank, self.cluster.node)

    def _on_capacity(self, w, data, peer):
        from ..placement import Capacity
        try:
            cap = Capacity.from_dict(data)
        except ValueError as e:
            # unknown, not missing: the plan goes ahead without its figures rather than wait for them
            self.log(f"Worker {w.rank} ({peer}) sent a bad capacity ({e}); it counts as unknown", WARNING)
            cap = Capacity.unknown(w.host, "unknown (bad report)")
        w.capacity = cap.overridden(self.cluster.node_overrides.get(w.host))
        c = w.capacity
        self.log(f"Worker {w.rank} ({w.host}) measured {_figure(c.speed_gbps, 'GB/s')} (1 row), "
                 f"{_figure(c.speed8_gbps, 'GB/s')} (8 rows), {_figure(c.memory_mb, 'MB usable', '.0f')} ({c.source})"
                 + (f"; unknown: {', '.join(c.unknowns)}" if c.unknowns else ""))
        with self.lock:
            go = self.plan_pending and all(x.capacity is not None for x in self.workers.values())
            if go:
                self.plan_pending = False       # one plan per leader: a rejoining worker keeps its layers
        if go:
            threading.Thread(target=self._plan, daemon=True, name="planner").start()
        elif self.placement is None and all(x.capacity is not None for x in self.workers.values()):
            self._predict_current()

    def capacities(self) -> list:
        """Every node's Capacity in rank order (None where not known yet)."""
        return [self.capacity] + [w.capacity for w in self.workers.values()]

    def shape(self):
        from ..placement import ModelShape
        c = self.config
        return ModelShape(n_layer=c.n_layer, n_embd=c.n_embd, n_ctx=c.n_ctx, n_vocab=c.n_vocab)

    def _predict_current(self):
        """A fixed split (even, balanced, mapping): predict it all the same, to check it against traffic."""
        from ..placement import forecast
        if self.capacity is None or len(group.hops(self.ranges, list(range(len(self.ranges))))) < len(self.ranges):
            return                          # a split stage: the placement model runs stages in turn (`plan` says)
        p = forecast(self.shape(), self.capacities(), self.ranges, self.cluster, self.model.placement_objective)
        if p is not None:                   # None: a speed unknown, nothing to predict with
            self.placement = p

    def _plan(self):
        """Every worker has measured itself: placement.decide chooses the split (as `nanopipe plan`
        does); tell each worker its layers."""
        from ..placement import PlacementError, decide, unknown_figures
        caps = self.capacities()
        unknown = unknown_figures(caps)
        if unknown:
            self.log(f"Plan: figures unknown ({'; '.join(unknown)}); planning with what is known", WARNING)
        try:
            d = decide(self.shape(), caps, self.ranges, self.model, self.cluster)
        except PlacementError as e:
            self._refuse(str(e))
            return
        self.plan_note = d.note
        _count_event(self, "planned")
        if not d.solved:
            self.log(f"Plan: {self.plan_note}")
            self._apply_plan(d.ranges, [None] * len(caps))
            if d.placement is not None:
                self.placement = d.placement
            return
        p, ev = d.placement, d.even
        excluded = [None] * len(caps)
        for i, (lo, hi) in enumerate(p.ranges):
            if i > 0 and lo == hi:
                excluded[i] = next((n for n in p.notes if n.startswith(f"{caps[i].name}:")),
                                   f"{caps[i].name}: the plan gives it no layers")
        self.log(f"Plan: {self.plan_note}: " + ", ".join(
            f"rank {i} ({c.name}) {layers_text(*r)}" for i, (c, r) in enumerate(zip(caps, p.ranges)))
            + f"; predicted {p.tok_s(1):.1f} tok/s for 1 stream, {p.tok_s(8):.1f} for 8 "
              f"(even split: {ev.tok_s(1):.1f} and {ev.tok_s(8):.1f})")
        for n in p.notes:
            self.log(f"Plan: {n}", WARNING)
        self._apply_plan(p.ranges, excluded)
        self.placement = p

    def _refuse(self, message: str):
        """The model does not fit the cluster: tell every worker, and stop (`serve` exits with it)."""
        self.fatal = message
        self.log(f"Cannot place the model: {message}", ERROR)
        for w in self.workers.values():
            try:
                with w.lock:
                    send_frame(w.sock, Msg.ERROR, {"message": message, "fatal": True})
            except (OSError, AttributeError):
                pass
        self.stop_event.set()
        try:
            if self.srv is not None:
                self.srv.shutdown(socket.SHUT_RDWR)     # wakes the accept() in serve_forever (Linux)
                self.srv.close()
        except OSError:
            pass

    def _apply_plan(self, ranges: list, excluded: list):
        """Adopt `ranges`: reload rank 0's blocks if they changed, then send each worker its place."""
        ranges = [tuple(r) for r in ranges]
        if ranges[0] != tuple(self.ranges[0]) and self.load_rank0 is not None:
            lo, hi = ranges[0]
            stage = self.load_rank0(lo, hi)
            with self.scheduler.lock:
                old = self.scheduler
                self.stage = stage
                self.scheduler = Scheduler(stage, ring=None, max_sessions=self.cluster.max_sessions,
                                           prefix_cache_bytes=self.cluster.prefix_cache_bytes(), log=self._warn)
                self.scheduler._ids = old._ids          # session ids go on counting: no two alike
                self.scheduler.take_waiting(old)        # requests that came in while the nodes were measured
                old.stop()
            self.log(f"Server reloaded its share for the plan: layers {layers_text(*ranges[0])}")
        with self.lock:
            self.ranges = ranges
            for r, w in self.workers.items():
                w.layers, w.excluded = ranges[r], excluded[r]
            places = {r: self._place_of(r) for r in self.workers}
            if not self.ring_ranks():
                self.ring_ready.set()           # rank 0 holds every block: no ring at all
        for r, w in self.workers.items():
            try:
                with w.lock:
                    send_frame(w.sock, Msg.STATUS, {"plan": places[r]})
            except (OSError, AttributeError):
                pass                            # it left; it gets its place in the WELCOME when it is back

    def check_predictions(self):
        """After real traffic: warn when a stage's measured one-row time goes more than 25% off its
        prediction, once per condition (rank, its layers, slower or faster), and again only when that
        changes; it is back in line below 15% (a stage hovering at 25% does not flap). The figures
        go to the debug log (-v) whenever their whole percent changes."""
        for row in self.stage_report():
            off = row.get("off")
            if off is None or row["samples"] < 16:
                continue
            rank = row["rank"]
            said, last_pct = self._off_warned.get(rank, (None, None))
            pct = round(off * 100)
            figures = (f"Stage {rank} ({row['host']}) takes {row['measured_ms']:.2f} ms per decode step, "
                       f"{off:+.0%} off its predicted {row['predicted_ms']:.2f} ms")
            condition = (tuple(row["layers"] or ()), "slower" if off > 0 else "faster")
            if abs(off) > 0.25 and said != condition:
                said = condition
                _count_event(self, "slow_stage")
                self.log(f"{figures} (throttled, overloaded, or measured at a better moment; said again only "
                         "if that changes, figures at -v)", WARNING)
            elif said is not None and abs(off) < 0.15:
                said = None
                self.log(f"{figures}: back in line with its prediction")
            elif pct != last_pct:
                self.log(figures, DEBUG)
            self._off_warned[rank] = (said, pct)

    def stage_report(self) -> list:
        """Predicted vs measured milliseconds per one-row decode step, per stage in the ring."""
        p = self.placement
        if p is None:
            return []
        rows = []
        sch_ms = self.scheduler.decode_ms if hasattr(self.scheduler, "decode_ms") else []
        for r in range(len(self.ranges)):
            if r > 0 and self.workers[r].excluded:
                continue
            pred = p.stage_s[r] * 1000
            if r == 0:
                samples = sorted(sch_ms)
                meas = samples[len(samples) // 2] if samples else None
                n, host = len(samples), self.cluster.leader.host
            else:
                w = self.workers[r]
                meas, n, host = w.stats.get("decode_ms"), w.stats.get("decode_samples", 0) or 0, w.host
            meas = meas if finite(meas) and meas >= 0 else None     # (checked_stats let only those in)
            n = n if finite(n) else 0
            rows.append({"rank": r, "host": host, "layers": first_last(*self.ranges[r]), "predicted_ms": round(pred, 3),
                         "measured_ms": meas, "samples": n,
                         "off": round(meas / pred - 1, 3) if meas and pred > 0 else None})
        return rows

    def _on_ready(self, w, meta):
        if meta.get("epoch") is not None:
            w.ring_epoch = meta["epoch"]    # it has dialed its next hop for the ring of that epoch
            return
        with self.lock:
            w.status = "ready"
            w.synthetic = meta.get("synthetic")
            budget = meta.get("prefix_cache_bytes")
            w.prefix_cache_bytes = budget if is_int(budget) and budget >= 0 else None
        self.log(f"Worker {w.rank} ready: loaded layers {layers_text(*w.layers)}")
        weights = self._weights_summary()
        if weights["weights_mixed"]:    # the leader must know: real and random slices make gibberish
            self.log(f"Worker {w.rank} joined with {'synthetic' if w.synthetic else 'real'} weights. "
                     f"{weights['weights_note']}")
        self._maybe_build_ring()

    def _maybe_build_ring(self, retry_after_s: float = 0.0):
        """Start closing the ring if every worker is ready and no ring is up or being built."""
        with self.lock:
            if (self.ring_ready.is_set() or self._building or time.time() - self._last_build < retry_after_s
                    or self.plan_pending or self.fatal or not self.ring_ranks()
                    or any(self.workers[r].status != "ready" for r in self.ring_ranks())):
                return
            self._building = True
        threading.Thread(target=self._build_ring, daemon=True, name="ring-builder").start()

    def _build_ring(self):
        try:
            self._build_ring_once()
        except Exception as e:          # a bug must not end the thread unsaid; the watchdog retries
            self.log(f"Cannot close the ring: internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}",
                     ERROR)
        finally:
            with self.lock:
                self._building, self._last_build = False, time.time()

    def _build_ring_once(self) -> bool:
        """Close a new ring: each worker re-dials its next hop (the last one dials us), then we dial
        worker 1 and replay every live session. Returns False, after logging why, if it could not;
        the watchdog tries again while every worker is still ready."""
        with self.lock:
            self.epoch += 1
            epoch = self.epoch
        workers = [self.workers[r] for r in self.ring_ranks()]
        socks = {w.rank: w.sock for w in workers}
        for w in workers:
            try:
                with w.lock:
                    send_frame(socks[w.rank], Msg.STATUS, {"ring": "connect", "epoch": epoch})
            except (OSError, AttributeError):       # AttributeError: its sock is None, it just left
                self.log(f"Cannot close the ring (epoch {epoch}): worker {w.rank} went away", WARNING)
                return False
        deadline = time.time() + RING_BUILD_TIMEOUT_S
        while not (all(w.ring_epoch == epoch for w in workers) and self._ring_in_epoch == epoch):
            # a worker that left (even one already back, on a new connection) never got this epoch
            if time.time() > deadline or any(w.sock is not socks[w.rank] for w in workers):
                late = [str(w.rank) for w in workers if w.ring_epoch != epoch]
                self.log(f"Cannot close the ring (epoch {epoch}): rank {', '.join(late) or '?'} did not connect to "
                         f"its next hop within {RING_BUILD_TIMEOUT_S:g}s"
                         + ("" if self._ring_in_epoch == epoch else "; the last worker never connected back to the "
                            "leader: check that the leader's address in host_ip is reachable from it"), WARNING)
                return False
            time.sleep(0.01)
        hops = [self.workers[r] for r in self.ring_hops()]
        first = self.cluster.node(hops[0].rank)
        try:
            sock, _, _ = dial(first.ip, first.port, role="data", rank=0, token=self.cluster.auth_token, attempts=5,
                              backoff_s=0.1, max_backoff_s=1.0, who=f"worker {first.rank}", tls=self.tls_client,
                              extra={"epoch": epoch})
        except (OSError, WireError) as e:
            self.log(f"Cannot open the ring to worker 1: {e}", WARNING)
            return False
        last = hops[-1]
        ring = Ring(sock, self.config.n_embd, depth=self.cluster.depth(), epoch=epoch, on_break=self._on_ring_break,
                    link_sleep=LinkModel.of(self.cluster).wait, source=f"rank {last.rank} ({last.host})", log=self.log)
        with self.scheduler.lock, self.lock:     # no scheduler step runs while the ring changes
            if epoch != self.epoch or any(w.status != "ready" for w in workers):
                ring.close()
                return False
            self.ring = ring
            self.scheduler.ring = ring
            self._set_prefix_budgets(hops)
            replayed = self.scheduler.replay_all()
            self.down_since = None
            self.grace_over = False
            self.ring_ready.set()
        stages = group.stages_in_ring(self.ranges, [0] + self.ring_ranks())[1:]     # a split stage shows as 1+2
        path = " -> ".join(["0"] + ["+".join(map(str, g)) for g in stages] + ["0"])
        left = [str(r) for r, w in self.workers.items() if w.excluded]
        self.log(f"All {len(workers)} worker(s) ready; ring {path} is up (epoch {epoch})"
                 + (f"; rank {', '.join(left)} left out by the plan" if left else "")
                 + (f"; replaying {replayed} interrupted session(s)" if replayed else ""))
        return True

    def _set_prefix_budgets(self, workers: list):
        """A new ring: every stage starts with no kept caches; each bounds them by its own budget
        (nanopipe/prefix.py; a worker that did not say uses the leader's). `workers`: those in the ring."""
        ours = self.scheduler.prefix.stages[0][1]
        stages = [(len(self.stage.blocks), ours)]
        stages += [(w.layers[1] - w.layers[0], ours if w.prefix_cache_bytes is None else w.prefix_cache_bytes)
                   for w in workers]
        self.scheduler.set_prefix_stages(stages)

    def _data_conn(self, sock, peer, hello):
        """The last worker's link back to the leader: final activations arrive here."""
        ring = self.ring_hops()
        last = ring[-1] if ring else 0
        if hello.get("rank") != last or last == 0:
            send_frame(sock, Msg.REJECT, {"reason": f"only rank {last} sends activations to the leader"})
            self.log(f"Rejected data link from {peer}: it claims rank {hello.get('rank')!r}; only rank {last} "
                     "sends activations to the leader", WARNING)
            return
        epoch = hello.get("epoch")
        welcome(sock, hello)
        self._ring_in_epoch = epoch
        name = f"worker {last} ({peer}, data)"
        try:
            while True:
                frame = recv_frame(sock, name, max_payload=self.max_act_bytes)
                ring = self.ring
                if frame.msg is Msg.ACT:
                    if ring is not None and frame.meta.get("epoch") == ring.epoch:
                        ring.deliver(frame, name)
                elif frame.msg is Msg.FREE:
                    pass                        # a FREE that went all the way round: every stage has freed
                elif frame.msg is Msg.ERROR:
                    self.log(f"{name}: {frame.meta.get('message')}", WARNING)
                    self._on_ring_break(f"{name} reported: {frame.meta.get('message')}", epoch)
                else:
                    raise ProtocolError(f"{name}: unexpected {frame.msg.name} on a data link")
        finally:
            # the ring of this epoch (if it is still the current one) has lost its last hop
            self._on_ring_break(f"{name}: the link back to the leader closed", epoch)

    def _on_ring_break(self, reason: str, epoch=None):
        """The ring is down: batches in flight are lost, generations wait for it to be rebuilt
        (by _maybe_build_ring, once every worker is ready). `epoch`: only if that ring is current."""
        with self.lock:
            ring = self.ring
            if ring is None or (epoch is not None and epoch != ring.epoch):
                return                          # already down, or news about an older ring
            ring.close()                        # a scheduler step blocked sending on it wakes up,
            self.ring_ready.clear()             # and no new step starts: the lock below comes free
        with self.scheduler.lock, self.lock:
            if self.ring is not ring:
                return
            self.ring = None
            self.scheduler.ring = None
            self.ring_ready.clear()
            if self.down_since is None:
                self.down_since = time.time()
            self.log(f"Ring broken: {reason}; generations wait up to {self.cluster.rejoin_grace_s:g}s for it to heal",
                     WARNING)
            self.scheduler.interrupt(f"{reason}; waiting up to {self.cluster.rejoin_grace_s:g}s for it to rejoin")

    def _on_worker_lost(self, rank, reason):
        if self.stop_event.is_set():
            return
        _count_event(self, "left")
        if self.workers[rank].excluded:      # it holds no layers: the ring does not miss it
            self.log(f"Worker {rank} (left out of the ring) is gone: {reason}")
            return
        self.log(f"Worker {rank} is down: {reason}", WARNING)
        self._on_ring_break(reason)

    def _watchdog(self):
        """Notice silent workers (a cut cable sends no FIN), rebuild the ring when every worker is
        ready again, fail what waited longer than the rejoin grace period, and compare the stages'
        times with the plan. A part that fails is logged (each different error once, with its
        traceback) and the rest go on, round after round: the watchdog lives as long as the leader."""
        seen: set = set()
        while not self.stop_event.wait(0.25):
            now = time.time()
            for doing, part, args in (("dropping silent workers", self._drop_silent, (now,)),
                                      ("rebuilding the ring", self._maybe_build_ring, (1.0,)),
                                      ("enforcing rejoin_grace_s", self._enforce_grace, (now,)),
                                      ("checking the stages' times", self.check_predictions, ())):
                try:
                    part(*args)
                except Exception as e:
                    what = f"{doing}: {type(e).__name__}: {e}"
                    if what not in seen and len(seen) < 100:
                        seen.add(what)
                        self.log(f"watchdog: {what}; it goes on\n{traceback.format_exc()}", ERROR)

    def _drop_silent(self, now: float):
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
            self._on_worker_lost(w.rank, f"worker {w.rank} ({w.host}) stopped answering")

    def _enforce_grace(self, now: float):
        with self.lock:
            if self.ring_ready.is_set():
                self.down_since, self.grace_over = None, False
            since = self.down_since
        if since is None or now - since <= self.cluster.rejoin_grace_s:
            return
        msg = self._grace_message()
        self.down_since = None                  # a request after a rank rejoins starts a new wait
        self.grace_over = True                  # until then, new requests fail at once (_generate)
        n = len(self.scheduler.sessions) + self.scheduler.waiting.qsize()
        if n:
            self.log(f"Failing {n} request(s): {msg}", WARNING)
        self.scheduler.fail_all(msg)

    def _grace_message(self) -> str:
        down = [f"{w.rank} ({w.host})" for w in self.workers.values() if w.status != "ready" and not w.excluded]
        if down:
            return (f"rank {', '.join(down)} did not come back within rejoin_grace_s="
                    f"{self.cluster.rejoin_grace_s:g}s; restart it with `nanopipe join` and retry")
        return (f"the ring could not be rebuilt within rejoin_grace_s={self.cluster.rejoin_grace_s:g}s; "
                "see the leader's log")

    def _past_grace(self) -> bool:
        """A rank has been down longer than rejoin_grace_s and none has come back since: a new
        request would only wait for nothing. (A rank that has registered again gets a new grace.)"""
        with self.lock:
            return (self.grace_over and not self.ring_ready.is_set()
                    and any(w.status == "down" and not w.excluded for w in self.workers.values()))


def _figure(v, unit: str, fmt: str = ".1f") -> str:
    """A measured figure for the log: (9.04, "GB/s") -> "9.0 GB/s"; None -> "unknown GB/s"."""
    return f"unknown {unit}" if v is None else f"{v:{fmt}} {unit}"
