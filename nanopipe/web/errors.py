"""The web app's errors: one exception every route raises, answered as JSON in the caller's shape.

    raise ApiError(400, "text: give the prompt as a non-empty string", param="text")
    -> 400 {"error": "text: ..."}                                   (/chat, /config, ...)
    -> 400 {"error": {"message": "text: ...", "type": "invalid_request_error", "param": "text", ...}}   (/v1)

create_app's error handler (web/app.py) turns an ApiError into `error_response`; a leader's refusal
(a ClientError) becomes one by `leader_error`.
"""
from __future__ import annotations

import math

from flask import jsonify, request

from ..cluster.leader_client import ClientError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}


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
