"""A worker: `nanopipe join --rank R --host NAME`.

It needs numpy, PyYAML and the standard library only (never tiktoken, flask or torch). It dials the
leader, registers its rank, is told its layer range, loads only those blocks, opens its data port,
and then, for every ACT frame from the rank before it:

    x = blocks_forward(x, my_blocks, segments=[(cache of each session, its n rows)])   # (T, C)

and sends x on to the next rank (the last worker sends it back to the leader). Each session has
its own KV cache here; a FREE frame drops it. If the leader goes away the worker dials again with
backoff, so restarting the leader heals the cluster by itself.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time

import numpy as np

from ..blas import current as current_blas
from ..config import ClusterConfig
from ..kernels import kernels
from ..logs import worker_logger
from ..model import GPTConfig, KVCache, blocks_forward, blocks_forward_member
from ..partition import layers_text
from ..prefix import fork_cache
from .group import GroupLinks, GroupPlace
from .net import (
    HandshakeError,
    accept,
    client_tls,
    close_now,
    dial,
    listen,
    max_act_bytes,
    serve_accepts,
    server_tls,
    welcome,
)
from .node import LinkModel, rss_mb
from .wire import (
    ConnectionClosed,
    Msg,
    ProtocolError,
    WireError,
    act_sessions,
    encode_frame,
    frame_array,
    recv_frame,
    send_array,
    send_frame,
)

HINT_AFTER_ATTEMPTS = 3      # failed dials to the leader before the worker asks whether it is running


def retry_log(log, addr: str, hint_after: int = HINT_AFTER_ATTEMPTS):
    """dial()'s `log` for a worker waiting for its leader: the retries go to the debug log (-v), and
    once, after `hint_after` failures, one warning says what is probably wrong:

        Connection to 10.0.0.1:65432 failed (Connection refused); ... Is the leader (`nanopipe serve
        --rank 0`) running at 10.0.0.1:65432? Still retrying.
    """
    failures = 0

    def on_retry(msg: str):
        nonlocal failures
        failures += 1
        if failures == hint_after:
            log(f"{msg}. Is the leader (`nanopipe serve --rank 0`) running at {addr}? Still retrying.",
                logging.WARNING)
        else:
            log(msg, logging.DEBUG)
    return on_retry


class Worker:
    """Rank R >= 1 of a cluster: blocks[lo:hi] of the model, one KV cache per live session, two links.

    The control link to the leader carries registration, heartbeats (STATS) and ring rebuilds; the
    data links take ACT frames from the rank before and pass them, through this stage's blocks, to
    the rank after. `run()` dials the leader and serves until the process ends, redialling when
    the leader goes away.
    """

    def __init__(self, cluster: ClusterConfig, rank: int, weights_path: str | None, host: str | None = None,
                 n_head: int | None = None, max_attempts: int = 0, layers: tuple | None = None, fetch=None):
        """`weights_path` None: `fetch(lo, hi)` gets the file holding blocks lo..hi-1 once the
        leader has said which (`nanopipe join --leader`: pulled from the leader's weights source)."""
        if rank < 1:
            raise ValueError("workers have rank >= 1; rank 0 is the leader (`nanopipe serve --rank 0`)")
        node = cluster.node(rank)
        if host is not None and host != node.host:
            from ..config import ConfigError
            if host not in {n.host for n in cluster.nodes}:
                raise ConfigError(f"{cluster.path}: host '{host}' is not in host_ip/workers "
                                  f"(known: {', '.join(n.host for n in cluster.nodes)})")
            raise ConfigError(f"{cluster.path}: rank {rank} runs on host '{node.host}', not '{host}'; "
                              f"check 'workers' or pass --host {node.host}")
        self.cluster, self.rank, self.node = cluster, rank, node
        self.weights_path, self.n_head, self.fetch = weights_path, n_head, fetch
        self.capacity = None            # placement.Capacity, measured once the model's shape is known
        self.prev_rank = rank - 1       # who sends us activations (a rank the solver left out is skipped)
        self.decode_ms = collections.deque(maxlen=64)   # compute time of recent one-row frames
        self.max_attempts = max_attempts or 10**9
        self.tag = f"[WORKER-{rank}]"
        self.logger = worker_logger(rank)
        self.layers = layers            # the blocks (lo, hi) this rank expects: loaded before dialing
        self.stage = None
        self.group: GroupLinks | None = None    # a split stage's links to the other members (cluster/group.py)
        self.caches: dict = {}
        self.down_sock = None
        self.down_lock = threading.Lock()
        self.down_ready = threading.Event()
        self.work_lock = threading.Lock()
        self.control_lock = threading.Lock()
        self.control_sock = None
        self.epoch = None               # the ring this worker is part of; frames of other rings are stale
        self._last_welcome: dict = {}
        self.compute_ms = 0.0
        self.frames = 0
        self.stop_event = threading.Event()
        self.fatal: str | None = None   # why the worker stopped by itself (`join` exits non-zero with it)
        self.srv = None
        self.tls_server = server_tls(cluster.tls_cert, cluster.tls_key)
        self.tls_client = client_tls(cluster.tls_cert)

    def log(self, msg: str, level: int = logging.INFO):
        """One line of this worker's log: `[WORKER-R] msg` (nanopipe/logs.py)."""
        self.logger.log(level, msg)

    # -- the control connection to the leader ------------------------------------------------

    def run(self):
        """Register with the leader and serve until stopped; re-register if the leader goes away."""
        leader = self.cluster.leader
        if self.layers is not None and self.stage is None:
            # the guide's order: load, then connect. The leader's welcome has the last word on the
            # range; _session reloads (and reports a failure to the leader) if it differs.
            from ..weights import WeightsError
            try:
                self._load(*self.layers)
            except WeightsError as e:
                self.log(f"Cannot load layers {layers_text(*self.layers)} yet: {e}", logging.WARNING)
        while not self.stop_event.is_set():
            try:
                sock, attempt, self._last_welcome = dial(leader.ip, leader.port, role="worker", rank=self.rank,
                                     token=self.cluster.auth_token, attempts=self.max_attempts,
                                     log=retry_log(self.log, f"{leader.ip}:{leader.port}"),
                                     who="server", tls=self.tls_client, extra={"host": self.node.host})
            except HandshakeError as e:
                self.log(f"Registration refused: {e}", logging.ERROR)
                raise SystemExit(2) from None
            except OSError as e:
                self.log(str(e), logging.ERROR)
                raise SystemExit(1) from None
            self.log(f"Connected to server at {leader.ip}:{leader.port} on attempt {attempt}")
            try:
                self._session(sock)
            except (WireError, OSError) as e:
                if not isinstance(e, ConnectionClosed) and not self.stop_event.is_set():
                    self.log(f"Lost the leader: {e}", logging.WARNING)
            except (KeyError, TypeError, ValueError) as e:     # a WELCOME or plan missing a field, or of a wrong type
                self.log(f"The leader at {leader.ip}:{leader.port} sent what this worker cannot use "
                         f"({type(e).__name__}: {e}); is it the same nanopipe version?", logging.ERROR)
                raise SystemExit(2) from None
            finally:
                sock.close()
                self.control_sock = self.epoch = None
                self._drop_downstream()
                if self.group is not None:
                    self.group.close()
                self.caches.clear()         # the sessions they hold died with that leader
            if self.stop_event.is_set():
                break
            self.log("Leader connection closed; reconnecting", logging.WARNING)
            time.sleep(0.5)
        if self.fatal is not None:
            raise SystemExit(2)             # stop() logged why

    def _session(self, sock):
        welcome = dict(self._last_welcome)
        # heartbeats start before the weights load: a big slice takes longer to read than the
        # leader waits for a silent worker
        threading.Thread(target=self._heartbeat, args=(sock,), daemon=True).start()
        expect = GPTConfig(n_layer=welcome["n_layer"], n_embd=welcome["n_embd"], n_head=welcome["n_head"],
                           n_ctx=welcome["n_ctx"], n_vocab=welcome["n_vocab"])
        self._send_capacity(sock, expect)
        if welcome.get("layers") is None:       # partition auto (or not set): the leader plans once all are in
            self.log("Waiting for the leader's layer plan (it measures every node first)")
            welcome.update(self._wait_plan(sock))
        self.prev_rank = welcome.get("prev_rank", self.rank - 1)
        if welcome.get("excluded"):
            self.log(f"Left out of the ring by the leader's plan: {welcome['excluded']}. Standing by "
                     "(no layers loaded); restart the leader to re-plan.", logging.WARNING)
            self._stand_by(sock)
            return
        lo, hi = welcome["layers"]
        place = GroupPlace(welcome["group"]) if welcome.get("group") else None
        share = (place.member, place.size) if place else None
        have = self.stage and (self.stage.lo, self.stage.hi, self.stage.config.n_embd, self.stage.config.n_layer,
                               self.stage.share and (self.stage.share.member, self.stage.share.members))
        if have != (lo, hi, expect.n_embd, expect.n_layer, share):
            from ..weights import WeightsError
            try:
                self._load(lo, hi, expect, share=share)
            except WeightsError as e:
                self.log(f"Cannot load layers {layers_text(lo, hi)}: {e}", logging.ERROR)
                with self.control_lock:
                    send_frame(sock, Msg.ERROR, {"message": f"worker {self.rank}: {e}"})
                raise SystemExit(2) from None
        # the kernel choice, measured once per process on the blocks it holds (kernels.choose_gemv_rows)
        from ..kernels import KernelChoiceError, choose_gemv_rows, describe_kernels
        if not kernels.chosen:          # (the speed probe may have decided it already, on blocks of this shape)
            try:
                choose_gemv_rows(self.stage.blocks)
            except KernelChoiceError as e:
                self.log(str(e), logging.ERROR)
                raise SystemExit(2) from None
        self.log(describe_kernels())
        self.config = expect
        self.next_addr = tuple(welcome["next"]) if welcome.get("next") else None   # None: a later member
        self.next_rank = welcome.get("next_rank", 0)
        self.caches.clear()                 # a (re)started leader starts every session from scratch
        self.max_act_bytes = max_act_bytes(expect, self.cluster.max_sessions)
        if self.group is not None:
            self.group.close()
        self.group = GroupLinks(place, self.max_act_bytes) if place else None
        self.control_sock = sock
        self._ensure_listening()
        self.log(f"Registering as worker {self.rank} with server... (data port {self.node.port})")
        with self.control_lock:
            send_frame(sock, Msg.READY, {"rank": self.rank, "data_port": self.node.port,
                                         "synthetic": self.stage.synthetic, "layers": [lo, hi],
                                         "prefix_cache_bytes": self.cluster.prefix_cache_bytes()})
        while True:
            frame = recv_frame(sock, "leader")
            if frame.msg is Msg.STATUS and frame.meta.get("ring") == "connect":
                epoch = frame.meta.get("epoch")
                self.log(f"Received start_inference command from server. (ring epoch {epoch}: "
                         + (f"passing activations to rank {self.next_rank} at {self.next_addr[0]}:{self.next_addr[1]}"
                            if self.next_addr else f"member {self.group.place.member} of a split stage")
                         + (f", splitting layers {layers_text(lo, hi)} with ranks "
                            f"{', '.join(str(r) for r in self.group.place.ranks if r != self.rank)})"
                            if self.group else ")"))
                try:
                    self._connect_downstream(epoch)
                    if self.group is not None:
                        self._connect_group(epoch)
                except (WireError, OSError) as e:
                    # not fatal: the leader sees no READY for this epoch and tries again
                    self.log(f"Cannot join the ring (epoch {epoch}): {e}", logging.WARNING)
                    self._report(f"worker {self.rank}: cannot join the ring of epoch {epoch}: {e}")
                    continue
                with self.control_lock:
                    send_frame(sock, Msg.READY, {"rank": self.rank, "epoch": epoch})
                self.log("Waiting for generation requests... (from "
                         + (f"rank {self.prev_rank})" if self.next_addr else "member 0 of the split stage)"))
            elif frame.msg is Msg.PING:
                with self.control_lock:
                    send_frame(sock, Msg.PONG, frame.meta)

    def _send_capacity(self, sock, expect: GPTConfig):
        """Measure this node once (placement.measure: speed with the model's own matrix shapes, usable
        memory) and tell the leader, which places the layers with it (partition auto)."""
        if self.capacity is None:
            from ..placement import measure_node
            # self.stage: loaded already (the guide's order), that memory is the model's too
            self.capacity = measure_node(self.node.host, expect, self.logger,
                                         override=self.cluster.node_overrides.get(self.node.host),
                                         holding=self.stage)
        with self.control_lock:
            send_frame(sock, Msg.STATS, {"rank": self.rank, "capacity": self.capacity.as_dict()})

    def _wait_plan(self, sock) -> dict:
        """The leader's STATUS {"plan": {...}}: this rank's layers, next hop, and whether it is left out."""
        while True:
            frame = recv_frame(sock, "leader")
            if frame.msg is Msg.STATUS and isinstance(frame.meta.get("plan"), dict):
                plan = frame.meta["plan"]
                layers = plan.get("layers")
                if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(v, int) for v in layers)):
                    raise ProtocolError(f"leader: a plan without a valid layer range: {plan!r}")
                return plan
            if frame.msg is Msg.PING:
                with self.control_lock:
                    send_frame(sock, Msg.PONG, frame.meta)
            elif frame.msg is Msg.ERROR and frame.meta.get("fatal"):
                self.log(f"The leader cannot place the model: {frame.meta.get('message')}", logging.ERROR)
                raise SystemExit(2)

    def _stand_by(self, sock):
        """Left out: stay registered (heartbeats, PONGs) holding nothing, until the leader goes away."""
        self.stage = None
        while True:
            frame = recv_frame(sock, "leader")
            if frame.msg is Msg.PING:
                with self.control_lock:
                    send_frame(sock, Msg.PONG, frame.meta)

    def _load(self, lo: int, hi: int, expect: GPTConfig | None = None, share: tuple | None = None):
        """Load blocks lo..hi-1 of the weights file (checked against `expect`, the cluster's shape);
        `share` (r, m): member r of m's part of each (a split stage, model.share_of)."""
        from ..weights import load_stage
        n_head = self.n_head or (expect.n_head if expect is not None else None)
        path = self.weights_path or self.fetch(lo, hi)
        self.stage = load_stage(path, lo, hi, rank0=False, n_head=n_head, expect=expect, share=share)
        from ..weights import synthetic_note
        part = ""
        if share is not None:
            sh = self.stage.share
            part = (f", member {sh.member} of {sh.members}: heads {sh.heads[0]}-{sh.heads[1] - 1}, "
                    f"MLP columns {sh.hidden[0]}-{sh.hidden[1] - 1}")
        self.log(f"Loaded {hi - lo} layers for worker {self.rank} (layers {layers_text(lo, hi)}{part}, "
                 f"{self.stage.nbytes / 1e6:.1f} MB){synthetic_note(self.stage.synthetic)}")

    def _heartbeat(self, sock):
        """Tell the leader we're alive (and how big we are) every heartbeat_s."""
        period = self._last_welcome.get("heartbeat_s", 1.0)
        while True:
            try:
                with self.control_lock:
                    send_frame(sock, Msg.STATS, {"rank": self.rank, "rss_mb": rss_mb(),
                                                 "compute_ms": round(self.compute_ms, 3), "frames": self.frames,
                                                 "sessions": len(self.caches),
                                                 "gemv_rows": kernels.gemv_rows if kernels.chosen else None,
                                                 "decode_ms": _median(self.decode_ms),
                                                 "decode_samples": len(self.decode_ms),
                                                 "reduce_ms": (round(self.group.reduce_s * 1000, 3)
                                                               if self.group is not None else None),
                                                 "kv_cache_bytes": sum(c.nbytes for c in list(self.caches.values())),
                                                 "blas": current_blas().summary})
            except OSError:
                return
            time.sleep(period)

    # -- the data links: upstream in, downstream out -----------------------------------------

    def _ensure_listening(self):
        if self.srv is not None:
            return
        host = self.cluster.bind or self.node.ip
        self.srv = listen(host, self.node.port)
        self.log(f"Listening for activations on {host}:{self.node.port}")
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        """The data port's accept loop (net.serve_accepts: EMFILE and the like only pause it). If the
        port itself fails the worker is of no use to the ring: it stops, saying why (`fatal`)."""
        try:
            serve_accepts(self.srv, self._upstream, stopped=self.stop_event.is_set, log=self.log,
                          what=f"worker {self.rank}'s data port {self.node.port}")
        except Exception as e:
            self.stop(f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e))

    def stop(self, fatal: str | None = None):
        """Stop serving; with `fatal`, the reason `run` then exits with (logged here)."""
        if fatal is not None:
            self.fatal = fatal
            self.log(f"Stopping: {fatal}", logging.ERROR)
        self.stop_event.set()
        close_now(self.control_sock)            # wakes run(), which sees stop_event and returns
        close_now(self.srv)

    def _upstream(self, sock, addr, slot=lambda: None):
        peer = f"{addr[0]}:{addr[1]}"
        try:
            leader = self.cluster.leader
            try:
                sock, hello = accept(sock, peer=peer, tls=self.tls_server, token=self.cluster.auth_token,
                                     roles=("data", "member"), here=f"this is worker {self.rank}'s data port; the "
                                                                     f"leader listens on {leader.ip}:{leader.port}")
            finally:
                slot()
            if hello["role"] == "member":
                self._member_conn(sock, peer, hello)
                return
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
                    self._on_frame(frame, name)
        except ConnectionClosed:
            pass
        except Exception as e:      # a bad frame (WireError, ValueError), a dead next hop (OSError), a bug
            self.log(f"Closed data connection from {name}: {type(e).__name__}: {e}", logging.WARNING)
            if link_epoch is not None and link_epoch == self.epoch:
                # the current ring has lost this hop: tell the leader, which rebuilds it
                self._report(f"worker {self.rank} closed its data link from {name}: {e}", epoch=link_epoch)
        finally:
            close_now(sock)

    def _member_conn(self, sock, peer, hello):
        """A later member of our split stage dialled us for a ring epoch: keep the link for it."""
        group = self.group
        index = group.place.index_of(hello.get("rank")) if group is not None else None
        if index is None or index <= group.place.member:
            send_frame(sock, Msg.REJECT, {"reason": f"worker {self.rank} takes member links only from the later "
                                                    f"members of its split stage"})
            raise HandshakeError(f"{peer} claims to be member rank {hello.get('rank')!r} of this split stage; "
                                 f"it is not a later member ({group.place.ranks if group else 'no group here'})")
        welcome(sock, hello, {"rank": self.rank})
        group.offer(hello.get("epoch"), index, sock, f"member {index} (rank {hello['rank']}, {peer})")

    def _connect_group(self, epoch):
        """Link up with the other members of our split stage for `epoch` (cluster/group.py). A later
        member then serves what member 0 forwards, on a thread of its own."""
        def dial_member(rank, ip, port):
            sock, _, _ = dial(ip, port, role="member", rank=self.rank, token=self.cluster.auth_token, attempts=20,
                              backoff_s=0.1, max_backoff_s=1.0, who=f"member rank {rank}", tls=self.tls_client,
                              extra={"epoch": epoch})
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
                        t0 = time.perf_counter()
                        y = self._compute(frame, link.name)
                        ms = (time.perf_counter() - t0) * 1000
                        self.compute_ms += ms
                        self.frames += 1
                        if y is not None and len(y) == 1:
                            self.decode_ms.append(ms)
                    elif frame.msg is Msg.FREE:
                        self._free(frame)
                    else:
                        raise ProtocolError(f"{link.name}: unexpected {frame.msg.name} from member 0")
        except ConnectionClosed:
            pass
        except Exception as e:
            if self.epoch == epoch:
                self.log(f"Closed the link from {link.name}: {type(e).__name__}: {e}", logging.WARNING)
                self._report(f"worker {self.rank} (a member of a split stage) lost {link.name}: {e}", epoch=epoch)
        finally:
            if self.epoch == epoch:
                group.close()

    def _report(self, message: str, epoch=None):
        """An ERROR to the leader on the control link; with `epoch`, that ring is broken."""
        sock = self.control_sock
        if sock is None:
            return
        try:
            with self.control_lock:
                send_frame(sock, Msg.ERROR, {"message": message, "epoch": epoch})
        except OSError:
            pass

    def _on_frame(self, frame, peer):
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
            t0 = time.perf_counter()
            reduce_s = self.group.reduce_s if self.group is not None else 0.0
            y = self._compute(frame, peer, x, sessions)                        # (T, C)
            ms = (time.perf_counter() - t0) * 1000
            self.compute_ms += ms
            self.frames += 1
            if len(x) == 1:             # one decode row: what the placement predicted this stage takes
                self.decode_ms.append(ms)
            meta = dict(frame.meta)
            meta["trace"] = list(meta.get("trace", [])) + [{
                "rank": self.rank, "compute_ms": round(ms, 3), "layers": [self.stage.lo, self.stage.hi],
                "bytes_in": len(encode_frame(frame.msg, frame.meta)) + len(frame.payload), "t_in": round(t_in, 6),
                # a split stage: of compute_ms, the time in its all-reduces (waiting for the other members)
                **({"reduce_ms": round((self.group.reduce_s - reduce_s) * 1000, 3)} if self.group else {})}]
            self._send_down(Msg.ACT, meta, y)                                  # (T, C) to the next rank
        elif frame.msg is Msg.FREE:
            if frame.meta.get("epoch") != self.epoch:
                return                  # the rebuild that made the current ring dropped every cache
            if self.group is not None:
                self.group.forward(Msg.FREE, frame.meta)
            self._free(frame)
            self._send_down(Msg.FREE, frame.meta, None)
        else:
            raise ProtocolError(f"{peer}: unexpected {frame.msg.name} on a data link")

    def _compute(self, frame, peer, x=None, sessions=None):
        """This stage's blocks over an ACT's rows: all of each block, or, in a split stage, our
        part of each, summed with the other members' after each c_proj (model.blocks_forward_member)."""
        if sessions is None:            # a later member: the frame member 0 forwarded, checked here too
            sessions = act_sessions(frame, peer)
            x = frame_array(frame, expect_cols=self.config.n_embd, peer=peer)      # (T, C)
            if x.dtype != np.float32 or x.ndim != 2:
                raise ProtocolError(f"{peer}: ACT must carry float32 rows, got {x.dtype} {list(x.shape)}")
            if frame.meta.get("epoch") != self.epoch:
                return None
        segments = [(self._cache_for(s, peer), s["n"]) for s in sessions]      # the n of each sum to T
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

    def _cache_for(self, s: dict, peer: str) -> KVCache:
        """pos 0 starts (or, on a replay, restarts) a session; `fork` starts it from the first n
        positions of a kept cache (nanopipe/prefix.py); later rows must continue it exactly."""
        if s["pos"] == 0:
            cache = self.caches[s["id"]] = self._new_cache()
            return cache
        fork = s.get("fork")
        if fork is not None:
            if not (isinstance(fork, dict) and isinstance(fork.get("from"), str) and fork.get("n") == s["pos"]):
                raise ProtocolError(f"{peer}: session {s['id']!r} has a bad fork {fork!r}; expected "
                                    f"{{\"from\": kept id, \"n\": {s['pos']}}}")
            kept = self.caches.get(fork["from"])
            if kept is None or kept.length < s["pos"] or fork["from"] == s["id"]:
                have = None if kept is None else kept.length
                raise ProtocolError(f"{peer}: session {s['id']!r} forks {s['pos']} positions of {fork['from']!r}, "
                                    f"which this stage holds {have} of; the ring is out of step")
            cache = self.caches[s["id"]] = fork_cache(kept, s["pos"])
            return cache
        cache = self.caches.get(s["id"])
        if cache is None or cache.length != s["pos"]:
            have = None if cache is None else cache.length
            raise ProtocolError(f"{peer}: session {s['id']!r} at position {s['pos']} but this stage's cache "
                                f"holds {have} positions; the ring is out of step")
        return cache

    def _send_down(self, msg, meta, array):
        epoch = meta.get("epoch")
        deadline = time.monotonic() + 10
        while not self.down_ready.wait(0.1):
            if epoch != self.epoch:
                return                  # the ring was rebuilt meanwhile: this frame is stale
            if time.monotonic() > deadline:
                raise WireError(f"worker {self.rank}: no link to rank {self.next_rank} to pass activations on")
        if array is not None:
            LinkModel.of(self.cluster).wait(array.nbytes)       # a simulated slower link, for benchmarks
        with self.down_lock:
            if epoch != self.epoch or self.down_sock is None:
                return
            if array is None:
                send_frame(self.down_sock, msg, meta)
            else:
                send_array(self.down_sock, msg, meta, array)

    def _connect_downstream(self, epoch):
        """Join the ring of `epoch`: drop the old link and every cache (the leader replays each live
        session from position 0 on a new ring), then dial the next rank."""
        self.epoch = epoch              # from now on, frames of older rings are dropped
        self._drop_downstream()
        if self.group is not None:
            self.group.close()          # wakes a member blocked in an all-reduce of the old ring
        with self.work_lock:
            self.caches.clear()
        if self.next_addr is None:
            return                      # a later member of a split stage: member 0 passes our rows on
        host, port = self.next_addr
        sock, _, _ = dial(host, port, role="data", rank=self.rank, token=self.cluster.auth_token, attempts=20,
                          backoff_s=0.1, max_backoff_s=1.0, who=f"rank {self.next_rank}", tls=self.tls_client,
                          extra={"epoch": epoch})
        with self.down_lock:
            self.down_sock = sock
        self.down_ready.set()

    def _drop_downstream(self):
        self.down_ready.clear()
        sock = self.down_sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes a sender blocked on a dead link (it holds down_lock)
            except OSError:
                pass
        with self.down_lock:
            if self.down_sock is not None:
                close_now(self.down_sock)
            self.down_sock = None


def _median(xs) -> float | None:
    xs = sorted(xs)
    return round(xs[len(xs) // 2], 3) if xs else None
