"""The SmolCluster guide's API: POST /chat, GET /config, GET /health, POST /reconnect.

    POST /chat {"text": "Hello", "max_tokens": 20, "temperature": 0}
    -> {"response": " world...", "config": {"decoding_strategy": "greedy", ...}, "stats": {...}, "usage": {...}}

`register(app)` adds the routes. A request's body is parsed once into a ChatRequest (parse_chat,
with web/body.py's checks), which carries the final SamplingParams; web/generation.py runs it on
the leader (web/connection.py) and streams its events. With {"chat": true} (or a
`history`), /chat wraps the conversation in /v1/chat/completions' template (web/openai.py's
chat_prompt), as the page does.
"""
from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, jsonify

from ..sampling_params import FIELDS, SAMPLER_FIELDS, STRATEGY_USES, TUNABLE, SamplingParams, fits
from .body import check_fields, flag, json_body, optional, sampling
from .connection import WEIGHTS_STATUS_KEYS, leader_status, model_defaults, model_name, status_or_503, weights_info
from .errors import ApiError
from .generation import Generation, event_stream, sse, start_generation, usage_of
from .openai import CHAT_STOP, chat_pieces, check_chat_size
from .state import state, tokenizer

RECONNECT_ATTEMPTS = 3
CHAT_FIELDS = ("text",) + FIELDS + ("decoding_strategy", "stream", "chat", "history", "conversation_id")


def register(app: Flask):
    """Add /chat, /config, /health and /reconnect to `app`."""
    _register_chat(app)
    _register_cluster(app)


# ---------------------------------------------------------------------------------------------
# POST /chat


@dataclass(frozen=True)
class ChatRequest:
    """POST /chat's body, parsed once (parse_chat): the final SamplingParams it runs with, and how
    to make its prompt (prompt_ids). `chat` says `text` is a user's turn in /v1/chat/completions'
    template, after the `history` (the earlier turns, oldest first), as the page sends it."""
    text: str
    params: SamplingParams
    stream: bool = False
    chat: bool = False
    history: list | None = None
    conversation_id: str | None = None      # any string, echoed back

    def prompt_ids(self, n_ctx, transcripts=None) -> tuple:
        """(token ids, turns of the history left out to fit n_ctx: None without a history).

        Plain text is encoded as it is; a chat turn goes into the template (conversation_ids),
        starting with the ids the last turn computed (`transcripts`)."""
        if not self.chat:
            return tokenizer().encode(self.text), None
        ids, left_out = conversation_ids(self.history or [], self.text, self.params.max_tokens, n_ctx, transcripts)
        return ids, None if self.history is None else left_out


def parse_chat(body: dict, defaults: dict | None) -> ChatRequest:
    """POST /chat's body -> a ChatRequest, every field checked (a bad one is a 400 naming it), its
    sampling resolved on top of `defaults` (model_config.yaml's decoding section, or the leader's).

    Without a decoding_strategy the fields choose one, as in the OpenAI routes:
    {"text": "Hello", "temperature": 0} -> ChatRequest("Hello", greedy);
    {"text": "Hi", "temperature": 0.8, "top_k": 40} -> ChatRequest("Hi", top_k, T=0.8, k=40), whatever the default.
    """
    check_fields(body, CHAT_FIELDS)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "text: give the prompt as a non-empty string", param="text")
    strategy = optional(body, "decoding_strategy", lambda v: isinstance(v, str) and v in STRATEGY_USES,
                        f"one of {', '.join(sorted(STRATEGY_USES))}")
    stream = flag(body, "stream")
    chat = flag(body, "chat") or body.get("history") is not None
    params = sampling(body, defaults, strategy, (CHAT_STOP,) if chat else ())
    history, conv_id = conversation_fields(body)
    return ChatRequest(text, params, stream, chat, history, conv_id)


def params_view(params: SamplingParams, tokens: int | None = None) -> dict:
    """What a reply ran with, in the guide's shape; the page shows it under each reply. A knob the
    strategy does not use is null (greedy uses none of them); stop, penalties and bias appear
    when set.

    top_k, T=0.8, k=40, 30 tokens -> {"tokens_generated": 30, "temperature": 0.8, "top_k": 40,
    "top_p": None, "decoding_strategy": "top_k", "max_tokens": 30, "seed": None}
    """
    uses = STRATEGY_USES.get(params.strategy, ())
    view = {k: getattr(params, k) if k in uses else None for k in TUNABLE}
    view.update(decoding_strategy=params.strategy, max_tokens=params.max_tokens, seed=params.seed)
    extras = {k: v for k, v in params.sent_fields().items() if k in SAMPLER_FIELDS}
    view.update(extras)
    return view if tokens is None else {"tokens_generated": tokens, **view}


def conversation_fields(body: dict) -> tuple:
    """/chat's optional conversation: `history` (the earlier turns, oldest first, as
    [{"role": "user" | "assistant" | "system", "content": str}]) and `conversation_id` (any string,
    echoed back). (None, None) without them."""
    history, conv_id = body.get("history"), body.get("conversation_id")
    if conv_id is not None and not (isinstance(conv_id, str) and 0 < len(conv_id) <= 128):
        raise ApiError(400, "conversation_id: give a string of 1 to 128 characters", param="conversation_id")
    if history is None:
        return None, conv_id
    if not isinstance(history, list):
        raise ApiError(400, "history: give a list of {\"role\", \"content\"} objects, oldest first", param="history")
    check_chat_size(history, "history")
    for i, m in enumerate(history):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) and set(m) <= {"role", "content"}):
            raise ApiError(400, f"history[{i}]: must be {{\"role\": \"user\" | \"assistant\" | \"system\", "
                                f"\"content\": a string}}", param="history")
    return history, conv_id


def conversation_ids(history: list, text: str, reply_room: int, n_ctx, transcripts=None) -> tuple:
    """The conversation as one prompt, in /v1/chat/completions' template, trimmed to fit: if the
    prompt and `reply_room` tokens exceed n_ctx, the oldest turns are left out (a leading system
    message stays). Returns (token ids, how many turns were left out).

    history [user "Hi", assistant " Hello!"], text "Who are you?" ->
    "User: Hi\nAssistant: Hello!\nUser: Who are you?\nAssistant:" (0 left out if it fits)

    Whole, the prompt starts with the ids the last turn computed (`transcripts`, web/state.py). Too
    long, each message is encoded once and the oldest dropped by their counts: time linear in
    the history, however many turns must go.
    """
    tok = tokenizer()
    pieces = chat_pieces(list(history) + [{"role": "user", "content": text}], "history", transcripts)
    whole = "".join(pieces)
    ids = transcripts.encode(whole, tok) if transcripts is not None else tok.encode(whole)
    if fits(len(ids), reply_room, n_ctx) or not history:
        return ids, 0       # (a prompt that still does not fit is refused by check_fits)
    keep = 1 if history[0]["role"] == "system" else 0
    parts = [tok.encode(p) for p in pieces]     # message i's tokens; the last two: the user's turn, the cue
    total, first = sum(map(len, parts)), keep
    while not fits(total, reply_room, n_ctx) and first < len(history):
        total -= len(parts[first])
        first += 1
    if not keep and first:  # the oldest kept message now opens the prompt: no newline before it
        parts[first] = tok.encode(pieces[first][1:])
    return [t for part in parts[:keep] + parts[first:] for t in part], first - keep


def _register_chat(app: Flask):
    @app.post("/chat")
    def chat():
        req = parse_chat(json_body(), model_defaults())
        trim = {}

        def prompt_for(n_ctx):          # the leader's n_ctx, learnt as the generation dials it
            ids, trim["left_out"] = req.prompt_ids(n_ctx, state().transcripts)
            return ids
        gen = start_generation(prompt_for, req.params, "chat", "text")
        if req.chat:
            gen.remember_in(state().transcripts, tokenizer())
        extra = {} if req.conversation_id is None else {"conversation_id": req.conversation_id}
        if req.history is not None:
            extra.update(trimmed_turns=trim["left_out"], history_turns=len(req.history))
        if not req.stream:
            result = gen.run()
            return jsonify(response=gen.text, config=params_view(req.params, gen.n_tokens), stats=gen.stats(result),
                           usage=usage_of(result, gen), **extra)
        return event_stream(_chat_events(gen, req.params, extra), gen)


def _chat_events(gen: Generation, params: SamplingParams, extra: dict | None = None):
    """data: {"token": id, "text": piece} per token; `event: status`; then `event: done` or `event: error`."""
    for event in gen.events():
        kind = event[0]
        if kind == "token":
            yield sse({"token": event[1], "text": event[2]})
        elif kind == "status":
            yield sse({"status": event[1]}, event="status")
        elif kind == "done":
            yield sse({"response": gen.text, "config": params_view(params, gen.n_tokens),
                       "stats": gen.stats(event[1]), "usage": usage_of(event[1], gen), **(extra or {})}, event="done")
        else:
            err = gen.stream_error(event[1])
            yield sse({"error": err.message, "status": err.status}, event="error")


# ---------------------------------------------------------------------------------------------
# The cluster: /config, /health, /reconnect


def node_view(node: dict) -> dict:
    return {"rank": node.get("rank"), "host": node.get("host"), "layers": node.get("layers"),
            "status": node.get("status"), "last_seen_s": node.get("last_seen_s"), "synthetic": node.get("synthetic"),
            "blas": node.get("blas"), "unknown": node.get("unknown")}


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
        defaults = model_defaults()
        active = sampling({}, defaults)
        strategies = {}
        for name in (defaults.get("decoding_strategies") or {}):
            if name in STRATEGY_USES:
                p = sampling({}, defaults, name)
                strategies[name] = {k: getattr(p, k) for k in TUNABLE}
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
        status, answer = status_or_503(nodes=[])
        if answer is not None:
            return answer
        nodes = [node_view(n) for n in status.get("nodes", [])]
        down = [n for n in nodes if n["status"] != "up"]
        ok = bool(status.get("ready")) and not down
        body = {"ok": ok, "leader": {"addr": current_app.config["LEADER"], "reachable": True, "authorized": True,
                                     "ready": bool(status.get("ready")),
                                     "model": status.get("model")},
                "nodes": nodes, "live_sessions": status.get("live_sessions"),
                **{k: status[k] for k in WEIGHTS_STATUS_KEYS if k in status}}
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

