"""The web app's connection to the leader, and what the leader said about itself.

Every request that needs the cluster dials the leader on a connection of its own (`connect`:
never shared between requests, so two chats at once never share a socket). Each dial and status
answer updates state().leader_info, which the routes read back:

    connect()            a LeaderClient; leader_info learns model, aliases, n_ctx from its welcome
    leader_status()      the leader's STATUS; leader_info also learns its decoding defaults and weights
    status_or_503()      the same, or the 503 a status route answers when the leader is not there
    model_defaults()     model_config.yaml's decoding section, else the defaults the leader gave
    model_name(), model_aliases(), weights_info()
"""
from __future__ import annotations

from flask import current_app, jsonify

from ..cluster.leader_client import ClientError, LeaderClient
from ..weights import WEIGHTS_STATUS_KEYS
from .errors import ApiError
from .state import state

STATUS_TIMEOUT_S = 5.0             # a status question the leader does not answer in this long is "down"


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
    state().leader_info.update({k: status[k] for k in ("model", "aliases", "n_ctx", "defaults") + WEIGHTS_STATUS_KEYS
                                if k in status})
    return status


def status_or_503(**empty) -> tuple:
    """(the leader's status, None), or (None, the 503 answer of a route that shows it: why, and
    whether the leader is reachable at all; `empty`: the route's own empty fields, e.g. nodes=[])."""
    addr = current_app.config["LEADER"]
    try:
        return leader_status(), None
    except ApiError as e:
        # refused our token: it is up (reachable), we are not let in (authorized false)
        leader = ({"addr": addr, "reachable": True, "authorized": False} if e.kind == "unauthorized"
                  else {"addr": addr, "reachable": False})
        return None, (jsonify(ok=False, error=e.message, leader=leader, **empty), 503)


def model_defaults() -> dict:
    """model_config.yaml's decoding section; without one, what the leader says its defaults are (asked
    once, then remembered). A route asks for them before it parses a body (body.py takes them as an
    argument), so parsing never dials the leader."""
    defaults = current_app.config["MODEL_DEFAULTS"]
    if defaults is not None:
        return defaults
    info = state().leader_info
    if "defaults" not in info:
        leader_status()
    return info.get("defaults") or {}


def weights_info() -> dict:
    """{"synthetic": bool, "weights_mixed": bool, "weights_note": str | None}; {} until the leader said."""
    info = state().leader_info
    return {k: info.get(k) for k in WEIGHTS_STATUS_KEYS} if "synthetic" in info else {}


def model_name() -> str:
    return state().leader_info.get("model") or current_app.config["MODEL_NAME"] or "gpt2"


def model_aliases() -> list:
    """Other names the served model answers to (its hub name), from the leader or model_config.yaml."""
    info = state().leader_info
    names = info["aliases"] if "model" in info and "aliases" in info else current_app.config["MODEL_ALIASES"]
    return [n for n in names if n and n != model_name()]
