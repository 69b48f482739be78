"""The guide's habits, end to end, with real processes: `join RANK HOST`, a worker started before its
leader, a port that is taken, a cluster token that differs, and the slow-stage warning's manners."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import run_nanopipe, wait_until

from nanopipe.cluster.planner import Planner
from nanopipe.tools.localcluster import LocalCluster, write_configs


def _configs(folder, weights, nodes=2, **extra) -> dict:
    """A configs/ folder for `nodes` nodes on 127.0.0.1 (node0 the leader, node1 ...), on free ports."""
    from nanopipe.weights import read_config
    return write_configs(os.path.join(folder, "configs"), weights=weights, nodes=nodes,
                         n_layer=read_config(weights)[0].n_layer, cluster_extra=extra or None)


def _start(args, log_path, cwd):
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "nanopipe", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# join RANK HOST, and a worker that comes up before its leader


def test_join_takes_rank_and_host_positionally_and_asks_once_whether_the_leader_runs(tmp_path, tiny_weights):
    cc = _configs(tmp_path, tiny_weights)
    log = tmp_path / "worker.log"
    # -v: the quiet retries show as debug lines, so the test can see attempts go by after the hint
    proc = _start(["-v", "join", "1", "node1", "--config-dir", "configs", "--weights", tiny_weights], log, tmp_path)
    try:
        wait_until("the fourth failed attempt", lambda: "(attempt 4)" in log.read_text(), timeout=60,
                   detail=log.read_text)
    finally:
        _stop(proc)
    text = log.read_text()
    hint = f"Is the leader (`nanopipe serve --rank 0`) running at 127.0.0.1:{cc['port']}?"
    assert "Worker 1 starting" in text and "unexpected extra argument" not in text, text
    assert text.count(hint) == 1, text          # said once, after a few attempts, not on each
    first = text.index("(attempt 1)")
    assert text.index(hint) > first, text


def test_join_without_verbose_keeps_the_retries_quiet(tmp_path, tiny_weights):
    _configs(tmp_path, tiny_weights)
    log = tmp_path / "worker.log"
    proc = _start(["join", "--rank", "1", "--host", "node1", "--config-dir", "configs", "--weights", tiny_weights],
                  log, tmp_path)
    try:
        wait_until("the hint", lambda: "Is the leader" in log.read_text(), timeout=60, detail=log.read_text)
    finally:
        _stop(proc)
    text = log.read_text()
    assert "(attempt 1)" not in text and "(attempt 2)" not in text, text


@pytest.mark.parametrize("args, message", [
    (["1", "node1", "--rank", "2"], "two different ranks: 1 (as an argument) and --rank 2"),
    (["1", "node1", "--host", "node0"], "two different hosts: node1 (as an argument) and --host node0"),
    (["1", "--leader", "127.0.0.1:1"], "--leader takes the rank and host from the leader"),
])
def test_join_refuses_two_forms_that_disagree(tmp_path, tiny_weights, args, message):
    _configs(tmp_path, tiny_weights)
    r = run_nanopipe("join", *args, "--config-dir", "configs", cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# a leader up with another token; a port that is taken


@pytest.fixture(scope="module")
def guarded(tiny_weights):
    """One real `nanopipe serve` whose cluster token is "right"."""
    with LocalCluster(tiny_weights, nodes=1, cluster_extra={"auth_token": "right"}, ready_timeout=60) as cl:
        yield cl


def test_health_says_the_token_differs_when_the_leader_is_up_and_refuses_it(guarded):
    from nanopipe.web.app import create_app, settings_from_configs
    settings = settings_from_configs(guarded.config_dir, leader=guarded.leader_addr)
    wrong = create_app(dict(settings, TESTING=True, LEADER_TOKEN="wrong")).test_client()
    r = wrong.get("/health")
    assert r.status_code == 503
    assert r.json["leader"] == {"addr": guarded.leader_addr, "reachable": True, "authorized": False}, r.json
    assert "token differs" in r.json["error"] and "nanopipe serve" not in r.json["error"], r.json["error"]
    r = wrong.post("/chat", json={"text": "Hello", "max_tokens": 2})
    assert r.status_code == 503 and "token differs" in r.get_data(as_text=True)
    right = create_app(dict(settings, TESTING=True)).test_client().get("/health")
    assert right.json["leader"]["reachable"] is True and right.json["leader"]["authorized"] is True, right.json


def test_generate_on_a_leader_with_another_token_says_so(guarded, tmp_path):
    env_token = dict(os.environ, NANOPIPE_TOKEN="wrong", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "nanopipe", "generate", "Hi", "--leader", guarded.leader_addr,
                        "--config-dir", str(tmp_path / "none"), "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=60, env=env_token, cwd=tmp_path)
    assert r.returncode == 1 and "token differs" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_serve_on_a_taken_port_fails_before_loading_weights(guarded, tiny_weights, tmp_path):
    r = run_nanopipe("serve", "--config-dir", guarded.config_dir, "--weights", tiny_weights, cwd=tmp_path,
                     timeout=60)
    port = guarded.cluster["port"]
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Loading server's share" not in r.stderr and "Measured this node" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_web_on_a_taken_port_fails_before_its_banner(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run_nanopipe("web", "--port", str(port), "--leader", "127.0.0.1:1", "--config-dir",
                         str(tmp_path / "none"), cwd=tmp_path, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and f"cannot serve the web chat on 127.0.0.1:{port}" in r.stderr, out
    assert "Web chat on" not in out and "Traceback" not in out, out


# ---------------------------------------------------------------------------------------------
# the slow-stage warning: once per condition, then only when it changes


def _check(offs, layers=None):
    """Run Planner.check_predictions over a sequence of one stage's measured/predicted - 1 values;
    return the lines it logged, with their levels."""
    import logging
    lines = []
    state = SimpleNamespace(_off_warned={}, count=lambda kind: None,
                            log=lambda msg, level=logging.INFO: lines.append((level, msg)))
    for i, off in enumerate(offs):
        row = {"rank": 0, "host": "mini1", "layers": (layers or [[0, 4]] * len(offs))[i], "samples": 64,
               "predicted_ms": 100.0, "measured_ms": 100.0 * (1 + off), "off": off}
        state.stage_report = lambda row=row: [row]
        Planner.check_predictions(state)
    return lines


def test_the_slow_stage_warning_is_said_once_per_condition():
    import logging
    lines = _check([0.30, 0.28, 0.24, 0.26, 0.24, 0.30, -0.56, -0.56, -0.55])
    warnings = [m for level, m in lines if level == logging.WARNING]
    assert len(warnings) == 2, lines      # slower once (hovering at 25% is the same condition), faster once
    assert "+30% off its predicted 100.00 ms" in warnings[0] and "-56% off" in warnings[1], warnings
    assert all(level == logging.DEBUG for level, m in lines if m not in warnings), lines


def test_the_slow_stage_warning_comes_again_after_the_stage_was_back_in_line_or_moved():
    import logging
    lines = _check([0.30, 0.05, 0.30, 0.30], layers=[[0, 4], [0, 4], [0, 4], [0, 4]])
    assert [level for level, _ in lines if level >= logging.INFO] == [logging.WARNING, logging.INFO, logging.WARNING]
    lines = _check([0.30, 0.30], layers=[[0, 4], [0, 6]])       # a new plan gave it other layers
    assert [level for level, _ in lines] == [logging.WARNING, logging.WARNING], lines


# ---------------------------------------------------------------------------------------------
# the docs' commands run as written from a fresh clone (make install: the venv is not activated)


def test_the_docs_never_say_bare_pytest_where_the_venv_is_not_active():
    """Plain `pytest` is the system's (No module named 'nanopipe'): the docs give .venv/bin/pytest,
    or say to activate first on the same line."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    bare = []
    for name in ("README.md", "docs/WALKTHROUGH.md"):
        for line in (root / name).read_text().splitlines():
            if re.search(r"(^|[`$]\s*)pytest\b", line) and "activate" not in line:
                bare.append(f"{name}: {line.strip()}")
    assert not bare, "\n".join(bare)


# ---------------------------------------------------------------------------------------------
# from the demo to hand-run nodes: the synthetic weights the demo wrote are offered, not the hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["serve"], ["join", "1", "node1"], ["generate", "Hello", "--max-tokens", "2"]])
def test_a_node_without_its_weights_offers_the_synthetic_file_of_the_same_shape(tmp_path, tiny_weights, command):
    from nanopipe.weights import synthetic_name
    # configs whose weights file (model.safetensors) is missing here and whose url answers nothing
    write_configs(str(tmp_path / "configs"), weights=str(tmp_path / "elsewhere" / "model.safetensors"), nodes=2,
                  n_layer=4, n_head=4, weights_url=f"http://127.0.0.1:{_closed_port()}/model.safetensors")
    stand_in = os.path.join("weights", synthetic_name(n_layer=4, n_embd=64, n_head=4, n_ctx=128))
    os.makedirs(tmp_path / "weights")
    os.link(tiny_weights, tmp_path / stand_in)          # as `nanopipe demo --synthetic` leaves it
    r = run_nanopipe(*command, "--config-dir", "configs", cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"no weights at {os.path.join('weights', 'model.safetensors')}" in r.stderr, r.stderr
    assert f"--weights {stand_in}" in r.stderr, r.stderr
    assert "cannot reach" not in r.stderr, r.stderr         # the hub (here: a closed port) was not tried
    # the offered command works as written: a second name for the same file, no copy
    offered = re.search(r"`nanopipe (init-weights [^`]*)`", r.stderr)
    assert offered and offered.group(1).endswith(" weights/model.safetensors"), r.stderr
    r = run_nanopipe(*shlex.split(offered.group(1)), cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and os.path.samefile(tmp_path / "weights" / "model.safetensors", tmp_path / stand_in), \
        r.stdout + r.stderr


def test_plain_generate_on_synthetic_weights_says_so_on_stderr(tmp_path, tiny_weights):
    r = run_nanopipe("generate", "Hello", "--weights", tiny_weights, "--max-tokens", "3", "--config-dir",
                     str(tmp_path / "none"), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC: random weights, output is gibberish" in r.stderr, r.stderr
    assert "SYNTHETIC" not in r.stdout and r.stdout.startswith("Hello"), r.stdout     # stdout: the text alone


# ---------------------------------------------------------------------------------------------
# `nanopipe bench` a newcomer can read


def test_default_bench_is_one_short_table_with_verdicts(tmp_path, small_weights):
    """gpt2-small-shaped weights; the CPU time the command used is bounded (wall time would measure
    the other jobs on a shared machine): the old default spent minutes on profiles and long prompts."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = run_nanopipe("bench", "--weights", small_weights, cwd=tmp_path, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) <= 12, r.stdout                              # one screen
    header = next(i for i, line in enumerate(lines) if line.startswith("what was measured"))
    assert lines[header].split() == ["what", "was", "measured", "figure", "compared", "with", "verdict"], r.stdout
    decode = lines[header + 1]
    assert decode.startswith("decode, 1 stream") and "tok/s" in decode and "the memory bound" in decode, decode
    assert re.search(r"(meets|BELOW) the target \(>= 0\.85x\)$", decode), decode
    assert "issue" not in r.stdout and "--full" in r.stdout, r.stdout
    assert "LM head:" not in r.stdout and "matmuls alone" not in r.stdout, r.stdout   # the long parts: --full
    assert cpu_s < 60, f"the default bench used {cpu_s:.0f} s of CPU"


def test_bench_full_keeps_the_whole_report(tmp_path, tiny_weights):
    r = run_nanopipe("bench", "--full", "--weights", tiny_weights, "--tokens", "4", "--prompt-len", "8",
                     "--bandwidth-mb", "64", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    for part in ("decode step, ms per token:", "matmuls alone", "LM head: decode", "decode vs bound:"):
        assert part in r.stdout, r.stdout
    assert re.search(r"decode vs bound: +[\d.]+x: (meets|BELOW) the target", r.stdout), r.stdout
    assert "issue" not in r.stdout, r.stdout


# ---------------------------------------------------------------------------------------------
# a node asked to stop says what asked it, and exits 0


@pytest.mark.parametrize("sig, said", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C (SIGINT)")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_node_asked_to_stop_says_what_asked_it(tiny_weights, sig, said):
    from helpers import log_of
    with LocalCluster(tiny_weights, nodes=2, ready_timeout=60) as cl:
        cl.kill_rank(1, sig)
        assert cl.procs[1].returncode == 0, log_of(cl, 1)
        assert f"Shutting down: asked to stop ({said})" in log_of(cl, 1), log_of(cl, 1)
        cl.kill_rank(0, sig)
        assert cl.procs[0].returncode == 0, log_of(cl, 0)
        assert f"Shutting down: asked to stop ({said})" in log_of(cl, 0), log_of(cl, 0)


# ---------------------------------------------------------------------------------------------
# join --leader when the leader runs on synthetic weights: the worker makes the same blocks


class JoinByLeader(LocalCluster):
    """Workers started as `nanopipe join --leader 127.0.0.1:PORT` in an empty folder: no configs, no
    weights, and the configured download address refuses every connection."""

    def command(self, rank: int) -> list:
        if rank == 0:
            return super().command(0)
        return [sys.executable, "-m", "nanopipe", "join", "--leader", self.leader_addr,
                "--config-dir", os.path.join(self.workdir, "no-configs-here")]


def test_join_leader_on_synthetic_weights_makes_the_same_blocks_offline(tmp_path, tiny_weights):
    """Before: the worker downloaded the model_weights.yaml url (the real model, online; here an
    address that refuses) and mixed it with the leader's random blocks, or died offline."""
    from nanopipe.decoding import SamplingParams
    from nanopipe.engine import Engine
    os.makedirs(tmp_path / "weights")
    cl = JoinByLeader(tiny_weights, nodes=3, workdir=str(tmp_path), ready_timeout=90,
                      weights_url=f"http://127.0.0.1:{_closed_port()}/gpt2.safetensors")
    params = SamplingParams("greedy", max_tokens=8)
    prompt = [15496, 995, 11, 616]
    with cl:
        with cl.client(timeout=60) as c:
            got = c.generate(prompt, params)["token_ids"]
        logs = cl.logs()
    assert got == Engine.load(tiny_weights).generate(list(prompt), params)["token_ids"], "cluster == one process"
    assert "runs on SYNTHETIC weights (seed 0): making blocks" in logs, logs
    assert "Downloading" not in logs and "cannot reach" not in logs, logs
    made = sorted(f for f in os.listdir(tmp_path / "weights") if ".layers-" in f)
    assert len(made) == 2, made                 # one slice per worker, nothing else
