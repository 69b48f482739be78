"""Which WSGI server for `nanopipe web`: streamed replies through Werkzeug's development server,
waitress (what `nanopipe web` runs) and gunicorn (gthread), each a real process in front of the
same local cluster. Not a test: a measurement, run by hand (docs/WEB.md has the figures).

    .venv/bin/python tests/bench_web_server.py               # tiny model: the server's own cost shows
    .venv/bin/python tests/bench_web_server.py --gpt2        # gpt2-small-shaped synthetic weights
    (gunicorn is measured when it is installed: .venv/bin/pip install gunicorn)

Per server: time to first token and tokens/s of a streamed /chat reply as the client reads it
(median of --runs), first-token and total times of 32 streamed chats started at once, the web
process's peak RSS (gunicorn: master + worker).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from nanopipe.tools.localcluster import LocalCluster, free_ports
from nanopipe.weights import init_weights

WSGI_FILE = """
from nanopipe.tokenizer import get_tokenizer
from nanopipe.web.app import create_app, settings_from_configs
app = create_app(settings_from_configs({config_dir!r}, leader={leader!r}))
app.config["TOKENIZER"] = get_tokenizer()
"""


def server_command(kind: str, cl: LocalCluster, port: int, workdir: str) -> list:
    if kind == "waitress":
        return [sys.executable, "-m", "nanopipe", "web", "--config-dir", cl.config_dir, "--leader", cl.leader_addr,
                "--port", str(port)]
    with open(os.path.join(workdir, "benchapp.py"), "w") as f:
        f.write(WSGI_FILE.format(config_dir=cl.config_dir, leader=cl.leader_addr))
    if kind == "werkzeug":
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {workdir!r}); from benchapp import app; "
                f"from werkzeug.serving import run_simple; run_simple('127.0.0.1', {port}, app, threaded=True)"]
    return [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "--chdir", workdir, "-k", "gthread",
            "--threads", "64", "-w", "1", "-b", f"127.0.0.1:{port}", "benchapp:app"]


def stream(port: int, body: dict) -> dict:
    """One streamed /chat: client-side time to first token, tokens/s between first and last, tokens."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/chat", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    times, done = [], False
    for raw in iter(resp.readline, b""):
        if raw.startswith(b"data: ") and b'"token"' in raw:
            times.append(time.perf_counter())
        elif raw.startswith(b"event: done"):
            done = True
    conn.close()
    n = len(times)
    return {"ttft": times[0] - t0 if times else None, "end": time.perf_counter() - t0, "tokens": n, "done": done,
            "tps": (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None}


def peak_rss_mb(pid: int) -> float:
    total = 0.0
    for p in [pid] + [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def measure(kind: str, cl: LocalCluster, runs: int, tokens: int, workdir: str) -> dict:
    port = free_ports(1)[0]
    log = open(os.path.join(workdir, f"{kind}.log"), "w")
    proc = subprocess.Popen(server_command(kind, cl, port, workdir), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{kind} did not start: see {log.name}") from None
                time.sleep(0.2)
        body = {"text": "Hello world, my name is", "max_tokens": tokens, "decoding_strategy": "greedy"}
        stream(port, body)                                  # warm up: the leader's prefix cache, the tokenizer
        one = [stream(port, dict(body, text=f"Hello world number {i}, my name is")) for i in range(runs)]
        many: list = [None] * 32
        barrier = threading.Barrier(32)

        def run(i):
            barrier.wait()
            many[i] = stream(port, {"text": f"Stream {i}: the river said", "max_tokens": 12,
                                    "decoding_strategy": "greedy"})
        threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss = peak_rss_mb(proc.pid)
        return {"server": kind,
                "ttft_ms": 1000 * statistics.median(r["ttft"] for r in one),
                "tok_s": statistics.median(r["tps"] for r in one),
                "32_done": sum(1 for r in many if r["done"]),
                "32_ttft_max_ms": 1000 * max(r["ttft"] for r in many),
                "32_wall_s": wall, "rss_mb": rss}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2", action="store_true", help="gpt2-small-shaped synthetic weights (else tiny)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-web-")
    try:
        weights = os.path.join(workdir, "w.safetensors")
        if args.gpt2:
            init_weights(weights, size="gpt2", seed=0)
        else:
            init_weights(weights, n_layer=4, n_embd=64, n_head=4, n_ctx=128, n_vocab=50257, seed=0)
        kinds = ["werkzeug", "waitress"] + (["gunicorn"] if shutil.which("gunicorn", path=os.path.dirname(
            sys.executable)) else [])
        with LocalCluster(weights, nodes=3, workdir=os.path.join(workdir, "cluster"), ready_timeout=300) as cl:
            rows = [measure(kind, cl, args.runs, args.tokens, workdir) for kind in kinds]
        print(f"{'gpt2-small' if args.gpt2 else 'tiny'} synthetic weights, 3 nodes on 127.0.0.1; {args.tokens}-token "
              f"streamed /chat, median of {args.runs}; then 32 streamed 12-token chats at once")
        print(f"{'server':<10} {'TTFT ms':>8} {'tok/s':>7} {'32: done':>9} {'32: max TTFT ms':>16} {'32: wall s':>11}"
              f" {'peak RSS MB':>12}")
        for r in rows:
            print(f"{r['server']:<10} {r['ttft_ms']:8.1f} {r['tok_s']:7.1f} {r['32_done']:>9}"
                  f" {r['32_ttft_max_ms']:16.0f} {r['32_wall_s']:11.2f} {r['rss_mb']:12.0f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
