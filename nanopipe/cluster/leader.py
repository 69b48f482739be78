"""Rank 0, the leader: `nanopipe serve --rank 0`.

It tokenizes, embeds, runs its slice of blocks, samples, and talks to clients. Workers register
over a control connection; once every rank is READY the leader closes the ring

    rank 0 --ACT--> worker 1 --ACT--> worker 2 --ACT--> ... --ACT--> rank 0

and its scheduler (nanopipe/engine.py, the same one a single process uses) starts sending batches
round it. If a worker drops out, generations in progress wait up to `rejoin_grace_s` for that rank
to come back; then every session is replayed from its tokens so all caches are rebuilt, and
generation continues where it stopped.

The leader is built from parts, each owning its state and talking to the others through calls:

    registry   cluster/registry.py         the workers: registration, READY, heartbeats, silence
    planner    cluster/planner.py          where the layers go, and the prediction against traffic
    ring       cluster/ring.py             closing, breaking and rebuilding the ring; rejoin grace
    clients    cluster/client_protocol.py  the clients' connections: GENERATE in, tokens out
    scheduler  engine.py                   rank 0's stage and every live session
"""
from __future__ import annotations

import collections
import logging
import socket
import statistics
import threading
import time
import traceback

from ..blas import current as current_blas
from ..config import ClusterConfig, ModelConfig
from ..engine import Scheduler
from ..logs import leader_logger
from ..model import share_of
from ..partition import first_last, layers_text
from ..weights import synthetic_summary
from .client_protocol import ClientProtocol
from .net import (
    HandshakeError,
    accept,
    client_tls,
    close_now,
    listen,
    listen_on,
    max_act_bytes,
    serve_accepts,
    server_tls,
)
from .node import rss_mb
from .planner import Planner
from .registry import WorkerRegistry
from .replan import Replanner, back_from_gone
from .ring import RingBuilder
from .slices import serve_slice
from .wire import ConnectionClosed, WireError

_LOG = leader_logger()
EVENT_LOG_MAX = 100         # the cluster events status() lists, newest last (older ones are dropped)
WARNING, ERROR = logging.WARNING, logging.ERROR


def log(msg: str, level: int = logging.INFO):
    """One line of the leader's log: `[LEADER] msg` (nanopipe/logs.py)."""
    _LOG.log(level, msg)


class Leader:
    """Rank 0 of a cluster: composes its parts (see the module docstring) and runs them.

    The leader itself owns the lifecycle (serve_forever, shutdown), the accept loop that hands each
    connection to the part for its role (worker: registry.serve, data: ring.data_link, client:
    clients.serve), the watchdog that drives the parts' periodic work, the cluster events counted
    for /metrics, and status(), what every client and the web app ask for.

        leader = Leader(cluster_config, model_config, stage, ranges)   # stage: rank 0's StageWeights
        leader.serve_forever()                                          # until shutdown()
    """

    def __init__(self, cluster: ClusterConfig, model: ModelConfig, stage, ranges: list, tokenizer=None,
                 log_fn=log, capacity=None, load_rank0=None, weights_source=None):
        """`capacity`: rank 0's own placement.Capacity. With partition auto (or none set) and
        workers, the leader plans once every worker has registered and sent its measurements
        (planner.Planner); `ranges` is then the starting (even) split, and `load_rank0(lo, hi)`
        reloads rank 0's stage if the plan gives it other blocks. `weights_source`: {name, url,
        filename, sha256}, told to `join --leader` workers."""
        self.cluster, self.model, self.config, self.log = cluster, model, stage.config, log_fn
        self.lock = threading.RLock()       # membership and the ring change together (registry, ring)
        self.stop_event = threading.Event()
        self.started = time.time()
        self.metrics = {"rejected_peers": 0, "bad_frames": 0}
        # cluster events as logged, by kind (joined, rejoined, left, planned, slow_stage), for /metrics
        self.events = {"joined": 0, "rejoined": 0, "left": 0, "planned": 0, "slow_stage": 0, "gone": 0, "drained": 0,
                       "replanned": 0}
        # and each one as it happened, for the cluster page: {"t", "kind", "rank", "text"} (Leader._note)
        self.event_log: collections.deque = collections.deque(maxlen=EVENT_LOG_MAX)
        self.tls = server_tls(cluster.tls_cert, cluster.tls_key)
        self.srv = None
        self.scheduler = Scheduler(stage, ring=None, max_sessions=cluster.max_sessions,
                                   prefix_cache_bytes=cluster.prefix_cache_bytes(), log=self._warn)
        self.registry = WorkerRegistry(cluster, self.config, ranges, self.lock, log_fn, model_name=model.name,
                                       count=self._count, weights_source=weights_source,
                                       stopped=self.stop_event.is_set)
        self.planner = Planner(cluster, model, self.config, ranges, self.registry, self.scheduler, log_fn,
                               capacity=capacity, load_rank0=load_rank0, count=self._count,
                               on_fatal=self._stop_for, on_applied=lambda: self.ring.no_ring_needed())
        self.ring = RingBuilder(cluster, self.config, self.registry, self.scheduler, self.lock, log_fn,
                                tls_client=client_tls(cluster.tls_cert),     # for dialing worker 1
                                max_act_bytes=max_act_bytes(self.config, cluster.max_sessions),
                                may_build=lambda: (not self.planner.pending and self.planner.fatal is None
                                                   and not self.replanner.holds_ring()),
                                alone=len(ranges) == 1, note_event=self._note)
        # a node joins, is drained or is gone: a new plan for the running cluster
        self.replanner = Replanner(cluster, model, self.registry, self.planner, self.ring, self.scheduler, self.lock,
                                   log_fn, count=self._count, started=self.started, stopped=self.stop_event.is_set)
        self.clients = ClientProtocol(cluster, model, self.config, self.scheduler, self.ring, self.registry, log_fn,
                                      status=self.status, aliases=self.model_aliases, tokenizer=tokenizer,
                                      leave=self.replanner.leave)
        # what the registry learns, the other parts act on
        self.registry.on_ready = self._worker_ready
        self.registry.on_joined = lambda w: (back_from_gone(w, self.replanner.gone), self.ring.rank_back())
        self.registry.on_capacity = self.planner.on_capacity
        self.registry.on_lost = lambda w, reason: self.ring.on_break(reason)
        self.registry.on_ring_error = self.ring.on_break
        self.registry.plan_pending = lambda: self.planner.pending

    @property
    def fatal(self) -> str | None:
        """Why the model cannot be placed (`serve` exits with it), else None."""
        return self.planner.fatal

    @property
    def stage(self):
        """Rank 0's StageWeights (the plan may have reloaded them: the scheduler holds the current ones)."""
        return self.scheduler.stage

    @property
    def workers(self) -> dict:
        return self.registry.workers

    # -- lifecycle --------------------------------------------------------------------------

    def serve_forever(self, bound=None):
        """Accept workers and clients until shutdown. `bound`: the port, already bound (net.bind)."""
        node = self.cluster.leader
        host = self.cluster.bind or node.ip
        self.srv = listen(host, node.port) if bound is None else listen_on(bound)
        self.log(f"Server listening on {host}:{node.port}")
        if not self.cluster.auth_token:
            self.log("WARNING: no auth_token set: anyone who can reach this port can join the cluster or "
                     "read prompts. Set auth_token in cluster_config.yaml or NANOPIPE_TOKEN.", WARNING)
        if self.workers:
            pending = self.planner.pending
            self.log(f"Waiting for {len(self.workers)} worker(s): "
                     + ", ".join(f"rank {r} ({w.host}, layers "
                                 + ("once every node is measured)" if pending else f"{layers_text(*w.layers)})")
                                 for r, w in self.workers.items()))
        threading.Thread(target=self._run_scheduler, daemon=True, name="scheduler").start()
        threading.Thread(target=self._watchdog, daemon=True, name="watchdog").start()
        try:
            serve_accepts(self.srv, self._handle, stopped=self.stop_event.is_set, log=self.log,
                          what=f"the leader's port {host}:{node.port}")
        except OSError as e:
            self.log(f"Stopping: {e}", ERROR)
            raise
        finally:
            self.shutdown()

    def shutdown(self):
        self.stop_event.set()
        self.scheduler.stop()
        self.ring.close()
        try:
            self.srv and self.srv.close()
        except OSError:
            pass

    def _stop_for(self, message: str):
        """A part cannot go on (the model fits nowhere): stop serving; `serve` exits with `fatal`."""
        self.stop_event.set()
        try:
            if self.srv is not None:
                self.srv.shutdown(socket.SHUT_RDWR)     # wakes the accept() in serve_forever (Linux)
                self.srv.close()
        except OSError:
            pass

    def _run_scheduler(self):
        """The scheduler thread: Scheduler.run_forever, stepping only while the ring is up."""
        self.scheduler.run_forever(ready=self.ring.ready, on_error=self._on_scheduler_error)

    def _warn(self, msg: str):
        self.log(msg, WARNING)

    def _on_scheduler_error(self, e: Exception):
        """A bug in a step must not kill the leader silently: log it, fail what is live, go on."""
        self.log(f"scheduler error: {type(e).__name__}: {e}", ERROR)
        self.scheduler.fail_all(f"internal error in the leader: {e}")

    def _count(self, kind: str, rank=None, text: str = "", shown_as: str | None = None):
        """Count one cluster event of the kind status() reports under "events" (/metrics shows them),
        and note it in the event log as `shown_as` (default: `kind`)."""
        with self.lock:
            self.events[kind] = self.events.get(kind, 0) + 1
            self._note(shown_as or kind, rank, text)

    def _note(self, kind: str, rank=None, text: str = ""):
        """One line of the event log (status()'s "event_log", the cluster page's log):
        {"t": 1765000000.0, "kind": "died", "rank": 2, "text": "Worker 2 (node2) is down: ..."}."""
        with self.lock:
            self.event_log.append({"t": time.time(), "kind": kind, "rank": rank, "text": text})

    def _worker_ready(self, w):
        """A worker loaded its slice: warn if real and random weights now mix, then try to close the ring."""
        weights = self._weights_summary()
        if weights["weights_mixed"]:    # the leader must know: real and random slices make gibberish
            self.log(f"Worker {w.rank} joined with {'synthetic' if w.synthetic else 'real'} weights. "
                     f"{weights['weights_note']}")
        self.ring.maybe_build()

    def _watchdog(self):
        """Notice silent workers (a cut cable sends no FIN), rebuild the ring when every worker is
        ready again, fail what waited longer than the rejoin grace period, and compare the stages'
        times with the plan. A part that fails is logged (each different error once, with its
        traceback) and the rest go on, round after round: the watchdog lives as long as the leader."""
        seen: set = set()
        while not self.stop_event.wait(0.25):
            now = time.time()
            for doing, part, args in (("dropping silent workers", self.registry.drop_silent, (now,)),
                                      ("rebuilding the ring", self.ring.maybe_build, (1.0,)),
                                      ("re-planning", self.replanner.tick, (now,)),
                                      ("enforcing rejoin_grace_s", self._enforce_grace, (now,)),
                                      ("checking the stages' times", self.planner.check_predictions, ())):
                try:
                    part(*args)
                except Exception as e:
                    what = f"{doing}: {type(e).__name__}: {e}"
                    if what not in seen and len(seen) < 100:
                        seen.add(what)
                        self.log(f"watchdog: {what}; it goes on\n{traceback.format_exc()}", ERROR)

    def _enforce_grace(self, now: float):
        """Fail what waited longer than rejoin_grace_s for the ring, unless a re-plan brings it back:
        one is due, under way, or will be once a rank down now is past its grace (cluster/replan.py)."""
        if not self.replanner.pending():
            self.ring.enforce_grace(now)

    # -- connections, by role ---------------------------------------------------------------

    def _handle(self, sock, addr, slot=lambda: None):
        """One connection: the handshake (slot() frees its place among those pending), then its role."""
        peer = f"{addr[0]}:{addr[1]}"
        try:
            sock, hello = accept(sock, peer=peer, tls=self.tls, token=self.cluster.auth_token,
                                 roles=("worker", "data", "client", "weights"))
        except (HandshakeError, WireError, OSError, ValueError, RuntimeError) as e:
            self.metrics["rejected_peers"] += 1
            self.log(f"Rejected connection from {peer}: {e}", WARNING)
            return
        finally:
            slot()
        role = hello["role"]
        try:
            if role == "worker":
                self.registry.serve(sock, peer, hello)
            elif role == "data":
                self.ring.data_link(sock, peer, hello)
            elif role == "weights":         # a worker fetching its slice (cluster/slices.py)
                serve_slice(sock, peer, hello, getattr(self.stage, "source", None), self.registry.weights_source,
                            self.log, peers=self.registry.peers)
            else:
                self.clients.serve(sock, peer, hello)
        except (WireError, OSError, ValueError) as e:
            if not isinstance(e, ConnectionClosed):
                self.metrics["bad_frames"] += 1
                self.log(f"Closed connection from {peer} ({role}): {e}", WARNING)
        except Exception as e:      # a bug must cost one connection, never the leader
            self.metrics["bad_frames"] += 1
            self.log(f"Closed connection from {peer} ({role}) after an internal error: {type(e).__name__}: {e}\n"
                     + traceback.format_exc(), ERROR)
        finally:
            close_now(sock)

    # -- what the cluster says about itself -------------------------------------------------

    def _weights_summary(self) -> dict:
        """Are the cluster's weights synthetic (random)? Rank 0's and every worker's, as they said."""
        flags = {0: getattr(self.stage, "synthetic", None), **self.registry.synthetic_flags()}
        return synthetic_summary(flags)

    def model_aliases(self) -> list:
        """Other names the served model answers to: its hub name (model_config.yaml's hf_model_name)."""
        hub = self.model.hf_model_name
        return [hub] if hub and hub != self.model.name else []

    def status(self) -> dict:
        """What /health, /config and /metrics show: every node, up or down."""
        now, cap = time.time(), self.planner.capacity
        with self.lock:         # the ring comes up with the lock held: its event and `ready` agree
            event_log, ready = list(self.event_log), self.ring.ready.is_set()
        down_at = {e["rank"]: e["t"] for e in event_log if e["kind"] == "died"}     # the latest, per rank
        # each rank's link transit: median ms of recent one-row steps, from its compute's end to the next node
        transit = {r: round(statistics.median(list(ms)), 3)
                   for r, ms in dict(self.scheduler.batcher.transit_ms).items() if ms}
        # layers: [first, last] inclusive, as the text writes "0-3" (partition.first_last)
        nodes = [{"rank": 0, "host": self.cluster.leader.host, "layers": first_last(*self.planner.ranges[0]),
                  "status": "up", "last_seen_s": 0.0, "rss_mb": rss_mb(),
                  "synthetic": getattr(self.stage, "synthetic", None), "gemv_rows": self.scheduler.kernels.gemv_rows,
                  "capacity": cap.as_dict() if cap else None, "unknown": cap.unknowns if cap else None,
                  "blas": current_blas().summary, "transit_ms": transit.get(0)}]
        gone = []       # not part of the cluster any more (nor of /health); the cluster page shows them
        heads = {}      # a split stage's members: the heads each holds, [first, last]
        for members in self.registry.stages():
            for i, r in enumerate(members if len(members) > 1 else ()):
                lo, hi = share_of(i, len(members), self.config.n_head, self.config.n_embd).heads
                heads[r] = [lo, hi - 1]
        for r, w in self.workers.items():
            if self.replanner.is_gone(r):
                gone.append({"rank": r, "host": w.host, "status": "gone", "why": self.replanner.gone.get(r),
                             "down_s": round(now - down_at[r], 1) if r in down_at else None})
                continue
            nodes.append({"rank": r, "host": w.host, "layers": first_last(*w.layers), "transit_ms": transit.get(r),
                          "heads": heads.get(r),
                          "down_s": round(now - down_at[r], 1) if w.status == "down" and r in down_at else None,
                          "capacity": w.capacity.as_dict() if w.capacity else None, "excluded": w.excluded,
                          "status": "left out" if w.excluded else
                          "up" if w.status == "ready" else ("joining" if w.status == "joined" else "down"),
                          "last_seen_s": round(now - w.last_seen, 3) if w.last_seen else None,
                          "rss_mb": w.stats.get("rss_mb"), "compute_ms": w.stats.get("compute_ms"),
                          "frames": w.stats.get("frames"), "reduce_ms": w.stats.get("reduce_ms"),
                          "head_ms": w.stats.get("head_ms"),
                          **{k: w.stats.get(k) for k in ("compute_cpu_ms", "reduce_wait_ms", "reduce_sleeps")},
                          # a last split stage's first member: its LOGITS and TOP answers to rank 0
                          **{k: w.stats.get(k) for k in ("logits_frames", "logits_bytes", "top_frames", "top_bytes")},
                          "sessions": w.stats.get("sessions"), "kv_cache_bytes": w.stats.get("kv_cache_bytes"),
                          "gemv_rows": w.stats.get("gemv_rows"), "prefix_cache_bytes": w.prefix_cache_bytes,
                          "addr": w.addr, "synthetic": w.synthetic, "blas": w.stats.get("blas"),
                          "unknown": w.capacity.unknowns if w.capacity else None})
        s = self.scheduler
        return {"model": self.model.name, "aliases": self.model_aliases(), "ready": ready,
                "nodes": nodes,
                "live_sessions": len(s.sessions), "waiting": s.waiting.qsize(),
                "requests": s.stats["requests"], "tokens": s.stats["tokens"], "errors": s.stats["errors"],
                "cancelled_waiting": s.stats["cancelled_waiting"],
                "max_batches_in_flight": s.stats["max_in_flight"], "max_live_sessions": s.stats["max_live"],
                "rejected_peers": self.metrics["rejected_peers"], "bad_frames": self.metrics["bad_frames"],
                "uptime_s": round(now - self.started, 1), "n_ctx": self.config.n_ctx,
                "defaults": self.model.decoding_defaults(), "kv_cache_bytes": s.cache_bytes(),
                "placement": self.planner.status(), **self._prefix_status(), **self._weights_summary(),
                "events": dict(self.events), "event_log": event_log, "now": now, "gone": gone,
                "rejoin_grace_s": self.cluster.rejoin_grace_s}

    def _prefix_status(self) -> dict:
        """Prompt tokens reused from kept caches vs computed, and what is kept (nanopipe/prefix.py)."""
        s = self.scheduler
        return {"prompt_tokens_cached": s.stats["prompt_tokens_cached"],
                "prompt_tokens_computed": s.stats["prompt_tokens_computed"],
                "prefix_hits": s.prefix.stats["hits"], "prefix_evictions": s.prefix.stats["evictions"],
                "prefix_kept": len(s.prefix.kept), "prefix_cache_bytes": s.prefix_bytes()}
