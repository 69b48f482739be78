"""A split stage in a real cluster: workers given the very same layers share every block by heads.

Real `nanopipe serve` / `join` processes on 127.0.0.1 (LocalCluster), each cluster mixing a split
stage with plain ones, compared with one process (Engine). The members add their partial sums in
another order than one process's single matmul, so logprobs compare within a tolerance (the largest
difference is in the message); the tokens, greedy and seeded, must be the very same.

The weights have 4 heads, so 3 members hold 2, 1 and 1 heads (uneven), and their biases and
LayerNorm gains are made to count (init_weights writes zeros and ones, which would hide a c_proj
bias added by every member instead of once).
"""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from helpers import log_of, read_tensors, wait_log, wait_until

from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.safetensors_io import read_header, write_safetensors
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

SHAPE = dict(n_layer=5, n_embd=64, n_head=4, n_ctx=256)
PROMPT = [15496, 995, 11, 616]
READY_S = 60
LOGPROB_TOL = 1e-4

CASES = {
    "greedy": SamplingParams("greedy", max_tokens=12),
    "sampling": SamplingParams("sampling", temperature=0.8, max_tokens=12, seed=1),
    "top_k": SamplingParams("top_k", temperature=0.9, top_k=20, max_tokens=12, seed=2),
}

# name -> layer_mapping (inclusive), and the stages the leader's log must show
SPLITS = {
    "2 members between plain stages": ({0: [0, 0], 1: [1, 3], 2: [1, 3], 3: [4, 4]}, "ring 0 -> 1+2 -> 3 -> 0"),
    "3 members, uneven heads": ({0: [0, 1], 1: [2, 4], 2: [2, 4], 3: [2, 4]}, "ring 0 -> 1+2+3 -> 0"),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("splitcluster") / "tiny5.safetensors")
    init_weights(path, **SHAPE, seed=0)
    raw = read_tensors(path)
    rng = np.random.default_rng(5)
    for name, arr in raw.items():
        if name.startswith("h.") and name.endswith((".bias", "ln_1.weight", "ln_2.weight")) \
                and not name.endswith("attn.bias"):                   # attn.bias: the causal-mask buffer
            arr += rng.standard_normal(arr.shape).astype(np.float32) * np.float32(0.1)
    write_safetensors(path, raw, read_header(path).metadata)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    engine = Engine.load(weights)
    memo = {}

    def run(prompt, params):
        key = (tuple(prompt), params)
        if key not in memo:
            memo[key] = engine.generate(list(prompt), params)
        return memo[key]
    return run


def assert_same(got: dict, want: dict, what: str):
    assert got["token_ids"] == want["token_ids"], \
        f"{what}: the split cluster gave {got['token_ids']}, one process {want['token_ids']}"
    diff = float(np.max(np.abs(np.subtract(got["logprobs"], want["logprobs"]))))
    assert diff <= LOGPROB_TOL, f"{what}: logprobs differ from one process by up to {diff:.3g}"
    print(f"{what}: tokens equal, logprobs within {diff:.3g} of one process")


@pytest.fixture(scope="module", params=list(SPLITS))
def split_cluster(request, weights):
    mapping, path = SPLITS[request.param]
    cl = LocalCluster(weights, nodes=len(mapping), layer_mapping=mapping, ready_timeout=READY_S,
                      cluster_extra={"heartbeat_s": 0.2})
    cl.ring_path = path
    with cl:
        yield cl


@pytest.mark.parametrize("case", list(CASES))
def test_split_stage_gives_the_tokens_of_one_process(split_cluster, reference, case):
    with split_cluster.client() as c:
        got = c.generate(PROMPT, CASES[case])
    assert_same(got, reference(PROMPT, CASES[case]), case)
    log = log_of(split_cluster, 0)
    assert split_cluster.ring_path in log, f"the leader's log does not show {split_cluster.ring_path!r}:\n{log[-2000:]}"
