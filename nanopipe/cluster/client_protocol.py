"""The leader's client protocol: one connection per client, GENERATE in, TOKEN / STATUS / DONE out.

    client --GENERATE {"prompt_ids": [15496], "max_tokens": 5, ...}-->  leader
    client <--TOKEN {"request", "session", "token": 995, "text": " world"} ...  DONE {stats}
    (also GENERATE_BATCH, CANCEL {"session"}, STATE_REQUEST -> STATE: the cluster's state, PING -> PONG)

A GENERATE is checked once (sampling_params.request_params: a bad field is an ERROR naming it, kind
"invalid") and becomes an engine.Request; a GENERATE_BATCH queues several at once so they
run as one scheduler batch. While more than QUEUE_PER_SESSION x max_sessions requests wait, a new
one is refused with kind "busy" and "retry_after_s" (the web app answers 429 with Retry-After).
Frames to a client go through its ClientOutbox, so a client that stops reading never stalls the
scheduler.
"""
from __future__ import annotations

import collections
import logging
import socket
import struct
import threading

from ..engine import Request
from ..sampling_params import FIELDS, DecodingError, is_int, request_params
from .net import close_now, welcome
from .wire import Msg, ProtocolError, WireError, recv_frame, send_frame, state, status_text

WARNING = logging.WARNING

# the sampling fields a GENERATE may carry (absent: the model's defaults; see sampling_params.request_params)
CLIENT_FIELDS = ("strategy",) + FIELDS
CLIENT_SEND_TIMEOUT_S = 10.0   # a client that reads nothing this long while frames wait is dropped
CLIENT_QUEUE_MAX = 10_000      # frames waiting for one client; past this it is dropped
QUEUE_PER_SESSION = 4          # requests that may wait per session slot (max_sessions) before "busy"
BUSY_RETRY_AFTER_S = 1         # what a "busy" answer tells the client to wait before trying again


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
        self.sending = False            # a frame is out of the queue, being written
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
            self.cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued frame is written (True), at most `timeout` s (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.closed or (not self.frames and not self.sending), timeout)

    def close(self):
        """The connection is over: stop the sender, discard what was not sent."""
        with self.cond:
            self.closed = True
            self.frames.clear()
            self.cond.notify_all()

    def _run(self):
        while True:
            with self.cond:
                while not self.frames and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                msg, meta = self.frames.popleft()
                self.sending = True
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
            with self.cond:
                self.sending = False
                self.cond.notify_all()

    def _drop(self, reason: str):
        """Called with self.cond held."""
        self.closed = True
        self.frames.clear()
        self.cond.notify_all()
        self.log(f"Dropping client {self.peer}: {reason}", WARNING)
        close_now(self.sock)


class ClientProtocol:
    """The leader's side of its clients: reads their frames, checks each GENERATE, submits it to the
    scheduler and sends its events back; cancels a client's sessions when it goes away.

    It owns each client's connection and outbox, the tokenizer (built on the first text prompt) and
    its own counts (`counts`: requests queued, requests refused or failed). It asks the ring builder
    whether the ring is up or past its grace (`ring.waiting_since_now`, `ring.past_grace`,
    `ring.grace_message`), the registry who is not ready yet, and the leader for `status()` and the
    model's other names (`aliases()`).
    """

    def __init__(self, cluster, model, config, scheduler, ring, registry, log, *, status, aliases,
                 tokenizer=None, queue_max: int = CLIENT_QUEUE_MAX):
        self.cluster, self.model, self.config, self.scheduler = cluster, model, config, scheduler
        self.ring, self.registry, self.log, self.status, self.aliases = ring, registry, log, status, aliases
        self.tokenizer, self.queue_max = tokenizer, queue_max
        self.counts = {"requests": 0, "errors": 0}

    def serve(self, sock, peer, hello):
        """One client's connection, from its HELLO until it goes away."""
        welcome(sock, hello, {"model": self.model.name, "aliases": self.aliases(), "n_ctx": self.config.n_ctx})
        _send_timeout(sock, CLIENT_SEND_TIMEOUT_S)
        outbox = ClientOutbox(sock, peer, self.log, limit=self.queue_max)
        send = outbox.put                # every frame to this client, from any thread, goes through it
        mine: set = set()
        try:
            while True:
                try:
                    frame = recv_frame(sock, f"client {peer}", max_payload=0)
                except ProtocolError as e:      # say why before the connection closes
                    send(Msg.ERROR, {"message": f"bad frame, closing the connection: {e}", "kind": "invalid"})
                    outbox.flush(2.0)
                    raise
                if frame.msg is Msg.GENERATE_BATCH:
                    self.generate_batch(frame.meta, send, mine)
                elif frame.msg is Msg.GENERATE:
                    self._generate(frame.meta, send, mine)
                elif frame.msg is Msg.CANCEL:
                    sid = frame.meta.get("session")
                    if isinstance(sid, str) and sid in mine:
                        self.scheduler.cancel(sid)
                elif frame.msg is Msg.STATE_REQUEST:
                    send(*state(self.status()))
                elif frame.msg is Msg.PING:
                    send(Msg.PONG, frame.meta)
                else:
                    send(Msg.ERROR, {"message": f"a client may not send {frame.msg.name}"})
        finally:
            outbox.close()
            for sid in list(mine):    # the client went away (or was dropped): stop its generations
                self.scheduler.cancel(sid)

    def _generate(self, meta: dict, send, mine: set):
        req = self._prepare(meta, send, mine)
        if req is not None and not self._refuse_if_busy(1, meta.get("request"), send):
            self._queue(req, mine)

    def _prepare(self, meta: dict, send, mine: set) -> Request | None:
        """Check one GENERATE and make its Request, tokenizing a text prompt: everything that does not
        need the scheduler, so it runs without holding it. None: refused (the ERROR is sent)."""
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
        except (DecodingError, TypeError, ValueError) as e:     # TypeError: e.g. a list where a name goes
            self.counts["errors"] += 1
            send(Msg.ERROR, {"request": req_id, "message": f"invalid request: {e}", "kind": "invalid",
                             "field": getattr(e, "field", None)})
            return None
        if self.ring.past_grace():              # before building anything for it: it would only wait
            self.counts["errors"] += 1
            send(Msg.ERROR, {"request": req_id, "message": self.ring.grace_message(), "kind": "cluster"})
            return None
        want_text = meta.get("text", True) is not False
        # the stream that cuts the reply at a stop string; also the text a client is sent
        stream = self._tok().stop_stream(params.stop) if want_text or params.stop else None

        def emit(kind, data):
            if kind == "token":
                traced = {k: data[k] for k in ("hops", "head_ms", "transit_total_ms", "top") if k in data}
                send(Msg.TOKEN, {"request": req_id, "session": req.id, "token": data["id"], "logprob": data["logprob"],
                                 "text": data.get("text", "") if want_text else "", **traced})
            elif kind == "status":
                send(*status_text(req_id, req.id, data["text"]))
            elif kind == "done":
                mine.discard(req.id)
                if not want_text:
                    data = dict(data, text=None, tail="")
                send(Msg.DONE, dict(data, request=req_id, session=req.id))
            elif kind == "error":
                mine.discard(req.id)
                self.counts["errors"] += 1
                send(Msg.ERROR, {"request": req_id, "session": req.id, "message": data["error"], "kind": "cluster"})

        req = Request(prompt_ids, params, emit, echo=bool(meta.get("echo")), top_logprobs=top,
                      trace=meta.get("trace") is True, stop_at_eot=meta.get("ignore_eos") is not True,
                      score_only=meta.get("score_only") is True, text=stream)
        try:
            self.scheduler.check(req)
        except DecodingError as e:
            self.counts["errors"] += 1
            send(Msg.ERROR, {"request": req_id, "message": str(e), "kind": "invalid", "field": e.field})
            return None
        return req

    def _refuse_if_busy(self, n: int, req_id, send) -> bool:
        """Refuse `n` new requests if they would make the queue longer than QUEUE_PER_SESSION per
        session slot: an ERROR of kind "busy" that says when to retry."""
        waiting, limit = self.scheduler.waiting.qsize(), QUEUE_PER_SESSION * self.cluster.max_sessions
        if waiting + n <= limit:
            return False
        self.counts["errors"] += 1
        send(Msg.ERROR, {"request": req_id, "kind": "busy", "retry_after_s": BUSY_RETRY_AFTER_S,
                         "message": f"busy: {waiting} requests are already waiting (at most {limit}: "
                                    f"{QUEUE_PER_SESSION} per session slot, max_sessions={self.cluster.max_sessions}); "
                                    f"retry in {BUSY_RETRY_AFTER_S} s"})
        return True

    def _queue(self, req: Request, mine: set):
        """Hand a checked Request to the scheduler."""
        self.scheduler.submit(req, checked=True)
        mine.add(req.id)
        self.counts["requests"] += 1
        if not self.ring.waiting_since_now():   # never wait longer than rejoin_grace_s, even at start-up
            down = [str(w.rank) for w in self.registry.not_ready()]
            req.emit("status", {"text": f"waiting for rank {', '.join(down) or '?'} to join (at most "
                                        f"{self.cluster.rejoin_grace_s:g}s)"})

    def generate_batch(self, meta: dict, send, mine: set):
        """A GENERATE_BATCH, several generations: {"batch": [{"request": "r1.0", "prompt_ids": [...],
        "seed": 7}, ...], <fields shared by all>}. Each item is answered like its own GENERATE (frames
        carry its request id). Every item is checked and tokenized first, without holding the
        scheduler; then they are queued while it is held, so its next step admits them together:
        prompts of one API request run as one batch, not one after another."""
        items = meta.get("batch")
        limit = QUEUE_PER_SESSION * self.cluster.max_sessions
        if not (isinstance(items, list) and 0 < len(items) <= limit and all(isinstance(i, dict) for i in items)):
            self.counts["errors"] += 1
            send(Msg.ERROR, {"request": meta.get("request"), "kind": "invalid",
                             "message": f"invalid request: batch must be a list of 1..{limit} generations"})
            return
        shared = {k: v for k, v in meta.items() if k != "batch"}
        reqs = [self._prepare({**shared, **item}, send, mine) for item in items]
        if any(req is None for req in reqs):
            return                          # that item's ERROR is sent; the client gives up on the batch
        with self.scheduler.lock:           # no step starts until every item is queued
            if self._refuse_if_busy(len(reqs), meta.get("request"), send):
                return
            for req in reqs:
                self._queue(req, mine)

    def _tok(self):
        if self.tokenizer is None:      # get_tokenizer builds one for all, however many clients ask at once
            from ..tokenizer import get_tokenizer
            self.tokenizer = get_tokenizer()
        return self.tokenizer


def _send_timeout(sock, seconds: float):
    """Make sends on `sock` fail after `seconds` instead of blocking forever; receives still wait."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    except (OSError, struct.error):
        pass                                # not on this platform: sends block as before
