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
                                 "decoding_strategy", "seed", "stream", "stop", "frequency_penalty",
                                 "presence_penalty", "repetition_penalty", "logit_bias", "chat"}
                                 -> {"response", "config", "stats"}
    GET  /config                decoding defaults, model, and each node's rank, host and layers
    GET  /health                leader reachability and every node's status; 503 unless all are up
    POST /reconnect             dial the leader again and report
    GET  /metrics               Prometheus text format (web/metrics.py)
    POST /v1/completions        OpenAI-compatible: web/openai.py, a Blueprint that builds on the
    POST /v1/chat/completions     request checks, leader connection and SSE helpers below
    GET  /v1/models

Errors are JSON, never a traceback: 400 {"error": "..."} naming the field for bad input, 401 for a
missing API token, 503 when the leader or a worker is down. /v1 routes use OpenAI's error shape.
"""
from __future__ import annotations

import hmac
import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

from flask import Flask, Response, current_app, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from ..cluster.client import ClientError, LeaderClient
from ..config import ConfigError, ConfigNotFound, load_cluster_config, load_model_config
from ..decoding import (
    EOT,
    STRATEGIES,
    STRATEGY_USES,
    DecodingError,
    SamplingParams,
    check_stop,
    request_params,
)
from .metrics import WebMetrics, render_metrics

STATUS_TIMEOUT_S = 5.0             # a status question the leader does not answer in this long is "down"
RECONNECT_ATTEMPTS = 3
MAX_BODY_BYTES = 1 << 20
PUBLIC_ENDPOINTS = {"page", "static_file"}      # served without the API token: the page asks for it
MAX_CHOICES = 16                   # prompts x n in one /v1/completions request (NANOPIPE_MAX_CHOICES)
# the sampling fields /chat and the OpenAI routes share; each is checked once, by SamplingParams.validate
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "frequency_penalty",
                   "presence_penalty", "repetition_penalty", "logit_bias")
CHAT_FIELDS = ("text", "max_tokens", "temperature", "top_k", "top_p", "decoding_strategy", "seed", "stream", "stop",
               "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "chat")


def web_dir() -> str:
    """The page's folder: the repository's web/ next to the package (an editable install uses it in
    place), or share/nanopipe/web under the Python prefix for an installed copy."""
    here = Path(__file__).resolve().parents[2] / "web"        # nanopipe/web/app.py -> <repo>/web
    if (here / "index.html").is_file():
        return str(here)
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
    except ConfigNotFound:      # a broken file is an error even with --leader
        if leader is None:
            raise
        settings["LEADER_TOKEN"] = os.environ.get("NANOPIPE_TOKEN")
    if os.environ.get("NANOPIPE_API_TOKEN"):
        settings["API_TOKEN"] = os.environ["NANOPIPE_API_TOKEN"]
    if os.environ.get("NANOPIPE_MAX_CHOICES"):
        try:
            settings["MAX_CHOICES"] = int(os.environ["NANOPIPE_MAX_CHOICES"])
        except ValueError:
            raise ConfigError(f"NANOPIPE_MAX_CHOICES={os.environ['NANOPIPE_MAX_CHOICES']!r}: give a whole number "
                              "(the most prompts x n one /v1/completions request may ask for)") from None
    try:
        mc = load_model_config(config_dir, model_name)
        settings.update(MODEL_NAME=mc.name, MODEL_DEFAULTS=mc.decoding_defaults(),
                        MODEL_ALIASES=(mc.hf_model_name,) if mc.hf_model_name != mc.name else ())
    except ConfigNotFound:
        if model_name is not None:
            raise
    return settings


def dial_leader(addr: str, token: str | None, attempts: int = 1, tls_ca: str | None = None) -> LeaderClient:
    """The real CLIENT_FACTORY: a new connection to the leader, passed the handshake (over TLS,
    checked against the cluster's pinned certificate `tls_ca`, when the cluster sets tls_cert)."""
    return LeaderClient.connect(addr, token=token, attempts=attempts, tls_ca=tls_ca)


class ApiError(Exception):
    """An error the API reports as JSON: status 400 names `param`; `kind` is counted in /metrics;
    `code` is OpenAI's machine-readable code (e.g. "model_not_found")."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code = code


def leader_error(e: ClientError) -> ApiError:
    """The leader's refusal of a request is the caller's fault (400, naming the field it carries);
    anything else is 503."""
    if e.kind == "invalid":
        return ApiError(400, str(e), param=getattr(e, "field", None))
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
        MODEL_NAME=None, MODEL_ALIASES=(), MAX_CHOICES=MAX_CHOICES, MODEL_DEFAULTS=None,
        CLIENT_FACTORY=dial_leader, WEB_DIR=web_dir(), TOKENIZER=None,
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
    # imported here, not at the top: openai builds on this module
    from . import openai
    app.register_blueprint(openai.bp)
    return app


class AppState:
    """What the app remembers between requests: its metrics and what the leader last said about itself."""

    def __init__(self):
        self.metrics = WebMetrics()
        self.leader_info: dict = {}         # model, n_ctx, defaults from the last status answer


def state() -> AppState:
    return current_app.extensions["nanopipe"]


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    """{"error": "..."} for our API; OpenAI's shape under /v1 so its client libraries show the message."""
    if request.path.startswith("/v1/"):
        from .openai import openai_error
        return jsonify(openai_error(status, message, param, code)), status
    return jsonify(error=message), status


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
        return error_response(e.status, e.message, e.param, e.code)

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


def optional(body: dict, field: str, check, what: str):
    """body[field] if present and not null, after `check(value)` passes; else None."""
    value = body.get(field)
    if value is None:
        return None
    if not check(value):
        raise ApiError(400, f"{field}: must be {what} (got {json.dumps(value)})", param=field)
    return value


def flag(body: dict, field: str) -> bool:
    """body[field] as a switch: absent or null is False; anything but true/false is a 400."""
    return bool(optional(body, field, lambda v: isinstance(v, bool), "true or false"))


def sampling_fields(body: dict, stop=()) -> dict:
    """The sampling fields both APIs share, as sent (None: not sent); `resolve` checks them.

    `stop`: stop strings the route adds to the client's own (up to 4), e.g. the chat template's
    turn marker: {"stop": "."}, stop=("\\nUser:",) -> ["\\nUser:", "."]
    """
    fields = {f: body.get(f) for f in SAMPLING_FIELDS}
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
    the strategy inferred from them when none is named (decoding.request_params)."""
    try:
        return request_params(decoding_defaults(), strategy=strategy, **fields)
    except DecodingError as e:
        raise ApiError(400, str(e), param=e.field) from None


def chat_request(body: dict) -> tuple:
    """POST /chat's body -> (prompt text, SamplingParams, stream).

    Without a decoding_strategy the fields choose one, as in the OpenAI routes:
    {"text": "Hello", "temperature": 0} -> ("Hello", greedy, False);
    {"text": "Hi", "temperature": 0.8, "top_k": 40} -> ("Hi", top_k, False), whatever the default.
    """
    check_fields(body, CHAT_FIELDS)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "text: give the prompt as a non-empty string", param="text")
    strategy = optional(body, "decoding_strategy", lambda v: v in STRATEGIES,
                        f"one of {', '.join(sorted(STRATEGIES))}")
    stream = flag(body, "stream")
    stop = ()
    if flag(body, "chat"):      # the page: text is the user's turn, in /v1/chat/completions' template
        from .openai import CHAT_STOP, chat_prompt  # (openai builds on this module)
        text, stop = chat_prompt([{"role": "user", "content": text}]), (CHAT_STOP,)
    return text, resolve(strategy, sampling_fields(body, stop)), stream


def tokenizer():
    tok = current_app.config["TOKENIZER"]
    if tok is None:     # many first requests at once: get_tokenizer lets one build, the others wait
        from ..tokenizer import get_tokenizer
        tok = current_app.config["TOKENIZER"] = get_tokenizer()
    return tok


# ---------------------------------------------------------------------------------------------
# Talking to the leader


def connect(attempts: int = 1):
    """A new connection to the leader for this request (never shared between requests)."""
    cfg = current_app.config
    tls = {"tls_ca": cfg["LEADER_TLS_CA"]} if cfg.get("LEADER_TLS_CA") else {}
    try:
        client = cfg["CLIENT_FACTORY"](cfg["LEADER"], cfg["LEADER_TOKEN"], attempts=attempts, **tls)
    except ClientError as e:
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
        raise ApiError(400, f"unknown field {unknown[0]!r}{hint}; known fields: {', '.join(known)}",
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
            if self.t_first is None:
                self.t_first = now
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
                 echo: bool = False, top_logprobs: int = 0, score_only: bool = False):
        super().__init__(client, prompts, params, metrics, t0, echo=echo, top_logprobs=top_logprobs)
        self.seeds, self.score_only = seeds, score_only
        self.texts: list = [[] for _ in prompts]        # generation i's pieces
        self.counts: list = [0] * len(prompts)          # generation i's sampled tokens
        self._t_last: list = [None] * len(prompts)

    def text_of(self, i: int) -> str:
        return "".join(self.texts[i])

    def _run(self):
        try:
            results = self.client.generate_batch(self.prompt, self.params, seeds=self.seeds, on_token=self._on_token,
                                                 on_status=lambda text: self._q.put(("status", text)),
                                                 echo=self.echo, top_logprobs=self.top_logprobs,
                                                 score_only=True if self.score_only else None)
            for r in results:
                self.metrics.observe_nodes(r.get("node_ms") or {})
            self._q.put(("done", results))
        except ClientError as e:
            self._q.put(("error", e))
        except Exception as e:  # a broken connection must end the response, not hang it
            self._q.put(("error", ClientError(f"lost the leader mid-reply: {type(e).__name__}: {e}", "cluster")))

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
                           top_logprobs=top_logprobs, score_only=score_only)


def sse(data, event: str | None = None) -> str:
    """One Server-Sent Event: 'event: done\\ndata: {...}\\n\\n'. JSON never contains a raw newline."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def sse_comment(text: str) -> str:
    """': waiting for rank 2\\n\\n': clients skip comments; a person reading the stream sees why it waits."""
    return ": " + " ".join(str(text).splitlines()) + "\n\n"


def event_stream(chunks, gen: Generation) -> Response:
    """A streamed text/event-stream response. However it ends (finished, or the client left before
    the first chunk), closing it also closes `gen`'s leader connection."""
    resp = Response(chunks, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.call_on_close(gen.close)
    return resp


# ---------------------------------------------------------------------------------------------
# POST /chat


def usage_of(result: dict, gen: Generation) -> dict:
    """OpenAI's token counts for one reply: {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}."""
    prompt = len(result.get("prompt_ids") or gen.prompt)
    return {"prompt_tokens": prompt, "completion_tokens": gen.n_tokens, "total_tokens": prompt + gen.n_tokens}


def params_view(params: SamplingParams, tokens: int | None = None) -> dict:
    """What a reply ran with, in the guide's shape; the page shows it under each reply. A knob the
    strategy does not use is null (greedy uses none of them); stop, penalties and bias appear
    when set.

    top_k, T=0.8, k=40, 30 tokens -> {"tokens_generated": 30, "temperature": 0.8, "top_k": 40,
    "top_p": None, "decoding_strategy": "top_k", "max_tokens": 30, "seed": None}
    """
    uses = STRATEGY_USES.get(params.strategy, ())
    view = {"temperature": params.temperature if "temperature" in uses else None,
            "top_k": params.top_k if "top_k" in uses else None,
            "top_p": params.top_p if "top_p" in uses else None,
            "decoding_strategy": params.strategy, "max_tokens": params.max_tokens, "seed": params.seed}
    extras = {k: v for k, v in params.sent_fields().items()
              if k in ("stop", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias")}
    view.update(extras)
    return view if tokens is None else {"tokens_generated": tokens, **view}


def _register_chat(app: Flask):
    @app.post("/chat")
    def chat():
        text, params, stream = chat_request(json_body())
        gen = start_generation(tokenizer().encode(text), params, "chat", "text")
        if not stream:
            result = gen.run()
            return jsonify(response=gen.text, config=params_view(params, gen.n_tokens), stats=gen.stats(result),
                           usage=usage_of(result, gen))
        return event_stream(_chat_events(gen, params), gen)


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
                       "stats": gen.stats(event[1]), "usage": usage_of(event[1], gen)}, event="done")
        else:
            err = gen.stream_error(event[1])
            yield sse({"error": err.message, "status": err.status}, event="error")


# ---------------------------------------------------------------------------------------------
# The cluster: /config, /health, /reconnect, /metrics


def node_view(node: dict) -> dict:
    return {"rank": node.get("rank"), "host": node.get("host"), "layers": node.get("layers"),
            "status": node.get("status"), "last_seen_s": node.get("last_seen_s"), "synthetic": node.get("synthetic")}


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
            nodes=[node_view(n) for n in status.get("nodes", [])], **weights_info())

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
                "nodes": nodes, "live_sessions": status.get("live_sessions"),
                **{k: status[k] for k in WEIGHTS_KEYS if k in status}}
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
