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

    GET  /                      the chat page (web/index.html), its app.js and style.css (also under
                                /static/), with no token needed
    POST /chat                  {"text", the sampling fields (sampling_params.FIELDS), "decoding_strategy",
                                 "stream", "chat", "history", "conversation_id"} (chat.CHAT_FIELDS)
                                 -> {"response", "config", "stats", "usage"}
    GET  /config                decoding defaults, model, and each node's rank, host and layers
    GET  /health                leader reachability and every node's status; 503 unless all are up
    POST /reconnect             dial the leader again and report
    POST /cluster/leave         {"rank": R}: drain a worker, as `nanopipe leave` (web/leave.py)
    GET  /metrics               Prometheus text format (web/metrics.py)
    GET  /cluster               the ring as the page's Cluster view draws it (web/cluster_view.py)
    POST /v1/completions        OpenAI-compatible: web/openai.py, a Blueprint
    POST /v1/chat/completions
    GET  /v1/models

The modules: app.py (this one: create_app, the guards every request passes, the page, /metrics),
chat.py (the guide's API), openai.py (the OpenAI routes), and what they share: errors.py (ApiError
and its JSON answers), body.py (reading a body into a route's typed request), connection.py (the
leader connection and what the leader said), generation.py (a generation as events, streamed as
Server-Sent Events), batch.py (several in one leader message), state.py (what the app remembers
between requests); metrics.py (Prometheus).
app.py imports the others; none imports app.py.

Browsers. A page from another origin may call the API if its origin is allowed: the app's own, then
`cors_origins` when cluster_config.yaml sets it, else DEFAULT_ORIGINS: http://localhost, 127.0.0.1
and [::1] on any port, and "null" (the page opened as a file). A POST whose Origin is not allowed
is a 403 before anything runs: a form or fetch() on some other site cannot make the cluster work
for it (no cookie is involved; the check is for clusters without an api_token). Programs that send
no Origin (curl, OpenAI clients) are not browsers and pass. Every answer says nosniff; the page
may not be framed and runs only its own script (SECURITY_HEADERS).

Errors are JSON, never a traceback: 400 {"error": "..."} naming the field for bad input, 401 for a
missing API token, 503 when the leader or a worker is down. /v1 routes use OpenAI's error shape.
"""
from __future__ import annotations

import hmac
import os
import re
import time
from pathlib import Path

from flask import Flask, Response, current_app, g, request, send_from_directory
from werkzeug.exceptions import HTTPException

from ..config import ConfigError, ConfigNotFound, Configs
from . import chat, cluster_view, leave, openai
from .connection import dial_leader, leader_status
from .errors import ApiError, error_response
from .metrics import render_metrics
from .state import AppState, state

MAX_BODY_BYTES = 1 << 20
PUBLIC_ENDPOINTS = {"page", "static_file"}      # served without the API token: the page asks for it
PAGE_FILES = ("app.js", "style.css")            # beside index.html, named relatively by it
# The origins allowed when cors_origins is not set: pages on this machine, and a page opened as a
# file ("null"; a sandboxed frame sends it too: set cors_origins or api_token to shut that out).
DEFAULT_ORIGINS = re.compile(r"http://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?|null")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # the page's own script and style only; it calls the API wherever the user points it (connect-src)
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}
MAX_CHOICES = 16                   # prompts x n in one /v1/completions request (NANOPIPE_MAX_CHOICES)


def web_dir() -> str:
    """The chat page's folder, found one way: the package's web/static. In the repository that is a
    symlink to the top-level web/ (where the page lives, and `cd web && python -m http.server` serves
    it), so an editable install serves the files in place; an installed copy carries the files
    themselves there (setup.cfg's package_data)."""
    return str((Path(__file__).parent / "static").resolve())


# ---------------------------------------------------------------------------------------------
# Settings


def settings_from_configs(configs: Configs | str = "configs", model_name: str | None = None,
                          leader: str | None = None) -> dict:
    """The app's settings from the YAML configs: where the leader is, the cluster secret (and, on a
    TLS cluster, the certificate) to dial it with, the API token, CORS origins, and the decoding
    defaults of model_config.yaml.

    With --leader given, missing config files are fine: defaults then come from the leader itself.
    `configs` is the command's config.Configs (what it read already is not read again; `model_name`,
    if given, picks another entry) or a folder.
    """
    if isinstance(configs, str):
        configs = Configs(configs, model_name)
    elif model_name is not None:
        configs = configs.for_model(model_name)
    settings = {"LEADER": leader, "CONFIG_DIR": configs.dir}
    try:
        cc = configs.cluster
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
        mc = configs.model
        settings.update(MODEL_NAME=mc.name, MODEL_DEFAULTS=mc.decoding_defaults(),
                        MODEL_ALIASES=(mc.hf_model_name,) if mc.hf_model_name != mc.name else ())
    except ConfigNotFound:
        if model_name is not None:
            raise
    return settings


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
    _register_metrics(app)
    chat.register(app)
    cluster_view.register(app)
    leave.register(app)                 # POST /cluster/leave (web/leave.py)
    app.register_blueprint(openai.bp)
    return app


def origin_allowed(origin: str) -> bool:
    """May a page from `origin` call the API? Its own origin may; others as the module docstring says.

    "http://localhost:8080" -> True unless cors_origins is set without it; "https://evil.example" ->
    False unless cors_origins lists it.
    """
    if origin == request.host_url.rstrip("/"):
        return True
    configured = current_app.config["CORS_ORIGINS"]
    return origin in configured if configured else DEFAULT_ORIGINS.fullmatch(origin) is not None


def _register_guards(app: Flask):
    @app.before_request
    def start_clock_and_check_token():
        g.t0 = time.perf_counter()
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin is not None and not origin_allowed(origin):
            state().metrics.count_error("forbidden")
            return error_response(403, f"a page from {origin} may not call this API (a browser sent the request "
                                       "from another site): if it is yours, add it to cors_origins in "
                                       "cluster_config.yaml")
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
    def cors_and_security_headers(resp):
        """Only allowed origins may read the API's answers from their pages; never '*', no credentials."""
        resp.headers.update(SECURITY_HEADERS)
        resp.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Max-Age"] = "600"
        return resp

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        state().metrics.count_error(e.kind)
        return error_response(e.status, e.message, e.param, e.code, e.retry_after_s)

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
    @app.get(f"/<any({', '.join(PAGE_FILES)}):name>")
    def static_file(name):
        return send_from_directory(current_app.config["WEB_DIR"], name)


def _register_metrics(app: Flask):
    """GET /metrics: Prometheus text (web/metrics.py), with the leader's node stats when it answers."""
    @app.get("/metrics")
    def metrics():
        try:
            status = leader_status()
        except ApiError:
            status = None
        return Response(render_metrics(state().metrics, status),
                        content_type="text/plain; version=0.0.4; charset=utf-8")
