"""docs/TROUBLESHOOTING.md quotes nanopipe's messages; this makes each of them happen for real and
checks the page says what the code prints.

Every quoted block on the page is tagged `<!-- check: NAME -->`; PRODUCE[NAME] below runs real
`nanopipe` processes (with a copy of the shipped configs/ on free ports of 127.0.0.1) until the
message appears, and each line of the block must equal a line of that output. What differs from
machine to machine is left open: numbers (ports, sizes, attempts), URLs, and the operating
system's reason in parentheses after a URL. Everything else is compared word for word.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import yaml
from helpers import CONFIG_DIR, REPO, wait_until

from nanopipe.tools.localcluster import free_ports

DOC = os.path.join(REPO, "docs", "TROUBLESHOOTING.md")
BLOCK = re.compile(r"<!-- check: ([a-z0-9-]+) -->\n```text\n(.*?)\n```", re.S)
VARIABLE = re.compile(r"(https?://\S+ \([^)]*\)|https?://\S+|\d+)")


def quoted() -> dict:
    with open(DOC) as f:
        return {name: text.split("\n") for name, text in BLOCK.findall(f.read())}


def pattern(line: str) -> re.Pattern:
    """A quoted line as a regex: numbers, URLs (with the reason after them) open, the rest literal."""
    out = []
    for i, part in enumerate(VARIABLE.split(line)):
        if i % 2 == 0:
            out.append(re.escape(part))
        elif part.startswith("http") and " (" in part:
            out.append(r"\S+ \([^)]*\)")
        elif part.startswith("http"):
            out.append(r"\S+")
        else:
            out.append(r"\d+")
    return re.compile("".join(out))


def test_pattern_leaves_open_only_what_varies():
    p = pattern("Error: cannot reach https://x.org/m (Name or service not known); copy it to weights/a (548.1 MB)")
    assert p.fullmatch("Error: cannot reach http://127.0.0.1:4/m (Connection refused); copy it to weights/a (9.0 MB)")
    assert not p.fullmatch("Error: cannot reach http://127.0.0.1:4/m (Connection refused); copy it to weights/b (9 MB)")


# ---------------------------------------------------------------------------------------------
# a copy of the shipped configs on free ports, and the processes that print the messages


class Site:
    """A folder like a fresh checkout on one machine: configs/ (the shipped files, free ports, a short
    rejoin_grace_s, the weights url pointing at a closed port), no weights/, and a small synthetic
    model of gpt2's layer count (tiny.safetensors) for the cluster."""

    def __init__(self, root):
        self.root = str(root)
        self.configs = os.path.join(self.root, "configs")
        shutil.copytree(CONFIG_DIR, self.configs)
        ports = free_ports(5)
        self.leader_port, self.worker_ports, self.closed_port, self.web_port = ports[0], ports[1:3], ports[3], ports[4]
        path = os.path.join(self.configs, "cluster_config.yaml")
        with open(path) as f:
            cc = yaml.safe_load(f)
        cc["port"] = self.leader_port
        # the guide's `workers: [mini2, pi1]`, each with a free port: {rank, host, port}
        cc["workers"] = [{"rank": r, "host": w if isinstance(w, str) else w["host"], "port": port}
                         for r, (w, port) in enumerate(zip(cc["workers"], self.worker_ports), start=1)]
        cc.update(rejoin_grace_s=2, heartbeat_s=0.2)
        with open(path, "w") as f:
            yaml.safe_dump(cc, f)
        path = os.path.join(self.configs, "model_weights.yaml")
        with open(path) as f:
            mw = yaml.safe_load(f)
        mw["models"]["gpt2"]["url"] = f"http://127.0.0.1:{self.closed_port}/model.safetensors"
        with open(path, "w") as f:
            yaml.safe_dump(mw, f)
        from nanopipe.weights import init_weights
        self.weights = os.path.join(self.root, "tiny.safetensors")
        init_weights(self.weights, n_layer=12, n_embd=96, n_head=12, n_ctx=128, n_vocab=50257, seed=0)
        self.procs: dict = {}

    def cmd(self, *args) -> list:
        return [sys.executable, "-m", "nanopipe", *args]

    def run(self, *args, timeout=120) -> str:
        r = subprocess.run(self.cmd(*args), capture_output=True, text=True, cwd=self.root, timeout=timeout,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return r.stdout + r.stderr

    def start(self, name, *args):
        log = open(os.path.join(self.root, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen(self.cmd(*args), stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def log(self, name) -> str:
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
            return f.read()

    def wait_log(self, name, needle, timeout=60) -> str:
        wait_until(f"{needle!r} in {name}'s log", lambda: needle in self.log(name), timeout,
                   detail=lambda: self.log(name))
        return self.log(name)

    def stop(self, name, sig=signal.SIGTERM):
        p = self.procs.pop(name)
        if p.poll() is None:
            p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every check's real output: {name: text}."""
    site = Site(tmp_path_factory.mktemp("site"))
    got = {}
    try:
        # nothing running yet
        site.start("lonely-worker", "join", "--rank", "1", "--host", "mini2", "--weights", site.weights,
                   "--config-dir", site.configs)
        got["worker-cannot-connect"] = site.wait_log("lonely-worker", "Is the leader")
        site.stop("lonely-worker")
        got["generate-leader-down"] = site.run("generate", "Hello", "--leader", f"mini1:{site.leader_port}",
                                               "--config-dir", site.configs)
        got["weights-generate"] = site.run("generate", "Hello", "--config-dir", site.configs)
        got["weights-serve-offline"] = site.run("serve", "--rank", "0", "--config-dir", site.configs)
        got["plan"] = site.run("plan", "--config-dir", CONFIG_DIR)
        got["gibberish"] = site.run("init-weights", "weights/gpt2.safetensors", "--n-layer", "2", "--n-embd", "64",
                                    "--n-head", "4", "--n-ctx", "64")
        os.remove(os.path.join(site.root, "weights", "gpt2.safetensors"))
        got["api-refused"] = api_error(site.configs)

        # the cluster: the shipped 3 nodes, on this machine
        site.start("leader", "serve", "--rank", "0", "--weights", site.weights, "--config-dir", site.configs)
        for rank, host in ((1, "mini2"), (2, "pi1")):
            site.start(f"worker{rank}", "join", "--rank", str(rank), "--host", host, "--weights", site.weights,
                       "--config-dir", site.configs)
        got["leader-listening"] = site.wait_log("leader", "Server listening")
        site.wait_log("leader", "ring 0 -> 1 -> 2 -> 0 is up")
        got["worker-port-as-leader"] = site.run("generate", "Hello", "--leader", f"127.0.0.1:{site.worker_ports[0]}",
                                                "--config-dir", site.configs)
        got["web-port-as-leader"] = web_port_as_leader(site)
        got["leave"] = site.run("leave", "--rank", "1", "--config-dir", site.configs)
        got["replanned"] = site.wait_log("leader", "Re-planned")
        got["drained"] = site.wait_log("worker1", "The leader has drained this node")
        site.stop("worker2", signal.SIGKILL)          # what the kernel's OOM killer sends
        got["worker-lost"] = site.wait_log("leader", "Worker 2 is down")
        got["past-grace"] = site.wait_log("leader", "Rank 2 (pi1) is gone")
    finally:
        site.stop_all()
    return got


def api_error(config_dir) -> str:
    """The web app's answer to a chat while the leader is down."""
    from nanopipe.web.app import create_app, settings_from_configs
    client = create_app(settings_from_configs(config_dir)).test_client()
    r = client.post("/chat", json={"text": "Hello"})
    assert r.status_code == 503, r.get_data(as_text=True)
    return r.json["error"]


def web_port_as_leader(site) -> str:
    """`generate --leader` pointed at a running web app."""
    from werkzeug.serving import make_server

    from nanopipe.web.app import create_app, settings_from_configs
    srv = make_server("127.0.0.1", 0, create_app(settings_from_configs(site.configs)), threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        return site.run("generate", "Hello", "--leader", f"127.0.0.1:{srv.server_port}", "--config-dir", site.configs)
    finally:
        srv.shutdown()


def test_every_quoted_message_is_checked():
    names = set(quoted())
    assert names, f"no <!-- check: NAME --> blocks in {DOC}"
    assert {"worker-cannot-connect", "weights-generate", "worker-lost", "gibberish", "api-refused"} <= names, \
        "the guide's five cases (worker cannot connect, weights not found, memory, gibberish, API refused)"


@pytest.mark.parametrize("name", sorted(quoted()))
def test_quoted_message_is_what_nanopipe_prints(name, outputs):
    assert name in outputs, f"{DOC} quotes a check {name!r} that this test does not produce"
    real = [ln.rstrip() for ln in outputs[name].splitlines()]
    for line in quoted()[name]:
        p = pattern(line)
        assert any(p.fullmatch(r) for r in real), \
            f"{name}: the page says\n  {line}\nbut nanopipe printed\n  " + "\n  ".join(real)

