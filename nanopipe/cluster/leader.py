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

import collections
import logging
import queue
import secrets
import socket
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..config import ClusterConfig, ModelConfig
from ..decoding import DecodingError, is_int, request_params
from ..engine import Request, Scheduler
from ..logs import leader_logger
from ..weights import synthetic_summary
from .net import (
    HandshakeError,
    accept,
    client_tls,
    close_now,
    dial,
    listen,
    max_act_bytes,
    server_tls,
)
from .wire import (
    ConnectionClosed,
    Msg,
    ProtocolError,
    WireError,
    encode_frame,
    frame_array,
    recv_frame,
    send_array,
    send_frame,
)
from .worker import rss_mb

# the sampling fields a GENERATE may carry (absent: the model's defaults; see decoding.request_params)
CLIENT_FIELDS = ("strategy", "temperature", "top_k", "top_p", "max_tokens", "seed", "stop", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "logit_bias")
RING_BUILD_TIMEOUT_S = 30.0    # every worker must reach its next hop within this
CLIENT_SEND_TIMEOUT_S = 10.0   # a client that reads nothing this long while frames wait is dropped
CLIENT_QUEUE_MAX = 10_000      # frames waiting for one client; past this it is dropped


_LOG = leader_logger()
WARNING, ERROR = logging.WARNING, logging.ERROR


def log(msg: str, level: int = logging.INFO):
    """One line of the leader's log: `[LEADER] msg` (nanopipe/logs.py)."""
    _LOG.log(level, msg)


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


class Ring:
    """The leader's two ends of the ring: it sends to worker 1 and receives from the last worker.

    A failed send marks the ring broken and reports it from another thread: the scheduler thread
    calls send() while holding its lock, and must finish its step with the ring it started with.
    """

    def __init__(self, out_sock, n_embd: int, depth: int, epoch: int, on_break, link_sleep=None):
        self.out_sock, self.n_embd, self.depth, self.epoch = out_sock, n_embd, depth, epoch
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
            trace = _checked_trace(frame.meta.get("trace"), peer)
            if trace:   # the last hop's frame size and arrival time, for `nanopipe trace`
                nbytes = len(encode_frame(frame.msg, frame.meta)) + len(frame.payload)
                trace[-1].update(bytes_out=nbytes, t_back=time.time())
            self.inbox.put((batch, x, trace))

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


class ClientOutbox:
    """One client's outgoing frames, and the thread that writes them to its socket.

    The scheduler thread emits every session's tokens. If it wrote to client sockets itself, a
    client that stops reading would, once the socket buffers fill, stall every generation of every
    client. So it only appends here, which never blocks; this client's own sender thread waits on
    its socket instead:

        scheduler --put(TOKEN)--> [frames of client A] --sender A--> socket A   (reads: fine)
                  --put(TOKEN)--> [frames of client B] --sender B--> socket B   (stopped reading)

    A client whose queue passes `limit` frames, or whose socket takes nothing for
    CLIENT_SEND_TIMEOUT_S, is dropped: its socket is closed, which wakes its connection thread,
    which then cancels its sessions.
    """

    def __init__(self, sock, peer: str, log, limit: int = CLIENT_QUEUE_MAX):
        self.sock, self.peer, self.log, self.limit = sock, peer, log, limit
        self.frames: collections.deque = collections.deque()       # (msg, meta), oldest first
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"send-{peer}")
        self.thread.start()

    def put(self, msg, meta: dict):
        """Queue a frame for this client; never blocks. Frames to a dropped client are discarded."""
        with self.cond:
            if self.closed:
                return
            if len(self.frames) >= self.limit:
                self._drop(f"{len(self.frames)} frames are waiting for it (limit {self.limit}); it reads too slowly")
                return
            self.frames.append((msg, meta))
            self.cond.notify()

    def close(self):
        """The connection is over: stop the sender, discard what was not sent."""
        with self.cond:
            self.closed = True
            self.frames.clear()
            self.cond.notify()

    def _run(self):
        while True:
            with self.cond:
                while not self.frames and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                msg, meta = self.frames.popleft()
            try:
                send_frame(self.sock, msg, meta)
            except OSError as e:
                with self.cond:
                    if not self.closed:
                        stuck = isinstance(e, (BlockingIOError, TimeoutError))
                        self._drop(f"it read nothing for {CLIENT_SEND_TIMEOUT_S:g}s" if stuck else f"send failed: {e}")
                return
            except WireError as e:      # a frame we cannot encode (too big): a bug, but only this frame's
                self.log(f"Not sent to client {self.peer}: {e}", WARNING)

    def _drop(self, reason: str):
        """Called with self.cond held."""
        self.closed = True
        self.frames.clear()
        self.cond.notify()
        self.log(f"Dropping client {self.peer}: {reason}", WARNING)
        close_now(self.sock)


class Leader:
    def __init__(self, cluster: ClusterConfig, model: ModelConfig, stage, ranges: list, tokenizer=None,
                 log_fn=log):
        self.cluster, self.model, self.stage, self.ranges = cluster, model, stage, ranges
        self.config = stage.config
        self.tokenizer = tokenizer
        self.log = log_fn
        self.workers = {r: WorkerState(r, cluster.node(r).host, ranges[r]) for r in range(1, len(ranges))}
        self.scheduler = Scheduler(stage, ring=None, max_sessions=cluster.max_sessions,
                                   prefix_cache_bytes=cluster.prefix_cache_bytes())
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

    def serve_forever(self):
        node = self.cluster.leader
        host = self.cluster.bind or node.ip
        self.srv = listen(host, node.port)
        self.log(f"Server listening on {host}:{node.port}")
        if not self.cluster.auth_token:
            self.log("WARNING: no auth_token set: anyone who can reach this port can join the cluster or "
                     "read prompts. Set auth_token in cluster_config.yaml or NANOPIPE_TOKEN.", WARNING)
        if self.workers:
            self.log(f"Waiting for {len(self.workers)} worker(s): "
                     + ", ".join(f"rank {r} ({w.host}, layers {w.layers[0]}-{w.layers[1] - 1})"
                                 for r, w in self.workers.items()))
        threading.Thread(target=self._scheduler_loop, daemon=True, name="scheduler").start()
        threading.Thread(target=self._watchdog, daemon=True, name="watchdog").start()
        try:
            while not self.stop_event.is_set():
                try:
                    sock, addr = self.srv.accept()
                except OSError:
                    break
                threading.Thread(target=self._handle, args=(sock, addr), daemon=True).start()
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

    def _scheduler_loop(self):
        sch = self.scheduler
        while not self.stop_event.is_set():
            if not self.ring_ready.is_set():
                self.ring_ready.wait(0.2)
                continue
            try:
                if not sch.step():
                    sch._wake.wait(0.05)
                    sch._wake.clear()
            except Exception as e:  # a bug must not kill the leader silently
                self.log(f"scheduler error: {type(e).__name__}: {e}", ERROR)
                sch.fail_all(f"internal error in the leader: {e}")

    # -- connections ------------------------------------------------------------------------

    def _handle(self, sock, addr):
        peer = f"{addr[0]}:{addr[1]}"
        try:
            sock, hello = accept(sock, peer=peer, tls=self.tls, token=self.cluster.auth_token,
                                 roles=("worker", "data", "client"))
        except (HandshakeError, WireError, OSError, ValueError) as e:
            self.metrics["rejected_peers"] += 1
            self.log(f"Rejected connection from {peer}: {e}", WARNING)
            return
        role = hello["role"]
        try:
            if role == "worker":
                self._worker_conn(sock, peer, hello)
            elif role == "data":
                self._data_conn(sock, peer, hello)
            else:
                self._client_conn(sock, peer)
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

    # workers ----------------------------------------------------------------------------------

    def _worker_conn(self, sock, peer, hello):
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
            w.status, w.addr, w.sock, w.last_seen, w.ring_epoch = "joined", peer, sock, time.time(), None
            self.grace_over = False             # a rank came back: new requests wait for the ring again
            w.stats = {}                    # until its first STATS, nothing is known of this process
        nxt = self.cluster.node(rank + 1 if rank + 1 < len(self.ranges) else 0)
        c = self.config
        send_frame(sock, Msg.WELCOME, {
            "rank": rank, "layers": list(w.layers), "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "n_ctx": c.n_ctx, "n_vocab": c.n_vocab, "model": self.model.name, "next": [nxt.ip, nxt.port],
            "next_rank": nxt.rank, "heartbeat_s": self.cluster.heartbeat_s})
        self.log(f"Worker {rank} registered from {peer} (host {w.host}, layers {w.layers[0]}-{w.layers[1] - 1})")
        try:
            while True:
                frame = recv_frame(sock, f"worker {rank} ({peer})", max_payload=0)
                w.last_seen = time.time()
                if frame.msg is Msg.READY:
                    self._on_ready(w, frame.meta)
                elif frame.msg is Msg.STATS:
                    w.stats = {k: v for k, v in frame.meta.items() if isinstance(v, (int, float, str))}
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

    def _on_ready(self, w, meta):
        if meta.get("epoch") is not None:
            w.ring_epoch = meta["epoch"]    # it has dialed its next hop for the ring of that epoch
            return
        with self.lock:
            w.status = "ready"
            w.synthetic = meta.get("synthetic")
            budget = meta.get("prefix_cache_bytes")
            w.prefix_cache_bytes = budget if is_int(budget) and budget >= 0 else None
        self.log(f"Worker {w.rank} ready: loaded layers {w.layers[0]}-{w.layers[1] - 1}")
        weights = self._weights_summary()
        if weights["weights_mixed"]:    # the leader must know: real and random slices make gibberish
            self.log(f"Worker {w.rank} joined with {'synthetic' if w.synthetic else 'real'} weights. "
                     f"{weights['weights_note']}")
        self._maybe_build_ring()

    def _maybe_build_ring(self, retry_after_s: float = 0.0):
        """Start closing the ring if every worker is ready and no ring is up or being built."""
        with self.lock:
            if (self.ring_ready.is_set() or self._building or time.time() - self._last_build < retry_after_s
                    or any(w.status != "ready" for w in self.workers.values())):
                return
            self._building = True
        threading.Thread(target=self._build_ring, daemon=True, name="ring-builder").start()

    def _build_ring(self):
        try:
            self._build_ring_once()
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
        workers = list(self.workers.values())
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
        first = self.cluster.node(1)
        try:
            sock, _, _ = dial(first.ip, first.port, role="data", rank=0, token=self.cluster.auth_token, attempts=5,
                              backoff_s=0.1, max_backoff_s=1.0, who="worker 1", tls=self.tls_client,
                              extra={"epoch": epoch})
        except (OSError, WireError) as e:
            self.log(f"Cannot open the ring to worker 1: {e}", WARNING)
            return False
        ring = Ring(sock, self.config.n_embd, depth=self.cluster.depth(), epoch=epoch, on_break=self._on_ring_break,
                    link_sleep=self.cluster.link_sleep)
        with self.scheduler.lock, self.lock:     # no scheduler step runs while the ring changes
            if epoch != self.epoch or any(w.status != "ready" for w in workers):
                ring.close()
                return False
            self.ring = ring
            self.scheduler.ring = ring
            self._set_prefix_budgets(workers)
            replayed = self.scheduler.replay_all()
            self.down_since = None
            self.grace_over = False
            self.ring_ready.set()
        path = " -> ".join(["0"] + [str(r) for r in self.workers] + ["0"])
        self.log(f"All {len(self.workers)} worker(s) ready; ring {path} is up (epoch {epoch})"
                 + (f"; replaying {replayed} interrupted session(s)" if replayed else ""))
        return True

    def _set_prefix_budgets(self, workers: list):
        """A new ring: every stage starts with no kept caches; each bounds them by its own budget
        (nanopipe/prefix.py; a worker that did not say uses the leader's)."""
        ours = self.scheduler.prefix.stages[0][1]
        stages = [(len(self.stage.blocks), ours)]
        stages += [(w.layers[1] - w.layers[0], ours if w.prefix_cache_bytes is None else w.prefix_cache_bytes)
                   for w in workers]
        self.scheduler.set_prefix_stages(stages)

    def _data_conn(self, sock, peer, hello):
        """The last worker's link back to the leader: final activations arrive here."""
        last = len(self.ranges) - 1
        if hello.get("rank") != last or last == 0:
            send_frame(sock, Msg.REJECT, {"reason": f"only rank {last} sends activations to the leader"})
            self.log(f"Rejected data link from {peer}: it claims rank {hello.get('rank')!r}; only rank {last} "
                     "sends activations to the leader", WARNING)
            return
        epoch = hello.get("epoch")
        send_frame(sock, Msg.WELCOME, {})
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
        self.log(f"Worker {rank} is down: {reason}", WARNING)
        self._on_ring_break(reason)

    def _watchdog(self):
        """Notice silent workers (a cut cable sends no FIN), rebuild the ring when every worker is
        ready again, and fail what waited longer than the rejoin grace period."""
        timeout = max(3.0, 3 * self.cluster.heartbeat_s)
        while not self.stop_event.wait(0.25):
            now = time.time()
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
            self._maybe_build_ring(retry_after_s=1.0)
            self._enforce_grace(now)

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
        down = [f"{w.rank} ({w.host})" for w in self.workers.values() if w.status != "ready"]
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
                    and any(w.status == "down" for w in self.workers.values()))

    # clients ----------------------------------------------------------------------------------

    def _client_conn(self, sock, peer):
        send_frame(sock, Msg.WELCOME, {"model": self.model.name, "aliases": self.model_aliases(),
                                       "n_ctx": self.config.n_ctx})
        _send_timeout(sock, CLIENT_SEND_TIMEOUT_S)
        outbox = ClientOutbox(sock, peer, self.log, limit=self.client_queue_max)
        send = outbox.put                # every frame to this client, from any thread, goes through it
        mine: set = set()
        try:
            while True:
                frame = recv_frame(sock, f"client {peer}", max_payload=0)
                if frame.msg is Msg.GENERATE and "batch" in frame.meta:
                    self._generate_batch(frame.meta, send, mine)
                elif frame.msg is Msg.GENERATE:
                    self._generate(frame.meta, send, mine)
                elif frame.msg is Msg.CANCEL:
                    sid = frame.meta.get("session")
                    if isinstance(sid, str) and sid in mine:
                        self.scheduler.cancel(sid)
                elif frame.msg is Msg.STATUS:
                    send(Msg.STATUS, self.status())
                elif frame.msg is Msg.PING:
                    send(Msg.PONG, frame.meta)
                else:
                    send(Msg.ERROR, {"message": f"a client may not send {frame.msg.name}"})
        finally:
            outbox.close()
            for sid in list(mine):    # the client went away (or was dropped): stop its generations
                self.scheduler.cancel(sid)

    def _generate(self, meta: dict, send, mine: set):
        req_id = meta.get("request")
        try:
            prompt_ids = meta.get("prompt_ids")
            if prompt_ids is None:
                text = meta.get("prompt")
                if not isinstance(text, str) or not text:
                    raise DecodingError("prompt: give a non-empty 'prompt' string or 'prompt_ids'", field="prompt")
                prompt_ids = self._tok().encode(text)
            if not isinstance(prompt_ids, list) or not all(is_int(t) for t in prompt_ids):
                raise DecodingError("prompt_ids: must be a list of token ids", field="prompt")
            params = request_params(self.model.decoding_defaults(), **{k: meta.get(k) for k in CLIENT_FIELDS})
            top = meta.get("top_logprobs", 0) or 0
            if not is_int(top) or not 0 <= top <= 20:
                raise DecodingError("top_logprobs: must be an integer in 0..20", field="top_logprobs")
            if self.scheduler.waiting.qsize() >= 4 * self.cluster.max_sessions:
                raise DecodingError(f"busy: {self.scheduler.waiting.qsize()} requests already waiting; retry later")
        except (DecodingError, TypeError, ValueError) as e:     # TypeError: e.g. a list where a name goes
            self.metrics["errors"] += 1
            send(Msg.ERROR, {"request": req_id, "message": f"invalid request: {e}", "kind": "invalid",
                             "field": getattr(e, "field", None)})
            return
        if self._past_grace():
            self.metrics["errors"] += 1
            send(Msg.ERROR, {"request": req_id, "message": self._grace_message(), "kind": "cluster"})
            return
        want_text = meta.get("text", True) is not False
        # the stream that cuts the reply at a stop string; also the text a client is sent
        stream = self._tok().stop_stream(params.stop) if want_text or params.stop else None

        def emit(kind, data):
            if kind == "token":
                traced = {k: data[k] for k in ("hops", "head_ms", "transit_total_ms", "top") if k in data}
                send(Msg.TOKEN, {"request": req_id, "session": req.id, "token": data["id"], "logprob": data["logprob"],
                                 "text": data.get("text", "") if want_text else "", **traced})
            elif kind == "status":
                send(Msg.STATUS, {"request": req_id, "session": req.id, "text": data["text"]})
            elif kind == "done":
                mine.discard(req.id)
                if not want_text:
                    data = dict(data, text=None, tail="")
                send(Msg.DONE, dict(data, request=req_id, session=req.id))
            elif kind == "error":
                mine.discard(req.id)
                self.metrics["errors"] += 1
                send(Msg.ERROR, {"request": req_id, "session": req.id, "message": data["error"], "kind": "cluster"})

        req = Request(prompt_ids, params, emit, echo=bool(meta.get("echo")), top_logprobs=top,
                      trace=meta.get("trace") is True, stop_at_eot=meta.get("ignore_eos") is not True,
                      score_only=meta.get("score_only") is True, text=stream)
        try:
            self.scheduler.submit(req)
        except DecodingError as e:
            self.metrics["errors"] += 1
            send(Msg.ERROR, {"request": req_id, "message": str(e), "kind": "invalid", "field": e.field})
            return
        mine.add(req.id)
        self.metrics["requests"] += 1
        if not self.ring_ready.is_set():
            with self.lock:                     # never wait longer than rejoin_grace_s, even at start-up
                if self.down_since is None and not self.ring_ready.is_set():
                    self.down_since = time.time()
            down = [str(r) for r, w in self.workers.items() if w.status != "ready"]
            emit("status", {"text": f"waiting for rank {', '.join(down) or '?'} to join (at most "
                                    f"{self.cluster.rejoin_grace_s:g}s)"})

    def _generate_batch(self, meta: dict, send, mine: set):
        """One GENERATE carrying several generations: {"batch": [{"request": "r1.0", "prompt_ids": [...],
        "seed": 7}, ...], <fields shared by all>}. Each item is answered like its own GENERATE (frames
        carry its request id). They are queued while the scheduler is held, so its next step admits
        them together: prompts of one API request run as one batch, not one after another."""
        items = meta.get("batch")
        limit = 4 * self.cluster.max_sessions
        if not (isinstance(items, list) and 0 < len(items) <= limit and all(isinstance(i, dict) for i in items)):
            self.metrics["errors"] += 1
            send(Msg.ERROR, {"request": meta.get("request"), "kind": "invalid",
                             "message": f"invalid request: batch must be a list of 1..{limit} generations"})
            return
        shared = {k: v for k, v in meta.items() if k != "batch"}
        with self.scheduler.lock:           # no step starts until every item is queued
            for item in items:
                self._generate({**shared, **item}, send, mine)

    def _tok(self):
        if self.tokenizer is None:      # get_tokenizer builds one for all, however many clients ask at once
            from ..tokenizer import get_tokenizer
            self.tokenizer = get_tokenizer()
        return self.tokenizer

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
        nodes = [{"rank": 0, "host": self.cluster.leader.host, "layers": list(self.ranges[0]), "status": "up",
                  "last_seen_s": 0.0, "rss_mb": rss_mb(), "synthetic": getattr(self.stage, "synthetic", None),
                  "gemv_rows": self.scheduler.kernels.gemv_rows}]
        for r, w in self.workers.items():
            nodes.append({"rank": r, "host": w.host, "layers": list(w.layers),
                          "status": "up" if w.status == "ready" else ("joining" if w.status == "joined" else "down"),
                          "last_seen_s": round(now - w.last_seen, 3) if w.last_seen else None,
                          "rss_mb": w.stats.get("rss_mb"), "compute_ms": w.stats.get("compute_ms"),
                          "sessions": w.stats.get("sessions"), "kv_cache_bytes": w.stats.get("kv_cache_bytes"),
                          "gemv_rows": w.stats.get("gemv_rows"),
                          "addr": w.addr, "synthetic": w.synthetic})
        s = self.scheduler
        return {"model": self.model.name, "aliases": self.model_aliases(), "ready": self.ring_ready.is_set(),
                "nodes": nodes,
                "live_sessions": len(s.sessions), "waiting": s.waiting.qsize(),
                "requests": s.stats["requests"], "tokens": s.stats["tokens"], "errors": s.stats["errors"],
                "max_batches_in_flight": s.stats["max_in_flight"], "max_live_sessions": s.stats["max_live"],
                "rejected_peers": self.metrics["rejected_peers"], "bad_frames": self.metrics["bad_frames"],
                "uptime_s": round(now - self.started, 1), "n_ctx": self.config.n_ctx,
                "defaults": self.model.decoding_defaults(), "kv_cache_bytes": s.cache_bytes(),
                **self._prefix_status(),
                **self._weights_summary()}

    def _prefix_status(self) -> dict:
        """Prompt tokens reused from kept caches vs computed, and what is kept (nanopipe/prefix.py)."""
        s = self.scheduler
        return {"prompt_tokens_cached": s.stats["prompt_tokens_cached"],
                "prompt_tokens_computed": s.stats["prompt_tokens_computed"],
                "prefix_hits": s.prefix.stats["hits"], "prefix_evictions": s.prefix.stats["evictions"],
                "prefix_kept": len(s.prefix.kept), "prefix_cache_bytes": s.prefix_bytes()}


def _send_timeout(sock, seconds: float):
    """Make sends on `sock` fail after `seconds` instead of blocking forever; receives still wait."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    except (OSError, struct.error):
        pass                                # not on this platform: sends block as before
