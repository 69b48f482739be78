"""A config mistake at the command line: every command gives the same clear `Error: ...`, exit code 1,
no traceback, and none falls back to built-in defaults when a config file is there but broken.

Built-in defaults are only for a config file that is not there at all (`generate --weights F` in a
folder without configs/).
"""
from __future__ import annotations

import os
import shutil

import pytest
import yaml
from click.testing import CliRunner
from helpers import CONFIG_DIR, run_nanopipe

from nanopipe.tools.cli import main


def configs(tmp_path, model=None, cluster=None) -> str:
    """A copy of the shipped configs/ with `model(data)` / `cluster(data)` applied to the YAML."""
    d = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, d)
    for name, edit in (("model_config.yaml", model), ("cluster_config.yaml", cluster)):
        if edit:
            data = yaml.safe_load((d / name).read_text())
            edit(data)
            (d / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return str(d)


def invoke(*args) -> object:
    return CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    """The `Error: ...` a command printed; fails if it crashed instead (an exception is a traceback)."""
    assert result.exit_code == 1, f"exit code {result.exit_code}:\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"crashed with {result.exception!r}"
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def topp(data):
    data["gpt2"]["active_decoding_strategy"] = "topp"


def test_generate_refuses_a_broken_model_config_as_serve_does(tmp_path, tiny_weights):
    """Before: `generate` ran greedy with `active_decoding_strategy: topp`, silently."""
    d = configs(tmp_path, model=topp)
    gen = error_line(invoke("generate", "Hello", "--weights", tiny_weights, "--config-dir", d, "--max-tokens", "2"))
    serve = error_line(invoke("serve", "--config-dir", d, "--weights", tiny_weights))
    assert gen == serve
    assert gen == (f"Error: {d}/model_config.yaml: gpt2: active_decoding_strategy 'topp' is not one of "
                   "decoding_strategies (greedy, sampling, top_p, top_k) (did you mean 'top_p'?)")


def test_generate_without_any_configs_uses_built_in_defaults(tmp_path, tiny_weights):
    result = invoke("generate", "Hello", "--weights", tiny_weights, "--config-dir", str(tmp_path / "none"),
                    "--max-tokens", "2", "--json")
    assert result.exit_code == 0, result.output


def auth_tokn(data):
    data["auth_tokn"] = "change-me"


@pytest.mark.parametrize("args", [
    ["plan"],
    ["serve", "--weights", "x.safetensors"],
    ["join", "--rank", "1", "--weights", "x.safetensors"],
    ["generate", "Hello", "--leader", "127.0.0.1:9"],
    ["web", "--leader", "127.0.0.1:9"],
], ids=["plan", "serve", "join", "generate --leader", "web --leader"])
def test_a_misspelled_cluster_key_stops_every_command(tmp_path, args):
    """Before: `plan` printed the split, and the others ran with the cluster open (no auth token)."""
    d = configs(tmp_path, cluster=auth_tokn)
    line = error_line(invoke(*args, "--config-dir", d))
    assert line == f"Error: {d}/cluster_config.yaml: unknown key 'auth_tokn' (did you mean 'auth_token'?)"


def test_plan_names_nodes_only_from_a_valid_cluster_file(tmp_path):
    """Before: a broken cluster file made `plan` print node0/node1/node2."""
    d = configs(tmp_path, cluster=lambda c: c.update(num_workers=3))
    line = error_line(invoke("plan", "--config-dir", d))
    assert "num_workers is 3 but 'workers' lists 2" in line
    os.remove(os.path.join(d, "cluster_config.yaml"))           # no cluster file at all: generic names
    result = invoke("plan", "--config-dir", d)
    assert result.exit_code == 0, result.output
    table = result.output.split("\n\n")[0]         # the layer table (node speeds follow it)
    assert [row.split()[0] for row in table.splitlines()[1:]] == ["node0", "node1", "node2"]


def test_plan_checks_num_nodes_against_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(invoke("plan", "--config-dir", str(CONFIG_DIR), "--model", "gpt2-large"))
    assert "gpt2-large: num_nodes=4 but" in line and "has 3 nodes" in line and "--nodes N" in line
    result = invoke("plan", "--config-dir", str(CONFIG_DIR), "--model", "gpt2-large", "--nodes", "4")
    assert result.exit_code == 0, result.output
    table = result.output.split("\n\n")[0]         # the layer table (node speeds follow it)
    assert [row.split()[:4] for row in table.splitlines()[1:]][-1] == ["node3", "3", "27-35", "9"]


@pytest.mark.parametrize("command", ["serve", "plan"])
def test_an_unknown_partition_is_an_error_not_a_traceback(tmp_path, tiny_weights, command):
    """Before: PartitionError escaped `serve` and `plan` as a Python traceback."""
    def evenly(m):
        m["gpt2"].update(partition="evenly")
        del m["gpt2"]["n_head"]         # the tiny weights' own (4): the weights load, the partition is the error
    d = configs(tmp_path, model=evenly)
    proc = run_nanopipe(command, "--config-dir", d, "--weights", tiny_weights, cwd=tmp_path, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert f"Error: {d}/model_config.yaml: gpt2: unknown partition 'evenly' (did you mean 'even'?)" in out, out


def test_plan_strategy_option_unknown_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(invoke("plan", "--config-dir", str(CONFIG_DIR), "--strategy", "evenly"))
    assert "unknown partition strategy 'evenly'" in line


def test_a_layer_mapping_with_a_gap_stops_serve(tmp_path, tiny_weights):
    mapping = {0: [0, 1, 2], 1: [3, 4, 6], 2: [7, 8, 9, 10, 11]}
    d = configs(tmp_path, model=lambda m: m["gpt2"].update(layer_mapping=mapping))
    line = error_line(invoke("serve", "--config-dir", d, "--weights", tiny_weights))
    assert line == f"Error: {d}/model_config.yaml: gpt2: layer_mapping rank 1: [3, 4, 6] skips layer 5; a rank " \
                   "holds consecutive layers: list them all, or write [first, last]"


@pytest.mark.parametrize("command", [["plan"], ["generate", "Hi", "--max-tokens", "2"], ["serve"]])
def test_a_command_reads_each_config_file_once(tmp_path, monkeypatch, command):
    """The configs are read once per command (config.Configs in click's context) and passed on as
    objects: `serve` read cluster_config.yaml twice, `plan` and `generate` model_config.yaml twice."""
    import collections

    import nanopipe.config as config
    from nanopipe.cluster.leader import Leader
    from nanopipe.tools.localcluster import write_configs
    from nanopipe.weights import init_weights
    (tmp_path / "weights").mkdir()
    init_weights(str(tmp_path / "weights" / "tiny.safetensors"), n_layer=4, n_embd=64, n_head=4, n_ctx=64)
    d = str(tmp_path / "cfg")
    write_configs(d, weights=str(tmp_path / "weights" / "tiny.safetensors"), nodes=3, n_layer=4, n_head=4)
    monkeypatch.chdir(tmp_path)
    reads, real = collections.Counter(), config._load_yaml
    monkeypatch.setattr(config, "_load_yaml", lambda folder, name: reads.update([name]) or real(folder, name))
    monkeypatch.setattr(Leader, "serve_forever", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setenv("NANOPIPE_PROBE_S", "0.05")
    result = invoke(*command, "--config-dir", d)
    assert result.exit_code == 0, result.output
    assert reads and set(reads.values()) == {1}, dict(reads)


def test_web_with_a_leader_name_reads_each_config_file_once(tmp_path, monkeypatch):
    """`nanopipe web --leader NAME:PORT` resolves NAME in cluster_config.yaml and takes the app's
    settings from the same files: each is read once (the app's settings read cluster_config.yaml again)."""
    import collections

    import nanopipe.config as config
    import nanopipe.tokenizer
    import nanopipe.web.server
    from nanopipe.tools.localcluster import free_ports, write_configs
    d = str(tmp_path / "cfg")
    write_configs(d, weights=str(tmp_path / "tiny.safetensors"), nodes=2, n_layer=2, n_head=4)
    served, port = {}, free_ports(1)[0]
    monkeypatch.setattr(nanopipe.web.server, "serve", lambda app, host, port, **kw: served.update(app.config))
    monkeypatch.setattr(nanopipe.tokenizer, "get_tokenizer", lambda: None)     # no tiktoken download here
    reads, real = collections.Counter(), config._load_yaml
    monkeypatch.setattr(config, "_load_yaml", lambda folder, name: reads.update([name]) or real(folder, name))
    result = invoke("web", "--leader", "node0:65432", "--port", str(port), "--config-dir", d)
    assert result.exit_code == 0, result.output
    assert served["LEADER"] == "127.0.0.1:65432" and served["MODEL_NAME"] == "local", served
    assert reads["cluster_config.yaml"] == 1 and set(reads.values()) == {1}, dict(reads)
