"""The SmolCluster guide's own three YAML files, as written (tests/fixtures/guide/, addresses changed to
127.0.0.1), load and run a real 3-node cluster whose answers equal one process.

    model_config.yaml    `causal_gpt2:` at the top level (no `models:`), active strategy top_k
    cluster_config.yaml  host_ip, port, num_workers, workers: [mini2, pi5], server
    model_weights.yaml   entries under `models:`

plus the guide's custom layer distribution as YAML (layer_mapping.yaml: 3, 4 and 5 layers) and its
multi-model snippet (multi_model.yaml), each appended to model_config.yaml as the guide says.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import free_port_run

from nanopipe.config import ConfigError, check_agree, load_cluster_config, load_model_config, load_weights_config
from nanopipe.decoding import SamplingParams, make_params
from nanopipe.engine import Engine
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

GUIDE = Path(__file__).resolve().parent / "fixtures" / "guide"
GUIDE_PORT = 65432
PROMPT = [15496, 995, 11, 616]                  # "Hello world, my"
SHAPE = dict(n_layer=12, n_embd=64, n_head=4, n_ctx=128)   # the guide's 12 layers, small and synthetic


def guide_folder(dst: Path, *snippets: str, port: int | None = None) -> str:
    """The guide's three files copied into dst/configs; `snippets` (fixture names) appended to
    model_config.yaml; the cluster's port changed to `port` (the only change to the file)."""
    d = dst / "configs"
    d.mkdir(parents=True)
    for name in ("model_config.yaml", "cluster_config.yaml", "model_weights.yaml"):
        shutil.copy(GUIDE / name, d / name)
    with open(d / "model_config.yaml", "a") as f:
        for snippet in snippets:
            f.write((GUIDE / snippet).read_text())
    if port is not None:
        text = (d / "cluster_config.yaml").read_text()
        assert text.count(f"port: {GUIDE_PORT}\n") == 1
        (d / "cluster_config.yaml").write_text(text.replace(f"port: {GUIDE_PORT}\n", f"port: {port}\n"))
    return str(d)


# ---------------------------------------------------------------------------------------------
# the files load as written


def test_the_guides_model_config_loads_as_written():
    mc = load_model_config(str(GUIDE))
    assert (mc.name, mc.hf_model_name, mc.weights_model_name) == ("causal_gpt2", "gpt2", "gpt2")
    assert (mc.num_layers, mc.num_nodes, mc.max_new_tokens, mc.active_decoding_strategy) == (12, 3, 50, "top_k")
    assert mc.decoding_strategies == {"greedy": {}, "sampling": {"temperature": 1.0},
                                      "top_p": {"temperature": 1.0, "p": 0.9}, "top_k": {"temperature": 1.0, "k": 40}}
    assert (mc.partition, mc.layer_mapping) == (None, None)      # even, or auto if the nodes measure >25% apart
    p = make_params(mc.decoding_defaults())
    assert (p.strategy, p.temperature, p.top_k, p.max_tokens) == ("top_k", 1.0, 40, 50)


def test_the_guides_cluster_config_loads_as_written():
    cc = load_cluster_config(str(GUIDE))
    assert [(n.rank, n.host, n.ip, n.port) for n in cc.nodes] == [
        (0, "mini1", "127.0.0.1", 65432), (1, "mini2", "127.0.0.1", 65433), (2, "pi5", "127.0.0.1", 65434)]
    check_agree(load_model_config(str(GUIDE)), cc)


def test_the_guides_model_weights_load_as_written():
    src = load_weights_config(str(GUIDE), "gpt2")
    assert (src.url, src.filename) == ("https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors",
                                       "gpt2.safetensors")
    assert load_weights_config(str(GUIDE), "gpt2-medium").filename == "gpt2-medium.safetensors"


def test_the_guides_second_model_needs_a_choice(tmp_path):
    d = guide_folder(tmp_path, "multi_model.yaml")
    with pytest.raises(ConfigError, match=r"2 models \(causal_gpt2, gpt2_large\) and no default_model"):
        load_model_config(d)
    large = load_model_config(d, "gpt2_large")          # --model gpt2_large
    assert (large.num_layers, large.num_nodes, large.weights_model_name) == (36, 6, "gpt2-large")
    assert large.active_decoding_strategy == "greedy"   # it sets no decoding: the defaults
    assert load_model_config(d, "causal_gpt2").active_decoding_strategy == "top_k"


def test_the_guides_layer_mapping_plans_3_4_5_layers(tmp_path, monkeypatch):
    d = guide_folder(tmp_path, "layer_mapping.yaml")
    assert load_model_config(d).layer_mapping == {0: [0, 1, 2], 1: [3, 4, 5, 6], 2: [7, 8, 9, 10, 11]}
    monkeypatch.chdir(tmp_path)             # no weights/ here: the shape comes from the known gpt2 size
    result = CliRunner().invoke(main, ["plan", "--config-dir", d])
    assert result.exit_code == 0, result.output
    rows = [line.split()[:4] for line in result.output.split("\n\n")[0].strip().splitlines()[1:]]
    assert rows == [["mini1", "0", "0-2", "3"], ["mini2", "1", "3-6", "4"], ["pi5", "2", "7-11", "5"]]


# ---------------------------------------------------------------------------------------------
# a real cluster on the guide's files


class GuideCluster(LocalCluster):
    """The guide's deployment: in the folder holding configs/ and weights/, `nanopipe serve --rank 0`,
    `nanopipe join --rank 1 --host mini2`, `nanopipe join --rank 2 --host pi5`; no --weights and no
    --config-dir, so every node finds its weights through model_weights.yaml as a user's would."""

    def __init__(self, workdir: Path, port: int):
        super().__init__(str(workdir / "weights" / "gpt2.safetensors"), nodes=3, workdir=str(workdir),
                         pull_ranks=(0, 1, 2), ready_timeout=60)
        self.cluster = {"port": port}

    def command(self, rank: int) -> list:
        base = [sys.executable, "-m", "nanopipe"]
        return base + (["serve", "--rank", "0"] if rank == 0 else
                       ["join", "--rank", str(rank), "--host", {1: "mini2", 2: "pi5"}[rank]])


@pytest.fixture(scope="module")
def guide_cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("guide")
    os.makedirs(work / "weights")
    init_weights(str(work / "weights" / "gpt2.safetensors"), **SHAPE, seed=0)
    port = free_port_run(3)           # the guide's workers listen on port + rank
    cl = GuideCluster(work, port)
    shutil.rmtree(cl.config_dir)                        # LocalCluster's own configs: replaced by the guide's
    guide_folder(work, "layer_mapping.yaml", port=port)
    with cl:
        yield cl


def test_guide_cluster_holds_3_4_5_layers(guide_cluster):
    with guide_cluster.client() as c:
        st = c.status()
    assert st["model"] == "causal_gpt2"
    assert [(n["host"], n["layers"]) for n in st["nodes"]] == [("mini1", [0, 2]), ("mini2", [3, 6]), ("pi5", [7, 11])]


@pytest.mark.parametrize("strategy", ["greedy", "top_k"])
def test_guide_cluster_answers_as_one_process(guide_cluster, strategy):
    """greedy, and the guide's own default (top_k, temperature 1.0, k 40) with a seed."""
    mc = load_model_config(guide_cluster.config_dir)
    params = make_params(mc.decoding_defaults(), strategy=strategy, max_tokens=16, seed=7)
    with guide_cluster.client(timeout=30) as c:
        got = c.generate(PROMPT, params)
    want = Engine.load(guide_cluster.weights).generate(list(PROMPT), params)
    # Exact equality is right here: every rank runs the very same numpy calls on the same float32
    # activations, in the same order, as the single process (same machine, same BLAS kernel).
    assert got["token_ids"] == want["token_ids"], \
        (f"{strategy}: the cluster on the guide's files gave {got['token_ids']}, one process {want['token_ids']} "
         "(same calls in the same order: they must be identical)")
    diff = float(np.max(np.abs(np.subtract(got["logprobs"], want["logprobs"]))))
    assert diff <= 1e-4, f"{strategy}: logprobs differ from one process by up to {diff:.3g}"
    assert isinstance(params, SamplingParams) and params.strategy == strategy
