"""tools/bootstrap.py: the `nanopipe` command sets OpenBLAS's environment before numpy loads, then
runs the CLI, whose modules import numpy at the top.

OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it. The real command runs here as a
process with an import hook (a sitecustomize.py) that notes the variable at the moment numpy is
first imported: a node sharing this machine with other ranks must have it set by then.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from nanopipe.config import Configs
from nanopipe.tools.bootstrap import option_value, prepare_env, shares_cores
from nanopipe.tools.localcluster import write_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = "20" if platform.machine().lower() in ("x86_64", "amd64") else "4"
ELSEWHERE = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]      # TEST-NET-1: never an address of this machine

# run first in the command's Python: what OPENBLAS_THREAD_TIMEOUT was when numpy's import began
WATCH = """
import atexit, json, os, sys
SEEN = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and "numpy" not in SEEN:
            SEEN["numpy"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset")
            SEEN["bootstrap_loaded"] = "nanopipe.tools.bootstrap" in sys.modules
        return None

sys.meta_path.insert(0, Watch())
atexit.register(lambda: open(os.environ["WATCH_OUT"], "w").write(json.dumps(SEEN)))
"""


def configs_at(folder, ips) -> str:
    d = str(folder / "configs")
    write_configs(d, weights=str(folder / "w.safetensors"), nodes=len(ips), n_layer=4, hosts=ips)
    return d


def run_watched(tmp_path, args, env_extra=None) -> tuple:
    """Run `python -m nanopipe *args` under WATCH: (what it saw when numpy loaded, the output)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(WATCH))
    out = tmp_path / "seen.json"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])), WATCH_OUT=str(out),
               **(env_extra or {}))
    r = subprocess.run([sys.executable, "-m", "nanopipe", *args], capture_output=True, text=True, cwd=str(tmp_path),
                       env=env, timeout=120)
    return json.loads(out.read_text()), r.stdout + r.stderr


def test_a_node_sharing_this_machine_has_the_short_spin_set_before_numpy_loads(tmp_path):
    """`serve` with every rank on 127.0.0.1 (the shipped configs, demo, tests): set when numpy loads.
    (`--rank 1` makes serve refuse at once: the environment is set and numpy loaded before that.)"""
    seen, out = run_watched(tmp_path, ["serve", "--rank", "1", "--config-dir", configs_at(tmp_path, ["127.0.0.1"] * 3)])
    assert "`serve` runs rank 0" in out, out
    assert seen == {"numpy": SHORT, "bootstrap_loaded": True}, (seen, out)


def test_a_node_alone_on_its_machine_keeps_openblas_default(tmp_path):
    seen, out = run_watched(tmp_path, ["serve", "--rank", "1", "--config-dir", configs_at(tmp_path, ELSEWHERE)])
    assert "`serve` runs rank 0" in out, out
    assert seen["numpy"] == "unset", (seen, out)


def test_join_a_leader_on_this_machine_and_an_explicit_setting_wins(tmp_path):
    """`join --leader` at this machine's address shares the leader's cores; an explicit value is kept."""
    args = ["join", "--leader=127.0.0.1:9", "--rank", "1", "--config-dir", str(tmp_path / "none")]
    seen, out = run_watched(tmp_path, args)
    assert "--leader takes the rank and host from the leader" in out, out
    assert seen["numpy"] == SHORT, (seen, out)
    seen, out = run_watched(tmp_path, args, {"OPENBLAS_THREAD_TIMEOUT": "7"})
    assert seen["numpy"] == "7", (seen, out)


def test_a_command_that_runs_no_node_sets_nothing(tmp_path):
    seen, out = run_watched(tmp_path, ["plan", "--config-dir", configs_at(tmp_path, ["127.0.0.1"] * 3)])
    assert seen["numpy"] == "unset", (seen, out)


# ---------------------------------------------------------------------------------------------
# the decision itself, in this process


def test_option_values_in_both_spellings():
    argv = ["-v", "join", "--config-dir=cfg", "--leader", "mini1:65432"]
    assert (option_value(argv, "--config-dir"), option_value(argv, "--leader"), option_value(argv, "--rank")) == \
        ("cfg", "mini1:65432", None)


@pytest.mark.parametrize("ips, leader, shares", [
    (["127.0.0.1"] * 3, None, True),                        # every rank here
    (ELSEWHERE, None, False),                               # one rank per machine, none of them this one
    (["192.0.2.1", "192.0.2.1", "192.0.2.3"], None, False),  # two ranks share a machine, but not this one
    (ELSEWHERE, "127.0.0.1:65432", True),                   # join --leader: the leader is here
    (["127.0.0.1"] * 3, "node0", True),                     # a host_ip name, resolved through the configs
    (ELSEWHERE, "node0:65432", False),                      # ... to an address elsewhere
])
def test_shares_cores_when_several_ranks_run_on_this_machine(tmp_path, ips, leader, shares):
    assert shares_cores(Configs(configs_at(tmp_path, ips)), leader) is shares


def test_prepare_env_hands_its_configs_on_and_leaves_other_commands_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    d = configs_at(tmp_path, ["127.0.0.1"] * 3)
    assert prepare_env(["generate", "Hi", "--config-dir", d]) is None
    assert "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    configs = prepare_env(["serve", "--config-dir", d])
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == SHORT
    assert configs.dir == d and configs.cluster.leader.host == "node0"
    (tmp_path / "configs" / "cluster_config.yaml").write_text("port: [")        # broken: the command says so
    assert prepare_env(["serve", "--config-dir", d]) is not None


def test_the_console_script_and_python_m_start_at_the_bootstrap():
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        assert "nanopipe = nanopipe.tools.bootstrap:main" in f.read()
    with open(os.path.join(ROOT, "nanopipe", "__main__.py")) as f:
        assert "from .tools.bootstrap import main" in f.read()


def test_the_command_goes_on_with_the_configs_the_bootstrap_read(tmp_path, monkeypatch):
    """`serve` through the bootstrap: cluster_config.yaml is read once, by the bootstrap, and the
    command uses that reading (click's context object), not a second one."""
    import collections

    import nanopipe.config as config
    from nanopipe.cluster.leader import Leader
    from nanopipe.tools import bootstrap
    from nanopipe.weights import init_weights
    (tmp_path / "weights").mkdir()
    init_weights(str(tmp_path / "weights" / "w.safetensors"), n_layer=4, n_embd=64, n_head=4, n_ctx=64)
    d = configs_at(tmp_path, ["127.0.0.1"] * 3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOPIPE_PROBE_S", "0.05")
    reads, real = collections.Counter(), config._load_yaml
    monkeypatch.setattr(config, "_load_yaml", lambda folder, name: reads.update([name]) or real(folder, name))
    monkeypatch.setattr(Leader, "serve_forever", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        bootstrap.main(["serve", "--config-dir", d])
    assert e.value.code == 0
    assert reads == {"cluster_config.yaml": 1, "model_config.yaml": 1, "model_weights.yaml": 1}, dict(reads)
