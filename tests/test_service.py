"""`nanopipe service`: the systemd unit that keeps a node (or the web app) running, checked by
systemd's own verifier where this machine has it, and field by field everywhere."""
from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys

import pytest
from helpers import CONFIG_DIR, run_nanopipe


def _fields(text: str) -> dict:
    """'Key=value' lines of a unit -> {key: value} (each key appears once in ours)."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _venv_bin() -> str:
    return os.path.dirname(os.path.abspath(sys.executable))


@pytest.mark.parametrize("args, name, command", [
    (["--rank", "0"], "nanopipe-rank0.service", ["serve", "--rank", "0"]),
    (["--rank", "2", "--host", "pi1"], "nanopipe-rank2.service", ["join", "--rank", "2", "--host", "pi1"]),
    (["--web", "--port", "8080"], "nanopipe-web.service", ["web", "--host", "127.0.0.1", "--port", "8080"]),
])
def test_the_unit_runs_this_venv_with_these_configs_as_me_and_restarts_on_failure(tmp_path, args, name, command):
    r = run_nanopipe("service", *args, "--config-dir", CONFIG_DIR, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    f = _fields(r.stdout)
    assert f["Restart"] == "on-failure" and f["WantedBy"] == "multi-user.target", r.stdout
    assert f["User"] == (os.environ.get("SUDO_USER") or getpass.getuser()), r.stdout
    assert f["WorkingDirectory"] == str(tmp_path), r.stdout        # where weights/ is
    exec_start = f["ExecStart"].split()
    assert exec_start[0].startswith(_venv_bin() + os.sep), exec_start   # this venv, by absolute path
    assert exec_start[-len(command) - 2:] == command + ["--config-dir", CONFIG_DIR], exec_start
    unit = tmp_path / name
    unit.write_text(r.stdout)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt package systemd); the fields were checked above")
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # any complaint about our file (a bad setting is only a warning, exit 0) fails the test too
    complaints = [line for line in (v.stdout + v.stderr).splitlines() if name in line or str(unit) in line]
    assert v.returncode == 0 and not complaints, v.stdout + v.stderr


def test_install_writes_the_unit_where_asked_and_says_the_next_commands(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    r = run_nanopipe("service", "--rank", "1", "--config-dir", CONFIG_DIR, "--install", "--unit-dir", str(units),
                     "--user", "pi", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    text = (units / "nanopipe-rank1.service").read_text()
    assert _fields(text)["User"] == "pi" and "--host mini2" in _fields(text)["ExecStart"], text
    assert "systemctl daemon-reload" in r.stdout and "enable --now nanopipe-rank1" in r.stdout, r.stdout


@pytest.mark.parametrize("args, message", [
    (["--rank", "1", "--host", "pi1"], "rank 1 runs on host 'mini2', not 'pi1'"),
    (["--rank", "5"], "no rank 5; ranks are 0 (the leader) to 2"),
    ([], "give --rank R for a node"),
    (["--rank", "1", "--web"], "give --rank R for a node"),
])
def test_a_wrong_node_is_a_clear_error(tmp_path, args, message):
    r = run_nanopipe("service", *args, "--config-dir", CONFIG_DIR, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_install_without_permission_says_to_use_sudo(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: every folder is writable, so there is no refusal to see")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    r = run_nanopipe("service", "--rank", "0", "--config-dir", CONFIG_DIR, "--install", "--unit-dir", str(locked),
                     cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "permission denied; run it with sudo" in r.stderr, r.stderr


def test_weights_go_into_the_node_unit_by_absolute_path_and_must_exist(tmp_path):
    """The demo's synthetic file, say: without --weights the unit's node looks for model_weights.yaml's
    file and, missing it, fails and restarts forever."""
    w = tmp_path / "weights" / "synthetic-gpt2.safetensors"
    w.parent.mkdir()
    w.write_bytes(b"not checked here")
    r = run_nanopipe("service", "--rank", "1", "--config-dir", CONFIG_DIR, "--weights",
                     "weights/synthetic-gpt2.safetensors", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _fields(r.stdout)["ExecStart"].split()[-2:] == ["--weights", str(w)], r.stdout
    r = run_nanopipe("service", "--rank", "1", "--config-dir", CONFIG_DIR, "--weights", "weights/none.safetensors",
                     cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "no such file here" in r.stderr, r.stderr
    r = run_nanopipe("service", "--web", "--config-dir", CONFIG_DIR, "--weights", str(w), cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "the web app holds no weights" in r.stderr, r.stderr
