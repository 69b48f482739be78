"""A worker: `nanopipe join --rank R --host NAME`.

It needs numpy, PyYAML and the standard library only (never tiktoken, flask or torch). It dials the
leader, registers its rank, is told its layer range, loads only those blocks, opens its data port,
and then, for every ACT frame from the rank before it:

    x = blocks_forward(x, my_blocks, segments=[(cache of each session, its n rows)])   # (T, C)

and sends x on to the next rank (the last worker sends it back to the leader). Each session has
its own KV cache here; a FREE frame drops it. If the leader goes away the worker dials again with
backoff, so restarting the leader heals the cluster by itself. This module is the control side;
the data side (the data port, the blocks, the caches, the link on) is cluster/data_path.py.
"""
from __future__ import annotations

import logging
import threading
import time

from ..blas import current as current_blas
from ..config import ClusterConfig
from ..kernels import KernelChoiceError, kernels
from ..logs import worker_logger
from ..model import GPTConfig
from ..partition import layers_text
from .data_path import DataPath
from .group import GroupPlace
from .net import (
    HandshakeError,
    client_tls,
    close_now,
    dial,
    max_act_bytes,
    server_tls,
)
from .node import rss_mb
from .wire import (
    ConnectionClosed,
    Msg,
    WireError,
    capacity,
    read_epoch,
    read_plan,
    read_ring_layers,
    ready,
    recv_frame,
    ring_joined,
    send_frame,
)

DRAINED_LINE = "The leader has drained this node"    # logged as it stops; the demo does not start it again
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

    This class is the control side: it dials the leader, registers, measures the node, loads the
    blocks the leader places here, sends heartbeats (STATS), and joins each ring the leader builds.
    The data side (cluster/data_path.py, `self.data`) takes ACT frames from the rank before and
    passes them, through this stage's blocks, to the rank after. `run()` dials the leader and serves
    until the process ends, redialling when the leader goes away.
    """

    def __init__(self, cluster: ClusterConfig, rank: int, weights_path: str | None, host: str | None = None,
                 n_head: int | None = None, max_attempts: int = 0, layers: tuple | None = None, fetch=None,
                 share: tuple | None = None):
        """`weights_path` None: `fetch(lo, hi)` gets the file holding blocks lo..hi-1 once the
        leader has said which (`nanopipe join --leader`: pulled from the leader's weights source).
        `share` (r, m): the configs make this rank member r of m of a split stage, so only its part
        of `layers` is loaded before dialing (never the whole blocks first)."""
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
        self.max_attempts = max_attempts or 10**9
        self.logger = worker_logger(rank)
        self.layers = layers            # the blocks (lo, hi) this rank expects: loaded before dialing
        self.share = share              # its part of them, when the configs make it a split stage's member
        self.stage = None
        self._kernels_said = False      # describe_kernels logged (once a process)
        self.control_lock = threading.Lock()
        self.control_sock = None
        self._last_welcome: dict = {}
        self.stop_event = threading.Event()
        self.fatal: str | None = None   # why the worker stopped by itself (`join` exits non-zero with it)
        self.tls_client = client_tls(cluster.tls_cert)
        self.data = DataPath(cluster, rank, node, self.log, tls_server=server_tls(cluster.tls_cert, cluster.tls_key),
                             tls_client=self.tls_client, report=self._report, on_port_failed=self.stop,
                             stopped=self.stop_event.is_set)

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
                self.stage = self._load(*self.layers, share=self.share)
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
                self.control_sock = None
                self.data.reset()           # the sessions it held died with that leader
            if self.stop_event.is_set():
                break
            self.log("Leader connection closed; reconnecting", logging.WARNING)
            time.sleep(0.5)
        if self.fatal is not None:
            raise SystemExit(2)             # stop() logged why

    def _session(self, sock):
        """One registration with the leader: learn this rank's place, load its blocks, say READY,
        then follow the leader's orders until the connection ends: a new place whenever the leader
        re-plans (a node joined, left or is gone), each ring it builds, and at last, if it drains
        this node, DRAINED."""
        welcome = dict(self._last_welcome)
        # heartbeats start before the weights load: a big slice takes longer to read than the
        # leader waits for a silent worker
        threading.Thread(target=self._heartbeat, args=(sock,), daemon=True).start()
        expect = GPTConfig(n_layer=welcome["n_layer"], n_embd=welcome["n_embd"], n_head=welcome["n_head"],
                           n_ctx=welcome["n_ctx"], n_vocab=welcome["n_vocab"])
        self._send_capacity(sock, expect)
        self.control_sock = sock
        if welcome.get("layers") is None:       # partition auto (or not set): the leader plans once all are in
            self.log("Waiting for the leader's layer plan (it measures every node first)")
        else:
            self._take_place(sock, welcome, expect)
        self._follow(sock, expect)

    def _take_place(self, sock, place: dict, expect: GPTConfig):
        """The leader says where this rank sits: its layers and the ranks either side, or that it is
        left out. At the start, and again whenever the leader re-plans the running cluster: the new
        slice loads while the current ring goes on with the old one (the data path swaps it in when
        the leader closes the new ring), then READY says it is loaded."""
        if place.get("excluded"):
            self.data.stand_by(place.get("prev_rank"))
            self.stage = None
            self.log(f"Left out of the ring by the leader's plan: {place['excluded']}. Standing by (no layers "
                     "loaded); the leader brings this node in when a re-plan gives it layers.", logging.WARNING)
            return
        lo, hi = place["layers"]
        group = GroupPlace(place["group"]) if place.get("group") else None     # a split stage's member
        self._load_place(sock, lo, hi, expect, share=(group.member, group.size) if group else None)
        head_part = load_head_part(self, group, expect) if group and group.head else None
        self.data.place(self.stage, expect, prev_rank=place.get("prev_rank", self.rank - 1),
                        next_addr=tuple(place["next"]) if place.get("next") else None,
                        next_rank=place.get("next_rank", 0),
                        max_act_bytes=max_act_bytes(expect, self.cluster.max_sessions), group=group,
                        head_part=head_part)
        self.data.ensure_listening()
        self.log(f"Registering as worker {self.rank} with server... (data port {self.node.port}, layers "
                 f"{layers_text(lo, hi)})")
        with self.control_lock:     # a share of the head it was asked to run and cannot: the leader learns why
            send_frame(sock, *ready(self.rank, self.node.port, self.stage.synthetic, [lo, hi],
                                    self.cluster.prefix_cache_bytes(),
                                    lm_head_missing=head_part if isinstance(head_part, str) else None))

    def _load_place(self, sock, lo: int, hi: int, expect: GPTConfig, share: tuple | None = None):
        """Hold blocks lo..hi-1 of the cluster's model as `self.stage`: what is held already if it is
        that, fewer of the blocks held (nothing to load), else loaded. And the kernels chosen for them.
        `share` (r, m): member r of m's part of each block (a split stage; held only if the very same).
        A slice that cannot load is told to the leader, and the worker exits."""
        shape = (expect.n_embd, expect.n_layer)

        def share_of(s):
            return s.share and (s.share.member, s.share.members)
        held = [s for s in (self.stage, self.data.stage, self.data.next_stage)
                if s is not None and (s.config.n_embd, s.config.n_layer) == shape and share_of(s) == share]
        same = [s for s in held if (s.lo, s.hi) == (lo, hi)]
        part = [s for s in held if s.holds(lo, hi)] if share is None else []
        if same:
            self.stage = same[0]
        elif part:
            self.stage = part[0].narrowed(lo, hi)       # fewer of the blocks it holds: nothing to load
            self.log(f"Keeping layers {layers_text(lo, hi)} of those it holds for the new plan")
        else:
            from ..weights import WeightsError
            try:
                self.stage = self._load(lo, hi, expect, share)
            except WeightsError as e:
                self.log(f"Cannot load layers {layers_text(lo, hi)}: {e}", logging.ERROR)
                with self.control_lock:
                    send_frame(sock, Msg.ERROR, {"message": f"worker {self.rank}: {e}"})
                raise SystemExit(2) from None
        # the kernel choice, measured once per process on the blocks it holds (kernels.choose_gemv_rows)
        from ..kernels import choose_gemv_rows, describe_kernels
        if not kernels.chosen:          # (the speed probe may have decided it already, on blocks of this shape)
            try:
                choose_gemv_rows(self.stage.blocks)
            except KernelChoiceError as e:
                self.log(str(e), logging.ERROR)
                raise SystemExit(2) from None
        if not self._kernels_said:
            self._kernels_said = True
            self.log(describe_kernels())

    def _follow(self, sock, expect: GPTConfig):
        """Follow the leader until it goes away: its PLANs (the first, or a re-plan's), each ring it
        builds (START_INFERENCE, answered by RING_JOINED), its PINGs, and DRAINED (stop)."""
        while True:
            frame = recv_frame(sock, "leader")
            if frame.msg is Msg.START_INFERENCE:
                epoch = read_epoch(frame, "leader")
                down, group = self.data.down, self.data.group
                self.log(f"Received start_inference command from server. (START_INFERENCE, ring epoch {epoch}: "
                         + (f"passing activations to rank {down.next_rank} at {down.addr[0]}:{down.addr[1]}"
                            if down.addr else f"member {group.place.member} of a split stage")
                         + (f", splitting its layers with rank(s) "
                            f"{', '.join(str(r) for r in group.place.ranks if r != self.rank)})" if group else ")"))
                try:
                    self.data.join_ring(epoch, read_ring_layers(frame))
                except (WireError, OSError) as e:
                    # not fatal: the leader sees no RING_JOINED for this epoch and tries again
                    self.log(f"Cannot join the ring (epoch {epoch}): {e}", logging.WARNING)
                    self._report(f"worker {self.rank}: cannot join the ring of epoch {epoch}: {e}")
                    continue
                with self.control_lock:
                    send_frame(sock, *ring_joined(self.rank, epoch))
                self.log("Waiting for generation requests... (from "
                         + (f"rank {self.data.prev_rank})" if down.addr else "member 0 of the split stage)"))
            elif frame.msg is Msg.PLAN:
                self._take_place(sock, read_plan(frame), expect)
            elif frame.msg is Msg.PING:
                with self.control_lock:
                    send_frame(sock, Msg.PONG, frame.meta)
            elif frame.msg is Msg.DRAINED:
                self.log(f"{DRAINED_LINE} ({frame.meta.get('reason') or 'nanopipe leave'}): the "
                         "ring runs without it now; stopping")
                self.stop()
                return
            elif frame.msg is Msg.ERROR and frame.meta.get("fatal"):
                self.log(f"The leader cannot place the model: {frame.meta.get('message')}", logging.ERROR)
                raise SystemExit(2)

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
            send_frame(sock, *capacity(self.rank, self.capacity.as_dict()))

    def _load(self, lo: int, hi: int, expect: GPTConfig | None = None, share: tuple | None = None):
        """Blocks lo..hi-1 of the weights (checked against `expect`, the cluster's shape), as a new
        StageWeights; `share` (r, m): member r of m's part of each (a split stage, model.share_of).
        The one place a worker gets a slice, at the start and at every re-plan: from its weights
        file, else `fetch(lo, hi)` (the leader, the hub, the leader's synthetic recipe)."""
        from ..weights import load_stage, synthetic_note
        n_head = self.n_head or (expect.n_head if expect is not None else None)
        path = self.weights_path or self.fetch(lo, hi)
        try:        # the first load decides the process's memory orders (kernels.choose_layout)
            stage = load_stage(path, lo, hi, rank0=False, n_head=n_head, expect=expect, share=share, choose_order=True)
        except KernelChoiceError as e:
            self.log(str(e), logging.ERROR)
            raise SystemExit(2) from None
        part = ""
        if share is not None:
            sh = stage.share
            part = (f", member {sh.member} of {sh.members}: heads {sh.heads[0]}-{sh.heads[1] - 1}, "
                    f"MLP columns {sh.hidden[0]}-{sh.hidden[1] - 1}")
        self.log(f"Loaded {hi - lo} layers for worker {self.rank} (layers {layers_text(lo, hi)}{part}, "
                 f"{stage.nbytes / 1e6:.1f} MB){synthetic_note(stage.synthetic)}")
        return stage

    def _heartbeat(self, sock):
        """Tell the leader we're alive (and how big we are) every heartbeat_s."""
        period = self._last_welcome.get("heartbeat_s", 1.0)
        while True:
            try:
                with self.control_lock:
                    send_frame(sock, Msg.STATS, {"rank": self.rank, "rss_mb": rss_mb(), **self.data.heartbeat(),
                                                 "gemv_rows": kernels.gemv_rows if kernels.chosen else None,
                                                 "blas": current_blas().summary})
            except OSError:
                return
            time.sleep(period)

    # -- stopping, and what goes wrong -------------------------------------------------------

    def stop(self, fatal: str | None = None):
        """Stop serving; with `fatal`, the reason `run` then exits with (logged here)."""
        if fatal is not None:
            self.fatal = fatal
            self.log(f"Stopping: {fatal}", logging.ERROR)
        self.stop_event.set()
        close_now(self.control_sock)            # wakes run(), which sees stop_event and returns
        self.data.close()

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


def load_head_part(worker: Worker, group: GroupPlace, expect: GPTConfig):
    """The ring's last split stage runs the LM head: this member's rows of the vocabulary
    (model.vocab_share) and ln_f, read from its weights file (weights.load_head_share), kept across
    re-plans that give it the same rows, in the head's memory order, decided the first time this
    process holds a head (kernels.choose_head_order: a worker that started plain has not yet). A
    worker whose file holds no head (it fetched or was given a slice of blocks) gets why, as a
    string: its READY tells the leader, which then asks the stage for no logits and runs the head
    on rank 0, as with split_lm_head: false."""
    from ..model import vocab_share
    from ..weights import WeightsError, load_head_share
    vocab = vocab_share(group.member, group.size, expect.n_vocab)
    held = worker.data.head_part
    if isinstance(held, dict) and held["vocab"] == vocab:
        return held
    why = no_head_in(worker.weights_path)
    if why is None:
        try:
            head_order(worker, expect)
            part = load_head_share(worker.weights_path, vocab, worker.n_head or expect.n_head, expect)
            worker.log(f"Loaded the LM head's rows {vocab[0]}-{vocab[1] - 1} of {expect.n_vocab} for worker "
                       f"{worker.rank} ({part['lm_head'].nbytes / 1e6:.1f} MB, kept "
                       f"{'row-major (C)' if part['lm_head'].flags.c_contiguous else 'column-major (F)'}): the "
                       "split stage runs the head")
            return part
        except (WeightsError, KernelChoiceError, OSError) as e:
            why = str(e)
    worker.log(f"Cannot run a share of the LM head ({why}); rank 0 runs the head", logging.WARNING)
    return why


def no_head_in(path: str | None) -> str | None:
    """Why the weights file at `path` cannot give this worker a share of the LM head, if it plainly
    cannot: none (it fetched its blocks), or one of blocks only (`nanopipe pull --layers`), with
    neither wte nor lm_head. None: it has a head to read (load_head_share checks the rest)."""
    if path is None:
        return "it fetched a slice of blocks, which holds no LM head (no wte)"
    from ..gpt2_tensors import base_name
    from ..safetensors_io import SafetensorsError, read_header
    try:
        names = {base_name(n) for n in read_header(path).tensors}
    except (OSError, SafetensorsError) as e:
        return f"cannot read {path}: {e}"
    if not names & {"wte.weight", "lm_head.weight"}:
        return f"its weights file {path} has no wte: it holds blocks only (as `nanopipe pull --layers` writes)"
    return None


def head_order(worker: Worker, expect: GPTConfig):
    """The LM head's memory order, decided before this process's first share of the head loads
    (kernels.choose_head_order); said in the log as the start says the kernels, when it is new."""
    from ..kernels import choose_head_order, describe_kernels
    if kernels.head_order_how is None:
        choose_head_order(expect.n_embd, expect.n_vocab)
        worker.log(describe_kernels())
