"""Serving the web app: waitress, and a stop that ends every stream cleanly.

Why waitress: it is a production WSGI server in pure Python (nothing to compile on a Pi; Debian and
Raspberry Pi OS package it as python3-waitress), it runs inside our own process (the demo serves
the chat from a thread of its process, and /metrics counts every request in one place), and it
sends each chunk a response yields as soon as it is yielded, so Server-Sent Events stream token by
token. gunicorn (gthread) streams as well, but it forks a worker it owns: the demo could not run it
in a thread, /metrics would be per worker, and it adds a second process. docs/WEB.md has the
measurements (time to first token, tokens/s, 32 streams at once) against Werkzeug's development
server and gunicorn.

How a chunk travels: a waitress thread runs the Flask view; each `yield sse(...)` of the route is
handed to the connection's output buffer, which wakes waitress's socket loop at once (send_bytes=1:
no batching), and the loop writes it to the socket as an HTTP/1.1 chunk. One thread per request
while it runs: a stream holds its thread for the whole reply, so THREADS bounds how many replies
are streamed at once (more wait in waitress's queue, they do not fail).

How it stops (SIGTERM from systemd or `kill`, or Ctrl-C), `WebServer.stop(grace_s)`:

    1. close the listening socket: new connections are refused, open ones go on;
    2. wait up to grace_s for the generations in flight to finish on their own;
    3. end the rest: each gets a final event saying the server is stopping (/chat: `event: error`;
       /v1: an error chunk, then `data: [DONE]`), its response ends with the closing chunk, and its
       leader connection is hung up, which cancels the generation on the cluster;
    4. wait for waitress to write out what is buffered, close every connection, end the loop.

The client sees a whole HTTP response ending with a final event, never a reset connection.

    server = WebServer(app, "127.0.0.1", 8000)      # binds now: OSError if the port is taken
    server.start()                                  # the socket loop and THREADS worker threads
    ...
    server.stop(grace_s=10)                         # -> {"finished": 2, "ended": 1}
"""
from __future__ import annotations

import signal
import threading
import time

import waitress
from waitress import wasyncore

THREADS = 64            # requests served at once; each running stream holds one (64 idle threads: ~1 MB RSS)
GRACE_S = 10.0          # how long a stop waits for generations in flight to finish on their own
FLUSH_S = 5.0           # then how long it waits for their last bytes to reach the clients
STOP_MESSAGE = "the web server is stopping (SIGTERM or Ctrl-C); this reply was cut short: ask again when it is back"


class WebServer:
    """waitress serving the Flask app `app` (create_app) on host:port; see the module docstring."""

    def __init__(self, app, host: str, port: int, threads: int = THREADS):
        self.app = app
        self.generations = app.extensions["nanopipe"].generations
        self._map: dict = {}
        # ident: the Server header; expose_tracebacks off: errors are the app's JSON, never a traceback
        self.server = waitress.create_server(app, map=self._map, host=host, port=port, threads=threads,
                                             ident="nanopipe", expose_tracebacks=False)
        self.host, self.port = host, self.server.effective_port
        self._thread: threading.Thread | None = None

    def start(self) -> "WebServer":
        self._thread = threading.Thread(target=self._loop, daemon=True, name="web")
        self._thread.start()
        return self

    def _loop(self):
        # waitress's own run() catches only SystemExit/KeyboardInterrupt; the loop ends when stop()
        # has closed every socket in its map
        wasyncore.loop(timeout=self.server.adj.asyncore_loop_timeout, map=self._map)

    def stop(self, grace_s: float = GRACE_S) -> dict:
        """Stop as the module docstring says; returns how many generations finished and were ended."""
        trigger = self.server.trigger
        trigger.pull_trigger(lambda: wasyncore.dispatcher.close(self.server))     # 1. no new connections
        before = self.generations.begin_stop(STOP_MESSAGE)          # ... and no new generation
        deadline = time.monotonic() + grace_s
        while self.generations.count() and time.monotonic() < deadline:       # 2.
            time.sleep(0.05)
        ended = self.generations.stop_all(STOP_MESSAGE)                         # 3.
        deadline = time.monotonic() + FLUSH_S
        while not self._idle() and time.monotonic() < deadline:                 # 4.
            time.sleep(0.05)
        trigger.pull_trigger(self._close_all)
        if self._thread is not None:
            self._thread.join(FLUSH_S)
        self.server.task_dispatcher.shutdown(timeout=1)
        return {"finished": max(before - ended, 0), "ended": ended}

    def close(self):
        """Release the port and the threads of a server that never started (start() not called)."""
        self._close_all()
        self.server.task_dispatcher.shutdown(timeout=1)

    def _idle(self) -> bool:
        """No request running or queued, and nothing left unsent on any connection."""
        d = self.server.task_dispatcher
        busy = d.active_count > 0 or len(d.queue) > 0
        return not busy and not any(getattr(ch, "total_outbufs_len", 0) for ch in list(self._map.values()))

    def _close_all(self):
        """In the loop's thread: close every connection and the trigger; the loop then ends."""
        for dispatcher in list(self._map.values()):
            try:
                dispatcher.close()
            except OSError:
                pass


def serve(app, host: str, port: int, grace_s: float = GRACE_S, echo=print, threads: int = THREADS) -> None:
    """`nanopipe web`: serve until SIGTERM, SIGINT (Ctrl-C) or SIGHUP, then stop cleanly and return.

    Raises OSError before serving anything if host:port cannot be bound."""
    server = WebServer(app, host, port, threads=threads)
    stop = threading.Event()
    received: list = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()
    signals = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s]
    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        server.start()
        while not stop.wait(0.5):
            pass
        for s in signals:               # a second Ctrl-C must not cut the clean stop short
            signal.signal(s, signal.SIG_IGN)
        busy = server.generations.count()
        echo(f"Stopping the web server ({received[0]}): "
             + (f"{busy} reply(s) in flight get up to {grace_s:g} s to finish" if busy else "no reply in flight"))
        done = server.stop(grace_s)
        echo("Web server stopped" + (f": {done['finished']} reply(s) finished, {done['ended']} ended early with a "
                                     "final event" if busy or done["ended"] else "."))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
