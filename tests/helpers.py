"""Helpers the test files share: one copy of each, imported as `from helpers import ...`.

    wait_until(what, ok, timeout)        poll ok() until it returns something truthy; never a bare sleep
    run_nanopipe(*args)                  the real command line, `python -m nanopipe ...`, as a user runs it
    port_free(port), free_port_run(n)    ports on 127.0.0.1
    self_signed_cert(folder)             a throwaway certificate for 127.0.0.1 (openssl), for TLS tests
    read_tensors(path)                   every tensor of a safetensors file, name -> array as stored
    GOLDEN_CASES, GOLDEN_PROVENANCE      what transformers computed for tests/golden/tiny-hf (HF_DIR)

and, for a running LocalCluster `cl`:

    status(cl), node(st, rank), workers(st)     the leader's status and the nodes in it
    wait_status(cl, ok, timeout, what)          poll the status until ok(status)
    wait_freed(cl)                              every KV cache freed, as reported after the generations ended
    log_of(cl, rank), wait_log(cl, rank, ...)   a node's log, and waiting for a line in it

    wait_until("rank 2 down", lambda: node(status(cl), 2)["status"] == "down", 5)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def wait_until(what: str, ok, timeout: float, interval: float = 0.05, detail=None):
    """Poll ok() every `interval` s until it returns something truthy, and return that; after
    `timeout` s fail naming `what` (and detail(), when given, for the state to debug from)."""
    deadline = time.time() + timeout
    while True:
        got = ok()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout}s" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)


def run_nanopipe(*args, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real command line, `python -m nanopipe *args`, as a user would (output captured)."""
    return subprocess.run([sys.executable, "-m", "nanopipe", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_tensors(path) -> dict:
    """Every tensor of a safetensors file, read with nanopipe's own reader: name -> array, as stored."""
    from nanopipe.safetensors_io import read_header, read_tensor
    header = read_header(str(path))
    with open(path, "rb") as f:
        return {name: read_tensor(f, info) for name, info in header.tensors.items()}


REPO = str(Path(__file__).resolve().parent.parent)
CONFIG_DIR = os.path.join(REPO, "configs")             # the shipped configs/

GOLDEN = Path(__file__).parent / "golden"
HF_DIR = GOLDEN / "tiny-hf"             # the small random GPT-2 transformers saved (save_pretrained)


def _golden():
    """The recorded cases: a list of (prompt ids, logits (T, V), greedy ids (16,)), and the provenance."""
    with np.load(GOLDEN / "tiny_golden.npz") as z:
        n = len([k for k in z.files if k.startswith("prompt_ids_")])
        cases = [(z[f"prompt_ids_{i}"].tolist(), z[f"logits_{i}"], z[f"greedy_{i}"].tolist())
                 for i in range(n)]
    return cases, json.loads((GOLDEN / "tiny_golden.json").read_text())


GOLDEN_CASES, GOLDEN_PROVENANCE = _golden()    # made by tests/golden/make_golden.py


# ---------------------------------------------------------------------------------------------
# ports and certificates


def port_free(port: int) -> bool:
    """Can a new listener bind 127.0.0.1:port right now?"""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port_run(n: int) -> int:
    """A port p with p, p+1, ..., p+n-1 free a moment ago (the guide's workers listen on port + rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n - 1 <= 65535 and all(port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def self_signed_cert(folder) -> tuple:
    """A throwaway certificate for 127.0.0.1, made with the openssl command line: (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the `openssl` command to make a self-signed certificate")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=nanopipe-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


# ---------------------------------------------------------------------------------------------
# a running LocalCluster: its status and its logs


def status(cl) -> dict:
    """The leader's status, asked with the cluster's own secret (and certificate, under TLS)."""
    with cl.client() as c:
        return c.status()


def node(st: dict, rank: int) -> dict:
    """Rank's entry in a status."""
    return next(n for n in st["nodes"] if n["rank"] == rank)


def workers(st: dict) -> list:
    """Every worker's entry in a status (rank 0, the leader, left out)."""
    return [n for n in st["nodes"] if n["rank"] > 0]


def wait_status(cl, ok, timeout: float, what: str) -> dict:
    """Poll the leader's status until ok(status); fail naming `what`, the last status and the logs."""
    last = {}

    def check():
        last["st"] = status(cl)
        return last["st"] if ok(last["st"]) else None
    return wait_until(what, check, timeout,
                      detail=lambda: f"last status:\n{json.dumps(last.get('st'), indent=1)}\n{cl.logs()}")


def all_freed(st: dict) -> bool:
    """No live session anywhere, and every stage holds exactly the finished sessions' caches the
    leader keeps for reuse (nanopipe/prefix.py), none more and none fewer, in every worker's last
    report (with reuse off, or nothing kept: no KV cache byte left at all)."""
    kept = st.get("prefix_kept", 0)
    return (st["live_sessions"] == 0 and st["kv_cache_bytes"] == st.get("prefix_cache_bytes", 0)
            and all(n["sessions"] == kept and (n["kv_cache_bytes"] > 0) == (kept > 0) for n in workers(st)))


def reported_since(st: dict, since: float, asked_at: float) -> bool:
    """Has every worker's last report reached the leader after time `since`? (`asked_at`: a time
    before the status was asked; the leader says how long ago each report came, in last_seen_s.)"""
    return all(n["last_seen_s"] is not None and asked_at - n["last_seen_s"] > since for n in workers(st))


def wait_freed(cl, timeout: float = 5) -> dict:
    """Every cache freed, on the leader and on every worker, by reports sent after this call (the
    generations have ended by then). A stale "0 sessions" from before they began cannot pass, and a
    FREE that never arrived keeps a worker's count up and fails here."""
    since = time.time()

    def check():
        asked_at = time.time()
        st = status(cl)
        return st if reported_since(st, since, asked_at) and all_freed(st) else None
    return wait_until("every cache freed (only the kept ones left, on every stage, reported after the end)",
                      check, timeout, detail=lambda: f"last status:\n{json.dumps(status(cl), indent=1)}\n{cl.logs()}")


def log_of(cl, rank: int) -> str:
    """Everything rank has logged so far (the log is written as things happen)."""
    with open(cl.log_path(rank), errors="replace") as f:
        return f.read()


def wait_log(cl, rank: int, *needles: str, timeout: float = 5.0) -> str:
    """The first line of rank's log holding every needle, once it is there."""
    def find():
        return next((line for line in log_of(cl, rank).splitlines() if all(n in line for n in needles)), None)
    return wait_until(f"a line with {needles} in rank {rank}'s log", find, timeout, detail=cl.logs)
