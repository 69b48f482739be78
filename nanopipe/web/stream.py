"""A streamed response: Server-Sent Events made from a generation's events (web/generation.py).

    sse({"token": 995, "text": " world"})          -> 'data: {"token":995,"text":" world"}\n\n'
    sse({"response": "..."}, event="done")         -> 'event: done\ndata: {...}\n\n'
    sse_comment("waiting for rank 2")              -> ': waiting for rank 2\n\n'
    return event_stream(chunks, gen)               the text/event-stream response a route returns
"""
from __future__ import annotations

import json

from flask import Response

from .errors import leader_error
from .generation import Generation


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
