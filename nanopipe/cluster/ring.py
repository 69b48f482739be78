"""The ring, as the leader keeps it: its two ends (`Ring`) and the part that closes it (`RingBuilder`).

Once every worker the plan placed is READY, the builder closes the ring

    rank 0 --ACT--> worker 1 --ACT--> worker 2 --ACT--> ... --ACT--> rank 0

(`build_once`: each worker re-dials its next hop for a new epoch, the last one dials the leader's
data port, `data_link`; then the leader dials worker 1). A worker that leaves or goes silent breaks
the ring (`on_break`): batches in flight are lost, generations wait up to rejoin_grace_s for the
rank to come back, and when the ring is rebuilt every session is replayed from its tokens
(Scheduler.replay_all). Past the grace period, what waited fails (`enforce_grace`).

`Ring` is the leader's two ends of it, the scheduler's ring.send()/ring.recv().
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
import traceback

import numpy as np

from ..batching import SplitLogits, SplitTop
from ..logs import shown
from .group import read_top
from .net import close_now, dial, welcome
from .node import LinkModel
from .registry import finite
from .wire import (
    Msg,
    ProtocolError,
    WireError,
    encode_frame,
    frame_array,
    recv_frame,
    send_array,
    send_frame,
    start_inference,
)

WARNING, ERROR = logging.WARNING, logging.ERROR

RING_BUILD_TIMEOUT_S = 30.0    # every worker must reach its next hop within this


class Ring:
    """The leader's two ends of the ring: it sends to worker 1 and receives from the last worker.

    A failed send marks the ring broken and reports it from another thread: the scheduler thread
    calls send() while holding its lock, and must finish its step with the ring it started with.
    """

    def __init__(self, out_sock, n_embd: int, depth: int, epoch: int, on_break, link_sleep=None,
                 source: str = "the ring", log=None, n_vocab: int = 0, max_logits_bytes: int = 0):
        """`source`: who sends the final activations back (the last rank), named when they are bad;
        `log(msg, level)`: where a bad number in a trace is reported (once per rank and field).
        `max_logits_bytes` > 0: the ring ends in a split stage that runs the LM head (group.splits_head):
        each ACT asks it for the logits of the rows the step samples from (`logits`), as long as
        they fit in that many bytes (rows x n_vocab float32); a bigger step gets its rows back."""
        self.out_sock, self.n_embd, self.depth, self.epoch = out_sock, n_embd, depth, epoch
        self.n_vocab, self.max_logits_bytes = n_vocab, max_logits_bytes
        self.logits_asked: dict = {}                 # batch id -> (the rows it asked logits of, greedy: tops)
        self.source, self.log = source, log
        self.warned: set = set()                     # (rank, field) of bad trace numbers already logged
        self.link_sleep = link_sleep                 # a simulated slower link, for benchmarks
        self.inbox: queue.Queue = queue.Queue()
        self.on_break = on_break
        self.broken = False
        self.rows_sent: dict = {}                    # batch id -> rows, to check what comes back

    def send(self, batch_id, sessions, x, logits=None, greedy=False):
        """Batch `batch_id`'s rows x (T, C) to worker 1; `logits`: the rows the step needs logits of
        (Batcher.logit_rows), asked of a last split stage that runs the head (see __init__); `greedy`:
        those rows need only their top (Batcher.greedy), which it then sends instead (Msg.TOP, 24
        bytes a row: asked whatever the rows' logits would weigh)."""
        if self.broken:
            return                                   # the batch is replayed once the ring is rebuilt
        self.rows_sent[batch_id] = len(x)
        meta = {"batch": batch_id, "epoch": self.epoch, "sessions": sessions, "trace": []}
        if logits and self.max_logits_bytes and (greedy or len(logits) * self.n_vocab * 4 <= self.max_logits_bytes):
            meta["logits"] = list(logits)
            self.logits_asked[batch_id] = (list(logits), bool(greedy))
            if greedy:
                meta["greedy"] = True
        if self.link_sleep is not None:
            self.link_sleep(x.nbytes)
        try:
            send_array(self.out_sock, Msg.ACT, meta, np.ascontiguousarray(x, np.float32))
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
        if frame.msg in (Msg.LOGITS, Msg.TOP):
            self._deliver_head(frame, peer)
        if frame.msg is Msg.ACT:
            self.logits_asked.pop(frame.meta.get("batch"), None)    # (the head's share was missing somewhere)
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

    def _deliver_head(self, frame, peer):
        """The last split stage ran the head: the logits of the rows this batch asked for, (R, V), or
        for a greedy step each row's top (TOP), and which of its hidden rows were not finite (rank 0
        fails those sessions). A TOP that answers a batch in flight but cannot be read fails that
        batch's sessions alone (SplitTop.bad); a frame that answers none closes the link. Logits
        where tops were asked are used as they are (a member that does not know TOP)."""
        batch = frame.meta.get("batch")
        rows = self.rows_sent.pop(batch, None) if isinstance(batch, int) else None
        asked, greedy = self.logits_asked.pop(batch, (None, False)) if isinstance(batch, int) else (None, False)
        bad = frame.meta.get("nonfinite", [])
        if rows is None or asked is None or frame.msg is Msg.TOP and not greedy:     # (tops asked, logits are fine)
            raise ProtocolError(f"{peer}: {frame.msg.name} for batch {batch!r} does not answer a batch in flight "
                                f"({'no' if asked is None else len(asked)} rows of "
                                f"{'tops' if greedy else 'logits'} asked)")
        if frame.msg is Msg.LOGITS:
            x = frame_array(frame, expect_cols=self.n_vocab, peer=peer)                  # (R, V)
            if x.ndim != 2 or x.dtype != np.float32 or len(x) != len(asked):
                raise ProtocolError(f"{peer}: LOGITS for batch {batch!r} with {x.dtype} {list(x.shape)} does not "
                                    f"answer a batch in flight ({len(asked)} rows of logits asked)")
            answer = SplitLogits(x, asked, bad)
        else:
            answer = self._read_top(frame, peer, asked, rows)
        if not (isinstance(bad, list) and all(isinstance(r, int) and 0 <= r < rows for r in bad)):
            raise ProtocolError(f"{peer}: {frame.msg.name} has a bad \"nonfinite\" list {bad!r}; expected rows "
                                f"0..{rows - 1}")
        trace = self._clean_trace(_checked_trace(frame.meta.get("trace"), peer))
        if trace:
            nbytes = len(encode_frame(frame.msg, frame.meta)) + len(frame.payload)
            trace[-1].update(bytes_out=nbytes, t_back=time.time())
        self.inbox.put((batch, answer, trace))

    @staticmethod
    def _read_top(frame, peer: str, asked: list, rows: int) -> SplitTop:
        """A TOP frame for a batch in flight as a SplitTop; one that cannot be read, a SplitTop that
        says why (its sessions fail; its link and the ring go on: the frame itself was well framed)."""
        try:
            top, token, lse = read_top(frame, peer, len(asked))
        except ProtocolError as e:
            zeros = np.zeros(len(asked))
            return SplitTop(zeros, zeros.astype(np.int64), zeros, asked, [], bad=str(e).removeprefix(f"{peer}: "))
        return SplitTop(top, token, lse, asked, frame.meta.get("nonfinite", []))

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


class RingBuilder:
    """Owns the ring: the epoch counter, the current `Ring` (handed to the scheduler as its
    ring.send/recv), `ready` (set while a ring is up, or when none is needed), closing it when every
    placed worker is READY, the last worker's data link back (`data_link`), what a break does
    (`on_break`), and the rejoin grace period while it is down (`down_since`, `past_grace`).

    It reads the workers from the registry (who is in the ring, their sockets, their READY) and
    changes the scheduler's ring under the scheduler's lock, so no step runs while the ring changes.
    `may_build()` is the leader's say (False while the plan waits for measurements, or the model
    could not be placed). `lock` is the leader's lock, shared with the registry.
    """

    def __init__(self, cluster, config, registry, scheduler, lock, log, *, tls_client, max_act_bytes: int,
                 may_build=lambda: True, alone: bool = False, note_event=lambda kind, rank, text: None):
        """`alone`: rank 0 holds every block, there is no ring to wait for. `note_event(kind, rank,
        text)`: the leader's event log (the ring coming up is noted there)."""
        self.cluster, self.config, self.registry, self.scheduler = cluster, config, registry, scheduler
        self.lock, self.log, self.tls_client, self.max_act_bytes = lock, log, tls_client, max_act_bytes
        self.may_build, self.note_event = may_build, note_event
        self.ring: Ring | None = None
        # ring epochs count up from a random start, so a restarted leader never reuses one that a
        # worker may still hold frames of
        self.epoch = secrets.randbelow(1 << 30)
        self.ready = threading.Event()
        self.down_since: float | None = None
        # set when the ring stayed down past rejoin_grace_s: while a rank is still down, a new request
        # fails at once with the same message instead of waiting a whole grace period again
        self.grace_over = False
        self._building = False
        self._last_build = 0.0
        self._ring_in_epoch = None
        if alone:
            self.ready.set()

    # -- closing the ring -------------------------------------------------------------------

    def maybe_build(self, retry_after_s: float = 0.0):
        """Start closing the ring if every worker is ready and no ring is up or being built."""
        ranks = self.registry.ring_ranks()
        workers = self.registry.workers
        with self.lock:
            if (self.ready.is_set() or self._building or time.time() - self._last_build < retry_after_s
                    or not self.may_build() or not ranks or any(workers[r].status != "ready" for r in ranks)):
                return
            self._building = True
        threading.Thread(target=self._build, daemon=True, name="ring-builder").start()

    @property
    def building(self) -> bool:
        """A ring build is under way (its thread is running)."""
        return self._building

    def take_down(self):
        """Close the current ring on purpose (the leader re-plans, cluster/replan.py). Call between two
        scheduler steps (Scheduler.between_steps) with the leader's lock held; build_once then closes
        the new one. Until it is up, rejoin_grace_s holds as after a break."""
        if self.ring is not None:
            self.ring.close()
        self.ring = None
        self.scheduler.ring = None
        self.ready.clear()
        if self.down_since is None:
            self.down_since = time.time()

    def no_ring_needed(self):
        """The plan gave rank 0 every block: requests run without a ring."""
        with self.lock:
            if not self.registry.ring_ranks():
                self.ready.set()

    def _build(self):
        try:
            self.build_once()
        except Exception as e:          # a bug must not end the thread unsaid; the watchdog retries
            self.log(f"Cannot close the ring: internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}",
                     ERROR)
        finally:
            with self.lock:
                self._building, self._last_build = False, time.time()

    def build_once(self) -> bool:
        """Close a new ring: each worker re-dials its next hop (the last one dials us), then we dial
        worker 1 and replay every live session. Returns False, after logging why, if it could not;
        the watchdog tries again while every worker is still ready."""
        with self.lock:
            self.epoch += 1
            epoch = self.epoch
        workers = [self.registry.workers[r] for r in self.registry.ring_ranks()]
        socks = {w.rank: w.sock for w in workers}
        for w in workers:
            try:
                with w.lock:
                    send_frame(socks[w.rank], *start_inference(epoch, w.layers))
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
        hops = [self.registry.workers[r] for r in self.registry.ring_hops()]
        first = self.cluster.node(hops[0].rank)
        try:
            sock, _, _ = dial(first.ip, first.port, role="data", rank=0, token=self.cluster.auth_token, attempts=5,
                              backoff_s=0.1, max_backoff_s=1.0, who=f"worker {first.rank}", tls=self.tls_client,
                              extra={"epoch": epoch})
        except (OSError, WireError) as e:
            self.log(f"Cannot open the ring to worker 1: {e}", WARNING)
            return False
        last = hops[-1]
        ring = Ring(sock, self.config.n_embd, depth=self.cluster.depth(), epoch=epoch, on_break=self.on_break,
                    link_sleep=LinkModel.of(self.cluster).wait, source=f"rank {last.rank} ({last.host})", log=self.log,
                    n_vocab=self.config.n_vocab,
                    max_logits_bytes=self.max_act_bytes if self.registry.splits_head() else 0)
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
            path = " -> ".join(["0"] + ["+".join(map(str, g)) for g in self.registry.stages()] + ["0"])   # 1+2: split
            # with the lock held, as status() reads them: never "ready" without the event saying so
            self.note_event("ring_up", None,
                            f"Ring {path} is up" + (f"; {replayed} session(s) replayed" if replayed else ""))
            self.ready.set()
        left = [str(r) for r, w in self.registry.workers.items() if w.excluded]
        self.log(f"All {len(workers)} worker(s) ready; ring {path} is up (epoch {epoch})"
                 + (f"; rank {', '.join(left)} left out by the plan" if left else "")
                 + (f"; replaying {replayed} interrupted session(s)" if replayed else ""))
        return True

    def _set_prefix_budgets(self, workers: list):
        """A new ring: every stage starts with no kept caches; each bounds them by its own budget
        (nanopipe/prefix.py; a worker that did not say uses the leader's). `workers`: those in the ring."""
        ours = self.scheduler.prefix.stages[0][1]
        stages = [(len(self.scheduler.stage.blocks), ours)]
        stages += [(w.layers[1] - w.layers[0], ours if w.prefix_cache_bytes is None else w.prefix_cache_bytes)
                   for w in workers]
        self.scheduler.set_prefix_stages(stages)

    def data_link(self, sock, peer, hello):
        """The last worker's link back to the leader: final activations arrive here."""
        ring = self.registry.ring_hops()
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
                if frame.msg in (Msg.ACT, Msg.LOGITS, Msg.TOP):
                    if ring is not None and frame.meta.get("epoch") == ring.epoch:
                        ring.deliver(frame, name)
                elif frame.msg is Msg.FREE:
                    pass                        # a FREE that went all the way round: every stage has freed
                elif frame.msg is Msg.ERROR:
                    self.log(f"{name}: {frame.meta.get('message')}", WARNING)
                    self.on_break(f"{name} reported: {frame.meta.get('message')}", epoch)
                else:
                    raise ProtocolError(f"{name}: unexpected {frame.msg.name} on a data link")
        finally:
            # the ring of this epoch (if it is still the current one) has lost its last hop
            self.on_break(f"{name}: the link back to the leader closed", epoch)

    # -- when it breaks -----------------------------------------------------------------------

    def on_break(self, reason: str, epoch=None):
        """The ring is down: batches in flight are lost, generations wait for it to be rebuilt
        (by maybe_build, once every worker is ready). `epoch`: only if that ring is current."""
        with self.lock:
            ring = self.ring
            if ring is None or (epoch is not None and epoch != ring.epoch):
                return                          # already down, or news about an older ring
            ring.close()                        # a scheduler step blocked sending on it wakes up,
            self.ready.clear()                  # and no new step starts: the lock below comes free
        with self.scheduler.lock, self.lock:
            if self.ring is not ring:
                return
            self.ring = None
            self.scheduler.ring = None
            self.ready.clear()
            if self.down_since is None:
                self.down_since = time.time()
            self.log(f"Ring broken: {reason}; generations wait up to {self.cluster.rejoin_grace_s:g}s for it to heal",
                     WARNING)
            self.scheduler.interrupt(f"{reason}; waiting up to {self.cluster.rejoin_grace_s:g}s for it to rejoin")

    def rank_back(self):
        """A rank registered again: new requests wait for the ring again (a new grace period)."""
        self.grace_over = False

    def waiting_since_now(self) -> bool:
        """A request was queued: if no ring is up, start the grace clock (even at start-up, no
        request waits longer than rejoin_grace_s). True if the ring is up."""
        if self.ready.is_set():
            return True
        with self.lock:
            if self.down_since is None and not self.ready.is_set():
                self.down_since = time.time()
        return False

    def enforce_grace(self, now: float):
        """Fail what has waited longer than rejoin_grace_s for the ring."""
        with self.lock:
            if self.ready.is_set():
                self.down_since, self.grace_over = None, False
            since = self.down_since
        if since is None or now - since <= self.cluster.rejoin_grace_s:
            return
        msg = self.grace_message()
        self.down_since = None                  # a request after a rank rejoins starts a new wait
        self.grace_over = True                  # until then, new requests fail at once (past_grace)
        n = len(self.scheduler.sessions) + self.scheduler.waiting.qsize()
        if n:
            self.log(f"Failing {n} request(s): {msg}", WARNING)
        self.scheduler.fail_all(msg)

    def grace_message(self) -> str:
        down = [f"{w.rank} ({w.host})" for w in self.registry.not_ready(left_out_too=False)]
        if down:
            return (f"rank {', '.join(down)} did not come back within rejoin_grace_s="
                    f"{self.cluster.rejoin_grace_s:g}s; restart it with `nanopipe join` and retry")
        return (f"the ring could not be rebuilt within rejoin_grace_s={self.cluster.rejoin_grace_s:g}s; "
                "see the leader's log")

    def past_grace(self) -> bool:
        """A rank has been down longer than rejoin_grace_s and none has come back since: a new
        request would only wait for nothing. (A rank that has registered again gets a new grace.)"""
        with self.lock:
            return self.grace_over and not self.ready.is_set() and self.registry.any_down()

    def close(self):
        """The leader stops: close our end towards worker 1."""
        ring = self.ring
        try:
            ring and ring.out_sock.close()
        except OSError:
            pass
