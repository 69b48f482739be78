"""Reading a request's body: once, into the typed request its route runs (web/chat.py's ChatRequest,
web/openai.py's CompletionRequest and ChatCompletionRequest). What every route shares is here:

    json_body()                       the body as a JSON object, checked (depth, Unicode), else a 400
    check_fields(body, known)         an unknown field is a 400 naming it (and the closest known one)
    optional(body, "n", check, what)  one optional field, checked; flag(body, "stream") a true/false
    sampling(body, defaults)          the body's sampling fields -> the final SamplingParams, validated
                                      once (sampling_params.request_params) on top of `defaults`

Nothing here dials the leader: a route that needs the leader's decoding defaults asks for them
first (connection.model_defaults) and passes them in.

    sampling({"temperature": 0.8, "top_k": 40, "max_tokens": 30}, defaults) -> top_k, T=0.8, k=40, 30 tokens
"""
from __future__ import annotations

import difflib
import json

from flask import request

from ..logs import shown
from ..sampling_params import FIELDS, DecodingError, SamplingParams, check_stop, request_params
from .errors import ApiError

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


def check_fields(body: dict, known) -> None:
    """Refuse a field the route does not know, naming it and the closest known one (a typo must not
    be silently ignored): {"temprature": 0} -> 400 "unknown field 'temprature' (did you mean
    'temperature'?); known fields: ..."."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ApiError(400, f"unknown field {shown(unknown[0])}{hint}; known fields: {', '.join(known)}",
                       param=unknown[0])


def sampling(body: dict, defaults: dict | None, strategy: str | None = None, stop=()) -> SamplingParams:
    """The exact SamplingParams a request runs with, validated once: `defaults` (model_config.yaml's
    decoding section, or the leader's), then the body's sampling fields (sampling_params.FIELDS; absent
    or null: not sent), the strategy inferred from them when none is named
    (sampling_params.request_params). A bad field is a 400 naming it.

    `stop`: stop strings the route adds to the client's own (up to 4), e.g. the chat template's
    turn marker: {"stop": "."}, stop=("\\nUser:",) -> ("\\nUser:", ".")
    """
    fields = {f: body.get(f) for f in FIELDS}
    try:
        sent = check_stop(fields["stop"])           # a client may send up to 4 (OpenAI's limit)
        fields["stop"] = list(stop) + [s for s in sent if s not in stop]
        return request_params(defaults, strategy=strategy, **fields)
    except DecodingError as e:
        raise ApiError(400, str(e), param=e.field) from None
