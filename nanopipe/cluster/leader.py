"""Rank 0, the leader: `nanopipe serve --rank 0`.

It tokenizes, embeds, runs its slice of blocks, samples, and talks to clients. Workers register
over a control connection; once every rank is READY the leader closes the ring

    rank 0 --ACT--> worker 1 --ACT--> worker 2 --ACT--> ... --ACT--> rank 0

and its scheduler (nanopipe/engine.py, the same one a single process uses) starts sending batches
round it. If a worker drops out, generations in progress wait up to `rejoin_grace_s` for that rank
to come back; then every session is replayed from its tokens so all caches are rebuilt, and
generation continues where it stopped.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback

from ..blas import current as current_blas
from ..config import ClusterConfig, ModelConfig
from ..engine import Scheduler
from ..logs import leader_logger
from ..partition import first_last, layers_text, planned_by_leader
from ..placement import unknown_figures
from ..weights import synthetic_summary
from .clients import CLIENT_QUEUE_MAX, ClientProtocol
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
from .ring import Membership, Ring, WorkerState
from .wire import ConnectionClosed, WireError

_LOG = leader_logger()
WARNING, ERROR = logging.WARNING, logging.ERROR


def log(msg: str, level: int = logging.INFO):
    """One line of the leader's log: `[LEADER] msg` (nanopipe/logs.py)."""
    _LOG.log(level, msg)


class Leader(Membership, ClientProtocol):
    """Rank 0 of a cluster: its stage, its scheduler, and every connection to it.

    This class owns the lifecycle (serve_forever, shutdown), the accept loop that hands each
    connection to its role (worker: Membership._worker_conn, data: Membership._data_conn, client:
    ClientProtocol._client_conn), and the status every client and the web app ask for. The
    shared state lives here, set in __init__: the workers and the ring (cluster/ring.py), the
    clients' requests (cluster/clients.py) and the scheduler both serve.

        leader = Leader(cluster_config, model_config, stage, ranges)   # stage: rank 0's StageWeights
        leader.serve_forever()                                          # until shutdown()
    """

    def __init__(self, cluster: ClusterConfig, model: ModelConfig, stage, ranges: list, tokenizer=None,
                 log_fn=log, capacity=None, load_rank0=None, weights_source=None):
        """`capacity`: rank 0's own placement.Capacity. With partition auto (or none set) and
        workers, the leader plans once every worker has registered and sent its measurements
        (`_plan`); `ranges` is then the starting (even) split, and `load_rank0(lo, hi)` reloads
        rank 0's stage if the plan gives it other blocks."""
        self.cluster, self.model, self.stage, self.ranges = cluster, model, stage, ranges
        self.capacity, self.load_rank0 = capacity, load_rank0
        self.weights_source = weights_source   # {name, url, filename, sha256}, for `join --leader` workers
        self.plan_pending = planned_by_leader(model) and len(ranges) > 1
        self.placement = None           # the plan's prediction (placement.Placement), for /metrics and bench
        self.plan_note = ""             # how the split was chosen, for status()
        self.fatal: str | None = None   # set when the model cannot be placed: `serve` exits with it
        self._off_warned: dict = {}     # rank -> (((lo, hi), "slower" | "faster") warned about or None, last % off)
        self._enrol_hold: dict = {}     # rank -> until when it is held for a worker that enrolled
        self.config = stage.config
        self.tokenizer = tokenizer
        self.log = log_fn
        self.workers = {r: WorkerState(r, cluster.node(r).host, ranges[r]) for r in range(1, len(ranges))}
        self.scheduler = Scheduler(stage, ring=None, max_sessions=cluster.max_sessions,
                                   prefix_cache_bytes=cluster.prefix_cache_bytes(), log=self._warn)
        self.ring: Ring | None = None
        # ring epochs count up from a random start, so a restarted leader never reuses one that a
        # worker may still hold frames of
        self.epoch = secrets.randbelow(1 << 30)
        self.lock = threading.RLock()
        self.ring_ready = threading.Event()
        self.down_since: float | None = None
        # set when the ring stayed down past rejoin_grace_s: while a rank is still down, a new request
        # fails at once with the same message instead of waiting a whole grace period again
        self.grace_over = False
        self.stop_event = threading.Event()
        self.started = time.time()
        self.metrics = {"requests": 0, "errors": 0, "rejected_peers": 0, "bad_frames": 0}
        # cluster events as logged, by kind (joined, rejoined, left, planned, slow_stage), for /metrics
        self.events = {"joined": 0, "rejoined": 0, "left": 0, "planned": 0, "slow_stage": 0}
        self.tls = server_tls(cluster.tls_cert, cluster.tls_key)
        self.tls_client = client_tls(cluster.tls_cert)      # for dialing worker 1
        self.max_act_bytes = max_act_bytes(self.config, cluster.max_sessions)
        self.srv = None
        self.client_queue_max = CLIENT_QUEUE_MAX
        self._building = False
        self._last_build = 0.0
        self._ring_in_epoch = None
        if len(ranges) == 1:
            self.ring_ready.set()

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
            self.log(f"Waiting for {len(self.workers)} worker(s): "
                     + ", ".join(f"rank {r} ({w.host}, layers "
                                 + ("once every node is measured)" if self.plan_pending
                                    else f"{layers_text(*w.layers)})")
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
        for s in (self.srv, self.ring.out_sock if self.ring else None):
            try:
                s and s.close()
            except OSError:
                pass

    def _run_scheduler(self):
        """The scheduler thread: Scheduler.run_forever, stepping only while the ring is up. The plan
        may replace the scheduler once (rank 0's blocks moved, `_apply_plan` stops the old one): the
        thread then runs the new one."""
        while not self.stop_event.is_set():
            sch = self.scheduler
            sch.run_forever(ready=self.ring_ready, on_error=self._on_scheduler_error)
            if sch is self.scheduler:
                break

    def _warn(self, msg: str):
        self.log(msg, WARNING)

    def _on_scheduler_error(self, e: Exception):
        """A bug in a step must not kill the leader silently: log it, fail what is live, go on."""
        self.log(f"scheduler error: {type(e).__name__}: {e}", ERROR)
        self.scheduler.fail_all(f"internal error in the leader: {e}")

    # -- connections, by role ---------------------------------------------------------------

    def _handle(self, sock, addr, slot=lambda: None):
        """One connection: the handshake (slot() frees its place among those pending), then its role."""
        peer = f"{addr[0]}:{addr[1]}"
        try:
            sock, hello = accept(sock, peer=peer, tls=self.tls, token=self.cluster.auth_token,
                                 roles=("worker", "data", "client"))
        except (HandshakeError, WireError, OSError, ValueError, RuntimeError) as e:
            self.metrics["rejected_peers"] += 1
            self.log(f"Rejected connection from {peer}: {e}", WARNING)
            return
        finally:
            slot()
        role = hello["role"]
        try:
            if role == "worker":
                self._worker_conn(sock, peer, hello)
            elif role == "data":
                self._data_conn(sock, peer, hello)
            else:
                self._client_conn(sock, peer, hello)
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
        flags = {0: getattr(self.stage, "synthetic", None)}
        flags.update({r: w.synthetic for r, w in self.workers.items()})
        return synthetic_summary(flags)

    def model_aliases(self) -> list:
        """Other names the served model answers to: its hub name (model_config.yaml's hf_model_name)."""
        hub = self.model.hf_model_name
        return [hub] if hub and hub != self.model.name else []

    def status(self) -> dict:
        """What /health, /config and /metrics show: every node, up or down."""
        now = time.time()
        # layers: [first, last] inclusive, as the text writes "0-3" (partition.first_last)
        nodes = [{"rank": 0, "host": self.cluster.leader.host, "layers": first_last(*self.ranges[0]), "status": "up",
                  "last_seen_s": 0.0, "rss_mb": rss_mb(), "synthetic": getattr(self.stage, "synthetic", None),
                  "gemv_rows": self.scheduler.kernels.gemv_rows,
                  "capacity": self.capacity.as_dict() if self.capacity else None,
                  "unknown": self.capacity.unknowns if self.capacity else None, "blas": current_blas().summary}]
        for r, w in self.workers.items():
            nodes.append({"rank": r, "host": w.host, "layers": first_last(*w.layers),
                          "capacity": w.capacity.as_dict() if w.capacity else None, "excluded": w.excluded,
                          "status": "left out" if w.excluded else
                          "up" if w.status == "ready" else ("joining" if w.status == "joined" else "down"),
                          "last_seen_s": round(now - w.last_seen, 3) if w.last_seen else None,
                          "rss_mb": w.stats.get("rss_mb"), "compute_ms": w.stats.get("compute_ms"),
                          "frames": w.stats.get("frames"), "reduce_ms": w.stats.get("reduce_ms"),
                          "sessions": w.stats.get("sessions"), "kv_cache_bytes": w.stats.get("kv_cache_bytes"),
                          "gemv_rows": w.stats.get("gemv_rows"), "prefix_cache_bytes": w.prefix_cache_bytes,
                          "addr": w.addr, "synthetic": w.synthetic, "blas": w.stats.get("blas"),
                          "unknown": w.capacity.unknowns if w.capacity else None})
        s = self.scheduler
        return {"model": self.model.name, "aliases": self.model_aliases(), "ready": self.ring_ready.is_set(),
                "nodes": nodes,
                "live_sessions": len(s.sessions), "waiting": s.waiting.qsize(),
                "requests": s.stats["requests"], "tokens": s.stats["tokens"], "errors": s.stats["errors"],
                "cancelled_waiting": s.stats["cancelled_waiting"],
                "max_batches_in_flight": s.stats["max_in_flight"], "max_live_sessions": s.stats["max_live"],
                "rejected_peers": self.metrics["rejected_peers"], "bad_frames": self.metrics["bad_frames"],
                "uptime_s": round(now - self.started, 1), "n_ctx": self.config.n_ctx,
                "defaults": self.model.decoding_defaults(), "kv_cache_bytes": s.cache_bytes(),
                "placement": self._placement_status(), **self._prefix_status(), **self._weights_summary(),
                "events": dict(self.events)}

    def _prefix_status(self) -> dict:
        """Prompt tokens reused from kept caches vs computed, and what is kept (nanopipe/prefix.py)."""
        s = self.scheduler
        return {"prompt_tokens_cached": s.stats["prompt_tokens_cached"],
                "prompt_tokens_computed": s.stats["prompt_tokens_computed"],
                "prefix_hits": s.prefix.stats["hits"], "prefix_evictions": s.prefix.stats["evictions"],
                "prefix_kept": len(s.prefix.kept), "prefix_cache_bytes": s.prefix_bytes()}

    def _placement_status(self) -> dict:
        """The plan and its prediction (None until every node is measured), and predicted vs measured
        per stage after traffic."""
        p = self.placement
        out = {"partition": self.model.partition or "default", "objective": self.model.placement_objective,
               "note": self.plan_note, "pending": self.plan_pending, "stages": self.stage_report(),
               "unknown": unknown_figures(self.capacities())}
        if p is not None:
            out.update(predicted_tok_s_1=round(p.tok_s(1), 2), predicted_tok_s_8=round(p.tok_s(8), 2),
                       hop_ms=round(p.hop_s * 1000, 3), notes=list(p.notes))
        return out
