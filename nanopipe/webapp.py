"""The web app: a chat page, a JSON API, an OpenAI-compatible API and Prometheus metrics in front of
the leader.

    nanopipe web                      # leader address from configs/cluster_config.yaml
    open http://127.0.0.1:8000/

It holds no model and no shared socket: every request that needs the cluster dials the leader with
its own LeaderClient, so two browser tabs chatting at once never share a connection (the leader
batches them together). One /chat request, streamed:

    browser --POST /chat {"text": "Hello", "stream": true}--> web app
    web app --dial, GENERATE [15496] greedy max_tokens=50-->   leader (rank 0) -> ring of workers
    web app <--TOKEN 995 " world", TOKEN ..., DONE {stats}--   leader
    browser <--data: {"token": 995, "text": " world"} ... event: done--  web app

Routes (API routes need `Authorization: Bearer <api_token>` when cluster_config.yaml sets api_token):

    GET  /                      the chat page (web/index.html) and /static/* (no token needed)
    POST /chat                  {"text", "max_tokens", "temperature", "top_k", "top_p",
                                 "decoding_strategy", "seed", "stream"} -> {"response", "config", "stats"}
    GET  /config                decoding defaults, model, and each node's rank, host and layers
    GET  /health                leader reachability and every node's status; 503 unless all are up
    POST /reconnect             dial the leader again and report
    GET  /metrics               Prometheus text format
    POST /v1/completions        OpenAI-compatible (text_completion)
    POST /v1/chat/completions   OpenAI-compatible (chat.completion), with the template below
    GET  /v1/models

Chat template. GPT-2 is not a chat model; /v1/chat/completions turns the messages into one prompt
that ends where the assistant's reply should start:

    [{"role": "system", "content": "Be brief."},         System: Be brief.
     {"role": "user", "content": "Hi"},          ->       User: Hi
     {"role": "assistant", "content": "Hello!"},          Assistant: Hello!
     {"role": "user", "content": "Who are you?"}]         User: Who are you?
                                                          Assistant:

OpenAI sampling fields map onto a decoding strategy: temperature 0 -> greedy; otherwise top_p if
top_p < 1, else top_k if top_k (an extension) is given, else sampling. A request that sets none of
temperature, top_p and top_k gets the model's configured default strategy (model_config.yaml).

Errors are JSON, never a traceback: 400 {"error": "..."} naming the field for bad input, 401 for a
missing API token, 503 when the leader or a worker is down. /v1 routes use OpenAI's error shape
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import bisect
import hmac
import json
import math
import os
import queue
import socket
import threading
import time
import uuid
from pathlib import Path

from flask import Flask, Response, current_app, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from .client import ClientError, LeaderClient
from .config import ConfigError, load_cluster_config, load_model_config
from .decoding import STRATEGIES, STRATEGY_USES, DecodingError, SamplingParams, make_params

EOT = 50256                        # <|endoftext|>: ends a reply; it is not shown as text
STATUS_TIMEOUT_S = 5.0             # a status question the leader does not answer in this long is "down"
RECONNECT_ATTEMPTS = 3
MAX_BODY_BYTES = 1 << 20
PUBLIC_ENDPOINTS = {"page", "static_file"}      # served without the API token: the page asks for it
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CHAT_FIELDS = ("text", "max_tokens", "temperature", "top_k", "top_p", "decoding_strategy", "seed", "stream")
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def web_dir() -> str:
    """The page's folder: the repository's web/ next to the package (an editable install uses it in
    place), or share/nanopipe/web under the Python prefix for an installed copy."""
    here = Path(__file__).resolve().parent.parent / "web"
    if here.is_dir():
        return str(here)
    import sys
    return os.path.join(sys.prefix, "share", "nanopipe", "web")


# ---------------------------------------------------------------------------------------------
# Settings


def settings_from_configs(config_dir: str = "configs", model_name: str | None = None,
                          leader: str | None = None) -> dict:
    """The app's settings from the YAML configs: where the leader is, the cluster secret (and, on a
    TLS cluster, the certificate) to dial it with, the API token, CORS origins, and the decoding
    defaults of model_config.yaml.

    With --leader given, missing config files are fine: defaults then come from the leader itself.
    """
    settings = {"LEADER": leader, "CONFIG_DIR": config_dir}
    try:
        cc = load_cluster_config(config_dir)
        settings.update(LEADER=leader or f"{cc.leader.ip}:{cc.leader.port}", LEADER_TOKEN=cc.auth_token,
                        LEADER_TLS_CA=cc.tls_cert, API_TOKEN=cc.api_token, CORS_ORIGINS=tuple(cc.cors_origins))
    except ConfigError:
        if leader is None:
            raise
        settings["LEADER_TOKEN"] = os.environ.get("NANOPIPE_TOKEN")
    if os.environ.get("NANOPIPE_API_TOKEN"):
        settings["API_TOKEN"] = os.environ["NANOPIPE_API_TOKEN"]
    try:
        mc = load_model_config(config_dir, model_name)
        settings.update(MODEL_NAME=mc.name, MODEL_DEFAULTS=mc.decoding_defaults())
    except ConfigError:
        if model_name is not None:
            raise
    return settings


def dial_leader(addr: str, token: str | None, attempts: int = 1, tls_ca: str | None = None) -> LeaderClient:
    """The real CLIENT_FACTORY: a new connection to the leader, passed the handshake (over TLS,
    checked against the cluster's pinned certificate `tls_ca`, when the cluster sets tls_cert)."""
    return LeaderClient.connect(addr, token=token, attempts=attempts, tls_ca=tls_ca)


class ApiError(Exception):
    """An error the API reports as JSON: status 400 names `param`; `kind` is counted in /metrics."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def leader_error(e: ClientError) -> ApiError:
    """The leader's refusal of a request is the caller's fault (400); anything else is 503."""
    if e.kind == "invalid":
        head = str(e).split(":")[0].split()[0] if str(e) else ""
        return ApiError(400, str(e), param=head if head in CHAT_FIELDS + ("prompt",) else None)
    return ApiError(503, str(e), kind=e.kind)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(test_config: dict | None = None) -> Flask:
    """The Flask app. `test_config` overrides settings; tests pass CLIENT_FACTORY, a function
    (addr, token, attempts=1) -> an object with LeaderClient's generate/status/close/welcome
    (with LEADER_TLS_CA set, it is also passed tls_ca=)."""
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(
        LEADER="127.0.0.1:65432", LEADER_TOKEN=None, LEADER_TLS_CA=None, API_TOKEN=None, CORS_ORIGINS=(),
        MODEL_NAME=None, MODEL_DEFAULTS=None, CLIENT_FACTORY=dial_leader, WEB_DIR=web_dir(), TOKENIZER=None,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    app.json.sort_keys = False          # keep the documented field order in every answer
    if test_config is None:
        app.config.update(settings_from_configs())
    else:
        app.config.update(test_config)
    app.extensions["nanopipe"] = AppState()
    _register_guards(app)
    _register_pages(app)
    _register_chat(app)
    _register_cluster(app)
    _register_openai(app)
    return app


class AppState:
    """What the app remembers between requests: its metrics and what the leader last said about itself."""

    def __init__(self):
        self.metrics = WebMetrics()
        self.leader_info: dict = {}         # model, n_ctx, defaults from the last status answer


def state() -> AppState:
    return current_app.extensions["nanopipe"]


def error_response(status: int, message: str, param: str | None = None):
    """{"error": "..."} for our API; OpenAI's shape under /v1 so its client libraries show the message."""
    if request.path.startswith("/v1/"):
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
        body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param,
                          "code": None}}
    else:
        body = {"error": message}
    return jsonify(body), status


def _register_guards(app: Flask):
    @app.before_request
    def start_clock_and_check_token():
        g.t0 = time.perf_counter()
        token = current_app.config["API_TOKEN"]
        if not token or request.method == "OPTIONS" or request.endpoint in PUBLIC_ENDPOINTS:
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        state().metrics.count_error("unauthorized")
        resp, status = error_response(401, "missing or wrong API token: send the header 'Authorization: Bearer "
                                           "<api_token>' (api_token in cluster_config.yaml); in the chat page, "
                                           "paste it under 'API token'")
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp, status

    @app.after_request
    def cors(resp):
        """Only the configured origins may call the API from another site's page; never '*'."""
        origins = current_app.config["CORS_ORIGINS"]
        origin = request.headers.get("Origin")
        if origins:
            resp.headers.add("Vary", "Origin")
        if origin and origin in origins:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Max-Age"] = "600"
        return resp

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        state().metrics.count_error(e.kind)
        return error_response(e.status, e.message, e.param)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return error_response(e.code or 500, f"{e.name}: {e.description}")

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        app.logger.exception("unhandled error in %s %s", request.method, request.path)
        state().metrics.count_error("internal")
        return error_response(500, f"internal error in the web app ({type(e).__name__}: {e}); "
                                   "the web server's log has the details")


def _register_pages(app: Flask):
    @app.get("/")
    def page():
        return send_from_directory(current_app.config["WEB_DIR"], "index.html")

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(current_app.config["WEB_DIR"], name)


# ---------------------------------------------------------------------------------------------
# Reading requests


def json_body() -> dict:
    """The request body as a JSON object, whatever Content-Type the caller sent."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise ApiError(400, "request body: expected a JSON object, got an empty body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def optional(body: dict, field: str, check, what: str):
    """body[field] if present and not null, after `check(value)` passes; else None."""
    value = body.get(field)
    if value is None:
        return None
    if not check(value):
        raise ApiError(400, f"{field}: must be {what} (got {json.dumps(value)})", param=field)
    return value


def sampling_fields(body: dict) -> dict:
    """The sampling numbers both APIs share, type- and range-checked; absent ones are None."""
    return {
        "max_tokens": optional(body, "max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "temperature": optional(body, "temperature", lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
                                "a number >= 0"),
        "top_k": optional(body, "top_k", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "top_p": optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "seed": optional(body, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0 or null"),
    }


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
    """The exact SamplingParams a request runs with: config defaults, then the request's values."""
    try:
        return make_params(decoding_defaults(), strategy=strategy, **fields)
    except DecodingError as e:
        field = str(e).split()[0]
        raise ApiError(400, str(e), param=field if field in CHAT_FIELDS else None) from None


def chat_request(body: dict) -> tuple:
    """POST /chat's body -> (prompt text, SamplingParams, stream).

    {"text": "Hello", "temperature": 0} -> ("Hello", greedy, False): temperature 0 without a
    decoding_strategy means greedy, as in the OpenAI API.
    """
    unknown = sorted(set(body) - set(CHAT_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; known fields: {', '.join(CHAT_FIELDS)}", param=unknown[0])
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "text: give the prompt as a non-empty string", param="text")
    strategy = optional(body, "decoding_strategy", lambda v: v in STRATEGIES,
                        f"one of {', '.join(sorted(STRATEGIES))}")
    stream = optional(body, "stream", lambda v: isinstance(v, bool), "true or false")
    fields = sampling_fields(body)
    if strategy is None and fields["temperature"] == 0:
        strategy = "greedy"
    return text, resolve(strategy, fields), bool(stream)


def openai_strategy(temperature, top_p, top_k) -> str | None:
    """OpenAI's knobs -> a strategy name; None means "the model's default".

    (0, *, *) -> greedy;  (0.7, 0.9, None) -> top_p;  (0.7, 1, 40) -> top_k;  (0.7, None, None) -> sampling
    """
    if temperature is None and top_p is None and top_k is None:
        return None
    if temperature == 0:
        return "greedy"
    if top_p is not None and top_p < 1:
        return "top_p"
    if top_k is not None:
        return "top_k"
    return "sampling"


def openai_request(body: dict) -> tuple:
    """The fields /v1/completions and /v1/chat/completions share -> (SamplingParams, stream)."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = dict(body, max_tokens=body["max_completion_tokens"])     # the chat API's newer name
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only n=1 is supported (one completion per request)", param="n")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "stop: stop sequences are not supported; generation ends at <|endoftext|> or "
                            "max_tokens", param="stop")
    stream = optional(body, "stream", lambda v: isinstance(v, bool), "true or false")
    fields = sampling_fields(body)
    strategy = openai_strategy(fields["temperature"], fields["top_p"], fields["top_k"])
    return resolve(strategy, fields), bool(stream)


def chat_prompt(messages) -> str:
    """OpenAI messages -> one GPT-2 prompt, with the template in this module's docstring.

    [{"role": "user", "content": "Hi"}] -> "User: Hi\\nAssistant:"
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: give a non-empty list of {\"role\", \"content\"} objects", param="messages")
    lines = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: must be an object with role and content", param="messages")
        role = m.get("role")
        if role not in ROLE_NAMES:
            raise ApiError(400, f"{where}.role: must be system, user or assistant (got {json.dumps(role)})",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):       # [{"type": "text", "text": "..."}]: the newer content form
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(p for p in parts if isinstance(p, str)) if len(parts) == len(content) else None
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content: must be a string (or a list of text parts)", param="messages")
        lines.append(f"{ROLE_NAMES[role]}: {content}")
    return "\n".join(lines) + "\nAssistant:"


def tokenizer():
    tok = current_app.config["TOKENIZER"]
    if tok is None:     # many first requests at once: get_tokenizer lets one build, the others wait
        from .tokenizer import get_tokenizer
        tok = current_app.config["TOKENIZER"] = get_tokenizer()
    return tok


def encode_prompt(prompt, field: str) -> list:
    """Text (or a list of token ids, as OpenAI allows) -> token ids, checked."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, f"{field}: give a non-empty prompt", param=field)
        return tokenizer().encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t <= EOT for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ApiError(400, f"{field}: only one prompt per request", param=field)
    raise ApiError(400, f"{field}: must be a non-empty string or a list of token ids in 0..{EOT}", param=field)


# ---------------------------------------------------------------------------------------------
# Talking to the leader


def connect(attempts: int = 1):
    """A new connection to the leader for this request (never shared between requests)."""
    cfg = current_app.config
    tls = {"tls_ca": cfg["LEADER_TLS_CA"]} if cfg.get("LEADER_TLS_CA") else {}
    try:
        client = cfg["CLIENT_FACTORY"](cfg["LEADER"], cfg["LEADER_TOKEN"], attempts=attempts, **tls)
    except ClientError as e:
        raise ApiError(503, f"{e} (the web app keeps retrying; check `nanopipe serve --rank 0`)",
                       kind="unreachable") from None
    except ValueError as e:        # a malformed leader address
        raise ApiError(503, f"leader address {cfg['LEADER']!r}: {e}", kind="unreachable") from None
    info = state().leader_info
    welcome = getattr(client, "welcome", None) or {}
    info.update({k: welcome[k] for k in ("model", "n_ctx") if k in welcome})
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
    state().leader_info.update({k: status[k] for k in ("model", "n_ctx", "defaults") if k in status})
    return status


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
        raise ApiError(400, str(e), param="max_tokens") from None


def _hang_up(client):
    """Close a leader connection another thread may be reading; the leader then cancels its generation."""
    sock = getattr(client, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)      # wakes a recv() blocked in the other thread
        except OSError:
            pass
    client.close()


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
                 top_logprobs: int = 0):
        self.client, self.prompt, self.params, self.metrics = client, prompt, params, metrics
        self.echo, self.top_logprobs = echo, top_logprobs
        self.t0 = t0                            # when the HTTP request arrived: TTFT includes the dial
        self.t_first = self.t_last = None
        self.n_tokens = 0
        self.pieces: list = []
        self._q: queue.Queue = queue.Queue()
        self.started = False

    def close(self):
        """Hang up if events() never ran (a response abandoned before its first chunk)."""
        if not self.started:
            self.started = True
            self.client.close()

    def events(self):
        self.started = True
        self.metrics.begin()
        threading.Thread(target=self._run, daemon=True, name="generation").start()
        finished = False
        try:
            while True:
                event = self._q.get()
                finished = event[0] in ("done", "error")
                yield event
                if finished:
                    return
        finally:
            self.metrics.end()
            if finished:
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
        }

    def _run(self):
        try:
            result = self.client.generate(self.prompt, self.params, on_token=self._on_token,
                                          on_status=lambda text: self._q.put(("status", text)),
                                          echo=self.echo, top_logprobs=self.top_logprobs)
            self.metrics.observe_nodes(result.get("node_ms") or {})
            self._q.put(("done", result))
        except ClientError as e:
            self._q.put(("error", e))
        except Exception as e:  # a broken connection must end the response, not hang it
            self._q.put(("error", ClientError(f"lost the leader mid-reply: {type(e).__name__}: {e}", "cluster")))

    def _on_token(self, token_id, text):
        if token_id is not None:
            now = time.perf_counter()
            self.metrics.observe_token(now - (self.t_last if self.t_last is not None else self.t0),
                                       first=self.t_first is None)
            self.t_first = self.t_first if self.t_first is not None else now
            self.t_last = now
            self.n_tokens += 1
            if token_id == EOT:
                text = ""
        self.pieces.append(text or "")
        self._q.put(("token", token_id, text or ""))


def start_generation(prompt_ids: list, params: SamplingParams, route: str, field: str, echo: bool = False,
                     top_logprobs: int = 0) -> Generation:
    """Dial the leader, check the prompt fits its context, and return the (not yet started) generation."""
    client = connect()
    try:
        check_fits(params, prompt_ids, state().leader_info.get("n_ctx"), field)
    except ApiError:
        client.close()
        raise
    state().metrics.count_request(route)
    return Generation(client, prompt_ids, params, state().metrics, g.t0, echo=echo, top_logprobs=top_logprobs)


def sse(data, event: str | None = None) -> str:
    """One Server-Sent Event: 'event: done\\ndata: {...}\\n\\n'. JSON never contains a raw newline."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def sse_comment(text: str) -> str:
    return ": " + " ".join(str(text).splitlines()) + "\n\n"


def event_stream(chunks) -> Response:
    return Response(chunks, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def model_name() -> str:
    return state().leader_info.get("model") or current_app.config["MODEL_NAME"] or "gpt2"


# ---------------------------------------------------------------------------------------------
# POST /chat


def params_view(params: SamplingParams, tokens: int | None = None) -> dict:
    """The parameter display the page shows under each reply."""
    view = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "decoding_strategy": params.strategy, "max_tokens": params.max_tokens, "seed": params.seed}
    return view if tokens is None else {"tokens_generated": tokens, **view}


def _register_chat(app: Flask):
    @app.post("/chat")
    def chat():
        text, params, stream = chat_request(json_body())
        gen = start_generation(tokenizer().encode(text), params, "chat", "text")
        if not stream:
            result = gen.run()
            return jsonify(response=gen.text, config=params_view(params, gen.n_tokens), stats=gen.stats(result))
        return event_stream(_chat_events(gen, params))


def _chat_events(gen: Generation, params: SamplingParams):
    """data: {"token": id, "text": piece} per token; `event: status`; then `event: done` or `event: error`."""
    for event in gen.events():
        kind = event[0]
        if kind == "token":
            yield sse({"token": event[1], "text": event[2]})
        elif kind == "status":
            yield sse({"status": event[1]}, event="status")
        elif kind == "done":
            yield sse({"response": gen.text, "config": params_view(params, gen.n_tokens),
                       "stats": gen.stats(event[1])}, event="done")
        else:
            err = leader_error(event[1])
            gen.metrics.count_error(err.kind)
            yield sse({"error": err.message, "status": err.status}, event="error")


# ---------------------------------------------------------------------------------------------
# The cluster: /config, /health, /reconnect, /metrics


def node_view(node: dict) -> dict:
    return {"rank": node.get("rank"), "host": node.get("host"), "layers": node.get("layers"),
            "status": node.get("status"), "last_seen_s": node.get("last_seen_s")}


def _register_cluster(app: Flask):
    @app.get("/config")
    def config():
        """Decoding defaults for the page's controls; the leader's nodes if it answers."""
        try:
            status, down = leader_status(), None
        except ApiError as e:
            status, down = {}, e.message
        if current_app.config["MODEL_DEFAULTS"] is None and not state().leader_info.get("defaults"):
            raise ApiError(503, f"no model_config.yaml here and the leader did not answer: {down}",
                           kind="unreachable")
        active = resolve(None, {})
        strategies = {}
        for name in (decoding_defaults().get("decoding_strategies") or {}):
            if name in STRATEGIES:
                p = resolve(name, {})
                strategies[name] = {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}
        return jsonify(
            max_tokens=active.max_tokens, temperature=active.temperature, top_k=active.top_k, top_p=active.top_p,
            active_strategy=active.strategy, strategies=strategies,
            strategy_uses={k: list(v) for k, v in STRATEGY_USES.items()},
            model=model_name(), n_ctx=state().leader_info.get("n_ctx"), leader=current_app.config["LEADER"],
            leader_up=down is None, leader_error=down, auth_required=bool(current_app.config["API_TOKEN"]),
            nodes=[node_view(n) for n in status.get("nodes", [])])

    @app.get("/health")
    def health():
        """200 when the leader answers and every node is up; 503 (with the reason) otherwise."""
        addr = current_app.config["LEADER"]
        try:
            status = leader_status()
        except ApiError as e:
            return jsonify(ok=False, error=e.message, leader={"addr": addr, "reachable": False}, nodes=[]), 503
        nodes = [node_view(n) for n in status.get("nodes", [])]
        down = [n for n in nodes if n["status"] != "up"]
        ok = bool(status.get("ready")) and not down
        body = {"ok": ok, "leader": {"addr": addr, "reachable": True, "ready": bool(status.get("ready")),
                                     "model": status.get("model")},
                "nodes": nodes, "live_sessions": status.get("live_sessions")}
        if not ok:
            body["error"] = ("not ready: " + ", ".join(f"rank {n['rank']} ({n['host']}) is {n['status']}"
                                                       for n in down)) if down else "the ring is not up yet"
        return jsonify(body), 200 if ok else 503

    @app.post("/reconnect")
    def reconnect():
        """Dial the leader again (a few attempts, with backoff) and forget what it said before."""
        state().leader_info.clear()
        status = leader_status(attempts=RECONNECT_ATTEMPTS)
        nodes = status.get("nodes", [])
        up = sum(n.get("status") == "up" for n in nodes)
        return jsonify(ok=True, leader=current_app.config["LEADER"], model=status.get("model"),
                       ready=bool(status.get("ready")), nodes_up=up, nodes=len(nodes))

    @app.get("/metrics")
    def metrics():
        try:
            status = leader_status()
        except ApiError:
            status = None
        return Response(render_metrics(state().metrics, status),
                        content_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------------------------------------
# Metrics


class Histogram:
    """A Prometheus histogram: observe(0.03) with buckets (0.01, 0.05) counts in le="0.05" and le="+Inf"."""

    def __init__(self, buckets: tuple):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)      # per bucket, not yet cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list:
        out, running = [], 0
        for le, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {running}"]


class WebMetrics:
    """The web app's own measurements, shared by every request thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict = {}            # route -> generations started
        self.errors: dict = {}              # kind -> errors answered
        self.tokens = 0
        self.in_flight = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.node_s: dict = {}              # (rank, "compute" | "transit") -> seconds

    def count_request(self, route: str):
        with self.lock:
            self.requests[route] = self.requests.get(route, 0) + 1

    def count_error(self, kind: str):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def begin(self):
        with self.lock:
            self.in_flight += 1

    def end(self):
        with self.lock:
            self.in_flight -= 1

    def observe_token(self, seconds: float, first: bool):
        with self.lock:
            self.tokens += 1
            (self.ttft if first else self.per_token).observe(seconds)

    def observe_nodes(self, node_ms: dict):
        with self.lock:
            for rank, times in node_ms.items():
                for part in ("compute", "transit"):
                    key = (str(rank), part)
                    self.node_s[key] = self.node_s.get(key, 0.0) + float(times.get(part) or 0.0) / 1000


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(m: WebMetrics, status: dict | None) -> str:
    """Prometheus text exposition format 0.0.4: # HELP, # TYPE, then samples."""
    out: list = []

    def family(name, kind, help_text, samples):
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    with m.lock:
        family("nanopipe_web_requests_total", "counter", "Generations the web app started, by route.",
               [({"route": r}, n) for r, n in sorted(m.requests.items())] or [({"route": "chat"}, 0)])
        family("nanopipe_web_tokens_total", "counter", "Tokens the web app passed on to callers.", [({}, m.tokens)])
        family("nanopipe_web_errors_total", "counter", "Error answers, by kind (invalid, unauthorized, "
               "unreachable, cluster, internal).",
               [({"kind": k}, n) for k, n in sorted(m.errors.items())] or [({"kind": "invalid"}, 0)])
        family("nanopipe_web_in_flight", "gauge", "Generations the web app is streaming now.", [({}, m.in_flight)])
        out.extend(["# HELP nanopipe_web_ttft_seconds Time from the HTTP request to its first token.",
                    "# TYPE nanopipe_web_ttft_seconds histogram", *m.ttft.lines("nanopipe_web_ttft_seconds"),
                    "# HELP nanopipe_web_time_per_token_seconds Time between consecutive tokens of a reply.",
                    "# TYPE nanopipe_web_time_per_token_seconds histogram",
                    *m.per_token.lines("nanopipe_web_time_per_token_seconds")])
        for part in ("compute", "transit"):
            family(f"nanopipe_node_{part}_seconds_total", "counter",
                   f"Each node's {part} time, summed over the replies this web app served.",
                   [({"rank": r}, s) for (r, p), s in sorted(m.node_s.items()) if p == part])
    family("nanopipe_leader_up", "gauge", "1 if the leader answered a status request.", [({}, int(status is not None))])
    if status is not None:
        family("nanopipe_leader_ready", "gauge", "1 if every rank is up and the ring is closed.",
               [({}, int(bool(status.get("ready"))))])
        family("nanopipe_live_sessions", "gauge", "Generations live on the leader now.",
               [({}, status.get("live_sessions") or 0)])
        for key, help_text in (("requests", "Requests the leader has admitted."),
                               ("tokens", "Tokens the leader has sampled."),
                               ("errors", "Requests the leader failed.")):
            family(f"nanopipe_leader_{key}_total", "counter", help_text, [({}, status.get(key) or 0)])
        nodes = status.get("nodes", [])
        family("nanopipe_node_up", "gauge", "1 if the node is up.",
               [({"rank": n.get("rank"), "host": n.get("host")}, int(n.get("status") == "up")) for n in nodes])
        family("nanopipe_node_rss_bytes", "gauge", "Each node's resident memory as it last reported.",
               [({"rank": n.get("rank"), "host": n.get("host")}, int(n["rss_mb"] * 1024 * 1024))
                for n in nodes if isinstance(n.get("rss_mb"), (int, float))])
        if status.get("kv_cache_bytes") is not None:
            family("nanopipe_leader_kv_cache_bytes", "gauge", "Rank 0's KV cache memory.",
                   [({}, status["kv_cache_bytes"])])
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible routes


def _completion_logprobs(tok, result: dict, echo: bool, offset0: int = 0) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    ids = (list(result.get("prompt_ids") or []) if echo else []) + list(result["token_ids"])
    lps = (([None] + list(result.get("prompt_logprobs") or [])) if echo else []) + list(result.get("logprobs") or [])
    tops = result.get("top_logprobs")
    pieces = ["" if t == EOT else p for t, p in zip(ids, tok.pieces(ids))]
    offsets, pos = [], offset0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    out = {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets}
    if tops is not None:
        prompt_part = [None] * (len(result.get("prompt_ids") or []) if echo else 0)
        out["top_logprobs"] = prompt_part + [{tok.pieces([t["id"]])[0]: t["logprob"] for t in pos_top}
                                             for pos_top in tops]
    else:
        out["top_logprobs"] = None
    return out


def _chat_logprobs(tok, result: dict) -> dict:
    """The chat API's logprobs: one entry per generated token with its top alternatives."""
    tops = result.get("top_logprobs") or [[] for _ in result["token_ids"]]
    content = []
    for t, lp, top in zip(result["token_ids"], result.get("logprobs") or [], tops):
        piece = tok.pieces([t])[0]
        content.append({"token": piece, "logprob": lp, "bytes": list(tok.token_bytes(t)),
                        "top_logprobs": [{"token": tok.pieces([x["id"]])[0], "logprob": x["logprob"],
                                          "bytes": list(tok.token_bytes(x["id"]))} for x in top]})
    return {"content": content}


def _usage(result: dict, gen: Generation) -> dict:
    prompt = len(result.get("prompt_ids") or gen.prompt)
    return {"prompt_tokens": prompt, "completion_tokens": gen.n_tokens, "total_tokens": prompt + gen.n_tokens}


def _register_openai(app: Flask):
    @app.get("/v1/models")
    def models():
        try:
            leader_status()
        except ApiError:
            if not current_app.config["MODEL_NAME"]:
                raise
        return jsonify(object="list", data=[{"id": model_name(), "object": "model", "created": 0,
                                             "owned_by": "nanopipe"}])

    @app.post("/v1/completions")
    def completions():
        body = json_body()
        params, stream = openai_request(body)
        logprobs = optional(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= 5, "an integer in 0..5 or null")
        echo = optional(body, "echo", lambda v: isinstance(v, bool), "true or false") or False
        if stream and (logprobs is not None or echo):
            raise ApiError(400, "logprobs/echo: not available with stream=true; ask without streaming",
                           param="logprobs" if logprobs is not None else "echo")
        ids = encode_prompt(body.get("prompt"), "prompt")
        gen = start_generation(ids, params, "completions", "prompt", echo=echo, top_logprobs=logprobs or 0)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name()}
        if stream:
            return event_stream(_completion_chunks(gen, meta, _include_usage(body)))
        result = gen.run()
        prompt_text = tokenizer().decode(ids) if echo else ""
        choice = {"text": prompt_text + gen.text, "index": 0, "finish_reason": result.get("finish_reason"),
                  "logprobs": None if logprobs is None else _completion_logprobs(tokenizer(), result, echo)}
        return jsonify(**meta, choices=[choice], usage=_usage(result, gen))

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = json_body()
        params, stream = openai_request(body)
        want_logprobs = optional(body, "logprobs", lambda v: isinstance(v, bool), "true or false") or False
        top = optional(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= 20, "an integer in 0..20")
        if stream and want_logprobs:
            raise ApiError(400, "logprobs: not available with stream=true; ask without streaming", param="logprobs")
        ids = encode_prompt(chat_prompt(body.get("messages")), "messages")
        gen = start_generation(ids, params, "chat_completions", "messages",
                               top_logprobs=(top or 0) if want_logprobs else 0)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name()}
        if stream:
            return event_stream(_chat_chunks(gen, dict(meta, object="chat.completion.chunk"), _include_usage(body)))
        result = gen.run()
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                  "logprobs": _chat_logprobs(tokenizer(), result) if want_logprobs else None,
                  "finish_reason": result.get("finish_reason")}
        return jsonify(**meta, choices=[choice], usage=_usage(result, gen))


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _openai_error_chunk(gen: Generation, e: ClientError) -> str:
    err = leader_error(e)
    gen.metrics.count_error(err.kind)
    return sse({"error": {"message": err.message, "type": "invalid_request_error" if err.status == 400 else
                          "server_error", "param": err.param, "code": None}})


def _completion_chunks(gen: Generation, meta: dict, usage: bool):
    """OpenAI's text_completion stream: one chunk per token, a last one with finish_reason, [DONE]."""
    try:
        yield from _completion_events(gen, meta, usage)
    finally:
        gen.close()


def _completion_events(gen: Generation, meta: dict, usage: bool):
    for event in gen.events():
        if event[0] == "token" and event[2]:
            yield sse({**meta, "choices": [{"text": event[2], "index": 0, "logprobs": None, "finish_reason": None}]})
        elif event[0] == "status":
            yield sse_comment(event[1])          # clients skip comments; a person reading the stream sees why it waits
        elif event[0] == "done":
            yield sse({**meta, "choices": [{"text": "", "index": 0, "logprobs": None,
                                            "finish_reason": event[1].get("finish_reason")}]})
            if usage:
                yield sse({**meta, "choices": [], "usage": _usage(event[1], gen)})
        elif event[0] == "error":
            yield _openai_error_chunk(gen, event[1])
    yield sse("[DONE]")


def _chat_chunks(gen: Generation, meta: dict, usage: bool):
    """OpenAI's chat.completion.chunk stream: the role first, then content deltas, then finish_reason."""
    try:
        yield from _chat_chunk_events(gen, meta, usage)
    finally:
        gen.close()


def _chat_chunk_events(gen: Generation, meta: dict, usage: bool):
    yield sse({**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]})
    for event in gen.events():
        if event[0] == "token" and event[2]:
            yield sse({**meta, "choices": [{"index": 0, "delta": {"content": event[2]}, "logprobs": None,
                                            "finish_reason": None}]})
        elif event[0] == "status":
            yield sse_comment(event[1])
        elif event[0] == "done":
            yield sse({**meta, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                            "finish_reason": event[1].get("finish_reason")}]})
            if usage:
                yield sse({**meta, "choices": [], "usage": _usage(event[1], gen)})
        elif event[0] == "error":
            yield _openai_error_chunk(gen, event[1])
    yield sse("[DONE]")
