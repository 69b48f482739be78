"""Placement on unequal machines, with real processes: one worker under a CPU quota of 25% of a
core, another under a memory limit (cgroups v1), a real 3-node cluster with `partition: auto`.

The machine is shared and noisy, so measured figures are checked with generous margins; what
must hold exactly is the token stream (cluster == one process: every stage runs the very same
numpy calls, whatever the split) and that no node is given more than its memory holds.
"""
from __future__ import annotations

import os
import re
import sys
import time

import pytest
from helpers import log_of
from httpserver import FileServer

from nanopipe.cgroups import CGroup, why_not_writable
from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.placement import Capacity, ModelShape, max_blocks
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

# 12 blocks of 12.6 MB; with max_sessions 64 at n_ctx 256 each block's KV cache is 67 MB, so a
# memory limit of a few hundred MB really binds
SHAPE = dict(n_layer=12, n_embd=512, n_head=8, n_ctx=256)
MAX_SESSIONS = 64
MEM_LIMIT_MB = 300
PROMPT = [15496, 995, 11, 616]
# rank 0's memory (MB, 10^6 bytes) for at most 4 blocks at max_sessions 4: wte + wpe (103.5 MB) +
# 4 x (12.6 MB of weights + 4.2 MB of KV cache)
RANK0_MB = 175
WORKER_MB = 70      # a worker: 4 x 16.8 MB


def _skip_reason():
    reasons = [r for r in (why_not_writable("cpu"), why_not_writable("memory")) if r]
    return "; ".join(reasons) or None


pytestmark = pytest.mark.skipif(_skip_reason() is not None,
                                reason=f"cgroups v1 are not writable here: {_skip_reason()}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("placement") / "w512.safetensors"
    init_weights(str(path), **SHAPE, seed=3)
    return str(path)


@pytest.fixture(scope="module")
def reference(weights):
    return Engine.load(weights)


def _caps(status) -> list:
    return [Capacity.from_dict(n["capacity"]) for n in status["nodes"]]


@pytest.fixture(scope="module")
def unequal(weights):
    """Rank 1 at 25% of one core, rank 2 limited to MEM_LIMIT_MB; partition auto."""
    cpu = CGroup("cpu", {"cpu.cfs_period_us": 100000, "cpu.cfs_quota_us": 25000})
    mem = CGroup("memory", {"memory.limit_in_bytes": MEM_LIMIT_MB << 20})
    with cpu, mem:
        cl = LocalCluster(weights, nodes=3, partition="auto", cluster_extra={"max_sessions": MAX_SESSIONS},
                          wrap={1: cpu.wrapper(), 2: mem.wrapper()}, ready_timeout=90,
                          env={"NANOPIPE_PROBE_S": "1.0"})     # 10 quota periods: the machine is shared
        with cl:
            assert cl.procs[1].pid in cpu.pids() and cl.procs[2].pid in mem.pids(), "the wrapper moved them"
            with cl.client() as c:
                status = c.status()
            yield cl, status


def test_measured_speed_and_memory_reflect_the_limits(unequal):
    cl, status = unequal
    leader, throttled, small = _caps(status)
    print(f"measured: {leader}\n          {throttled}\n          {small}")
    # 25% of one core streams far slower than a node with the machine's cores (generous: < 60%)
    assert throttled.speed_gbps < 0.6 * max(leader.speed_gbps, small.speed_gbps), (leader, throttled, small)
    # the limited node reports at most its limit, minus what the Python process already holds
    limit_mb = (MEM_LIMIT_MB << 20) / 1e6                           # memory_mb is in 10^6 bytes
    assert small.memory_mb <= limit_mb, small
    assert small.memory_mb >= limit_mb - 200, small
    assert throttled.memory_mb > 4 * MEM_LIMIT_MB, throttled      # MemAvailable: no limit there


def test_auto_gives_the_throttled_node_fewer_layers_and_the_small_one_no_more_than_fits(unequal):
    cl, status = unequal
    caps = _caps(status)
    counts = [n["layers"][1] - n["layers"][0] + 1 if n["layers"] else 0 for n in status["nodes"]]   # [first, last]
    shape = ModelShape(n_layer=SHAPE["n_layer"], n_embd=SHAPE["n_embd"], n_ctx=SHAPE["n_ctx"])
    fits = max_blocks(shape, caps[2], False, MAX_SESSIONS)
    print(f"split {counts}; the small node holds at most {fits} blocks; notes {status['placement'].get('notes')}")
    assert sum(counts) == SHAPE["n_layer"]
    assert counts[1] < SHAPE["n_layer"] // 3, f"the throttled node got {counts[1]} blocks (even: 4)"
    assert counts[1] < counts[0], counts
    assert counts[2] <= fits < SHAPE["n_layer"], (counts, fits)
    assert status["placement"]["partition"] == "auto" and status["placement"]["objective"] == "throughput"
    log = cl.logs()
    assert "Plan: auto (partition: auto); objective throughput" in log, log


def test_greedy_output_equals_one_process(unequal, reference):
    cl, _ = unequal
    params = SamplingParams("greedy", max_tokens=10)
    with cl.client(timeout=60) as c:
        got = c.generate(PROMPT, params)
    want = reference.generate(list(PROMPT), params)
    assert got["token_ids"] == want["token_ids"], \
        ("cluster and one process run the same calls in the same order: they must be identical; "
         f"cluster {got['token_ids']}, one process {want['token_ids']}")


def test_a_model_that_cannot_fit_is_refused_with_needed_vs_usable(weights, tmp_path):
    """max_sessions so large that the KV cache alone exceeds every node: serve exits with the figures,
    and the workers, told so, exit too."""
    mem = CGroup("memory", {"memory.limit_in_bytes": MEM_LIMIT_MB << 20})
    with mem:
        cl = LocalCluster(weights, nodes=3, partition="auto", cluster_extra={"max_sessions": 100_000},
                          wrap={2: mem.wrapper()}, workdir=str(tmp_path))
        try:
            cl.start_rank(0)
            cl.wait_leader(60)
            cl.start_rank(1)
            cl.start_rank(2)
            deadline = time.time() + 60
            while time.time() < deadline and any(p.poll() is None for p in cl.procs.values()):
                time.sleep(0.1)
            codes = {r: p.poll() for r, p in cl.procs.items()}
        finally:
            cl.stop()
    log = cl.logs()
    assert codes == {0: 1, 1: 2, 2: 2}, f"exit codes {codes}\n{log}"
    assert "Error: cannot serve the model: the model does not fit the cluster" in log, log
    assert re.search(r"= \d+ MB needed, \d+ MB usable in all", log), log
    assert "lower max_sessions" in log, log
    assert log.count("The leader cannot place the model: the model does not fit") == 2, log


class _stopping:
    def __init__(self, server):
        self.server = server

    def __enter__(self):
        return self.server

    def __exit__(self, *exc):
        self.server.stop()


class JoinByLeader(LocalCluster):
    """Workers started as `nanopipe join --leader 127.0.0.1:PORT`: no rank, no host, no configs."""

    def command(self, rank: int) -> list:
        if rank == 0:
            return super().command(0)
        return [sys.executable, "-m", "nanopipe", "join", "--leader", self.leader_addr,
                "--config-dir", os.path.join(self.workdir, "no-configs-here")]


def _unmarked(weights: str, path: str) -> str:
    """The same tensors without the synthetic marker: a leader on real weights, as far as it can
    tell (on synthetic ones it would tell workers to make them, not to pull them)."""
    from nanopipe.safetensors_io import read_header, read_tensor, write_safetensors
    from nanopipe.weights import SYNTHETIC_KEY
    header = read_header(weights)
    with open(weights, "rb") as f:
        tensors = {name: read_tensor(f, info) for name, info in header.tensors.items()}
    meta = {k: v for k, v in header.metadata.items() if k not in (SYNTHETIC_KEY, "nanopipe_seed", "nanopipe_shape")}
    write_safetensors(path, tensors, meta)
    return path


def test_join_with_only_the_leaders_address_and_rejoin_with_the_same_layers(tmp_path, reference):
    weights = _unmarked(reference.stage.source, str(tmp_path / "real-looking.safetensors"))
    with open(weights, "rb") as f:
        server = FileServer({"/w.safetensors": f.read()}).start()      # with Range: workers pull slices
    cl = JoinByLeader(weights, nodes=3, partition="auto", workdir=str(tmp_path),
                      cluster_extra={"max_sessions": 4, "prefix_cache_mb": 3,
                                     # each node holds at most 4 blocks, so the plan is 4/4/4 whatever
                                     # the speeds measured (on one machine the best split would
                                     # otherwise put nearly everything on the node that measured fastest)
                                     "nodes": {"node0": {"memory_mb": RANK0_MB},
                                               "node1": {"memory_mb": WORKER_MB}, "node2": {"memory_mb": WORKER_MB}}},
                      weights_url=server.url("/w.safetensors"))
    os.makedirs(os.path.join(str(tmp_path), "weights"), exist_ok=True)
    with cl, _stopping(server):
        with cl.client() as c:
            before = c.status()
        layers = [n["layers"] for n in before["nodes"]]
        assert [last - first + 1 for first, last in layers] == [4, 4, 4], layers      # [first, last] each
        # the leader's settings reach them too: their budget for kept caches is the leader's prefix_cache_mb
        holding = [n for n in before["nodes"][1:] if n["layers"]]
        assert holding and all(n["prefix_cache_bytes"] == 3 << 20 for n in holding), before["nodes"]
        params = SamplingParams("greedy", max_tokens=8)
        want = reference.generate(list(PROMPT), params)["token_ids"]
        with cl.client(timeout=60) as c:
            assert c.generate(PROMPT, params)["token_ids"] == want, "cluster == one process (same calls)"
        # a worker restarts: its rank is the only free one, so it gets it back, with the same layers.
        # Which rank process 1 got depends on which of the two enrolled first: read it from its log.
        mine = re.search(r"\[WORKER-(\d+)\]", log_of(cl, 1)).group(1)
        other = {"1": "2", "2": "1"}[mine]
        cl.kill_rank(1)
        cl.start_rank(1)
        cl.wait_ready(60)
        with cl.client() as c:
            after = c.status()
            assert c.generate(PROMPT, params)["token_ids"] == want, "after the rejoin too"
        assert [n["layers"] for n in after["nodes"]] == layers
        log = cl.logs()
        assert log_of(cl, 0).count(f"enrolled as rank {mine}") == 2, log
        assert log.count(f"enrolled as rank {other}") == 1, log
        # it got only its own blocks (from the leader, which holds them: the url is not needed)
        pulled = [f for f in os.listdir(os.path.join(str(tmp_path), "weights")) if ".layers-" in f]
        assert pulled, os.listdir(os.path.join(str(tmp_path), "weights"))


def test_a_stage_far_off_its_prediction_is_warned_about(weights):
    """cluster_config.yaml claims node1 streams 1000 GB/s: its real time is far above the
    prediction, and after traffic the leader says so in its log and in STATUS."""
    cl = LocalCluster(weights, nodes=3, partition="even",
                      cluster_extra={"nodes": {"node1": {"speed_gbps": 1000, "speed8_gbps": 1000}},
                                     "heartbeat_s": 0.2})
    with cl:
        with cl.client(timeout=60) as c:
            c.generate(PROMPT, SamplingParams("greedy", max_tokens=30))
        # wait for node1's own line: another stage may be warned about first (faster than predicted)
        warned = re.compile(r"Stage 1 \(node1\) takes [\d.]+ ms per decode step, \+\d+% off its predicted")
        deadline, row = time.time() + 20, None
        while time.time() < deadline:
            if warned.search(cl.logs()):
                break
            time.sleep(0.2)
        with cl.client() as c:
            stages = c.status()["placement"]["stages"]
        row = next(s for s in stages if s["rank"] == 1)
        assert row["measured_ms"] is not None and row["off"] > 0.25, stages
        assert warned.search(cl.logs()), cl.logs()
