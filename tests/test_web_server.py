"""`nanopipe web` as a server to leave running: a real process on a real local cluster.

What must hold (nanopipe/web/server.py says how):

    no banner        nothing in its output about a development server
    streaming        each SSE event leaves when it is made: the first token reaches the client while
                     the generation is still running (the app's in-flight gauge still says 1)
    SIGTERM          the listening socket closes; replies in flight finish within --shutdown-grace,
                     or end with a final event (/chat: `event: error`, /v1: an error chunk and
                     [DONE]); every response ends with HTTP's closing chunk, never a reset; the
                     process says what it did and exits 0; the leader frees every cache
    load             32 streamed chats at once, each to its `done` event

Each hop of the cluster takes >= 10 ms (link_delay_ms), so a 100-token reply takes seconds: long
enough to be caught mid-stream on any machine.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from helpers import wait_freed, wait_until

from nanopipe.tools.localcluster import LocalCluster, free_ports

LINK_DELAY_MS = 10
LONG = 100                         # tokens: a reply that takes seconds through the ring
START_S = 60


@pytest.fixture(scope="module")
def cluster(tiny_weights, tmp_path_factory):
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path_factory.mktemp("webserver")), ready_timeout=60,
                      cluster_extra={"link_delay_ms": LINK_DELAY_MS})
    with cl:
        yield cl


class Web:
    """`nanopipe web` in its own process, in front of `cl`; its output goes to a file."""

    def __init__(self, cl: LocalCluster, tmp_path, *args):
        self.port = free_ports(1)[0]
        self.log_path = tmp_path / f"web-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nanopipe", "web", "--config-dir", cl.config_dir, "--leader", cl.leader_addr,
                 "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wait_until("`nanopipe web` answering", self._answers, START_S, interval=0.1, detail=lambda: self.output)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"`nanopipe web` exited ({self.proc.returncode}):\n{self.output}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/config", timeout=5) as r:
                self.server_header = r.headers.get("Server")
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def in_flight(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            line = next(x for x in r.read().decode().splitlines() if x.startswith("nanopipe_web_in_flight "))
        return float(line.split()[1])

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def web_of(cluster, tmp_path):
    started = []

    def start(*args) -> Web:
        started.append(Web(cluster, tmp_path, *args))
        return started[-1]
    yield start
    for w in started:
        w.close()


class Stream:
    """A streamed POST read event by event through http.client, which raises IncompleteRead if the
    connection ends without HTTP/1.1's closing chunk (a reset or a cut stream)."""

    def __init__(self, port: int, path: str, body: dict):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.request("POST", path, json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("Transfer-Encoding") == "chunked", self.resp.headers
        self.events: list = []              # (event name, data) as they came

    def next(self):
        """The next event (comments skipped), or None at the stream's proper end."""
        name, data = "message", None
        for raw in iter(self.resp.readline, b""):
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
                data = data if data == "[DONE]" else json.loads(data)
            elif line == "" and data is not None:
                self.events.append((name, data))
                return self.events[-1]
        assert self.resp.isclosed()         # the closing chunk was read: a whole HTTP response
        return None

    def rest(self) -> list:
        while self.next() is not None:
            pass
        self.conn.close()
        return self.events


CHAT = {"text": "Hello world, my name", "max_tokens": LONG, "decoding_strategy": "greedy"}
V1 = {"model": "local", "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": LONG,
      "temperature": 0}


def test_web_serves_with_no_development_server_banner(web_of):
    web = web_of()
    assert web.server_header == "nanopipe", web.server_header          # waitress, not Werkzeug/x Python/y
    assert web.terminate() == 0, web.output
    out = web.output
    for banner in ("development server", "Do not use it in a production", "Serving Flask app", "Debug mode",
                   "Running on"):
        assert banner not in out, f"banner {banner!r} in the output of `nanopipe web`:\n{out}"
    assert "Web chat on http://127.0.0.1:" in out and "Web server stopped" in out, out
    assert "Traceback" not in out, out


def test_tokens_arrive_while_the_reply_is_still_being_generated(web_of, cluster):
    web = web_of()
    s = Stream(web.port, "/chat", CHAT)
    first = s.next()
    while first[0] != "message":            # status events first, if any
        first = s.next()
    assert "token" in first[1], s.events
    # the first token is here and the generation is still running: nothing waited for the end
    assert web.in_flight() == 1.0, s.events
    events = s.rest()
    tokens = [d for name, d in events if name == "message"]
    assert events[-1][0] == "done" and len(tokens) == LONG == events[-1][1]["stats"]["tokens"], events[-3:]
    assert web.in_flight() == 0.0


def test_sigterm_lets_the_replies_in_flight_finish(web_of, cluster):
    web = web_of("--shutdown-grace", "120")
    chat, v1 = Stream(web.port, "/chat", CHAT), Stream(web.port, "/v1/chat/completions", V1)
    chat.next(), v1.next()
    web.proc.send_signal(signal.SIGTERM)
    chat_events, v1_events = chat.rest(), v1.rest()
    assert chat_events[-1][0] == "done" and chat_events[-1][1]["stats"]["tokens"] == LONG, chat_events[-3:]
    assert v1_events[-1][1] == "[DONE]", v1_events[-3:]
    assert v1_events[-2][1].get("choices", [{}])[0].get("finish_reason") == "length", v1_events[-3:]
    assert web.proc.wait(60) == 0, web.output
    assert "Stopping the web server (SIGTERM): 2 reply(s) in flight" in web.output, web.output
    assert "Web server stopped: 2 reply(s) finished, 0 ended early" in web.output, web.output
    with pytest.raises(OSError):        # and nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{web.port}/config", timeout=5)


def test_sigterm_past_the_grace_ends_each_stream_with_a_final_event(web_of, cluster):
    web = web_of("--shutdown-grace", "0")
    chat, v1 = Stream(web.port, "/chat", CHAT), Stream(web.port, "/v1/chat/completions", V1)
    chat.next(), v1.next()
    assert web.terminate() == 0, web.output
    chat_events, v1_events = chat.rest(), v1.rest()      # each response ends properly: no IncompleteRead

    name, data = chat_events[-1]
    assert name == "error" and "the web server is stopping" in data["error"] and data["status"] == 503, chat_events[-3:]
    assert len(chat_events) < LONG, "the reply was not cut short"
    assert v1_events[-1][1] == "[DONE]", v1_events[-3:]
    assert "the web server is stopping" in v1_events[-2][1]["error"]["message"], v1_events[-3:]
    assert "Web server stopped: 0 reply(s) finished, 2 ended early" in web.output, web.output
    wait_freed(cluster, timeout=15)          # the leader cancelled both generations and freed their caches


def test_32_streams_at_once(web_of, cluster):
    web = web_of()
    results, errors = [None] * 32, []
    barrier = threading.Barrier(32)

    def one(i):
        try:
            barrier.wait(30)
            body = {"text": f"Stream number {i} says", "max_tokens": 12, "decoding_strategy": "greedy"}
            results[i] = Stream(web.port, "/chat", body).rest()
        except Exception as e:  # reported in the test thread
            errors.append((i, repr(e)))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    for i, events in enumerate(results):
        assert events[-1][0] == "done", (i, events[-3:])
        tokens = [d for name, d in events if name == "message"]
        assert "".join(d["text"] for d in tokens) == events[-1][1]["response"], i
    assert web.terminate() == 0, web.output
    wait_freed(cluster, timeout=15)
