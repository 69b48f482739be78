"""A worker's data path: activations in from the rank before, through its blocks, out to the rank after.

    rank r-1 --ACT {sessions, epoch, trace}--> [data port] --blocks_forward--> --ACT--> rank r+1
                                                (one KV cache per session)             (or the leader)

A member of a split stage (cluster/group.py) holds part of every block: its first member forwards
each ACT and FREE to the others over member links, and every member runs its part, summing partials
with the others after each c_proj; only the first member passes the result on.

Each ACT carries the rows of several sessions; every session's rows run against its own cache. A
FREE drops caches and is passed on, so every stage frees the same ids in the same order as the ACT
frames that used them. Frames of another ring build (`epoch`) are stale and dropped: the leader
replays every live session on a new ring.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time

import numpy as np

from ..model import KVCache, blocks_forward, blocks_forward_member, head_share, share_top
from ..partition import layers_text
from ..prefix import fork_cache
from .group import GroupLinks, GroupPlace, top_meta, top_payload
from .net import HandshakeError, accept, close_now, dial, listen, serve_accepts, welcome
from .node import LinkModel
from .slices import serve_held
from .wire import (
    ConnectionClosed,
    Msg,
    ProtocolError,
    WireError,
    act_sessions,
    array_meta,
    encode_frame,
    frame_array,
    recv_frame,
    send_array,
    send_frame,
)

REPLY_STATS = ("logits_frames", "logits_bytes", "top_frames", "top_bytes")


class Downstream:
    """The link to the next rank, for the ring of one epoch: `connect(epoch)` dials it, `send` passes
    a frame on (dropped if the ring was rebuilt meanwhile), `drop` closes it."""

    def __init__(self, cluster, rank: int, tls_client):
        self.cluster, self.rank, self.tls_client = cluster, rank, tls_client
        self.addr, self.next_rank = None, 0    # where the activations go (set by DataPath.place)
        self.epoch = None               # the ring this worker is part of; frames of other rings are stale
        self.sock = None
        self.lock = threading.Lock()
        self.ready = threading.Event()

    def connect(self, epoch):
        """Dial the next rank for the ring of `epoch`."""
        host, port = self.addr
        sock, _, _ = dial(host, port, role="data", rank=self.rank, token=self.cluster.auth_token, attempts=20,
                          backoff_s=0.1, max_backoff_s=1.0, who=f"rank {self.next_rank}", tls=self.tls_client,
                          extra={"epoch": epoch})
        with self.lock:
            self.sock = sock
        self.ready.set()

    def send(self, msg, meta, array):
        """Pass a frame on; one of an older ring (its meta's epoch) is dropped, waiting or not."""
        epoch = meta.get("epoch")
        deadline = time.monotonic() + 10
        while not self.ready.wait(0.1):
            if epoch != self.epoch:
                return                  # the ring was rebuilt meanwhile: this frame is stale
            if time.monotonic() > deadline:
                raise WireError(f"worker {self.rank}: no link to rank {self.next_rank} to pass activations on")
        if array is not None:
            LinkModel.of(self.cluster).wait(array.nbytes)       # a simulated slower link, for benchmarks
        with self.lock:
            if epoch != self.epoch or self.sock is None:
                return
            if array is None:
                send_frame(self.sock, msg, meta)
            else:
                send_array(self.sock, msg, meta, array)

    def drop(self):
        self.ready.clear()
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes a sender blocked on a dead link (it holds the lock)
            except OSError:
                pass
        with self.lock:
            if self.sock is not None:
                close_now(self.sock)
            self.sock = None


class DataPath:
    """A worker's data path. Owns the data port and its upstream links, the stage's blocks as they
    run (`stage`, `config`), one KV cache per session (`caches`), the ring's epoch, the link on
    (`down`, a Downstream) and what it measured (compute_ms, frames, decode_ms: the heartbeat's figures).

    The control side (worker.Worker) tells it where it sits (`place`), when to join a ring
    (`join_ring`) and when the leader is gone (`reset`). What it cannot handle it reports back:
    `report(message, epoch)` (an upstream link of the current ring closed) and `on_port_failed(why)`
    (the data port itself failed: the worker is of no use and stops).
    """

    def __init__(self, cluster, rank: int, node, log, *, tls_server, tls_client, report, on_port_failed,
                 stopped=lambda: False):
        self.cluster, self.rank, self.node, self.log = cluster, rank, node, log
        self.tls_server, self.report, self.on_port_failed, self.stopped = tls_server, report, on_port_failed, stopped
        self.down = Downstream(cluster, rank, tls_client)
        self.stage = self.config = None
        self.next_stage = None          # a re-plan's blocks, taken up when the leader closes the new ring
        self.group: GroupLinks | None = None    # a split stage's links to the other members
        self.head_part: dict | str | None = None    # a last split stage's share of the LM head (head_step)
        self.head_s = 0.0
        self.prev_rank = rank - 1       # who sends us activations (a rank the solver left out is skipped)
        self.max_act_bytes = 0
        self.caches: dict = {}
        self.work_lock = threading.Lock()
        self.decode_ms = collections.deque(maxlen=64)   # compute time of recent one-row frames
        self.compute_ms = 0.0
        self.compute_cpu_ms = 0.0       # of compute_ms, on the CPU (the rest: waiting for other members, or preempted)
        self.frames = 0
        # the split head's answers to rank 0 (member 0): LOGITS and TOP frames, and their bytes
        self.replies = collections.Counter({k: 0 for k in REPLY_STATS})
        self.srv = None

    @property
    def epoch(self):
        return self.down.epoch

    def place(self, stage, config, *, prev_rank: int, next_addr: tuple | None, next_rank: int, max_act_bytes: int,
              group: GroupPlace | None = None, head_part: dict | str | None = None):
        """Where this stage sits: its blocks (stage), the cluster's shape, who sends to it, who it sends to;
        in a split stage its group (a later member has no next_addr: member 0 passes its rows on).
        Outside a ring (at the start) the blocks are used at once; in a running ring (the leader
        re-plans) they wait for the next join_ring, and the current ring goes on with the old ones."""
        with self.work_lock:
            self.config, self.prev_rank, self.max_act_bytes = config, prev_rank, max_act_bytes
            self.down.addr, self.down.next_rank = next_addr, next_rank    # dialed at the next join_ring
            if self.epoch is None or self.stage is None:
                self.stage, self.next_stage = stage, None
                self.caches.clear()         # a (re)started leader starts every session from scratch
            else:
                self.next_stage = stage
            if self.group is not None:
                self.group.close()
            self.group = GroupLinks(group, max_act_bytes) if group else None
            self.head_part = head_part

    def stand_by(self, prev_rank):
        """Left out by the plan: no ring, no blocks, no caches (sent once the ring runs without us)."""
        self.down.epoch = None
        self.down.drop()
        with self.work_lock:
            self.stage = self.next_stage = None
            self.prev_rank = prev_rank
            self.caches.clear()

    def join_ring(self, epoch, layers: list | None = None):
        """Join the ring of `epoch`, running `layers` [lo, hi] (None: the blocks held): take up the
        blocks a re-plan placed here if they are those, drop the old link and every cache (the leader
        replays each live session from position 0 on a new ring), then dial the next rank."""
        with self.work_lock:
            nxt = self.next_stage
            if nxt is not None and (layers is None or [nxt.lo, nxt.hi] == list(layers)):
                self.stage, self.next_stage = nxt, None
        if self.stage is None or (layers is not None and [self.stage.lo, self.stage.hi] != list(layers)):
            held = "none" if self.stage is None else layers_text(self.stage.lo, self.stage.hi)
            raise WireError(f"worker {self.rank}: the ring is built for layers {layers}, this node holds {held}")
        self.down.epoch = epoch             # from now on, frames of older rings are dropped
        self.down.drop()
        if self.group is not None:
            self.group.close()              # wakes a member blocked in an all-reduce of the old ring
        with self.work_lock:
            self.caches.clear()
        if self.down.addr is not None:      # (a later member of a split stage passes nothing on)
            self.down.connect(epoch)
        if self.group is not None:
            self._connect_group(epoch)

    def reset(self):
        """The leader is gone: no ring, no link on, no sessions (they died with that leader)."""
        self.down.epoch = None
        self.down.drop()
        if self.group is not None:
            self.group.close()
        self.caches.clear()

    def heartbeat(self) -> dict:
        """What the heartbeat reports of the data path."""
        return {"compute_ms": round(self.compute_ms, 3), "frames": self.frames, "sessions": len(self.caches),
                "decode_ms": _median(self.decode_ms), "decode_samples": len(self.decode_ms),
                "kv_cache_bytes": sum(c.nbytes for c in list(self.caches.values())),
                "compute_cpu_ms": round(self.compute_cpu_ms, 3),
                "head_ms": head_ms(self),
                **dict(self.replies),
                **({"reduce_ms": round(self.group.reduce_s * 1000, 3), "reduce_sleeps": self.group.sleeps,
                    "reduce_wait_ms": round(self.group.wait_s * 1000, 3)} if self.group is not None
                   else {"reduce_ms": None})}

    # -- the data port: upstream links in ---------------------------------------------------------

    def ensure_listening(self):
        if self.srv is not None:
            return
        host = self.cluster.bind or self.node.ip
        self.srv = listen(host, self.node.port)
        self.log(f"Listening for activations on {host}:{self.node.port}")
        threading.Thread(target=self.serve_port, daemon=True).start()

    def serve_port(self):
        """The data port's accept loop (net.serve_accepts: EMFILE and the like only pause it). If the
        port itself fails the worker is of no use to the ring: it stops, saying why."""
        try:
            serve_accepts(self.srv, self._upstream, stopped=self.stopped, log=self.log,
                          what=f"worker {self.rank}'s data port {self.node.port}")
        except Exception as e:
            self.on_port_failed(f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e))

    def close(self):
        close_now(self.srv)

    def _upstream(self, sock, addr, slot=lambda: None):
        peer = f"{addr[0]}:{addr[1]}"
        try:
            leader = self.cluster.leader
            try:
                sock, hello = accept(sock, peer=peer, tls=self.tls_server, token=self.cluster.auth_token,
                                     roles=("data", "member", "weights"),
                                     here=f"this is worker {self.rank}'s data port; the leader listens on "
                                          f"{leader.ip}:{leader.port}")
            finally:
                slot()
            if hello["role"] == "member":
                accept_member(self, sock, peer, hello)
                return
            if hello["role"] == "weights":      # a worker fetching blocks this one holds (cluster/slices.py)
                return serve_held(sock, peer, hello, (self.stage, self.next_stage), f"worker {self.rank}", self.log)
            if hello.get("rank") != self.prev_rank:
                send_frame(sock, Msg.REJECT, {"reason": f"worker {self.rank} takes activations from rank "
                                                        f"{self.prev_rank} only"})
                raise HandshakeError(f"{peer} claims rank {hello.get('rank')!r}, expected {self.prev_rank}")
            welcome(sock, hello, {"rank": self.rank})
        except (WireError, OSError, ValueError, RuntimeError) as e:
            self.log(f"Rejected data connection from {peer}: {e}", logging.WARNING)
            close_now(sock)
            return
        # Each upstream link is served on its own: a second link (a stranger on a cluster without
        # auth_token, or a link from before a ring rebuild) cannot replace or break the current one.
        name = f"rank {self.prev_rank} ({peer})"
        link_epoch = hello.get("epoch")
        try:
            while True:
                frame = recv_frame(sock, name, max_payload=self.max_act_bytes)
                with self.work_lock:
                    self.on_frame(frame, name)
        except ConnectionClosed:
            pass
        except Exception as e:      # a bad frame (WireError, ValueError), a dead next hop (OSError), a bug
            self.log(f"Closed data connection from {name}: {type(e).__name__}: {e}", logging.WARNING)
            if link_epoch is not None and link_epoch == self.epoch:
                # the current ring has lost this hop: tell the leader, which rebuilds it
                self.report(f"worker {self.rank} closed its data link from {name}: {e}", epoch=link_epoch)
        finally:
            close_now(sock)

    # -- one frame through this stage ------------------------------------------------------------

    def on_frame(self, frame, peer):
        if frame.msg is Msg.ACT:
            t_in = time.time()          # wall clock, so `nanopipe trace` can time the hop that brought it
            sessions = act_sessions(frame, peer)
            x = frame_array(frame, expect_cols=self.config.n_embd, peer=peer)          # (T, C)
            if x.dtype != np.float32 or x.ndim != 2:
                raise ProtocolError(f"{peer}: ACT must carry float32 rows (T, {self.config.n_embd}), "
                                    f"got {x.dtype} {list(x.shape)}")
            if frame.meta.get("epoch") != self.epoch:
                return                  # from a ring since rebuilt: the leader replays its sessions
            if self.group is not None:
                self.group.forward(Msg.ACT, frame.meta, frame.payload)          # the same rows to every member
            t0, cpu0 = time.perf_counter(), time.thread_time()
            reduce_s = self.group.reduce_s if self.group is not None else 0.0
            y = self.compute(frame, peer, x, sessions)                          # (T, C)
            ms = (time.perf_counter() - t0) * 1000
            self.compute_ms += ms
            self.compute_cpu_ms += (time.thread_time() - cpu0) * 1000
            self.frames += 1
            if len(x) == 1:             # one decode row: what the placement predicted this stage takes
                self.decode_ms.append(ms)
            meta = dict(frame.meta)
            head_s = self.head_s
            reply = head_step(self, frame.meta, y, peer) if self.group is not None else None     # (msg, meta, rows)
            meta["trace"] = list(meta.get("trace", [])) + [{
                "rank": self.rank, "compute_ms": round(ms, 3), "layers": [self.stage.lo, self.stage.hi],
                "bytes_in": len(encode_frame(frame.msg, frame.meta)) + len(frame.payload), "t_in": round(t_in, 6),
                # a split stage: of compute_ms, the time in its all-reduces (waiting for the other members)
                **({"reduce_ms": round((self.group.reduce_s - reduce_s) * 1000, 3)} if self.group else {}),
                **({"head_ms": round((self.head_s - head_s) * 1000, 3)} if self.head_s != head_s else {})}]
            if reply is None:
                self.down.send(Msg.ACT, meta, y)
            else:               # the LM head ran here, split by vocabulary: logits, or greedy rows' tops
                send_head_reply(self, meta, y, *reply)
        elif frame.msg is Msg.FREE:
            if frame.meta.get("epoch") != self.epoch:
                return                  # the rebuild that made the current ring dropped every cache
            if self.group is not None:
                self.group.forward(Msg.FREE, frame.meta)
            self._free(frame)
            self.down.send(Msg.FREE, frame.meta, None)
        else:
            raise ProtocolError(f"{peer}: unexpected {frame.msg.name} on a data link")

    def compute(self, frame, peer, x=None, sessions=None):
        """This stage's blocks over an ACT's rows: all of each block, or, in a split stage, our
        part of each, summed with the other members' after each c_proj (model.blocks_forward_member)."""
        if sessions is None:            # a later member: the frame member 0 forwarded, checked here too
            sessions = act_sessions(frame, peer)
            x = frame_array(frame, expect_cols=self.config.n_embd, peer=peer)      # (T, C)
            if x.dtype != np.float32 or x.ndim != 2:
                raise ProtocolError(f"{peer}: ACT must carry float32 rows, got {x.dtype} {list(x.shape)}")
            if frame.meta.get("epoch") != self.epoch:
                return None
        # the n of each sum to T
        segments = [(cache_for(self.caches, s, peer, self._new_cache), s["n"]) for s in sessions]
        if self.group is None:
            return blocks_forward(x, self.stage.blocks, n_head=self.config.n_head, segments=segments)  # (T, C)
        return blocks_forward_member(x, self.stage.blocks, n_head=self.stage.share.n_head, segments=segments,
                                     reduce=self.group.all_reduce)                                 # (T, C)

    def _free(self, frame):
        ids = frame.meta.get("sessions", [])
        for sid in ids if isinstance(ids, list) else []:
            if isinstance(sid, str):
                self.caches.pop(sid, None)

    def _new_cache(self) -> KVCache:
        """An empty cache for one session: of every head, or in a split stage of ours only."""
        share = self.stage.share
        if share is None:
            return KVCache.for_model(self.config, len(self.stage.blocks))
        return KVCache(len(self.stage.blocks), share.n_head, self.config.head_dim, self.config.n_ctx)

    # -- a split stage: the member links ---------------------------------------------------------

    def _connect_group(self, epoch):
        """Link up with the other members of our split stage for `epoch` (cluster/group.py). A later
        member then serves what member 0 forwards, on a thread of its own."""
        def dial_member(rank, ip, port):
            sock, _, _ = dial(ip, port, role="member", rank=self.rank, token=self.cluster.auth_token, attempts=20,
                              backoff_s=0.1, max_backoff_s=1.0, who=f"member rank {rank}",
                              tls=self.down.tls_client, extra={"epoch": epoch})
            return sock
        self.group.connect(epoch, dial_member)
        if not self.group.place.first:
            threading.Thread(target=self._serve_member, args=(self.group, epoch), daemon=True,
                             name=f"member-{epoch}").start()

    def _serve_member(self, group: GroupLinks, epoch):
        """A later member: compute our part of each ACT member 0 forwards (summing with the others
        after each c_proj), and drop the sessions a FREE names; until the link to member 0 closes."""
        link = group.first_link
        try:
            while True:
                frame = link.recv()
                with self.work_lock:
                    if self.epoch != epoch:
                        return
                    if frame.msg is Msg.ACT:
                        t0, cpu0 = time.perf_counter(), time.thread_time()
                        y = self.compute(frame, link.name)
                        ms = (time.perf_counter() - t0) * 1000
                        self.compute_ms += ms
                        self.compute_cpu_ms += (time.thread_time() - cpu0) * 1000
                        self.frames += 1
                        if y is not None and len(y) == 1:
                            self.decode_ms.append(ms)
                        if y is not None:
                            head_step(self, frame.meta, y, link.name)     # its share of the logits to member 0
                    elif frame.msg is Msg.FREE:
                        self._free(frame)
                    else:
                        raise ProtocolError(f"{link.name}: unexpected {frame.msg.name} from member 0")
        except ConnectionClosed:
            pass
        except Exception as e:
            if self.epoch == epoch:
                self.log(f"Closed the link from {link.name}: {type(e).__name__}: {e}", logging.WARNING)
                self.report(f"worker {self.rank} (a member of a split stage) lost {link.name}: {e}", epoch=epoch)
        finally:
            if self.epoch == epoch:
                group.close()


def accept_member(data: DataPath, sock, peer, hello):
    """A later member of `data`'s split stage dialled it for a ring epoch: keep the link for it
    (cluster/group.py); anyone else is refused and told why."""
    group = data.group
    index = group.place.index_of(hello.get("rank")) if group is not None else None
    if index is None or index <= group.place.member:
        send_frame(sock, Msg.REJECT, {"reason": f"worker {data.rank} takes member links only from the later "
                                                f"members of its split stage"})
        data.log(f"Rejected a member link from {peer}: it claims rank {hello.get('rank')!r}, not a later member "
                 f"of this split stage ({group.place.ranks if group else 'no split stage here'})", logging.WARNING)
        close_now(sock)
        return
    welcome(sock, hello, {"rank": data.rank})
    group.offer(hello.get("epoch"), index, sock, f"member {index} (rank {hello['rank']}, {peer})")


def head_step(data: DataPath, meta: dict, y: np.ndarray, peer: str) -> tuple | None:
    """A member's last step in a split stage that ends the ring and runs the LM head
    (group.place.head), after its last all-reduce: every member has the whole rows y, so each
    computes the logits of its rows of the vocabulary (model.head_share; `data.head_part`, from
    weights.load_head_share, or why it has none) for the rows rank 0 asked for (the ACT's
    `logits`), and member 0 gathers them in vocabulary order (GroupLinks.gather_logits). When rank
    0 says every such row is greedy (the ACT's `greedy`: it needs each row's token and logprob
    only), each member reduces its logits to (max, argmax, logsumexp) per row (model.share_top) and
    member 0 combines those instead (GroupLinks.gather_tops): 24 bytes a row back, not 4 V.

    Member 0 gets what it sends rank 0: (Msg.LOGITS, {}, (R, V) float32) or (Msg.TOP, {"argmax":
    [...]}, (R, 2) float64); None when rank 0 asked for none (a step too big for a frame of logits)
    or a member holds no share: member 0 then passes y on and rank 0 runs the head. The other
    members get None. The time goes to data.head_s (the heartbeat's head_ms)."""
    rows, greedy = meta.get("logits"), meta.get("greedy", False)
    if not data.group.place.head or rows is None:
        return None
    if not (isinstance(rows, list) and rows and all(isinstance(r, int) and 0 <= r < len(y) for r in rows)):
        raise ProtocolError(f"{peer}: ACT asks logits of rows {rows!r}; expected a list of its rows 0..{len(y) - 1}")
    if not isinstance(greedy, bool):
        raise ProtocolError(f"{peer}: ACT has \"greedy\": {greedy!r}; expected true or false")
    t0 = time.perf_counter()
    part = data.head_part
    share = head_share(y[rows], part["ln_f"], part["lm_head"]) if isinstance(part, dict) else None   # (R, v1-v0)
    why_not = part if isinstance(part, str) else "no share loaded"
    if greedy:
        top = data.group.gather_tops(None if share is None else share_top(share, part["vocab"][0]), why_not)
        reply = None if top is None else (Msg.TOP, top_meta(top), top_payload(top))     # (R, 2) float64
    else:
        logits = data.group.gather_logits(share, why_not)                                  # (R, V)
        reply = None if logits is None else (Msg.LOGITS, {}, logits)
    data.head_s += time.perf_counter() - t0
    return reply


def send_head_reply(data: DataPath, meta: dict, y: np.ndarray, msg: Msg, extra: dict, rows: np.ndarray):
    """Member 0: send rank 0 what head_step gathered (LOGITS or TOP, `extra` added to the ACT's
    meta) and which rows of y were not finite; count it (the heartbeat's logits_/top_ frames, bytes)."""
    meta.update(extra, nonfinite=np.flatnonzero(~np.isfinite(y).all(axis=1)).tolist())
    kind = msg.name.lower()
    data.replies[kind + "_frames"] += 1
    data.replies[kind + "_bytes"] += len(encode_frame(msg, array_meta(rows, meta))) + rows.nbytes
    data.down.send(msg, meta, rows)


def _median(xs) -> float | None:
    xs = sorted(xs)
    return round(xs[len(xs) // 2], 3) if xs else None


def cache_for(caches: dict, s: dict, peer: str, new_cache) -> KVCache:
    """The KV cache of session `s` (an ACT's {id, pos, n, fork}) in `caches`: pos 0 starts (or, on
    a replay, restarts) a session with `new_cache()`; `fork` starts it from the first n positions of
    a kept cache (nanopipe/prefix.py); later rows must continue it exactly."""
    if s["pos"] == 0:
        cache = caches[s["id"]] = new_cache()
        return cache
    fork = s.get("fork")
    if fork is not None:
        if not (isinstance(fork, dict) and isinstance(fork.get("from"), str) and fork.get("n") == s["pos"]):
            raise ProtocolError(f"{peer}: session {s['id']!r} has a bad fork {fork!r}; expected "
                                f"{{\"from\": kept id, \"n\": {s['pos']}}}")
        kept = caches.get(fork["from"])
        if kept is None or kept.length < s["pos"] or fork["from"] == s["id"]:
            have = None if kept is None else kept.length
            raise ProtocolError(f"{peer}: session {s['id']!r} forks {s['pos']} positions of {fork['from']!r}, "
                                f"which this stage holds {have} of; the ring is out of step")
        cache = caches[s["id"]] = fork_cache(kept, s["pos"])
        return cache
    cache = caches.get(s["id"])
    if cache is None or cache.length != s["pos"]:
        have = None if cache is None else cache.length
        raise ProtocolError(f"{peer}: session {s['id']!r} at position {s['pos']} but this stage's cache "
                            f"holds {have} positions; the ring is out of step")
    return cache


def head_ms(data: DataPath) -> float | None:
    """The heartbeat's head_ms: the time this member spent on its share of the LM head; None when
    it runs no share (no split stage, one that does not end the ring, or it holds none: rank 0 runs it)."""
    runs = data.group is not None and data.group.place.head and isinstance(data.head_part, dict)
    return round(data.head_s * 1000, 3) if runs else None
