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
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .net import close_now, dial
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

WARNING = logging.WARNING

RING_BUILD_TIMEOUT_S = 30.0    # every worker must reach its next hop within this


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


class Membership:
    """The Leader's part that owns the workers and the ring: registration, READY, heartbeats, ring
    build and rebuild, the watchdog and the rejoin grace period.

    It uses what Leader.__init__ sets: cluster, config, ranges, workers ({rank: WorkerState}),
    scheduler, ring, epoch, lock, ring_ready, down_since, grace_over, stop_event, tls_client,
    max_act_bytes, _building, _last_build, _ring_in_epoch, log; and Leader._weights_summary().
    """

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
                    link_sleep=LinkModel.of(self.cluster).wait)
        with self.scheduler.lock, self.lock:     # no scheduler step runs while the ring changes
            if epoch != self.epoch or any(w.status != "ready" for w in workers):
                ring.close()
                return False
            self.ring = ring
            self.scheduler.ring = ring
            replayed = self.scheduler.replay_all()
            self.down_since = None
            self.grace_over = False
            self.ring_ready.set()
        path = " -> ".join(["0"] + [str(r) for r in self.workers] + ["0"])
        self.log(f"All {len(self.workers)} worker(s) ready; ring {path} is up (epoch {epoch})"
                 + (f"; replaying {replayed} interrupted session(s)" if replayed else ""))
        return True

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
