"""What the web app remembers between requests: its metrics, what the leader last said about
itself, the generations running now, the token ids recent chats computed, and the tokenizer.

    state().leader_info          {"model": "gpt2", "n_ctx": 1024, "defaults": {...}, ...}
    state().transcripts.encode("User: Hi\nAssistant: Hello\nUser: Bye\nAssistant:", tokenizer())

One AppState per app (create_app puts it in app.extensions), shared by every request.
"""
from __future__ import annotations

import threading
from array import array
from collections import OrderedDict

from flask import current_app

from .metrics import WebMetrics


class Transcripts:
    """The token ids each finished chat computed, by their text, so the next turn starts with them.

    A chat's turn N+1 is turn N's text plus the reply plus the new turn. Encoding that text again
    need not give the tokens the model computed: the model may have written " there" as " the" +
    "re", or "\n\n" as two tokens, and a stop string may end inside a token. Then the prefix cache
    (nanopipe/prefix.py) matches only up to the first difference. So when a chat finishes, its
    prompt ids and generated ids are kept under their decoded text, and `encode` starts a prompt
    with the longest kept text it begins with, encoding only the rest:

        remember("User: Hi\nAssistant: Hello", [12982, 25, 15902, 198, 48902, 25, 18435])
        encode("User: Hi\nAssistant: Hello\nUser: Bye\nAssistant:")
        -> [12982, 25, 15902, 198, 48902, 25, 18435] + encode("\nUser: Bye\nAssistant:")

    It also knows the replies that began without whitespace (`bare`): the template writes them
    right after "Assistant:", as the model did, where a message written by hand gets a space.

    Bounded (least recently used dropped first); shared by every request of the app, each entry
    only ever used for a text that starts with it, whose ids decode to that very text.
    """

    MAX_ENTRIES = 256

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._kept: OrderedDict = OrderedDict()     # text -> array of token ids
        self._bare: OrderedDict = OrderedDict()     # replies that began without whitespace -> None
        self._lock = threading.Lock()

    def remember(self, text: str, ids, reply: str = ""):
        if not text:
            return
        with self._lock:
            self._kept[text] = array("I", ids)
            self._kept.move_to_end(text)
            if reply and not reply[:1].isspace():
                self._bare[reply] = None
                self._bare.move_to_end(reply)
            for kept in (self._kept, self._bare):
                while len(kept) > self.max_entries:
                    kept.popitem(last=False)

    def bare(self, reply: str) -> bool:
        """Was `reply` a chat's reply that began without whitespace?"""
        return reply in self._bare

    def encode(self, text: str, tok) -> list:
        with self._lock:
            best = max((k for k in self._kept if text.startswith(k)), key=len, default="")
            if not best:
                return tok.encode(text)
            self._kept.move_to_end(best)
            ids = list(self._kept[best])
        return ids + (tok.encode(text[len(best):]) if len(text) > len(best) else [])


class AppState:
    """What the app remembers between requests: its metrics, what the leader last said about
    itself, and the tokens recent chats computed."""

    def __init__(self):
        self.metrics = WebMetrics()
        self.leader_info: dict = {}         # model, n_ctx, defaults from the last status answer
        self.generations = Generations()    # the ones running now: a server that stops ends them (web/server.py)
        self.transcripts = Transcripts()


class Generations:
    """The generations running now, so that a server that stops can end each with a final event.

    begin_stop(message) ends every generation that starts from then on at once; stop_all(message)
    ends those still running (Generation.stop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: set = set()
        self._stopping: str | None = None

    def add(self, gen):
        with self._lock:
            self._live.add(gen)
            if self._stopping:
                gen.stop(self._stopping)

    def discard(self, gen):
        with self._lock:
            self._live.discard(gen)

    def count(self) -> int:
        with self._lock:
            return len(self._live)

    def begin_stop(self, message: str) -> int:
        """From now on a new generation is ended as it starts; returns how many are running."""
        with self._lock:
            self._stopping = message
            return len(self._live)

    def stop_all(self, message: str) -> int:
        """End every generation still running; returns how many."""
        with self._lock:
            self._stopping = message
            live = list(self._live)
        for gen in live:
            gen.stop(message)
        return len(live)


def state() -> AppState:
    return current_app.extensions["nanopipe"]


def tokenizer():
    tok = current_app.config["TOKENIZER"]
    if tok is None:     # many first requests at once: get_tokenizer lets one build, the others wait
        from ..tokenizer import get_tokenizer
        tok = current_app.config["TOKENIZER"] = get_tokenizer()
    return tok
