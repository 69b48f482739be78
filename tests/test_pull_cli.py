"""`nanopipe pull` and the weights check of `serve` / `join`, against a real HTTP server on 127.0.0.1.

    nanopipe pull NAME                  the whole file, from model_weights.yaml's url, into --out
    nanopipe pull NAME --layers 4-7     only blocks 4..7, into NAME's file name + ".layers-4-7"
    nanopipe join --rank R              no --weights: checks weights/<filename>, pulls only its slice

The end-to-end test starts a 3-node cluster whose workers have no weights at all: each must pull
exactly the byte ranges of its own blocks (checked against the server's log of Range requests),
and the cluster must then answer exactly as one process does.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from httpserver import FileServer, closed_port

from nanopipe.decoding import SamplingParams
from nanopipe.safetensors_io import read_header, read_tensor
from nanopipe.tools import pull as P
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights, load_stage

SHAPE = dict(n_layer=8, n_embd=32, n_head=4, n_ctx=16, n_vocab=100)
PROMPT = [15496, 995, 11, 616, 1438]               # "Hello world, my name"
GREEDY = SamplingParams("greedy", max_tokens=12)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A small synthetic GPT-2 (8 blocks) in the official hub layout, mask buffers included."""
    path = str(tmp_path_factory.mktemp("served") / "small.safetensors")
    init_weights(path, **SHAPE, seed=3)
    return path


@pytest.fixture
def server(source):
    s = FileServer.serving({"/model.safetensors": source})
    yield s
    s.stop()


def config_dir(tmp_path, url: str) -> str:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "model_weights.yaml").write_text(yaml.safe_dump({"small": {"url": url, "filename": "small.safetensors"}}))
    return str(folder)


def pull_cli(*args) -> object:
    return CliRunner().invoke(main, ["pull", *args])


def block_names(header, lo: int, hi: int) -> set:
    """The tensors a worker running blocks lo..hi-1 needs: every block tensor but the mask buffers."""
    return {n for n in header.tensors
            if n.startswith("h.") and lo <= int(n.split(".")[1]) < hi and not n.endswith(".attn.bias")}


# ---------------------------------------------------------------------------------------------
# nanopipe pull


def test_pull_downloads_the_whole_file_with_progress(server, source, tmp_path):
    out = tmp_path / "w"
    r = pull_cli("small", "--config-dir", config_dir(tmp_path, server.url("/model.safetensors")), "--out", str(out))
    assert r.exit_code == 0, r.output
    dest = out / "small.safetensors"
    assert f"Model weights ready at: {dest}" in r.stdout
    assert f"Downloading {server.url('/model.safetensors')} -> {dest}" in r.stderr
    assert "100%" in r.stderr and "MB/s" in r.stderr, f"no progress line in:\n{r.stderr}"
    assert dest.read_bytes() == open(source, "rb").read()
    assert not (out / "small.safetensors.part").exists()


def test_pull_layers_makes_a_slice_a_worker_loads(server, source, tmp_path):
    out = tmp_path / "w"
    r = pull_cli("small", "--layers", "4-7", "--config-dir", config_dir(tmp_path, server.url("/model.safetensors")),
                 "--out", str(out))
    assert r.exit_code == 0, r.output
    dest = out / "small.layers-4-7.safetensors"        # inclusive, like --layers 4-7
    assert f"Model weights ready at: {dest}" in r.stdout
    assert sorted(os.listdir(out)) == ["small.layers-4-7.safetensors"]
    assert all(rng is not None for _, rng in server.requests), "a request without Range fetched the whole file"

    full, part = read_header(source), read_header(str(dest))
    assert set(part.tensors) == block_names(full, 4, 8)
    with open(source, "rb") as fa, open(dest, "rb") as fb:
        for name, info in part.tensors.items():
            np.testing.assert_array_equal(read_tensor(fb, info), read_tensor(fa, full.tensors[name]), err_msg=name)

    stage = load_stage(str(dest), 4, 8, rank0=False)
    assert (stage.lo, stage.hi, len(stage.blocks)) == (4, 8, 4)
    assert stage.config.n_layer == SHAPE["n_layer"] and stage.config.n_embd == SHAPE["n_embd"]


@pytest.mark.parametrize("where", ["404", "refused"])
def test_pull_failure_names_the_url_and_what_to_do(server, tmp_path, where):
    url = (server.url("/no-such.safetensors") if where == "404"
           else f"http://127.0.0.1:{closed_port()}/model.safetensors")
    r = pull_cli("small", "--config-dir", config_dir(tmp_path, url), "--out", str(tmp_path / "w"))
    assert r.exit_code == 1, r.output
    assert "Error:" in r.output and url in r.output, r.output
    assert "nanopipe init-weights" in r.output, r.output
    assert "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "w" / "small.safetensors")


# ---------------------------------------------------------------------------------------------
# a worker without weights pulls only its own slice


def test_join_without_weights_pulls_only_its_slice(tiny_weights, tiny_engine, tmp_path):
    with open(tiny_weights, "rb") as f:
        server = FileServer({"/tiny.safetensors": f.read()}).start()
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), pull_ranks=(1, 2),
                      weights_url=server.url("/tiny.safetensors"), ready_timeout=30)
    try:
        with cl:
            with cl.client() as c:
                layers = {n["rank"]: (n["layers"][0], n["layers"][1] + 1) for n in c.status()["nodes"]}   # half-open
                got = c.generate(PROMPT, GREEDY)
            logs = {r: open(cl.log_path(r), errors="replace").read() for r in (1, 2)}
    finally:
        server.stop()
    assert got["token_ids"] == tiny_engine.generate(PROMPT, GREEDY)["token_ids"]

    header = read_header(tiny_weights)
    want_ranges = []
    for rank in (1, 2):
        lo, hi = layers[rank]
        path = os.path.join("weights", f"tiny.layers-{lo}-{hi - 1}.safetensors")
        assert "Checking for model weights (local)..." in logs[rank], logs[rank]
        assert f"Model weights ready at: {path}" in logs[rank], logs[rank]
        assert set(read_header(os.path.join(cl.workdir, path)).tensors) == block_names(header, lo, hi)
        want_ranges += ["bytes=0-7", f"bytes=8-{header.data_start - 1}"]      # the header, in two reads
        want_ranges += [f"bytes={b}-{e - 1}"
                        for b, e in P.merge_ranges(P.select_tensors(header, lo, hi, rank0=False))]
    assert not os.path.exists(os.path.join(cl.workdir, "weights", "tiny.safetensors"))
    got_ranges = [rng for _, rng in server.requests]
    assert sorted(got_ranges, key=str) == sorted(want_ranges), \
        f"the workers asked for {got_ranges}, their slices need {want_ranges}"
    fetched = sum(int(e) - int(b) + 1 for b, e in (r[len("bytes="):].split("-") for r in got_ranges))
    assert fetched < os.path.getsize(tiny_weights) / 10       # wte alone is 90% of this model


def test_balanced_split_of_an_unknown_model_pulls_the_slice_the_leader_assigns(tmp_path):
    """The balanced split weighs the LM head (V*C multiply-adds against a block's 12*C^2), so a worker
    with no weights must learn C and V from the remote header: 10 blocks of C=64 on 2 nodes split
    1 | 9, where a guessed gpt2 C=768 would split 2 | 8 and the worker would fetch the wrong blocks."""
    from nanopipe.engine import Engine
    weights = str(tmp_path / "wide-head.safetensors")
    init_weights(weights, n_layer=10, n_embd=64, n_head=4, n_ctx=64, seed=1)
    with open(weights, "rb") as f:
        server = FileServer({"/w.safetensors": f.read()}).start()
    cl = LocalCluster(weights, nodes=2, workdir=str(tmp_path / "cluster"), partition="balanced", pull_ranks=(1,),
                      weights_url=server.url("/w.safetensors"), ready_timeout=30)
    try:
        with cl:
            with cl.client() as c:
                layers = [(n["layers"][0], n["layers"][1] + 1) for n in c.status()["nodes"]]    # half-open
                got = c.generate(PROMPT, GREEDY)
            log = open(cl.log_path(1), errors="replace").read()
    finally:
        server.stop()
    assert layers == [(0, 1), (1, 10)]
    assert "Model weights ready at: " + os.path.join("weights", "wide-head.layers-1-9.safetensors") in log, log
    assert got["token_ids"] == Engine.load(weights).generate(PROMPT, GREEDY)["token_ids"]


# ---------------------------------------------------------------------------------------------
# what a worker saves: gpt2-xl on 3 nodes


def test_gpt2_xl_worker_downloads_a_third_of_the_file():
    """gpt2-xl (48 blocks, C=1600, V=50257, n_ctx=1024) on 3 nodes: worker 1 runs blocks 16..31.

    A block holds 12*C^2 + 13*C float32s (c_attn 3C^2+3C, attn.c_proj C^2+C, c_fc 4C^2+4C,
    mlp.c_proj 4C^2+C, two LayerNorms 4C) = 122,963,200 bytes; the file also has each block's
    (1, 1, 1024, 1024) mask buffer (4 MiB, not fetched), wte, wpe and ln_f.
    """
    L, C, V, T = 48, 1600, 50257, 1024
    block = 4 * (12 * C * C + 13 * C)
    file_bytes = 4 * (V * C + T * C + 2 * C) + L * (block + 4 * T * T)
    total, worker = P.slice_bytes_for(L, C, V, T, 16, 32, rank0=False)
    print(f"\ngpt2-xl, 3 nodes: worker 1 (blocks 16..31) downloads {worker:,} bytes "
          f"({worker / 1e9:.2f} GB) of {total:,} ({total / 1e9:.2f} GB), {100 * worker / total:.1f}%")
    assert (total, worker) == (file_bytes, 16 * block) == (6_431_771_392, 1_967_411_200)
    assert 0.30 < worker / total < 0.31
