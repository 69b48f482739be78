"""The OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

A Flask Blueprint that create_app registers; each route parses its body once into a typed request
(CompletionRequest, ChatCompletionRequest) and runs it with web/generation.py (web/batch.py for several), so
OpenAI's client libraries (and curl scripts written for them) can talk to the cluster:

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

A conversation is cheap only if turn N+1's prompt starts with exactly the tokens turn N computed
(its prompt, then its reply), so the prefix cache reuses all of them. Two rules keep it so. A
content that begins with whitespace follows its "Assistant:" as it is: GPT-2's replies begin with
a space (" Hello!"), and a second space would make other tokens (so does a reply the model began
without one; a message written by hand, "Hello!", gets one space). And a chat's prompt starts
with the ids the last turn computed, kept by their text (web/state.py's Transcripts), since
encoding the text again may cut it into other tokens than the model wrote.

OpenAI sampling fields map onto a decoding strategy by sampling_params.infer_strategy, the rule /chat
uses too: temperature 0 -> greedy; top_k (an extension) -> top_k; top_p < 1 -> top_p; else
sampling; top_k with top_p < 1 is a 400. A request that sets none of temperature, top_p and top_k
gets the model's configured default strategy (model_config.yaml). stop, frequency_penalty,
presence_penalty, logit_bias and repetition_penalty (an extension) apply to every strategy.

Batches and scoring (/v1/completions). `prompt` may be a list of prompts, and `n` asks for n
choices of each; they all go to the leader in one message and run as concurrent sessions of one
scheduler batch (choice i*n + j is prompt i's choice j, sampled with seed + j when a seed is
given). `echo` with `max_tokens: 0` scores the prompt, the request evaluation harnesses send:

    {"prompt": [[464, 3290, 318]], "echo": true, "max_tokens": 0, "logprobs": 1}
    -> tokens ["The", " dog", " is"], token_logprobs [null, log p(" dog" | "The"), log p(" is" | "The dog")],
       top_logprobs [null, {top-1 after "The": its logprob}, {top-1 after "The dog": its logprob}]

Errors, in a response or mid-stream, have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from flask import Blueprint, current_app, jsonify

from ..decoding import EOT
from ..sampling_params import FIELDS, SamplingParams, is_int
from .batch import BatchGeneration, batch_usage, start_batch
from .body import check_fields, flag, json_body, optional, sampling
from .connection import leader_status, model_aliases, model_defaults, model_name, weights_info
from .errors import ApiError, openai_error
from .generation import Generation, event_stream, sse, sse_comment, start_generation, usage_of
from .state import state, tokenizer

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"     # where the template's next turn starts: a chat reply ends there
# A conversation's size limits: GPT-2's context holds a few thousand characters, so more only costs
# the web app time (each message is encoded once, but an unbounded body is still unbounded work).
MAX_CHAT_TURNS = 1000
MAX_CHAT_CHARS = 256 * 1024

# The request fields each route knows; any other is refused, naming it. The sampling fields are
# sampling_params.FIELDS (top_k and repetition_penalty are extensions to OpenAI's).
_SHARED_FIELDS = ("model",) + FIELDS + ("n", "stream", "stream_options", "user")
COMPLETION_FIELDS = _SHARED_FIELDS + ("prompt", "logprobs", "echo", "best_of", "suffix")
CHAT_COMPLETION_FIELDS = _SHARED_FIELDS + ("messages", "max_completion_tokens", "logprobs", "top_logprobs")

bp = Blueprint("openai", __name__, url_prefix="/v1")


# ---------------------------------------------------------------------------------------------
# Reading requests


def served_names() -> list:
    """The names the served model answers to: the cluster's model (config name) first, then its hub name."""
    if "model" not in state().leader_info:
        try:
            leader_status()         # learn the leader's model name; if it is down, the request 503s later
        except ApiError:
            pass
    return [model_name()] + model_aliases()


def check_model(name):
    """An unknown `model` is OpenAI's 404 model_not_found; none given (None) means the served one.
    Checked after the body is parsed: the names may need the leader's word (served_names).

    "gpt2-xl" on a cluster serving "gpt2" (hub name "openai-community/gpt2") -> 404
    """
    if name is None:
        return
    served, *aliases = served_names()
    if name != served and name not in aliases:
        also = f" (alias {', '.join(json.dumps(a) for a in aliases)})" if aliases else ""
        raise ApiError(404, f"The model {json.dumps(name)} does not exist: this server serves {json.dumps(served)}"
                            f"{also}; see GET /v1/models", param="model", kind="not_found", code="model_not_found")


def choice_count(body: dict) -> int:
    """n (choices per prompt) and best_of, which must equal it: nanopipe returns every choice it makes."""
    n = optional(body, "n", lambda v: is_int(v) and v >= 1, "an integer >= 1") or 1
    best_of = optional(body, "best_of", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    if best_of is not None and best_of != n:
        raise ApiError(400, f"best_of: only best_of == n is supported (got best_of={best_of}, n={n}); nanopipe "
                            "returns every completion it makes, so ask for n instead", param="best_of")
    return n


def openai_request(body: dict, defaults: dict | None, stop=(), max_n: int = 1) -> tuple:
    """The fields /v1/completions and /v1/chat/completions share -> (SamplingParams, stream).
    `stop`: stop strings the route always adds (the chat template's next turn); `max_n`: the
    largest n the route takes (the caller checks n itself when it is above 1)."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = dict(body, max_tokens=body["max_completion_tokens"])     # the chat API's newer name
    if max_n == 1 and body.get("n") not in (None, 1):
        raise ApiError(400, "n: only n=1 is supported here (one completion per request); /v1/completions "
                            "takes n > 1", param="n")
    optional(body, "user", lambda v: isinstance(v, str), "a string")   # accepted; nanopipe keeps no per-user state
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix: not supported (GPT-2 only continues text; it cannot fill in before a suffix)",
                       param="suffix")
    stream = flag(body, "stream")
    return sampling(body, defaults, stop=stop), stream


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions' body, parsed once (parse_completion): the prompts as token ids, the final
    SamplingParams, and what to send back. Choice i*n + j is prompt i's choice j."""
    model: str | None
    prompts: list
    params: SamplingParams
    n: int = 1
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    score_only: bool = False        # echo with max_tokens 0: score the prompts, generate nothing
    include_usage: bool = False


def parse_completion(body: dict, defaults: dict | None, max_choices: int) -> CompletionRequest:
    """POST /v1/completions' body -> a CompletionRequest, every field checked (a bad one is a 400
    naming it), the sampling resolved on top of `defaults`. `max_choices`: prompts x n at most."""
    check_fields(body, COMPLETION_FIELDS)
    echo = flag(body, "echo")
    score_only = is_int(body.get("max_tokens")) and body["max_tokens"] == 0
    if score_only:                  # echo + max_tokens 0: score the prompt, generate nothing
        if not echo:
            raise ApiError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt with echo=true "
                                "(and logprobs); otherwise give an integer >= 1", param="max_tokens")
        body = dict(body, max_tokens=1)
    params, stream = openai_request(body, defaults, max_n=max_choices)
    n = choice_count(body)
    logprobs = optional(body, "logprobs", lambda v: is_int(v) and 0 <= v <= 5, "an integer in 0..5 or null")
    if stream and (logprobs is not None or echo):
        raise ApiError(400, "logprobs/echo: not available with stream=true; ask without streaming",
                       param="logprobs" if logprobs is not None else "echo")
    prompts = encode_prompts(body.get("prompt"))
    if len(prompts) * n > max_choices:
        raise ApiError(400, f"prompt/n: {len(prompts)} prompt(s) x n={n} = {len(prompts) * n} completions; at most "
                            f"{max_choices} per request (NANOPIPE_MAX_CHOICES): split the batch into smaller requests",
                       param="n" if n > 1 else "prompt")
    return CompletionRequest(body.get("model"), prompts, params, n, stream, echo, logprobs, score_only,
                             _include_usage(body))


@dataclass(frozen=True)
class ChatCompletionRequest:
    """POST /v1/chat/completions' body, parsed once (parse_chat_completion): the conversation as one
    prompt in the chat template (token ids), the final SamplingParams, and what to send back."""
    model: str | None
    prompt_ids: list
    params: SamplingParams
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0           # with logprobs: the K most likely alternatives of each token
    include_usage: bool = False


def parse_chat_completion(body: dict, defaults: dict | None) -> ChatCompletionRequest:
    """POST /v1/chat/completions' body -> a ChatCompletionRequest (a bad field is a 400 naming it).
    The prompt starts with the ids the last turn of this conversation computed, if this app kept them."""
    check_fields(body, CHAT_COMPLETION_FIELDS)
    params, stream = openai_request(body, defaults, stop=(CHAT_STOP,))
    want_logprobs = flag(body, "logprobs")
    top = optional(body, "top_logprobs", lambda v: is_int(v) and 0 <= v <= 20, "an integer in 0..20")
    if stream and want_logprobs:
        raise ApiError(400, "logprobs: not available with stream=true; ask without streaming", param="logprobs")
    if isinstance(body.get("messages"), list):
        check_chat_size(body["messages"], "messages")
    ids = encode_chat(chat_prompt(body.get("messages"), state().transcripts))
    return ChatCompletionRequest(body.get("model"), ids, params, stream, want_logprobs,
                                 (top or 0) if want_logprobs else 0, _include_usage(body))


def chat_prompt(messages, transcripts=None) -> str:
    """OpenAI messages -> one GPT-2 prompt, with the template in this module's docstring.

    [{"role": "user", "content": "Hi"}] -> "User: Hi\\nAssistant:"
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello!"}, {"role": "user",
     "content": "Bye"}] -> "User: Hi\\nAssistant: Hello!\\nUser: Bye\\nAssistant:"
    """
    return "".join(chat_pieces(messages, transcripts=transcripts))


def check_chat_size(messages: list, field: str):
    """At most MAX_CHAT_TURNS messages and MAX_CHAT_CHARS characters of content, else a 400 saying so."""
    if len(messages) > MAX_CHAT_TURNS:
        raise ApiError(400, f"{field}: {len(messages)} messages; at most {MAX_CHAT_TURNS} are accepted (the "
                            "model's context holds far fewer, the oldest are left out anyway): send the most recent "
                            "ones", param=field)
    chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    if chars > MAX_CHAT_CHARS:
        raise ApiError(400, f"{field}: {chars} characters of content; at most {MAX_CHAT_CHARS} are accepted (the "
                            "model's context holds a few thousand): send the most recent turns", param=field)


def chat_pieces(messages, field: str = "messages", transcripts=None) -> list:
    """The template's text one message at a time, then the reply's cue; they join into the prompt.
    A content that begins with whitespace (GPT-2's replies do) is not given another space, nor is
    a reply the model began without one (`transcripts` knows them: web/state.py).

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello!"}]
    -> ["User: Hi", "\\nAssistant: Hello!", "\\nAssistant:"]
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"{field}: give a non-empty list of {{\"role\", \"content\"}} objects", param=field)
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
        bare = content[:1].isspace() or (role == "assistant" and transcripts is not None and transcripts.bare(content))
        newline, space = "\n" if lines else "", "" if bare else " "
        lines.append(f"{newline}{ROLE_NAMES[role]}:{space}{content}")
    return lines + ["\nAssistant:"]


def encode_chat(text: str) -> list:
    """A chat prompt's token ids: the ids an earlier turn computed for the text it starts with (if
    this app kept them), then the rest encoded."""
    return state().transcripts.encode(text, tokenizer())


def encode_prompts(prompt, field: str = "prompt") -> list:
    """The `prompt` of /v1/completions -> a list of prompts, each a list of token ids, in order.

    "Hi" -> [[17250]];  [17250, 995] -> [[17250, 995]];  ["Hi", "Bye"] -> [[17250], [3886, 68]];
    [[17250], [3886, 68]] -> [[17250], [3886, 68]]
    """
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1 or isinstance(prompt[0], list):
            return [encode_prompt(p, f"{field}[{i}]") for i, p in enumerate(prompt)]
    return [encode_prompt(prompt, field)]


def encode_prompt(prompt, field: str) -> list:
    """Text (or a list of token ids, as OpenAI allows) -> token ids, checked.

    "Hello world" -> [15496, 995];  [15496, 995] -> [15496, 995];  ["Hello world"] -> [15496, 995]
    """
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, f"{field}: give a non-empty prompt", param=field.split("[")[0])
        return tokenizer().encode(prompt)
    if isinstance(prompt, list) and prompt and all(is_int(t) and 0 <= t <= EOT for t in prompt):
        return list(prompt)
    raise ApiError(400, f"{field}: must be a non-empty string or a list of token ids in 0..{EOT} (or a list of "
                        "those, for a batch)", param=field.split("[")[0])


# ---------------------------------------------------------------------------------------------
# Answers


def _meta(id_prefix: str, kind: str) -> dict:
    """The fields every answer and every chunk starts with: id, object, created, model."""
    return {"id": f"{id_prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
            "model": model_name()}


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _completion_logprobs(tok, result: dict, echo: bool) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset.

    With echo the prompt's tokens come first; its first token has no logprob (nothing came before it),
    so its top_logprobs entry is null too; every other prompt position carries its top alternatives.
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
    prompt_tops = result.get("prompt_top_logprobs")
    if tops is not None or prompt_tops is not None:
        def top_map(pos_top) -> dict:
            return {tok.pieces([t["id"]])[0]: t["logprob"] for t in pos_top}
        head = ([None] + [top_map(p) for p in prompt_tops] if prompt_tops is not None else [None] * len(prompt_ids)) \
            if echo else []
        tops = head + [top_map(p) for p in tops or []]
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
                yield sse({**meta, "choices": [], "usage": usage_of(event[1], gen)})
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
    """The model the cluster serves, under its config name, then its hub name (vLLM lists each name it
    answers to as a model; `root` says which model a name is)."""
    try:
        leader_status()
    except ApiError:
        if not current_app.config["MODEL_NAME"]:      # without a leader, the configured model still answers
            raise
    served = model_name()
    return jsonify(object="list", data=[{"id": name, "object": "model", "created": 0, "owned_by": "nanopipe",
                                         "root": served, **weights_info()} for name in [served] + model_aliases()])


@bp.post("/completions")
def completions():
    req = parse_completion(json_body(), model_defaults(), current_app.config["MAX_CHOICES"])
    check_model(req.model)
    meta = _meta("cmpl", "text_completion")
    if len(req.prompts) == 1 and req.n == 1 and not req.score_only:
        return _one_completion(req, meta)
    # a batch: choice i*n + j is prompt i's choice j; with a seed, choice j samples with seed + j
    params, n = req.params, req.n
    runs = [ids for ids in req.prompts for _ in range(n)]
    seeds = [params.seed + j if params.seed is not None and n > 1 else None for _ in req.prompts for j in range(n)]
    gen = start_batch(runs, seeds, params, "completions", "prompt", echo=req.echo, top_logprobs=req.logprobs or 0,
                      score_only=req.score_only)
    if req.stream:
        return event_stream(_batch_chunks(gen, meta, req.include_usage, len(runs), req.prompts), gen)
    results = gen.run()
    choices = []
    for i, (ids, result) in enumerate(zip(runs, results)):
        prompt_text = tokenizer().decode(ids) if req.echo else ""
        choices.append({"text": prompt_text + gen.text_of(i), "index": i, "finish_reason": result.get("finish_reason"),
                        "logprobs": None if req.logprobs is None else _completion_logprobs(tokenizer(), result,
                                                                                           req.echo)})
    return jsonify(**meta, choices=choices, usage=batch_usage(req.prompts, gen, results))


def _one_completion(req: CompletionRequest, meta: dict):
    """One prompt, one choice: a Generation streamed token by token."""
    ids = req.prompts[0]
    gen = start_generation(ids, req.params, "completions", "prompt", echo=req.echo, top_logprobs=req.logprobs or 0)
    if req.stream:
        return event_stream(_chunks(gen, meta, req.include_usage, _completion_choice), gen)
    result = gen.run()
    prompt_text = tokenizer().decode(ids) if req.echo else ""
    choice = {"text": prompt_text + gen.text, "index": 0, "finish_reason": result.get("finish_reason"),
              "logprobs": None if req.logprobs is None else _completion_logprobs(tokenizer(), result, req.echo)}
    return jsonify(**meta, choices=[choice], usage=usage_of(result, gen))


def _batch_chunks(gen: BatchGeneration, meta: dict, usage: bool, count: int, prompts: list):
    """A batch's stream: each token as a chunk carrying its choice's index; once all are done, one
    finish_reason chunk per choice (in index order), the usage if asked for, then data: [DONE]."""
    for event in gen.events():
        if event[0] == "token" and event[3]:
            yield sse({**meta, "choices": [{"text": event[3], "index": event[1], "logprobs": None,
                                            "finish_reason": None}]})
        elif event[0] == "status":
            yield sse_comment(event[1])
        elif event[0] == "done":
            for i, result in enumerate(event[1]):
                yield sse({**meta, "choices": [{"text": "", "index": i, "logprobs": None,
                                                "finish_reason": result.get("finish_reason")}]})
            if usage:
                yield sse({**meta, "choices": [], "usage": batch_usage(prompts, gen, event[1])})
        elif event[0] == "error":
            err = gen.stream_error(event[1])
            yield sse(openai_error(err.status, err.message, err.param))
    yield sse("[DONE]")


@bp.post("/chat/completions")
def chat_completions():
    req = parse_chat_completion(json_body(), model_defaults())
    check_model(req.model)
    gen = start_generation(req.prompt_ids, req.params, "chat_completions", "messages", top_logprobs=req.top_logprobs)
    gen.remember_in(state().transcripts, tokenizer())
    meta = _meta("chatcmpl", "chat.completion")
    if req.stream:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        chunks = _chunks(gen, dict(meta, object="chat.completion.chunk"), req.include_usage, _chat_choice, role)
        return event_stream(chunks, gen)
    result = gen.run()
    choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
              "logprobs": _chat_logprobs(tokenizer(), result) if req.logprobs else None,
              "finish_reason": result.get("finish_reason")}
    return jsonify(**meta, choices=[choice], usage=usage_of(result, gen))
