"""The OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

A Flask Blueprint that create_app registers; it builds on web/app.py's request checks, leader
connection and SSE helpers, so OpenAI's client libraries (and curl scripts written for them) can
talk to the cluster:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<api_token or anything>")
    client.completions.create(model="gpt2", prompt="Hello, I'm a language model,", max_tokens=20)

Chat template. GPT-2 is not a chat model; /v1/chat/completions turns the messages into one prompt
that ends where the assistant's reply should start:

    [{"role": "system", "content": "Be brief."},         System: Be brief.
     {"role": "user", "content": "Hi"},          ->       User: Hi
     {"role": "assistant", "content": "Hello!"},          Assistant: Hello!
     {"role": "user", "content": "Who are you?"}]         User: Who are you?
                                                          Assistant:

The reply ends at the template's next turn marker, CHAT_STOP ("\nUser:"), as well as at any `stop`
the client sends: GPT-2 would otherwise write the user's next line too.

OpenAI sampling fields map onto a decoding strategy by decoding.infer_strategy, the rule /chat
uses too: temperature 0 -> greedy; top_k (an extension) -> top_k; top_p < 1 -> top_p; else
sampling; top_k with top_p < 1 is a 400. A request that sets none of temperature, top_p and top_k
gets the model's configured default strategy (model_config.yaml). stop, frequency_penalty,
presence_penalty, logit_bias and repetition_penalty (an extension) apply to every strategy.

Errors, in a response or mid-stream, have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import time
import uuid

from flask import Blueprint, current_app, jsonify

from ..decoding import EOT, is_int
from .app import (
    ApiError,
    Generation,
    event_stream,
    flag,
    json_body,
    leader_status,
    model_name,
    optional,
    resolve,
    sampling_fields,
    sse,
    sse_comment,
    start_generation,
    tokenizer,
    weights_info,
)

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"     # where the template's next turn starts: a chat reply ends there
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

bp = Blueprint("openai", __name__, url_prefix="/v1")


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    """An error body in OpenAI's shape, which its client libraries show to the user.

    (400, "n: only n=1 is supported", "n") -> {"error": {"message": "n: only ...", "type":
    "invalid_request_error", "param": "n", "code": None}}
    """
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": None}}


# ---------------------------------------------------------------------------------------------
# Reading requests


def openai_request(body: dict, stop=()) -> tuple:
    """The fields /v1/completions and /v1/chat/completions share -> (SamplingParams, stream).
    `stop`: stop strings the route always adds (the chat template's next turn)."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = dict(body, max_tokens=body["max_completion_tokens"])     # the chat API's newer name
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only n=1 is supported (one completion per request)", param="n")
    stream = flag(body, "stream")
    return resolve(None, sampling_fields(body, stop)), stream


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


def encode_prompt(prompt, field: str) -> list:
    """Text (or a list of token ids, as OpenAI allows) -> token ids, checked.

    "Hello world" -> [15496, 995];  [15496, 995] -> [15496, 995];  ["Hello world"] -> [15496, 995]
    """
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, f"{field}: give a non-empty prompt", param=field)
        return tokenizer().encode(prompt)
    if isinstance(prompt, list) and prompt and all(is_int(t) and 0 <= t <= EOT for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ApiError(400, f"{field}: only one prompt per request", param=field)
    raise ApiError(400, f"{field}: must be a non-empty string or a list of token ids in 0..{EOT}", param=field)


# ---------------------------------------------------------------------------------------------
# Answers


def _meta(id_prefix: str, kind: str) -> dict:
    """The fields every answer and every chunk starts with: id, object, created, model."""
    return {"id": f"{id_prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
            "model": model_name()}


def _usage(result: dict, gen: Generation) -> dict:
    """OpenAI's usage, with prompt_tokens_details.cached_tokens: the prompt tokens whose KV cache a
    finished request left on every stage (nanopipe/prefix.py), so only the rest was prefilled."""
    prompt = len(result.get("prompt_ids") or gen.prompt)
    return {"prompt_tokens": prompt, "completion_tokens": gen.n_tokens, "total_tokens": prompt + gen.n_tokens,
            "prompt_tokens_details": {"cached_tokens": int(result.get("cached_tokens") or 0)}}


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _completion_logprobs(tok, result: dict, echo: bool) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset.

    With echo the prompt's tokens come first; its first token has no logprob (nothing came before it).
    """
    prompt_ids = list(result.get("prompt_ids") or []) if echo else []
    ids = prompt_ids + list(result["token_ids"])
    lps = (([None] + list(result.get("prompt_logprobs") or [])) if echo else []) + list(result.get("logprobs") or [])
    pieces = ["" if t == EOT else p for t, p in zip(ids, tok.pieces(ids))]
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    tops = result.get("top_logprobs")
    if tops is not None:
        tops = [None] * len(prompt_ids) + [{tok.pieces([t["id"]])[0]: t["logprob"] for t in pos_top}
                                           for pos_top in tops]
    return {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets, "top_logprobs": tops}


def _chat_logprobs(tok, result: dict) -> dict:
    """The chat API's logprobs: one entry per generated token with its top alternatives."""
    def entry(token_id, logprob) -> dict:
        return {"token": tok.pieces([token_id])[0], "logprob": logprob, "bytes": list(tok.token_bytes(token_id))}

    tops = result.get("top_logprobs") or [[] for _ in result["token_ids"]]
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(x["id"], x["logprob"]) for x in top]}
                        for t, lp, top in zip(result["token_ids"], result.get("logprobs") or [], tops)]}


def _chunks(gen: Generation, meta: dict, usage: bool, choice, first: dict | None = None):
    """OpenAI's stream: [a first chunk,] one chunk per token, one with finish_reason, the usage if
    asked for, then data: [DONE]. `choice(text, finish_reason)` is one choice in the route's shape."""
    if first is not None:
        yield sse({**meta, "choices": [first]})
    for event in gen.events():
        if event[0] == "token" and event[2]:
            yield sse({**meta, "choices": [choice(event[2], None)]})
        elif event[0] == "status":
            yield sse_comment(event[1])
        elif event[0] == "done":
            yield sse({**meta, "choices": [choice("", event[1].get("finish_reason"))]})
            if usage:
                yield sse({**meta, "choices": [], "usage": _usage(event[1], gen)})
        elif event[0] == "error":
            err = gen.stream_error(event[1])
            yield sse(openai_error(err.status, err.message, err.param))
    yield sse("[DONE]")


def _completion_choice(text: str, finish_reason) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _chat_choice(text: str, finish_reason) -> dict:
    return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish_reason}


# ---------------------------------------------------------------------------------------------
# Routes


@bp.get("/models")
def models():
    try:
        leader_status()
    except ApiError:
        if not current_app.config["MODEL_NAME"]:      # without a leader, the configured model still answers
            raise
    return jsonify(object="list", data=[{"id": model_name(), "object": "model", "created": 0,
                                         "owned_by": "nanopipe", **weights_info()}])


@bp.post("/completions")
def completions():
    body = json_body()
    params, stream = openai_request(body)
    logprobs = optional(body, "logprobs", lambda v: is_int(v) and 0 <= v <= 5, "an integer in 0..5 or null")
    echo = flag(body, "echo")
    if stream and (logprobs is not None or echo):
        raise ApiError(400, "logprobs/echo: not available with stream=true; ask without streaming",
                       param="logprobs" if logprobs is not None else "echo")
    ids = encode_prompt(body.get("prompt"), "prompt")
    gen = start_generation(ids, params, "completions", "prompt", echo=echo, top_logprobs=logprobs or 0)
    meta = _meta("cmpl", "text_completion")
    if stream:
        return event_stream(_chunks(gen, meta, _include_usage(body), _completion_choice), gen)
    result = gen.run()
    prompt_text = tokenizer().decode(ids) if echo else ""
    choice = {"text": prompt_text + gen.text, "index": 0, "finish_reason": result.get("finish_reason"),
              "logprobs": None if logprobs is None else _completion_logprobs(tokenizer(), result, echo)}
    return jsonify(**meta, choices=[choice], usage=_usage(result, gen))


@bp.post("/chat/completions")
def chat_completions():
    body = json_body()
    params, stream = openai_request(body, stop=(CHAT_STOP,))
    want_logprobs = flag(body, "logprobs")
    top = optional(body, "top_logprobs", lambda v: is_int(v) and 0 <= v <= 20, "an integer in 0..20")
    if stream and want_logprobs:
        raise ApiError(400, "logprobs: not available with stream=true; ask without streaming", param="logprobs")
    ids = encode_prompt(chat_prompt(body.get("messages")), "messages")
    gen = start_generation(ids, params, "chat_completions", "messages", top_logprobs=(top or 0) if want_logprobs else 0)
    meta = _meta("chatcmpl", "chat.completion")
    if stream:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        chunks = _chunks(gen, dict(meta, object="chat.completion.chunk"), _include_usage(body), _chat_choice, role)
        return event_stream(chunks, gen)
    result = gen.run()
    choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
              "logprobs": _chat_logprobs(tokenizer(), result) if want_logprobs else None,
              "finish_reason": result.get("finish_reason")}
    return jsonify(**meta, choices=[choice], usage=_usage(result, gen))
