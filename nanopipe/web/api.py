"""What the web routes share: errors, reading a request body, the leader connection, a generation.

/chat (web/chat.py), the OpenAI routes (web/openai.py) and create_app's guards (web/app.py) all
build on this module; it imports none of them. A request that needs the cluster dials the leader
with its own LeaderClient (`connect`), and a Generation turns the client's callbacks into events a
streamed response can yield:

    gen = start_generation(tokenizer().encode("Hello"), resolve(None, {}), "chat", "text")
    for event in gen.events():      # ("token", 995, " world"), ..., ("done", result)
        ...
"""
from __future__ import annotations

import json
import math
import queue
import socket
import threading
import time
from array import array
from collections import OrderedDict

from flask import Response, current_app, g, jsonify, request

from ..cluster.leader_client import ClientError, LeaderClient
from ..decoding import EOT
from ..logs import shown
from ..sampling_params import FIELDS, DecodingError, SamplingParams, check_stop, request_params
from .metrics import WebMetrics

REFUSAL_WAIT_S = 0.25              # how long a stream waits for the leader's at-once refusal before its 200
STATUS_TIMEOUT_S = 5.0             # a status question the leader does not answer in this long is "down"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error the API reports as JSON: status 400 names `param`; `kind` is counted in /metrics;
    `code` is OpenAI's machine-readable code (e.g. "model_not_found")."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid",
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code = code
        self.retry_after_s = retry_after_s      # sent as Retry-After (429: the leader is busy)


def leader_error(e: ClientError) -> ApiError:
    """The leader's refusal of a request is the caller's fault (400, naming the field it carries);
    a leader whose queue is full is 429 with Retry-After, which OpenAI's clients wait and retry
    (as they do 408, 409 and 5xx, but never 400); anything else is 503."""
    if e.kind == "invalid":
        return ApiError(400, str(e), param=getattr(e, "field", None))
    if e.kind == "busy":
        return ApiError(429, str(e), kind="busy", code="rate_limit_exceeded",
                        retry_after_s=getattr(e, "retry_after_s", None) or 1)
    return ApiError(503, str(e), kind=e.kind)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An error body in OpenAI's shape, which its client libraries show to the user.

    (400, "n: only n=1 is supported", "n") -> {"error": {"message": "n: only ...", "type":
    "invalid_request_error", "param": "n", "code": None}}
    """
    kind = "invalid_request_error" if code == "model_not_found" else ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after_s: float | None = None):
    """{"error": "..."} for our API; OpenAI's shape under /v1 so its client libraries show the message.
    `retry_after_s`: also a Retry-After header (whole seconds, at least 1)."""
    if request.path.startswith("/v1/"):
        resp = jsonify(openai_error(status, message, param, code))
    else:
        resp = jsonify(error=message)
    if retry_after_s is not None:
        resp.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return resp, status


# ---------------------------------------------------------------------------------------------
# What the app remembers


class Transcripts:
    """The token ids each finished chat computed, by their text, so the next turn starts with them.

    A chat's turn N+1 is turn N's text plus the reply plus the new turn. Encoding that text again
    need not give the tokens the model computed: the model may have written " there" as " the" +
    "re", or "\n\n" as two tokens, and a stop string may end inside a token. Then the prefix cache
    (nanopipe/prefix.py) matches only up to the first difference. So when a chat finishes, its
    prompt ids and generated ids are kept under their decoded text, and `encode` starts a prompt
    with the longest kept text it begins with, encoding only the rest:

        remember("User: Hi\nAssistant: Hello", [12982, 25, 15902, 198, 48902, 25, 18435])
        encode("User: Hi\nAssistant: Hello\nUser: Bye\nAssistant:")
        -> [12982, 25, 15902, 198, 48902, 25, 18435] + encode("\nUser: Bye\nAssistant:")

    It also knows the replies that began without whitespace (`bare`): the template writes them
    right after "Assistant:", as the model did, where a message written by hand gets a space.

    Bounded (least recently used dropped first); shared by every request of the app, each entry
    only ever used for a text that starts with it, whose ids decode to that very text.
    """

    MAX_ENTRIES = 256

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._kept: OrderedDict = OrderedDict()     # text -> array of token ids
        self._bare: OrderedDict = OrderedDict()     # replies that began without whitespace -> None
        self._lock = threading.Lock()

    def remember(self, text: str, ids, reply: str = ""):
        if not text:
            return
        with self._lock:
            self._kept[text] = array("I", ids)
            self._kept.move_to_end(text)
            if reply and not reply[:1].isspace():
                self._bare[reply] = None
                self._bare.move_to_end(reply)
            for kept in (self._kept, self._bare):
                while len(kept) > self.max_entries:
                    kept.popitem(last=False)

    def bare(self, reply: str) -> bool:
        """Was `reply` a chat's reply that began without whitespace?"""
        return reply in self._bare

    def encode(self, text: str, tok) -> list:
        with self._lock:
            best = max((k for k in self._kept if text.startswith(k)), key=len, default="")
            if not best:
                return tok.encode(text)
            self._kept.move_to_end(best)
            ids = list(self._kept[best])
        return ids + (tok.encode(text[len(best):]) if len(text) > len(best) else [])


class AppState:
    """What the app remembers between requests: its metrics, what the leader last said about
    itself, and the tokens recent chats computed."""

    def __init__(self):
        self.metrics = WebMetrics()
        self.leader_info: dict = {}         # model, n_ctx, defaults from the last status answer
        self.generations = Generations()    # the ones running now: a server that stops ends them (web/server.py)
        self.transcripts = Transcripts()


class Generations:
    """The generations running now, so that a server that stops can end each with a final event.

    begin_stop(message) ends every generation that starts from then on at once; stop_all(message)
    ends those still running (Generation.stop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: set = set()
        self._stopping: str | None = None

    def add(self, gen: "Generation"):
        with self._lock:
            self._live.add(gen)
            if self._stopping:
                gen.stop(self._stopping)

    def discard(self, gen: "Generation"):
        with self._lock:
            self._live.discard(gen)

    def count(self) -> int:
        with self._lock:
            return len(self._live)

    def begin_stop(self, message: str) -> int:
        """From now on a new generation is ended as it starts; returns how many are running."""
        with self._lock:
            self._stopping = message
            return len(self._live)

    def stop_all(self, message: str) -> int:
        """End every generation still running; returns how many."""
        with self._lock:
            self._stopping = message
            live = list(self._live)
        for gen in live:
            gen.stop(message)
        return len(live)


def state() -> AppState:
    return current_app.extensions["nanopipe"]


# ---------------------------------------------------------------------------------------------
# Reading requests


MAX_JSON_DEPTH = 32       # no route takes anything nested deeper than a few levels


def json_body() -> dict:
    """The request body as a JSON object, whatever Content-Type the caller sent.

    Refused with a 400 before any route reads it: a body nested deeper than MAX_JSON_DEPTH (deep
    enough to exhaust Python's recursion in the parser, or later in whatever walks it), and a string
    holding a lone surrogate ("\\ud800": valid JSON, but not Unicode text, so it cannot be encoded
    to send to the leader).
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise ApiError(400, "request body: expected a JSON object, got an empty body")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"request body: nested deeper than {MAX_JSON_DEPTH} levels; "
                            "send a flat JSON object") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    _check_json_value(body)
    return body


def _check_json_value(body) -> None:
    """Walk a parsed body without recursion: depth at most MAX_JSON_DEPTH, every string (keys too)
    encodable as UTF-8.

        {"stop": "\\ud800"} -> ApiError 400 "stop: ... lone surrogate ..."
    """
    stack = [(body, 1, None)]           # (value, depth, top-level field it sits under)
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"request body: nested deeper than {MAX_JSON_DEPTH} levels; "
                                    "send a flat JSON object", param=field)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                where = field if field is not None else k
                if isinstance(k, str):
                    stack.append((k, depth, where))
                stack.append((v, depth + 1, where))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                name = field if isinstance(field, str) else "request body"
                raise ApiError(400, f"{name[:64]}: holds a lone surrogate (\\u{ord(value[e.start]):04x}), which "
                                    "is not Unicode text; send each character as itself or as a "
                                    "surrogate pair", param=field if isinstance(field, str) else None) from None


def optional(body: dict, field: str, check, what: str):
    """body[field] if present and not null, after `check(value)` passes; else None."""
    value = body.get(field)
    if value is None:
        return None
    if not check(value):
        got = json.dumps(value)
        raise ApiError(400, f"{field}: must be {what} (got {got if len(got) <= 80 else got[:77] + '...'})",
                       param=field)
    return value


def flag(body: dict, field: str) -> bool:
    """body[field] as a switch: absent or null is False; anything but true/false is a 400."""
    return bool(optional(body, field, lambda v: isinstance(v, bool), "true or false"))


def sampling_fields(body: dict, stop=()) -> dict:
    """The sampling fields both APIs share, as sent (None: not sent); `resolve` checks them.

    `stop`: stop strings the route adds to the client's own (up to 4), e.g. the chat template's
    turn marker: {"stop": "."}, stop=("\\nUser:",) -> ["\\nUser:", "."]
    """
    fields = {f: body.get(f) for f in FIELDS}
    try:
        sent = check_stop(fields["stop"])           # a client may send up to 4 (OpenAI's limit)
    except DecodingError as e:
        raise ApiError(400, str(e), param=e.field) from None
    fields["stop"] = list(stop) + [s for s in sent if s not in stop]
    return fields


def decoding_defaults() -> dict:
    """model_config.yaml's decoding section; without one, what the leader says its defaults are."""
    defaults = current_app.config["MODEL_DEFAULTS"]
    if defaults is not None:
        return defaults
    info = state().leader_info
    if "defaults" not in info:
        leader_status()
    return info.get("defaults") or {}


def resolve(strategy: str | None, fields: dict) -> SamplingParams:
    """The exact SamplingParams a request runs with: config defaults, then the request's values,
    the strategy inferred from them when none is named (sampling_params.request_params)."""
    try:
        return request_params(decoding_defaults(), strategy=strategy, **fields)
    except DecodingError as e:
        raise ApiError(400, str(e), param=e.field) from None


def tokenizer():
    tok = current_app.config["TOKENIZER"]
    if tok is None:     # many first requests at once: get_tokenizer lets one build, the others wait
        from ..tokenizer import get_tokenizer
        tok = current_app.config["TOKENIZER"] = get_tokenizer()
    return tok


# ---------------------------------------------------------------------------------------------
# Talking to the leader


def dial_leader(addr: str, token: str | None, attempts: int = 1, tls_ca: str | None = None) -> LeaderClient:
    """The real CLIENT_FACTORY: a new connection to the leader, passed the handshake (over TLS,
    checked against the cluster's pinned certificate `tls_ca`, when the cluster sets tls_cert)."""
    return LeaderClient.connect(addr, token=token, attempts=attempts, tls_ca=tls_ca)


def connect(attempts: int = 1):
    """A new connection to the leader for this request (never shared between requests)."""
    cfg = current_app.config
    tls = {"tls_ca": cfg["LEADER_TLS_CA"]} if cfg.get("LEADER_TLS_CA") else {}
    try:
        client = cfg["CLIENT_FACTORY"](cfg["LEADER"], cfg["LEADER_TOKEN"], attempts=attempts, **tls)
    except ClientError as e:
        if e.kind == "unauthorized":    # up, and said no: a hint about the token, not about `serve`
            raise ApiError(503, str(e), kind="unauthorized") from None
        check = "" if "nanopipe serve --rank 0" in str(e) else "; check `nanopipe serve --rank 0`"
        raise ApiError(503, f"{e} (the web app keeps retrying{check})", kind="unreachable") from None
    except ValueError as e:        # a malformed leader address
        raise ApiError(503, f"leader address {cfg['LEADER']!r}: {e}", kind="unreachable") from None
    info = state().leader_info
    welcome = getattr(client, "welcome", None) or {}
    info.update({k: welcome[k] for k in ("model", "aliases", "n_ctx") if k in welcome})
    return client


def leader_status(attempts: int = 1) -> dict:
    """Ask the leader for its status on a fresh connection; remember model, n_ctx and defaults."""
    client = connect(attempts)
    try:
        sock = getattr(client, "sock", None)
        if sock is not None:
            sock.settimeout(STATUS_TIMEOUT_S)
        status = client.status()
    except ClientError as e:
        raise ApiError(503, str(e), kind="unreachable") from None
    finally:
        client.close()
    state().leader_info.update({k: status[k] for k in ("model", "aliases", "n_ctx", "defaults") + WEIGHTS_KEYS
                                if k in status})
    return status


WEIGHTS_KEYS = ("synthetic", "weights_mixed", "weights_note")   # are the cluster's weights random? (Leader.status)


def weights_info() -> dict:
    """{"synthetic": bool, "weights_mixed": bool, "weights_note": str | None}; {} until the leader said."""
    info = state().leader_info
    return {k: info.get(k) for k in WEIGHTS_KEYS} if "synthetic" in info else {}


def model_name() -> str:
    return state().leader_info.get("model") or current_app.config["MODEL_NAME"] or "gpt2"


def model_aliases() -> list:
    """Other names the served model answers to (its hub name), from the leader or model_config.yaml."""
    info = state().leader_info
    names = info["aliases"] if "model" in info and "aliases" in info else current_app.config["MODEL_ALIASES"]
    return [n for n in names if n and n != model_name()]


def check_fields(body: dict, known) -> None:
    """Refuse a field the route does not know, naming it and the closest known one (a typo must not
    be silently ignored): {"temprature": 0} -> 400 "unknown field 'temprature' (did you mean
    'temperature'?); known fields: ..."."""
    import difflib
    unknown = sorted(set(body) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ApiError(400, f"unknown field {shown(unknown[0])}{hint}; known fields: {', '.join(known)}",
                       param=unknown[0])


def check_fits(params: SamplingParams, prompt_ids: list, n_ctx, field: str):
    """Prompt + reply must fit in the model's context; say which to shorten."""
    if not n_ctx:
        return
    if len(prompt_ids) >= n_ctx:
        raise ApiError(400, f"{field}: the prompt is {len(prompt_ids)} tokens, but the model's context is "
                            f"n_ctx={n_ctx} tokens for prompt and reply together; shorten it", param=field)
    try:
        params.validate(n_ctx=n_ctx, prompt_len=len(prompt_ids))
    except DecodingError as e:
        raise ApiError(400, str(e), param=e.field) from None


def _hang_up(client):
    """Close a leader connection another thread may be reading; the leader then cancels its generation."""
    sock = getattr(client, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)      # wakes a recv() blocked in the other thread
        except OSError:
            pass
    client.close()


# ---------------------------------------------------------------------------------------------
# A generation as events, and streaming them


class Generation:
    """One generation on the leader as a stream of events, timed by the web app.

        gen = Generation(client, [15496, 995], params, metrics, t0)
        for event in gen.events():
            ("status", "waiting for rank 2 to join")
            ("token", 995, " world")            one per sampled token (id None: text held back at the end)
            ("done", result)                    the leader's DONE meta (token_ids, node_ms, ...)
         or ("error", ClientError)

    The leader's client API is callbacks on a blocking call, a streamed HTTP response is a
    generator: a thread runs the call and a queue connects the two. Leaving the loop early (the
    browser went away) hangs up on the leader, which cancels the generation and frees its caches.
    """

    def __init__(self, client, prompt, params: SamplingParams, metrics, t0: float, echo: bool = False,
                 top_logprobs: int = 0, registry: Generations | None = None):
        self.client, self.prompt, self.params, self.metrics = client, prompt, params, metrics
        self.echo, self.top_logprobs = echo, top_logprobs
        self.t0 = t0                            # when the HTTP request arrived: TTFT includes the dial
        self.t_first = self.t_last = None
        self.n_tokens = 0
        self.pieces: list = []
        self._q: queue.Queue = queue.Queue()
        self.started = False
        self._stopped = False
        self.keep = None                        # (Transcripts, tokenizer): remember what a chat computed
        self._thread: threading.Thread | None = None
        self._first = None                      # an event taken early by refused_at_once, still to be yielded
        self._registry = registry if registry is not None else Generations()
        self._registry.add(self)        # from now: a response may have begun (/v1's first chunk) before events()

    def stop(self, message: str):
        """End this generation now (the web server is stopping): events() yields ("error", ...) with
        `message` as its last event, and hangs up on the leader, which cancels the generation."""
        self._stopped = True
        self._q.put(("error", ClientError(message, "stopping")))

    def remember_in(self, transcripts: Transcripts, tok) -> Generation:
        """When this chat finishes, keep its prompt and generated ids under their text, for the next turn."""
        self.keep = (transcripts, tok)
        return self

    def close(self):
        """Hang up if events() never ran (a response abandoned before its first chunk)."""
        if not self.started:
            self.started = True
            self._registry.discard(self)
            self.client.close()

    def start(self):
        """Ask the leader now (events() does it on its first step otherwise)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="generation")
            self._thread.start()

    def refused_at_once(self, wait_s: float = REFUSAL_WAIT_S) -> ClientError | None:
        """Before a stream's 200 goes out: the leader's refusal (a full queue, a bad field), if it
        comes within wait_s, so that it can be a 429 or 400 that clients retry or show. The leader
        refuses at once, so wait_s only delays the headers of a reply whose first event is slower;
        never its first token. Whatever event came stays first in line for events()."""
        self.start()
        try:
            event = self._q.get(timeout=wait_s)
        except queue.Empty:
            return None
        self._first = event
        if event[0] == "error" and event[1].kind in ("busy", "invalid"):
            return event[1]
        return None

    def events(self):
        self.started = True
        self.metrics.begin()
        self.start()
        finished = False
        try:
            while True:
                event, self._first = (self._first, None) if self._first is not None else (self._q.get(), None)
                finished = event[0] in ("done", "error")
                yield event
                if finished:
                    return
        finally:
            self._registry.discard(self)
            self.metrics.end()
            if finished and not self._stopped:
                self.client.close()
            else:
                _hang_up(self.client)

    def run(self) -> dict:
        """Without streaming: the leader's result, or an ApiError."""
        for event in self.events():
            if event[0] == "error":
                raise leader_error(event[1])
            if event[0] == "done":
                return event[1]
        raise ApiError(503, "the leader stopped answering", kind="cluster")

    def stream_error(self, e: ClientError) -> ApiError:
        """An error met mid-stream, counted in /metrics here: the 200 went out already, so it is sent
        as an event and no error handler ever sees it."""
        err = leader_error(e)
        self.metrics.count_error(err.kind)
        return err

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def stats(self, result: dict) -> dict:
        """Per-reply stats as the user saw them: time to first token includes dialing the leader."""
        n = self.n_tokens
        decode_s = (self.t_last - self.t_first) if self.t_first is not None else 0.0
        return {
            "tokens": n,
            "ttft_ms": None if self.t_first is None else round((self.t_first - self.t0) * 1000, 1),
            "tokens_per_s": round((n - 1) / decode_s, 1) if n > 1 and decode_s > 0 else None,
            "total_ms": round((time.perf_counter() - self.t0) * 1000, 1),
            "finish_reason": result.get("finish_reason"),
            "node_ms": result.get("node_ms") or {},
            # prefix reuse: how much of the prompt every stage still held from an earlier request
            "prompt_tokens": len(result.get("prompt_ids") or self.prompt),
            "cached_tokens": result.get("cached_tokens") or 0,
            "prefill_ms": result.get("prefill_ms"),
        }

    def _call(self) -> tuple:
        """Ask the leader; (every result, what the "done" event carries)."""
        result = self.client.generate(self.prompt, self.params, on_token=self._on_token,
                                      on_status=lambda text: self._q.put(("status", text)),
                                      echo=self.echo, top_logprobs=self.top_logprobs)
        return [result], result

    def _run(self):
        try:
            results, done = self._call()
            for r in results:
                self.metrics.observe_nodes(r.get("node_ms") or {})
            if self.keep is not None:
                self._remember(done)
            self._q.put(("done", done))
        except ClientError as e:
            self._q.put(("error", e))
        except Exception as e:  # a broken connection must end the response, not hang it
            self._q.put(("error", ClientError(f"lost the leader mid-reply: {type(e).__name__}: {e}", "cluster")))

    def _remember(self, result: dict):
        """prompt + every generated token (the stop string's too: the next turn's template starts
        with it), less a closing end-of-text, which no prompt contains."""
        transcripts, tok = self.keep
        ids = list(result.get("prompt_ids") or self.prompt) + list(result.get("token_ids") or [])
        if ids and ids[-1] == EOT:
            ids.pop()
        for _ in range(4):      # a reply cut inside a character: keep the ids whose bytes are whole text
            try:
                text = tok.decode_bytes(ids).decode("utf-8")
            except UnicodeDecodeError:
                ids.pop()
                continue
            transcripts.remember(text, ids, reply=self.text)
            return

    def _on_token(self, token_id, text):
        if token_id is not None:
            now = time.perf_counter()
            self.metrics.observe_token(now - (self.t_last if self.t_last is not None else self.t0),
                                       first=self.t_first is None)
            if self.t_first is None:
                self.t_first = now
            self.t_last = now
            self.n_tokens += 1
            if token_id == EOT:
                text = ""
        self.pieces.append(text or "")
        self._q.put(("token", token_id, text or ""))


def start_generation(prompt_ids, params: SamplingParams, route: str, field: str, echo: bool = False,
                     top_logprobs: int = 0) -> Generation:
    """Dial the leader, check the prompt fits its context, and return the (not yet started) generation.
    `prompt_ids` may be a function of the leader's n_ctx (a conversation trimmed to fit it)."""
    client = connect()
    try:
        if callable(prompt_ids):
            prompt_ids = prompt_ids(state().leader_info.get("n_ctx"))
        check_fits(params, prompt_ids, state().leader_info.get("n_ctx"), field)
    except ApiError:
        client.close()
        raise
    state().metrics.count_request(route)
    return Generation(client, prompt_ids, params, state().metrics, g.t0, echo=echo, top_logprobs=top_logprobs,
                      registry=state().generations)


class BatchGeneration(Generation):
    """Several generations on one leader connection, run as one batch (LeaderClient.generate_batch):
    one per prompt and choice of a /v1/completions request. Its events:

        ("status", "waiting for rank 2 to join")
        ("token", i, 995, " world")            generation i sampled a token (id None: held-back text)
        ("done", [result_0, result_1, ...])    every generation's result, in order
     or ("error", ClientError)

    The rest (metrics, hanging up when the reader leaves) is Generation's.
    """

    def __init__(self, client, prompts: list, seeds: list, params: SamplingParams, metrics, t0: float,
                 echo: bool = False, top_logprobs: int = 0, score_only: bool = False,
                 registry: Generations | None = None):
        super().__init__(client, prompts, params, metrics, t0, echo=echo, top_logprobs=top_logprobs,
                         registry=registry)
        self.seeds, self.score_only = seeds, score_only
        self.texts: list = [[] for _ in prompts]        # generation i's pieces
        self.counts: list = [0] * len(prompts)          # generation i's sampled tokens
        self._t_last: list = [None] * len(prompts)

    def text_of(self, i: int) -> str:
        return "".join(self.texts[i])

    def _call(self) -> tuple:
        results = self.client.generate_batch(self.prompt, self.params, seeds=self.seeds, on_token=self._on_token,
                                             on_status=lambda text: self._q.put(("status", text)),
                                             echo=self.echo, top_logprobs=self.top_logprobs,
                                             score_only=True if self.score_only else None)
        return results, results

    def _on_token(self, i, token_id, text):
        if token_id is not None:
            now = time.perf_counter()
            last = self._t_last[i]
            self.metrics.observe_token(now - (last if last is not None else self.t0), first=last is None)
            self._t_last[i] = now
            self.counts[i] += 1
            self.n_tokens += 1
            if token_id == EOT:
                text = ""
        self.texts[i].append(text or "")
        self._q.put(("token", i, token_id, text or ""))


def start_batch(prompts: list, seeds: list, params: SamplingParams, route: str, field: str, echo: bool = False,
                top_logprobs: int = 0, score_only: bool = False) -> BatchGeneration:
    """start_generation for several prompts at once (each already repeated n times)."""
    client = connect()
    try:
        n_ctx = state().leader_info.get("n_ctx")
        for ids in prompts:
            if not score_only:
                check_fits(params, ids, n_ctx, field)
            elif n_ctx and len(ids) > n_ctx:        # scoring generates nothing: all n_ctx positions may be prompt
                raise ApiError(400, f"{field}: the prompt is {len(ids)} tokens, but the model's context is "
                                    f"n_ctx={n_ctx}; score a shorter window", param=field)
    except ApiError:
        client.close()
        raise
    state().metrics.count_request(route)
    return BatchGeneration(client, prompts, seeds, params, state().metrics, g.t0, echo=echo,
                           top_logprobs=top_logprobs, score_only=score_only, registry=state().generations)


def sse(data, event: str | None = None) -> str:
    """One Server-Sent Event: 'event: done\\ndata: {...}\\n\\n'. JSON never contains a raw newline."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def sse_comment(text: str) -> str:
    """': waiting for rank 2\\n\\n': clients skip comments; a person reading the stream sees why it waits."""
    return ": " + " ".join(str(text).splitlines()) + "\n\n"


def event_stream(chunks, gen: Generation) -> Response:
    """A streamed text/event-stream response. However it ends (finished, or the client left before
    the first chunk), closing it also closes `gen`'s leader connection. A leader that refuses the
    request at once (busy, a bad field) gets the status a request without streaming gets: 429 with
    Retry-After, or 400, not a 200 with an error event that OpenAI's clients would not retry."""
    refused = gen.refused_at_once()
    if refused is not None:
        gen.close()
        raise leader_error(refused)
    resp = Response(chunks, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.call_on_close(gen.close)
    return resp
