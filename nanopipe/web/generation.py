"""A generation on the leader as events, and streaming them as Server-Sent Events.

    gen = start_generation(tokenizer().encode("Hello"), params, "chat", "text")
    for event in gen.events():      # ("token", 995, " world"), ..., ("done", result)
        ...
    return event_stream(sse(...) for each event, gen)       # a text/event-stream response

start_generation dials the leader (connection.connect), checks that the prompt and its reply fit
the leader's context (sampling_params.check_fits, the rule the leader runs too) and returns the
Generation; several prompts in one leader message are web/batch.py's BatchGeneration.

    sse({"token": 995, "text": " world"})     -> 'data: {"token":995,"text":" world"}\n\n'
    sse({"response": "..."}, event="done")    -> 'event: done\ndata: {...}\n\n'
    sse_comment("waiting for rank 2")         -> ': waiting for rank 2\n\n'
"""
from __future__ import annotations

import json
import queue
import socket
import threading
import time

from flask import Response, g

from ..cluster.leader_client import ClientError
from ..decoding import EOT
from ..sampling_params import DecodingError, SamplingParams, check_fits
from .connection import connect
from .errors import ApiError, leader_error
from .state import Generations, Transcripts, state

REFUSAL_WAIT_S = 0.25              # how long a stream waits for the leader's at-once refusal before its 200


def check_fits_all(params: SamplingParams, prompts: list, field: str, score_only: bool = False):
    """Every prompt and its reply fit the context the leader said it has (n_ctx, from its welcome),
    else a 400 naming `field`: sampling_params.check_fits, once per request, before it is sent."""
    n_ctx = state().leader_info.get("n_ctx")
    try:
        for ids in prompts:
            check_fits(len(ids), params.max_tokens, n_ctx, field, score_only=score_only)
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
        check_fits_all(params, [prompt_ids], field)
    except Exception:               # a 400, or a prompt that could not be made: hang up first
        client.close()
        raise
    state().metrics.count_request(route)
    return Generation(client, prompt_ids, params, state().metrics, g.t0, echo=echo, top_logprobs=top_logprobs,
                      registry=state().generations)


def usage_of(result: dict, gen: Generation) -> dict:
    """OpenAI's usage for one reply (/chat and the OpenAI routes), with prompt_tokens_details.cached_tokens:
    the prompt tokens whose KV cache a finished request left on every stage (nanopipe/prefix.py), so
    only the rest was prefilled: {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6, ...}."""
    prompt = len(result.get("prompt_ids") or gen.prompt)
    return usage_counts(prompt, gen.n_tokens, int(result.get("cached_tokens") or 0))


def usage_counts(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage object from its three counts (a batch's too: web/batch.py)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


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
