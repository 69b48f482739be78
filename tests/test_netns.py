"""Separate hosts: the leader and each worker in a network namespace of its own.

    nptest-<pid>-n0  10.213.7.1  leader  ─┐
    nptest-<pid>-n1  10.213.7.2  worker 1 ├── veth ── bridge br0 in nptest-<pid>-hub
    nptest-<pid>-n2  10.213.7.3  worker 2 ─┘

Each namespace has its own interfaces, addresses and routes, so the nodes talk over a (virtual)
Ethernet exactly as separate machines on a LAN would, and a link can be cut with
`ip link set eth0 down` inside one of them: no FIN, no RST, just silence, as with a pulled cable.
The 10.213.7.0/24 addresses exist only inside these namespaces. Needs root and `ip netns`; the test
skips, saying why, where they are missing. Every namespace is deleted in a finally.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import wait_until

from nanopipe.decoding import SamplingParams
from nanopipe.tools.localcluster import write_configs

pytestmark = pytest.mark.netns

PROMPT = [15496, 995, 11, 616, 1438]
SUBNET = "10.213.7"
HEARTBEAT_S = 0.5          # the leader drops a silent worker after max(3 s, 3 heartbeats) = 3 s

# Runs inside the leader's namespace: a generation on one connection, the leader's status polled on
# another every 0.1 s, everything printed as JSON lines so the test can act on them as they come.
CLIENT = r"""
import json, sys, threading, time
from nanopipe.cluster.leader_client import ClientError, LeaderClient
addr, max_tokens = sys.argv[1], int(sys.argv[2])
prompt = json.loads(sys.argv[3])
out_lock = threading.Lock()
def say(**event):
    with out_lock:
        print(json.dumps(dict(event, t=time.time())), flush=True)
done = threading.Event()
def poll():
    with LeaderClient.connect(addr) as c:
        while not done.is_set():
            st = c.status()
            say(event="poll", nodes={n["rank"]: n["status"] for n in st["nodes"]}, ready=st["ready"])
            time.sleep(0.1)
n = [0]
def on_token(t, text):
    if t is not None:
        n[0] += 1
        say(event="token", n=n[0])
try:
    with LeaderClient.connect(addr) as c:
        threading.Thread(target=poll, daemon=True).start()
        r = c.generate(prompt, strategy="greedy", max_tokens=max_tokens, on_token=on_token,
                       on_status=lambda text: say(event="status", text=text))
    say(event="done", token_ids=r["token_ids"])
except ClientError as e:
    say(event="error", message=str(e))
done.set()
"""


def sh(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why this test cannot run here, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"nptest-{os.getpid()}-probe"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces n0..n{k-1} joined by a bridge in a hub namespace; node i is SUBNET.{i+1}."""

    def __init__(self, k: int):
        self.prefix = f"nptest-{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.names = [f"{self.prefix}-n{i}" for i in range(k)]
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(k)]

    def create(self):
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips)):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def link(self, i: int, up: bool):
        sh("ip", "-n", self.names[i], "link", "set", "eth0", "up" if up else "down")

    def delete(self):
        for ns in self.names + [self.hub]:
            sh("ip", "netns", "del", ns, check=False)

    def run(self, i: int, args: list, log_path: str, cwd: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *args], stdout=open(log_path, "ab"),
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def client(self, addr: str, max_tokens: int, cwd: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[0], sys.executable, "-c", CLIENT, addr,
                                 str(max_tokens), json.dumps(PROMPT)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd)


def events(proc: subprocess.Popen, timeout: float):
    """The client's JSON lines as they arrive; fails if it falls silent for `timeout` seconds."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout):
            raise AssertionError(f"the client printed nothing for {timeout}s")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the client exited early: {proc.stderr.read()}")
        event = json.loads(line)
        yield event
        if event["event"] in ("done", "error"):
            return


@pytest.fixture
def hosts():
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    h = Hosts(3)
    try:
        h.create()
        yield h
    finally:
        h.delete()


def test_nodes_on_separate_hosts_and_a_cut_link(hosts, tiny_weights, tiny_engine):
    work = tempfile.mkdtemp(prefix="nanopipe-netns-")
    config_dir = os.path.join(work, "configs")
    cluster = write_configs(config_dir, weights=tiny_weights, nodes=3, n_layer=4, hosts=hosts.ips,
                            cluster_extra={"heartbeat_s": HEARTBEAT_S, "rejoin_grace_s": 30})
    addr = f"{hosts.ips[0]}:{cluster['port']}"
    common = ["--config-dir", config_dir, "--weights", tiny_weights]
    cli = [sys.executable, "-m", "nanopipe"]
    logs = [os.path.join(work, f"rank{r}.log") for r in range(3)]
    procs = [hosts.run(0, cli + ["serve", "--rank", "0"] + common, logs[0], work)]
    procs += [hosts.run(r, cli + ["join", "--rank", str(r), "--host", f"node{r}"] + common, logs[r], work)
              for r in (1, 2)]

    def all_logs() -> str:
        return "\n".join(f"--- rank {r} ---\n" + open(p, errors="replace").read()[-3000:] for r, p in enumerate(logs))

    try:
        # 1. a greedy answer across three "machines" equals the single process's
        want = tiny_engine.generate(PROMPT, SamplingParams("greedy", max_tokens=100))["token_ids"]
        def ring_up():
            assert procs[0].poll() is None, f"the leader exited:\n{all_logs()}"
            return "ring 0 -> 1 -> 2 -> 0 is up" in open(logs[0]).read()
        wait_until("the ring up", ring_up, 60, 0.1, detail=all_logs)
        assert f"Worker 2 registered from {hosts.ips[2]}:" in open(logs[0]).read()
        first = [e for e in events(hosts.client(addr, 100, work), 30)][-1]
        assert first.get("token_ids") == want, f"{first}\n{all_logs()}"

        # 2. cut worker 2's cable mid-answer: the leader notices by its silence, the answer waits
        client = hosts.client(addr, 100, work)
        t_cut = t_down = None
        statuses = []
        for e in events(client, 40):
            if e["event"] == "token" and e["n"] == 5 and t_cut is None:
                hosts.link(2, up=False)
                t_cut = time.time()
            elif e["event"] == "poll" and t_cut and t_down is None and e["nodes"]["2"] == "down":
                t_down = e["t"]
                time.sleep(1.0)
                hosts.link(2, up=True)          # back well within rejoin_grace_s
            elif e["event"] == "status":
                statuses.append(e["text"])
            last = e
        assert t_cut is not None, "the answer never reached 5 tokens"
        assert t_down is not None, f"status never showed rank 2 down after the cut:\n{all_logs()}"
        assert t_down - t_cut < 3 + 2, f"the leader took {t_down - t_cut:.1f}s to notice the cut"
        assert "silent for" in open(logs[0]).read()
        assert statuses and "waiting up to 30s" in statuses[0], statuses
        assert last["event"] == "done", f"{last}\n{all_logs()}"
        assert last["token_ids"] == want, "the answer after the link came back differs from one process's"
        print(f"\nnetns: rank 2 seen down {t_down - t_cut:.1f}s after its link was cut; the answer resumed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
