"""`nanopipe demo` as a user runs it: a real process, its real nodes, its real ports and folders.

What each test proves:
- the demo runs the config folder's model, decoding defaults, hosts and ports (addresses become
  127.0.0.1; a taken port is replaced and said so), and prints one short ready block;
- SIGINT, SIGTERM and SIGHUP stop every process it started, free its ports and remove its folder;
  SIGKILL (no handler can run) still takes its nodes with it (Linux: PR_SET_PDEATHSIG);
- a web port in use is an error at start, not a second demo serving the first one's page;
- a worker killed mid-answer is reported down and started again, and the streamed answer resumes
  and equals the uninterrupted one; once the restarts are used up, past rejoin_grace_s the leader
  re-plans over the nodes left and the streamed answer still equals the uninterrupted one;
- a LocalCluster removes the folder it made, and its workers never dial a leader not yet listening.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml
from helpers import port_free, wait_until

from nanopipe.tools.localcluster import LocalCluster, free_ports

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds a process's children in /proc, and PR_SET_PDEATHSIG is Linux's")

START_S = 60        # a demo on tiny weights is up in ~3 s; a loaded machine gets room


def write_config_dir(path, ports: list, **cluster_extra) -> str:
    """A config folder unlike the demo's old built-in one: model `tinygpt`, top_k, 7 tokens, hosts
    alpha/beta/gamma at addresses that are not this machine's, fixed ports."""
    os.makedirs(path, exist_ok=True)
    model = {"default_model": "tinygpt", "models": {"tinygpt": {
        "hf_model_name": "tiny", "weights_model_name": "tinygpt", "num_layers": 4, "n_head": 4, "num_nodes": 3,
        "max_new_tokens": 7, "active_decoding_strategy": "top_k",
        "decoding_strategies": {"greedy": {}, "top_k": {"temperature": 0.7, "k": 30}}}}}
    cluster = {"host_ip": {"alpha": "10.9.9.1", "beta": "10.9.9.2", "gamma": "10.9.9.3"}, "server": "alpha",
               "port": ports[0], "num_workers": 2,
               "workers": [{"rank": 1, "host": "beta", "port": ports[1]},
                           {"rank": 2, "host": "gamma", "port": ports[2]}],
               **cluster_extra}
    weights = {"tinygpt": {"url": "http://example.invalid/tiny.safetensors", "filename": "tiny.safetensors"}}
    for name, data in (("model_config.yaml", model), ("cluster_config.yaml", cluster),
                       ("model_weights.yaml", weights)):
        with open(os.path.join(path, name), "w") as f:
            yaml.safe_dump(data, f)
    return str(path)


def child_pids(pid: int) -> dict:
    """{child pid: its command line} for the processes whose parent is `pid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Demo:
    """`nanopipe demo` in its own process; its output is collected line by line."""

    def __init__(self, tmp_path, config_dir: str, weights: str, *args, web_port: int | None = None):
        self.tmp = tmp_path / "tmp"              # TMPDIR: whatever folders the demo leaves show up here
        self.tmp.mkdir(exist_ok=True)
        self.web_port = web_port or free_ports(1)[0]
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "nanopipe", "demo", "--config-dir", config_dir,
                                      "--weights", weights, "--web-port", str(self.web_port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=str(tmp_path))
        self.lines: list = []
        self.seen: dict = {}                     # every child pid ever seen -> its command line
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = START_S) -> str:
        def seen():
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                self.reader.join(5)     # the reader catches up with the last lines
                raise AssertionError(f"the demo exited ({self.proc.returncode}) before {text!r}:\n{self.output}")
            return False
        wait_until(f"{text!r} in the demo's output", seen, timeout, detail=lambda: self.output)
        return self.output

    def wait_ready(self) -> str:
        return self.wait_for("Stop: Ctrl-C")

    def nodes(self) -> dict:
        """{rank: pid} of the nodes it runs now."""
        found = {}
        for pid, cmd in child_pids(self.proc.pid).items():
            self.seen[pid] = cmd
            if " serve " in cmd:
                found[0] = pid
            elif " join " in cmd:
                found[int(cmd.split("--rank ")[1].split()[0])] = pid
        return found

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def chat_stream(self, body: dict, on_event=None) -> list:
        """POST /chat with stream: true -> [(event name, data)], calling on_event(name, data, events) as they come."""
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=60)
        events: list = []
        try:
            conn.request("POST", "/chat", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            name, data = "message", None
            for raw in iter(resp.readline, b""):
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
                elif line == "" and data is not None:
                    events.append((name, data))
                    if on_event:
                        on_event(name, data, events)
                    name, data = "message", None
        finally:
            conn.close()
        return events

    def kill(self):
        """Whatever happened, leave nothing running: the demo, and every child it ever had."""
        if self.proc.poll() is None:
            self.nodes()
            self.proc.kill()
            self.proc.wait()
        for pid, cmd in self.seen.items():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    same = f.read().replace(b"\0", b" ").decode() == cmd       # not a recycled pid
                if same:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def ports():
    return free_ports(3)


@pytest.fixture
def demo_of(tmp_path, tiny_weights):
    started = []

    def start(config_dir, *args, web_port=None) -> Demo:
        d = Demo(tmp_path, config_dir, tiny_weights, *args, web_port=web_port)
        started.append(d)
        return d
    yield start
    for d in started:
        d.kill()


def assert_all_gone(demo: Demo, nodes: dict, ports: list):
    """Every node process ended, every port free, no nanopipe-cluster-* folder left."""
    wait_until(f"nodes {sorted(nodes.values())} to exit", lambda: not any(alive(p) for p in nodes.values()), 10)
    wait_until(f"ports {ports} to be free", lambda: all(port_free(p) for p in ports), 10)
    assert sorted(os.listdir(demo.tmp)) == [], f"the demo left {os.listdir(demo.tmp)} in TMPDIR"


# ---------------------------------------------------------------------------------------------
# the config folder, the ready block


@linux_only
def test_demo_runs_the_config_folder_and_prints_one_ready_block(demo_of, tmp_path, ports):
    config_dir = write_config_dir(tmp_path / "cfg", ports)
    with socket.socket() as squatter:           # beta's configured port is taken
        squatter.bind(("127.0.0.1", ports[1]))
        squatter.listen()
        demo = demo_of(config_dir)
        out = demo.wait_ready()
        nodes = demo.nodes()
        assert sorted(nodes) == [0, 1, 2], f"expected leader + 2 workers, found {nodes}:\n{out}"

        models = demo.get("/v1/models")
        # the config's name, then its hub name (hf_model_name) as an alias: docs/WEB.md, `model`
        assert [m["id"] for m in models["data"]] == ["tinygpt", "tiny"], models
        config = demo.get("/config")
        assert (config["model"], config["active_strategy"], config["max_tokens"], config["temperature"],
                config["top_k"]) == ("tinygpt", "top_k", 7, 0.7, 30), config
        assert [(n["rank"], n["host"], n["layers"], n["status"]) for n in config["nodes"]] == [
            (0, "alpha", [0, 1], "up"), (1, "beta", [2, 2], "up"), (2, "gamma", [3, 3], "up")], config["nodes"]

        moved = [line for line in demo.lines if line.startswith(f"port {ports[1]} (beta, rank 1) is in use; using")]
        assert len(moved) == 1, f"the demo did not say that beta's port {ports[1]} is taken:\n{out}"
        new_port = int(moved[0].rsplit(" ", 1)[1])
        assert config["leader"] == f"127.0.0.1:{ports[0]}", config["leader"]

    # the ready block: the plan with each node's address, the URL, how to stop
    for row in (f"alpha     0  0-1         2  127.0.0.1:{ports[0]}",
                f"beta      1  2-2         1  127.0.0.1:{new_port}",
                f"gamma     2  3-3         1  127.0.0.1:{ports[2]}"):
        assert row in demo.lines, f"plan row {row!r} missing:\n{out}"
    assert f"Web chat: http://127.0.0.1:{demo.web_port}/" in out
    assert f"kill {demo.proc.pid}" in out
    logs = re.search(r"Each node's whole log: (\S+)/rank<N>\.log", out)
    assert logs, f"the demo does not say where the nodes' logs are:\n{out}"
    assert os.path.exists(os.path.join(logs.group(1), "rank0.log")), out     # where it says, while it runs
    # ... and nothing else: no dial retries, no second URL, no Flask banner
    for noise in ("retrying", "Connection refused", "development server", "Serving Flask", "Debug mode",
                  "Web chat on"):
        assert noise not in out, f"start-up noise {noise!r}:\n{out}"
    assert out.count("Web chat") == 1, out
    start_up = demo.lines[:next(i for i, line in enumerate(demo.lines) if line.startswith("Stop: Ctrl-C")) + 1]
    assert len(start_up) <= 9, f"the start-up output should be one short block:\n{out}"

    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(30) == 0, demo.output
    assert_all_gone(demo, nodes, [ports[0], new_port, ports[2], demo.web_port])


# ---------------------------------------------------------------------------------------------
# stopping: every signal a user sends, and the one no handler sees


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_demo_stops_everything_it_started_on(sig, demo_of, tmp_path, ports):
    demo = demo_of(write_config_dir(tmp_path / "cfg", ports))
    demo.wait_ready()
    nodes = demo.nodes()
    assert sorted(nodes) == [0, 1, 2], demo.output
    demo.proc.send_signal(sig)
    assert demo.proc.wait(30) == 0, demo.output
    assert f"Stopping ({sig.name})" in demo.output
    assert "Traceback" not in demo.output, demo.output
    assert_all_gone(demo, nodes, ports + [demo.web_port])


@linux_only
def test_sigterm_mid_answer_lets_the_stream_end_before_the_nodes_stop(demo_of, tmp_path, ports):
    # 20 ms per hop: 40 tokens take ~2.5 s, well inside the web server's grace (demo.WEB_GRACE_S)
    demo = demo_of(write_config_dir(tmp_path / "cfg", ports, link_delay_ms=20))
    demo.wait_ready()
    body = {"text": "Hello world", "max_tokens": 40, "decoding_strategy": "greedy"}

    def sigterm_after_3_tokens(name, data, events):
        if name == "message" and len(events) == 3:
            demo.proc.send_signal(signal.SIGTERM)

    events = demo.chat_stream(body, sigterm_after_3_tokens)       # http.client: a cut stream raises
    assert events[-1][0] == "done" and events[-1][1]["config"]["tokens_generated"] == 40, events[-3:]
    assert demo.proc.wait(30) == 0, demo.output
    assert "Stopping (SIGTERM)" in demo.output and "Traceback" not in demo.output, demo.output


@linux_only
def test_a_sigkilled_demo_takes_its_nodes_with_it(demo_of, tmp_path, ports):
    demo = demo_of(write_config_dir(tmp_path / "cfg", ports))
    demo.wait_ready()
    nodes = demo.nodes()
    assert sorted(nodes) == [0, 1, 2], demo.output
    demo.proc.kill()
    demo.proc.wait()
    wait_until(f"nodes {sorted(nodes.values())} to exit after the demo was SIGKILLed",
               lambda: not any(alive(p) for p in nodes.values()), 15)
    wait_until("every port free", lambda: all(port_free(p) for p in ports + [demo.web_port]), 10)


@linux_only
def test_a_taken_web_port_fails_at_start(demo_of, tmp_path, ports):
    with socket.socket() as first:           # what a first demo (or `nanopipe web`) holds
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        demo = demo_of(write_config_dir(tmp_path / "cfg", ports), web_port=port)
        try:
            code = demo.proc.wait(START_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the demo kept running without its web port:\n{demo.output}") from None
        demo.reader.join(5)                  # the reader has every line the demo printed
        out = demo.output
    assert code != 0, out
    assert f"127.0.0.1:{port}" in out and "in use" in out and "--web-port" in out, out
    assert "Traceback" not in out and "Starting" not in out, f"nodes were started:\n{out}"
    assert all(port_free(p) for p in ports), "a node took its port although the demo failed"
    assert os.listdir(demo.tmp) == []


# ---------------------------------------------------------------------------------------------
# a worker dies: reported down, started again, the answer resumes


@linux_only
def test_a_killed_worker_is_started_again_and_the_answer_resumes(demo_of, tmp_path, ports):
    # 20 ms per hop: 40 tokens take ~2.5 s, time enough to kill a worker mid-answer
    grace = 8
    demo = demo_of(write_config_dir(tmp_path / "cfg", ports, link_delay_ms=20, rejoin_grace_s=grace,
                                    heartbeat_s=0.2), "--restarts", "1")
    demo.wait_ready()
    body = {"text": "Hello world", "max_tokens": 40, "decoding_strategy": "greedy"}
    (name, whole), = [e for e in demo.chat_stream(body) if e[0] != "message"]
    assert name == "done" and whole["config"]["tokens_generated"] == 40, whole

    def kill_gamma_after_3_tokens(name, data, events):
        if name == "message" and len(events) == 3:
            os.kill(demo.nodes()[2], signal.SIGKILL)

    events = demo.chat_stream(body, kill_gamma_after_3_tokens)
    assert events[-1][0] == "done", f"the answer did not resume: {events[-3:]}\n{demo.output}"
    assert events[-1][1]["response"] == whole["response"], "the resumed answer differs from the uninterrupted one"
    assert any(name == "status" and "rejoin" in data["status"] for name, data in events), \
        f"the stream never said it waits for the node: {[e for e in events if e[0] == 'status']}"
    out = demo.wait_for("Worker 2 is down")          # the leader's log line, echoed by the demo
    assert "[DEMO] The worker gamma (rank 2) was killed by SIGKILL; starting it again (1 of 1)" in out, out

    # the restarts are used up: past the grace period the leader re-plans over the two nodes left,
    # and the answer goes on where it stopped (cluster/replan.py)
    t0 = time.time()
    events = demo.chat_stream(body, kill_gamma_after_3_tokens)
    name, data = events[-1]
    assert name == "done" and data["response"] == whole["response"], f"the answer did not go on: {events[-2:]}"
    assert time.time() - t0 > grace - 0.5, "the answer went on before the grace period was over"
    assert "not starting it again (--restarts 1)" in demo.wait_for("not starting it again"), demo.output
    assert "re-planning over the rest" in demo.wait_for("re-planning over the rest"), demo.output
    assert sorted(demo.nodes()) == [0, 1], "the demo stopped the rest of the cluster"
    assert demo.proc.poll() is None, "the demo exited when a node died"


def test_a_worker_drained_by_nanopipe_leave_is_not_started_again(demo_of, tmp_path, ports):
    # the demo restarts a node that dies; a node drained on purpose must stay gone, or the leave is undone
    cfg = write_config_dir(tmp_path / "cfg", ports, heartbeat_s=0.2)
    demo = demo_of(cfg)
    demo.wait_ready()
    left = subprocess.run([sys.executable, "-m", "nanopipe", "leave", "--rank", "2", "--config-dir", cfg,
                           "--leader", f"127.0.0.1:{ports[0]}"],
                          capture_output=True, text=True, timeout=START_S)
    assert left.returncode == 0, left.stdout + left.stderr
    out = demo.wait_for("[DEMO] The worker gamma (rank 2)")
    assert "drained by `nanopipe leave`; not starting it again" in out, out
    assert "starting it again (1 of" not in out, out
    wait_until("the drained worker to stay gone", lambda: sorted(demo.nodes()) == [0, 1], timeout=START_S)
    assert demo.proc.poll() is None, "the demo exited when a node was drained"


# ---------------------------------------------------------------------------------------------
# LocalCluster, as the tests and the bench use it


def test_local_cluster_removes_its_folder_and_starts_the_leader_first(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with LocalCluster(tiny_weights, nodes=3, ready_timeout=60) as cl:
        assert os.path.dirname(cl.workdir) == str(tmp_path)
        for rank in (1, 2):
            with open(cl.log_path(rank)) as f:
                log = f.read()
            assert "retrying" not in log, f"worker {rank} dialed the leader before it listened:\n{log}"
    assert os.listdir(tmp_path) == [], f"LocalCluster left {os.listdir(tmp_path)}"

    with pytest.raises(ValueError, match="no-such.safetensors"):     # set-up fails: nothing left either
        LocalCluster(str(tmp_path / "no-such.safetensors"), nodes=2)
    assert os.listdir(tmp_path) == [], f"a failed LocalCluster left {os.listdir(tmp_path)}"

    kept = tmp_path / "mine"                 # a workdir the caller gives stays theirs
    with LocalCluster(tiny_weights, nodes=2, workdir=str(kept), ready_timeout=60):
        pass
    assert (kept / "rank0.log").exists()


# ---------------------------------------------------------------------------------------------
# the demo's config folder is the user's, read back through config.py


def test_demo_configs_keep_the_users_model_plan_and_settings(tmp_path, monkeypatch):
    from nanopipe.config import load_cluster_config, load_model_config
    from nanopipe.model import GPTConfig
    from nanopipe.tools.demo import demo_configs
    from nanopipe.tools.localcluster import write_yaml_files
    from nanopipe.tools.planning import plan_ranges

    monkeypatch.chdir(tmp_path)
    user = write_config_dir(tmp_path / "cfg", [7000, 7001, 7002], auth_token="s3cret", rejoin_grace_s=7,
                            max_sessions=4, tls_cert="certs/c.pem", tls_key="certs/c.key")
    with open(os.path.join(user, "model_config.yaml")) as f:
        model = yaml.safe_load(f)
    model["models"]["tinygpt"]["layer_mapping"] = {0: [0, 0], 1: [1, 2], 2: [3, 3]}
    with open(os.path.join(user, "model_config.yaml"), "w") as f:
        yaml.safe_dump(model, f)
    mc, cc = load_model_config(user), load_cluster_config(user)
    shape = GPTConfig(n_layer=4, n_embd=64, n_head=4, n_ctx=128, n_vocab=50257)
    ranges = plan_ranges(mc, shape)
    assert ranges == [(0, 1), (1, 3), (3, 4)], "the fixture's own layer_mapping"

    out = str(tmp_path / "demo")
    write_yaml_files(out, demo_configs(mc, cc, "tiny.safetensors", ranges, [9100, 9101, 9102]))
    mc2, cc2 = load_model_config(out), load_cluster_config(out)
    assert (mc2.name, mc2.decoding_defaults()) == (mc.name, mc.decoding_defaults())
    assert plan_ranges(mc2, shape) == ranges, "the nodes would run another plan than the one printed"
    assert [(n.rank, n.host, n.ip, n.port) for n in cc2.nodes] == [
        (0, "alpha", "127.0.0.1", 9100), (1, "beta", "127.0.0.1", 9101), (2, "gamma", "127.0.0.1", 9102)]
    assert (cc2.auth_token, cc2.rejoin_grace_s, cc2.max_sessions) == ("s3cret", 7, 4)
    assert (cc2.tls_cert, cc2.tls_key) == (str(tmp_path / "certs/c.pem"), str(tmp_path / "certs/c.key")), \
        "relative TLS paths must survive the nodes running in another folder"

    monkeypatch.setenv("NANOPIPE_TOKEN", "from-env")        # the environment's secret is not written to disk
    files = demo_configs(mc, load_cluster_config(user), "tiny.safetensors", ranges, [9100, 9101, 9102])
    assert "auth_token" not in files["cluster_config.yaml"]
