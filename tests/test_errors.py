"""Errors that point at the fix, and help that says what each option does: each case as a new user
meets it, through the real `nanopipe` command (a subprocess) and, where ports are involved, against
real processes listening on 127.0.0.1.

    an error          goes to stderr on a line of its own, never glued to the streamed text
    a long prompt     is refused before it is echoed, with its length, n_ctx and what to shorten
    missing weights   the hint names the model, the file and the exact command
    --leader NAME     a host_ip name resolves through cluster_config.yaml (the README's own example)
    a wrong port      says what listens there: a worker's data port, or an HTTP server (the web app)
    a dead rank       the stream says so on stderr, on lines of their own, and past rejoin_grace_s goes on
    --help            every option has a help line with its default; command summaries fit
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from helpers import CONFIG_DIR, node, run_nanopipe, wait_status

from nanopipe.cluster.leader_client import ClientError, LeaderClient
from nanopipe.config import Configs
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster, free_ports, write_configs

PROMPT = "Hello world, my name"


def error_line(stderr: str) -> str:
    """The one line of stderr that starts with `Error: `; fails if there is none."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
    assert lines, f"no line of stderr starts with 'Error: ':\n{stderr}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the CLI's own errors


def test_error_is_on_its_own_line_on_stderr(tmp_path):
    port = free_ports(1)[0]
    r = run_nanopipe("generate", "Hello", "--leader", f"127.0.0.1:{port}", "--config-dir", str(tmp_path))
    assert r.returncode == 1, r
    assert r.stdout == "" or r.stdout.endswith("\n"), \
        f"stdout {r.stdout!r} does not end its line: the error would be glued to it on a terminal"
    assert error_line(r.stderr).startswith(f"Error: leader at 127.0.0.1:{port} is unreachable"), r.stderr


def test_too_long_prompt_is_refused_before_it_is_echoed(tiny_weights, tiny_config, cluster):
    from nanopipe.tokenizer import get_tokenizer
    prompt = "hello " * 200
    n = len(get_tokenizer().encode(prompt))
    assert n > tiny_config.n_ctx
    for where in (["--weights", tiny_weights, "--config-dir", CONFIG_DIR],
                  ["--leader", cluster.leader_addr, "--config-dir", cluster.config_dir]):
        r = run_nanopipe("generate", prompt, *where)
        assert r.returncode == 1, r
        assert r.stdout == "", f"the prompt was echoed before the error ({where[0]}): {r.stdout[:80]!r}..."
        line = error_line(r.stderr)
        assert f"the prompt is {n} tokens" in line and f"n_ctx={tiny_config.n_ctx}" in line, line
        assert "shorten the prompt" in line, line
        assert "max_tokens <= 0" not in r.stderr, r.stderr


def test_a_reply_past_the_context_is_refused_before_the_prompt_is_echoed(tiny_weights, tiny_config, cluster):
    from nanopipe.tokenizer import get_tokenizer
    prompt = "hello " * 10
    n = len(get_tokenizer().encode(prompt))
    assert n < tiny_config.n_ctx
    for where in (["--weights", tiny_weights, "--config-dir", CONFIG_DIR],
                  ["--leader", cluster.leader_addr, "--config-dir", cluster.config_dir]):
        r = run_nanopipe("generate", prompt, "--max-tokens", str(tiny_config.n_ctx), *where)
        assert r.returncode == 1, r
        assert r.stdout == "", f"the prompt was echoed before the error ({where[0]}): {r.stdout[:80]!r}..."
        line = error_line(r.stderr)
        assert f"the prompt is {n} tokens and --max-tokens is {tiny_config.n_ctx}" in line, line
        assert f"use --max-tokens {tiny_config.n_ctx - n} or less" in line, line


def test_missing_weights_hint_names_the_model_file_and_command(tmp_path):
    r = run_nanopipe("generate", "Hello", "--model", "gpt2-medium", "--config-dir", CONFIG_DIR, cwd=tmp_path)
    assert r.returncode == 1, r
    line = error_line(r.stderr)
    assert "model 'gpt2-medium'" in line, line
    assert os.path.join("weights", "gpt2-medium.safetensors") in line, line
    assert "`nanopipe pull gpt2-medium`" in line, line
    assert "pull gpt2`" not in line, line
    assert "offline, `nanopipe init-weights weights/gpt2-medium.safetensors` writes synthetic" in line, line


# ---------------------------------------------------------------------------------------------
# --leader: names from host_ip, and the wrong port


def test_leader_given_by_its_host_ip_name(cluster):
    port = cluster.cluster["port"]
    for leader in (f"node0:{port}", "node0"):        # the README's `--leader mini1:65432`; the port may go
        r = run_nanopipe("generate", PROMPT, "--leader", leader, "--config-dir", cluster.config_dir,
                     "--strategy", "greedy", "--max-tokens", "3")
        assert r.returncode == 0, f"--leader {leader}: {r.stderr}"
        assert r.stdout.startswith(PROMPT) and len(r.stdout) > len(PROMPT) + 1, r.stdout


@pytest.mark.parametrize("given, addr", [
    ("mini1:65432", "127.0.0.1:65432"),     # the README's example, with the shipped configs
    ("mini1", "127.0.0.1:65432"),           # no port: the leader's from the config
    ("pi1:7000", "127.0.0.1:7000"),
    ("10.0.0.9:65432", "10.0.0.9:65432"),   # not a host_ip name: as given
    ("elsewhere:1234", "elsewhere:1234"),
])
def test_resolve_leader_through_host_ip(given, addr):
    from nanopipe.tools.cli import resolve_leader
    assert resolve_leader(Configs(CONFIG_DIR), given) == addr


def test_a_leader_name_in_no_host_ip_and_no_dns_says_so():
    from nanopipe.tools.cli import unknown_host_hint
    for given in ("mini9.invalid:65432", "mini9.invalid"):        # the port may go, as in --leader mini1
        hint = unknown_host_hint(Configs(CONFIG_DIR), given)
        assert hint.startswith(" Note: 'mini9.invalid' is not a name in host_ip of "), hint
        assert "cluster_config.yaml" in hint and hint.endswith(", nor a host this machine knows."), hint
    assert unknown_host_hint(Configs(CONFIG_DIR), "mini1:65432") == ""          # a host_ip name
    assert unknown_host_hint(Configs(CONFIG_DIR), "127.0.0.1:65432") == ""      # an address
    assert unknown_host_hint(Configs(CONFIG_DIR), "localhost:65432") == ""      # a name this machine resolves


def test_resolve_leader_without_configs_passes_the_address_on(tmp_path):
    from nanopipe.tools.cli import resolve_leader
    assert resolve_leader(Configs(str(tmp_path)), "mini1:65432") == "mini1:65432"


def test_a_workers_port_says_whose_it_is_and_where_the_leader_is(cluster, tmp_path):
    worker1 = cluster.cluster["workers"][0]["port"]
    leader = cluster.leader_addr
    # without a config the worker's refusal says it; with the cluster's config, the same
    for config_dir in (str(tmp_path), cluster.config_dir):
        r = run_nanopipe("generate", "Hello", "--leader", f"127.0.0.1:{worker1}", "--config-dir", config_dir)
        assert r.returncode == 1, r
        assert "worker 1's data port" in r.stderr and f"the leader listens on {leader}" in r.stderr, r.stderr


@pytest.fixture
def web_port(cluster):
    from werkzeug.serving import make_server

    from nanopipe.web.app import create_app, settings_from_configs
    app = create_app(settings_from_configs(cluster.config_dir, leader=cluster.leader_addr))
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_port
    srv.shutdown()


def test_the_web_port_is_recognised_as_http_at_once(web_port, tmp_path):
    t0 = time.time()
    with pytest.raises(ClientError) as e:
        LeaderClient.connect(f"127.0.0.1:{web_port}", timeout=5)
    waited = time.time() - t0
    assert "is an HTTP server" in str(e.value) and "the leader's own port" in str(e.value), str(e.value)
    assert waited < 3, f"took {waited:.1f}s to tell; the handshake timeout (5 s) should not be waited out"
    r = run_nanopipe("generate", "Hello", "--leader", f"127.0.0.1:{web_port}", "--config-dir", str(tmp_path))
    assert r.returncode == 1 and "is an HTTP server" in error_line(r.stderr), r.stderr


# ---------------------------------------------------------------------------------------------
# a rank down past rejoin_grace_s


def test_rank_down_past_grace_the_stream_goes_on_saying_so(tiny_weights, tmp_path):
    grace = 3
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path),
                      cluster_extra={"rejoin_grace_s": grace, "heartbeat_s": 0.2})
    try:
        cl.start()
        # a CLI generation streams, then rank 1 dies under it for good: past its grace the leader
        # re-plans over the rest and the answer goes on; what happened is said on stderr, each on its line
        proc = subprocess.Popen([sys.executable, "-m", "nanopipe", "generate", PROMPT, "--leader", cl.leader_addr,
                                 "--config-dir", cl.config_dir, "--strategy", "greedy", "--max-tokens", "120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        out = proc.stdout.read(len(PROMPT) + 1)        # the prompt, then the first token's text
        assert out.startswith(PROMPT.encode()), out
        cl.kill_rank(1, signal.SIGKILL)
        t_kill = time.time()
        rest, err = proc.communicate(timeout=60)
        in_flight_waited = time.time() - t_kill
        stdout, stderr = (out + rest).decode(), err.decode()
        assert proc.returncode == 0, (stdout, stderr)
        lines = stderr.splitlines()
        assert any(ln.startswith("[worker 1 (node1") and "waiting up to 3s for it to rejoin]" in ln
                   for ln in lines), stderr
        assert "[re-planning the cluster (rank 1 (node1) is gone); the answer goes on in a moment]" in lines, stderr
        assert in_flight_waited > grace - 0.5, f"the request in flight waited {in_flight_waited:.1f}s, not its grace"

        # rank 2 just died (within its grace): a new request waits for it, saying so, for the whole grace;
        # then rank 0, alone, holds every block and answers
        cl.kill_rank(2, signal.SIGKILL)
        wait_status(cl, lambda st: node(st, 2)["status"] == "down", 10, "rank 2 shown down")
        statuses = []
        t0 = time.time()
        with cl.client() as c:
            got = c.generate([15496, 995], max_tokens=5, strategy="greedy", ignore_eos=True,
                             on_status=statuses.append)
        waited = time.time() - t0
        assert len(got["token_ids"]) == 5
        assert statuses and "waiting for rank 2 to join" in statuses[0], statuses
        assert waited > grace - 0.5, f"a request within rank 2's grace waited only {waited:.1f}s"
        with cl.client() as c:
            assert [n["rank"] for n in c.status()["nodes"]] == [0]
    finally:
        cl.stop()


# ---------------------------------------------------------------------------------------------
# help


def options(cmd):
    import click
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_has_a_help_line_with_its_default(name):
    import click
    cmd = main.commands[name]
    ctx = click.Context(cmd, info_name=name)
    for p in options(cmd):
        text = p.get_help_record(ctx)[1]
        says = re.sub(r"\s*\[[^\]]*\]$", "", text).strip()       # the help without its "[default: ...]"
        assert says, f"{name} {p.opts[0]} has no help text: {text!r}"
        if not p.is_flag:
            assert "default:" in text or "required" in text, f"{name} {p.opts[0]} does not say its default: {text!r}"


def test_command_list_fits_without_cut_descriptions():
    r = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    listing = r.output.split("Commands:")[1].splitlines()[1:]
    assert len(listing) == len(main.commands), r.output
    for line in listing:
        assert not line.rstrip().endswith("..."), f"cut: {line!r}"
        assert len(line) <= 80, f"too wide: {line!r}"


def test_generate_help_points_at_the_model_config_for_its_defaults():
    """The decoding defaults are model_config.yaml's (per model): the help says where to look and writes
    none of them as a number (a hand-written "0.8 as shipped" went stale when the file changed)."""
    import re

    from nanopipe.tools.cli import MODEL_DEFAULTS
    r = CliRunner().invoke(main, ["generate", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    for option in ("--strategy", "--temperature", "--top-k", "--top-p", "--max-tokens"):
        said = re.search(re.escape(option) + r" \S+ (.*?\[default: [^\]]*\])", text)
        assert said, f"no [default: ...] for {option}:\n{text}"
        assert MODEL_DEFAULTS in said.group(1) and "model_config.yaml" in MODEL_DEFAULTS, said.group(1)
        assert not re.search(r"\[default:[^\]]*\d", said.group(1)), f"{option} quotes a number: {said.group(1)}"


def test_plan_partition_and_the_old_strategy_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    new = CliRunner().invoke(main, ["plan", "--partition", "balanced", "--config-dir", CONFIG_DIR])
    old = CliRunner().invoke(main, ["plan", "--strategy", "balanced", "--config-dir", CONFIG_DIR])
    even = CliRunner().invoke(main, ["plan", "--partition", "even", "--config-dir", CONFIG_DIR])
    assert new.exit_code == old.exit_code == even.exit_code == 0, (new.output, old.output)
    def split(out):         # the layer table; the speeds below it are measured afresh on each run
        return out.split("\n\n")[0]
    assert split(new.stdout) == split(old.stdout) != split(even.stdout), (new.stdout, old.stdout, even.stdout)
    assert "`plan --strategy` is now `plan --partition`" in old.stderr, old.stderr
    assert new.stderr == "", new.stderr


def test_a_split_stage_with_more_members_than_heads_stops_serve_and_plan(tiny_weights, tiny_config, tmp_path):
    # the heads are read from the weights (no n_head in model_config.yaml): one member more than heads
    members = tiny_config.n_head + 1
    mapping = {0: [0, 1], **{r: [2, tiny_config.n_layer - 1] for r in range(1, members + 1)}}
    configs = str(tmp_path / "configs")
    write_configs(configs, weights=tiny_weights, nodes=members + 1, n_layer=tiny_config.n_layer,
                  layer_mapping=mapping)
    want = (f"share layers 2-{tiny_config.n_layer - 1} ({members} members) but the model has only "
            f"{tiny_config.n_head} heads")
    for args in (["serve", "--rank", "0"], ["plan"], ["join", "--rank", "1", "--host", "node1"]):
        r = run_nanopipe(*args, "--config-dir", configs, "--weights", tiny_weights, cwd=tmp_path, timeout=90)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
        assert want in error_line(r.stderr) and "Traceback" not in r.stderr, (args, r.stderr)
