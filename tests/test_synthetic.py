"""Synthetic weights can never pass for real ones, and a user's weights file is never deleted.

    init-weights      marks its files ({"nanopipe_synthetic": "1", seed, shape}), writes one file per
                      shape that every other name links to, and writes a slice for a slice's name
    pull              treats a synthetic file as absent (replaces it, keeping it until the real one
                      is complete), moves a damaged file aside to <file>.corrupt, names slices
                      inclusively (gpt2.layers-8-11) and still reads the old half-open names
    every surface     serve/join log lines, the leader's status, /config, /health, /v1/models, the
                      page (its badge: tests/test_browser.py), generate --json say when the weights are
                      random, and when they are mixed

Pulls run against a real HTTP server on 127.0.0.1 (tests/httpserver.py); the cluster is real processes.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, read_tensors
from httpserver import FileServer, closed_port

from nanopipe import gpt2_tensors as gt
from nanopipe.safetensors_io import read_header, write_safetensors
from nanopipe.tools import pull as P
from nanopipe.tools.cli import main
from nanopipe.weights import (
    SYNTHETIC_NOTE,
    ensure_synthetic,
    init_weights,
    is_synthetic,
    load_stage,
    synthetic_summary,
)

SMALL = dict(n_layer=4, n_embd=32, n_head=2, n_ctx=16, n_vocab=100)
SMALL_ARGS = ["--n-layer", "4", "--n-embd", "32", "--n-head", "2", "--n-ctx", "16", "--n-vocab", "100"]
NOTE = f"({SYNTHETIC_NOTE})"


def real_copy(src: str, dst: str) -> str:
    """The same tensors without the synthetic marks: what a real checkpoint looks like to nanopipe."""
    meta = {k: v for k, v in read_header(src).metadata.items() if not k.startswith("nanopipe_")}
    write_safetensors(dst, read_tensors(src), meta)
    return dst


@pytest.fixture(scope="module")
def real_file(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("real")
    init_weights(str(d / "synthetic.safetensors"), seed=5, **SMALL)
    return real_copy(str(d / "synthetic.safetensors"), str(d / "model.safetensors"))


@pytest.fixture
def server(real_file):
    s = FileServer.serving({"/model.safetensors": real_file})
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------
# the mark, the shared file, the slice


def test_init_weights_marks_its_files_and_real_files_are_unmarked(tmp_path, real_file):
    path = str(tmp_path / "s.safetensors")
    init_weights(path, seed=3, **SMALL)
    meta = read_header(path).metadata
    assert meta["nanopipe_synthetic"] == "1" and meta["nanopipe_seed"] == "3"
    assert meta["nanopipe_shape"] == "n_layer=4,n_embd=32,n_head=2,n_ctx=16,n_vocab=100"
    assert is_synthetic(path) and load_stage(path).synthetic
    assert not is_synthetic(real_file) and not load_stage(real_file).synthetic
    assert is_synthetic({"nanopipe_synthetic": "seed=0"}), "files of older versions are synthetic too"


def test_one_synthetic_file_per_shape_shared_by_every_name(tmp_path):
    w = tmp_path / "weights"
    for name in ("gpt2.safetensors", "bench.safetensors"):
        r = CliRunner().invoke(main, ["init-weights", str(w / name), *SMALL_ARGS])
        assert r.exit_code == 0, r.output
    shared = ensure_synthetic(None, str(w), **SMALL, log=lambda s: None)   # what bench/trace/demo use
    assert os.path.basename(shared) == "synthetic-L4-C32-H2-T16-V100.safetensors"
    inodes = {os.stat(w / n).st_ino for n in os.listdir(w)}
    assert sorted(os.listdir(w)) == ["bench.safetensors", "gpt2.safetensors", os.path.basename(shared)]
    assert len(inodes) == 1, "three names, one file on disk"
    assert os.stat(shared).st_nlink == 3
    from nanopipe.tools import bench, trace
    assert bench.DEFAULT_WEIGHTS == trace.SYNTHETIC_PATH == os.path.join("weights", "synthetic-gpt2.safetensors"), \
        "bench, trace and demo share one gpt2 file"


def test_slice_hint_writes_a_slice_with_the_full_files_values(tmp_path):
    """The hint a worker gets offline names a slice; running it writes that slice, not a whole model."""
    dest = str(tmp_path / "gpt2.layers-2-3.safetensors")
    with pytest.raises(P.PullError) as e:                 # what a worker offline is told
        P.pull(f"http://127.0.0.1:{closed_port()}/m.safetensors", dest, out=io.StringIO(), timeout=5)
    hint = str(e.value)
    assert f"`nanopipe init-weights {dest} --layers 2-3`" in hint, hint
    r = CliRunner().invoke(main, ["init-weights", dest, "--layers", "2-3", *SMALL_ARGS])
    assert r.exit_code == 0, r.output
    got = read_tensors(dest)
    assert gt.block_indices(got) == [2, 3] and "wte.weight" not in got
    full = str(tmp_path / "full.safetensors")
    init_weights(full, **SMALL)
    want = read_tensors(full)
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)   # same seed, same generator calls
    stage = load_stage(dest, 2, 4, rank0=False)
    assert stage.synthetic and stage.config.n_layer == 4
    # the name alone is enough, and a name that disagrees with --layers is refused
    r = CliRunner().invoke(main, ["init-weights", str(tmp_path / "x.layers-0-1.safetensors"), *SMALL_ARGS])
    assert r.exit_code == 0 and gt.block_indices(read_tensors(str(tmp_path / "x.layers-0-1.safetensors"))) == [0, 1]
    r = CliRunner().invoke(main, ["init-weights", str(tmp_path / "y.layers-0-1.safetensors"), "--layers", "2-3",
                                  *SMALL_ARGS])
    assert r.exit_code == 1 and "make them agree" in r.output


# ---------------------------------------------------------------------------------------------
# pull replaces synthetic files and never deletes a user's file


def test_pull_replaces_a_synthetic_file_with_the_real_one(server, tmp_path, real_file):
    w = tmp_path / "weights"
    r = CliRunner().invoke(main, ["init-weights", str(w / "model.safetensors"), *SMALL_ARGS])
    assert r.exit_code == 0, r.output
    out = io.StringIO()
    path = P.pull(server.url("/model.safetensors"), str(w / "model.safetensors"), out=out, timeout=5)
    assert "holds synthetic (random) weights" in out.getvalue() and "replacing it" in out.getvalue()
    assert not is_synthetic(path)
    with open(path, "rb") as a, open(real_file, "rb") as b:
        assert a.read() == b.read()
    shared = w / "synthetic-L4-C32-H2-T16-V100.safetensors"
    assert is_synthetic(str(shared)), "the shared synthetic file is another name: it stays"


def test_pull_offline_keeps_the_synthetic_file_and_says_so(tmp_path):
    dest = str(tmp_path / "model.safetensors")
    init_weights(dest, **SMALL)
    before = open(dest, "rb").read()
    with pytest.raises(P.PullError, match="still holds the synthetic weights"):
        P.pull(f"http://127.0.0.1:{closed_port()}/model.safetensors", dest, out=io.StringIO(), timeout=5)
    assert open(dest, "rb").read() == before


def test_pull_keeps_a_synthetic_file_its_url_serves(tmp_path):
    """A synthetic file that is what the server holds (a test server) is kept, not fetched over and over."""
    src = str(tmp_path / "src.safetensors")
    init_weights(src, **SMALL)
    s = FileServer.serving({"/m.safetensors": src})
    try:
        dest = str(tmp_path / "dest.safetensors")
        P.pull(s.url("/m.safetensors"), dest, out=io.StringIO(), timeout=5)
        s.requests.clear()
        P.pull(s.url("/m.safetensors"), dest, out=io.StringIO(), timeout=5)
        assert all(rng is not None for _, rng in s.requests) and len(s.requests) == 2, s.requests  # header only
    finally:
        s.stop()


def test_damaged_file_is_moved_aside_not_deleted(tmp_path):
    dest = str(tmp_path / "model.safetensors")
    with open(dest, "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    before = open(dest, "rb").read()
    out = io.StringIO()
    with pytest.raises(P.PullError, match="cannot reach"):
        P.pull(f"http://127.0.0.1:{closed_port()}/model.safetensors", dest, out=out, timeout=5)
    assert f"moved it to {dest}.corrupt" in out.getvalue(), out.getvalue()
    assert open(dest + ".corrupt", "rb").read() == before


def test_serve_offline_with_a_damaged_file_keeps_it(tmp_path):
    """The reported case, as a real `nanopipe serve` process: offline, damaged weights/<file>."""
    from nanopipe.tools.localcluster import write_configs
    cfg = tmp_path / "configs"
    weights = tmp_path / "weights" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    write_configs(str(cfg), weights=str(weights), nodes=1, n_layer=4,
                  weights_url=f"http://127.0.0.1:{closed_port()}/model.safetensors")
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "nanopipe", "serve", "--config-dir", str(cfg)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    moved = os.path.join("weights", "model.safetensors.corrupt")
    assert f"moved it to {moved}" in r.stdout + r.stderr, r.stdout + r.stderr
    assert (tmp_path / moved).read_bytes() == b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# slice names: inclusive, and the old half-open ones still read


def test_slice_names_are_inclusive_and_old_names_still_serve(server, tmp_path):
    entry = {"url": server.url("/model.safetensors"), "filename": "model.safetensors"}
    wd = str(tmp_path / "w")
    assert P.slice_path(os.path.join(wd, "model.safetensors"), 1, 3) == os.path.join(wd, "model.layers-1-2.safetensors")
    old = P.legacy_slice_path(os.path.join(wd, "model.safetensors"), 1, 3)
    assert old == os.path.join(wd, "model.layers-1-3.safetensors")
    P.pull(entry["url"], old, layers=(1, 3), rank0=False, out=io.StringIO(), timeout=5)   # as older versions did
    server.requests.clear()
    lines = []
    path = P.ensure_weights("m", entry, wd, layers=(1, 3), rank0=False, log=lines.append, out=io.StringIO())
    assert path == old and server.requests == [], "the old name holds blocks 1..2: used, nothing fetched"
    assert any("half-open name of older versions" in x for x in lines), lines


def test_an_old_name_that_means_other_blocks_is_told_apart(server, tmp_path):
    """'model.layers-1-2' written by an older version holds block 1 only; today it names blocks 1..2.
    The file's own tensors decide: it is not used for blocks 1..2, and it is moved aside, not deleted."""
    entry = {"url": server.url("/model.safetensors"), "filename": "model.safetensors"}
    wd = str(tmp_path / "w")
    name = os.path.join(wd, "model.layers-1-2.safetensors")
    P.pull(entry["url"], name, layers=(1, 2), rank0=False, out=io.StringIO(), timeout=5)   # block 1 only
    assert gt.block_indices(read_header(name).tensors) == [1]
    out = io.StringIO()
    path = P.ensure_weights("m", entry, wd, layers=(1, 3), rank0=False, log=lambda s: None, out=out, timeout=5)
    assert path == name and gt.block_indices(read_header(path).tensors) == [1, 2]
    assert gt.block_indices(read_header(name + ".corrupt").tensors) == [1]
    assert "lacks h.2" in out.getvalue(), out.getvalue()


# ---------------------------------------------------------------------------------------------
# every surface says so


def test_ensure_weights_uses_synthetic_weights_and_says_so(server, tmp_path):
    wd = tmp_path / "w"
    init_weights(str(wd / "model.safetensors"), **SMALL)
    lines = []
    entry = {"url": server.url("/model.safetensors"), "filename": "model.safetensors", "sha256": "0" * 64}
    path = P.ensure_weights("m", entry, str(wd), log=lines.append, out=io.StringIO())
    assert server.requests == [], "serve runs the synthetic file it finds; `nanopipe pull` replaces it"
    assert lines[-1] == f"Model weights ready at: {path} {NOTE}"


def test_pull_cli_replaces_synthetic_and_says_ready_without_the_note(server, tmp_path):
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "model_weights.yaml").write_text(json.dumps(
        {"m": {"url": server.url("/model.safetensors"), "filename": "m.safetensors"}}))
    out = tmp_path / "w"
    init_weights(str(out / "m.safetensors"), **SMALL)
    r = CliRunner().invoke(main, ["pull", "m", "--config-dir", str(cfg), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "holds synthetic (random) weights" in r.output
    assert f"Model weights ready at: {out / 'm.safetensors'}\n" in r.output
    assert not is_synthetic(str(out / "m.safetensors"))


def test_synthetic_summary():
    assert synthetic_summary({0: True, 1: True}) == {"synthetic": True, "weights_mixed": False,
                                                     "weights_note": SYNTHETIC_NOTE}
    assert synthetic_summary({0: False, 1: None}) == {"synthetic": False, "weights_mixed": False, "weights_note": None}
    mixed = synthetic_summary({0: False, 1: True, 2: False})
    assert mixed["synthetic"] and mixed["weights_mixed"]
    assert mixed["weights_note"].startswith("MIXED: rank 1 runs synthetic (random) weights, rank 0, 2 real ones")


def test_generate_json_says_synthetic(tiny_weights, tmp_path):
    real = real_copy(tiny_weights, str(tmp_path / "real.safetensors"))
    for path, want in ((tiny_weights, True), (real, False)):
        r = CliRunner().invoke(main, ["generate", "Hi", "--weights", path, "--max-tokens", "2", "--json",
                                      "--config-dir", str(tmp_path / "none")])
        assert r.exit_code == 0, r.output
        got = json.loads(r.output.strip().splitlines()[-1])
        assert got["synthetic"] is want and got["weights_mixed"] is False, got


def test_mixed_cluster_says_so_on_every_surface(tiny_weights, tmp_path):
    """Leader and worker 1 run synthetic weights, worker 2 finds a real copy in its weights/ folder."""
    from nanopipe.tools.localcluster import LocalCluster
    from nanopipe.web.app import create_app, settings_from_configs
    work = tmp_path / "work"
    (work / "weights").mkdir(parents=True)
    real_copy(tiny_weights, str(work / "weights" / os.path.basename(tiny_weights)))
    with LocalCluster(tiny_weights, nodes=3, workdir=str(work), pull_ranks=(2,), ready_timeout=30) as cl:
        with cl.client() as c:
            status = c.status()
        web = create_app(settings_from_configs(cl.config_dir, leader=cl.leader_addr)).test_client()
        config, health, models = web.get("/config").get_json(), web.get("/health"), web.get("/v1/models").get_json()
        gen = CliRunner().invoke(main, ["generate", "Hi", "--leader", cl.leader_addr, "--max-tokens", "2", "--json",
                                        "--config-dir", cl.config_dir])
        logs = {rank: open(cl.log_path(rank), errors="replace").read() for rank in (0, 1, 2)}
    assert gen.exit_code == 0, gen.output
    got = json.loads(gen.output.strip().splitlines()[-1])
    assert [n["synthetic"] for n in status["nodes"]] == [True, True, False]
    assert status["synthetic"] and status["weights_mixed"]
    assert status["weights_note"].startswith("MIXED: rank 0, 1 run synthetic (random) weights, rank 2 real ones")
    for body in (config, health.get_json(), models["data"][0], got):
        assert body["synthetic"] is True and body["weights_mixed"] is True, body
        assert body["weights_note"] == status["weights_note"]
    assert [n["synthetic"] for n in config["nodes"]] == [True, True, False]
    assert NOTE in logs[0] and "from " + cl.weights + " " + NOTE in logs[0], logs[0]
    assert "Worker 2 joined with real weights. MIXED:" in logs[0], logs[0]
    assert NOTE in logs[1] and NOTE not in logs[2], logs[2]


def test_offline_worker_hint_writes_the_slice_it_names(tmp_path):
    """A worker with no weights and no network is told a command; run as a real process, that command
    writes the slice file the worker then uses (and says is synthetic)."""
    import shlex
    import time

    from nanopipe.tools.localcluster import write_configs
    cfg = tmp_path / "configs"
    write_configs(str(cfg), weights=str(tmp_path / "small.safetensors"), nodes=2, n_layer=4,
                  weights_url=f"http://127.0.0.1:{closed_port()}/small.safetensors")
    env = dict(os.environ, PYTHONPATH=REPO)
    cli = [sys.executable, "-m", "nanopipe"]
    r = subprocess.run(cli + ["join", "--rank", "1", "--config-dir", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    slice_name = os.path.join("weights", "small.layers-2-3.safetensors")
    hint = f"nanopipe init-weights {slice_name} --layers 2-3"
    assert f"`{hint}`" in r.stderr, r.stderr
    # the hint as printed, with this test model's shape (gpt2's is the default)
    r = subprocess.run(cli + shlex.split(hint)[1:] + SMALL_ARGS, cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert gt.block_indices(read_header(str(tmp_path / slice_name)).tensors) == [2, 3]
    assert os.listdir(tmp_path / "weights") == ["small.layers-2-3.safetensors"], "a slice, not a whole model"
    # the worker now starts: it finds the slice, says it is synthetic, and goes on to dial the leader
    p = subprocess.Popen(cli + ["join", "--rank", "1", "--config-dir", str(cfg)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            if not line or "Model weights ready at:" in line:
                break
        assert lines[-1].strip() == f"[WORKER-1] Model weights ready at: {slice_name} {NOTE}", "".join(lines)
    finally:
        p.kill()
        p.wait()
