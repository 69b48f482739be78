"""A split stage chosen by `partition: auto`, and re-planned while it runs: real processes.

Each node listens on an address of its own (127.0.0.1, .2, .3, ...: Linux routes all of 127/8 to
loopback), so the leader counts them as separate machines, and the nodes' speeds and memory are
given in cluster_config.yaml's `nodes:` (nothing measured): rank 0 has room for one block only,
the workers are slow, so the link model predicts the split a conversation's token >= 10% sooner
than any pipeline. A simulated 50 ms link on every hop keeps a stream running (~0.1 s a token)
while a node is drained, killed or started. Every answer's tokens must equal one process's.

    auto picks the split       3 nodes: ranks 1+2 share blocks 1-4, the LM head left on rank 0 (the
                               workers are too slow for it); greedy tokens as one process
    auto gives them the head   the same with workers as fast as rank 0 and no simulated delay: the
                               members run the LM head too, split by vocabulary
    a member drained           4 nodes, ranks 1+2+3 split: `nanopipe leave --rank 3` mid-stream ->
                               ranks 1+2 go on as the split stage
    a member gone for good     3 nodes: rank 2 killed mid-stream -> after rejoin_grace_s rank 1
                               holds blocks 1-4 alone, a plain stage
    a worker joins a mapping   layer_mapping {0: [0, 0], 1: [1, 4], 2: [1, 4]} with rank 2 absent:
                               rank 1 runs blocks 1-4 alone; rank 2 joins mid-stream -> the split again
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from click.testing import CliRunner
from helpers import (
    finish,
    generate_in_background,
    log_of,
    serve_app,
    status,
    wait_log,
    wait_status,
    wait_until,
)
from test_split_cluster import SHAPE, lively_weights

from nanopipe.engine import Engine
from nanopipe.sampling_params import SamplingParams
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster, write_configs

PROMPT = [15496, 995, 11, 616]
LONG = SamplingParams("greedy", max_tokens=80)
GRACE = 3
# split_lm_head as by default: these workers are given 2000x rank 0's slowness, so auto splits the
# blocks over them and keeps the LM head on rank 0 (on them it would take 14 s a token)
EXTRA = {"rejoin_grace_s": GRACE, "heartbeat_s": 0.2, "link_delay_ms": 50}
READY_S = 90
# rank 0: fast, but room for its embeddings and LM head (12.9 MB) and one block (2.3 MB with its KV
# cache at 16 sessions) only; the workers slow (a block 400 ms): one worker alone 1.6 s a token,
# two members 0.8 s + 8 all-reduces x 50 ms
FAST0 = {"speed_gbps": 1.0, "speed8_gbps": 1.0, "memory_mb": 16.5}
SLOW = {"speed_gbps": 0.0005, "speed8_gbps": 0.0005, "memory_mb": 4000}
# as fast as rank 0: on 1 GbE (assumed: no link set) half the head each (6.4 ms) and 2.8 ms on the
# link beat the whole head on rank 0 (12.9 ms): 12.0 ms a token against 15.7, the pipeline 14.5
FAST = {"speed_gbps": 1.0, "speed8_gbps": 1.0, "memory_mb": 4000}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """5 blocks of 4 heads, made so that greedy decoding picks a different token at most steps."""
    return lively_weights(str(tmp_path_factory.mktemp("splitreplan") / "tiny5.safetensors"))


@pytest.fixture(scope="module")
def reference(weights) -> list:
    tokens = Engine.load(weights).generate(list(PROMPT), LONG)["token_ids"]
    assert len(set(tokens)) > 10, f"the reference repeats itself ({tokens}): it would hide a wrong answer"
    return tokens


def machines(weights: str, workdir: str, n: int, *, partition: str = "auto", layer_mapping=None,
             workers: dict = SLOW, extra: dict | None = None) -> LocalCluster:
    """A LocalCluster of n nodes at 127.0.0.1 .. 127.0.0.n, the speeds and memory above given."""
    config_dir = os.path.join(workdir, "written")
    hosts = [f"127.0.0.{i + 1}" for i in range(n)]
    nodes = {f"node{i}": (FAST0 if i == 0 else workers) for i in range(n)}
    write_configs(config_dir, weights=weights, nodes=n, n_layer=SHAPE["n_layer"], partition=partition,
                  layer_mapping=layer_mapping, hosts=hosts, cluster_extra={**EXTRA, **(extra or {}), "nodes": nodes})
    files = {}
    for name in ("model_config.yaml", "cluster_config.yaml", "model_weights.yaml"):
        with open(os.path.join(config_dir, name)) as f:
            files[name] = yaml.safe_load(f)
    return LocalCluster(weights, nodes=n, workdir=workdir, configs=files, ready_timeout=READY_S)


def layers(st: dict) -> dict:
    return {n["rank"]: n["layers"] for n in st["nodes"]}


def started_without_rank_2(cl, gone: str = "Rank 2 (node2) is gone") -> dict:
    """Ranks 0 and 1 started, rank 2 not: wait for the leader's `gone` line about it and a ready
    ring 0 -> 1 -> 0, rank 1 alone on blocks 1-4; that status."""
    cl.start_rank(0)
    cl.wait_leader()
    cl.start_rank(1)
    wait_log(cl, 0, gone, timeout=READY_S)
    st = wait_status(cl, lambda st: st["ready"], READY_S, "the ring 0 -> 1 -> 0 without rank 2")
    assert layers(st) == {0: [0, 0], 1: [1, 4]}, st["nodes"]
    return st


def head_on_rank_0(cl, ranks=(1, 2)):
    """The LM head runs on rank 0: the plan in force says so, and no worker loaded or ran a share of it."""
    st = status(cl)
    assert st["placement"]["lm_head_ranks"] == [0], st["placement"]
    assert all(n.get("head_ms") is None for n in st["nodes"] if n["rank"] > 0), st["nodes"]
    assert not any("Loaded the LM head's rows" in log_of(cl, r) for r in ranks)


def test_auto_picks_a_split_stage_and_answers_as_one_process(weights, reference, tmp_path):
    cl = machines(weights, str(tmp_path), 3)
    with cl:
        line = wait_log(cl, 0, "planned:")
        # worked out in tests/test_split_head_place.py: 1313.4 ms with the head on rank 0, 14216.3 on the
        # members, 1713.2 for the pipeline
        assert ("split stage ranks 1-2 (layers 1-4), predicted 1313.4 ms/token vs pipeline 1713.2 for one "
                "conversation, the LM head on rank 0 (on the members: 14216.3 ms)") in line, line
        st = status(cl)
        assert layers(st) == {0: [0, 0], 1: [1, 4], 2: [1, 4]}, st["nodes"]
        wait_log(cl, 0, "ring 0 -> 1+2 -> 0")
        with cl.client() as c:
            got = c.generate(PROMPT, LONG)
        assert got["token_ids"] == reference, "the auto-chosen split stage answers differently from one process"
        time.sleep(0.6)                     # the next heartbeats would carry a head's time
        head_on_rank_0(cl)

        # `plan --from-cluster`, from the leader (HOST:PORT) and from the web app (URL): the members one stage
        from nanopipe.web.app import create_app
        url, server = serve_app(create_app({"LEADER": cl.leader_addr, "LEADER_TOKEN": cl.token}))
        try:
            for addr in (cl.leader_addr, url):
                out = CliRunner().invoke(main, ["plan", "--from-cluster", addr, "--config-dir", cl.config_dir])
                assert out.exit_code == 0, out.output
                table = out.output.split("\n\n")[0].splitlines()
                assert [row.split() for row in table] == [
                    ["Node", "Rank", "Layers", "Count", "Heads"], ["node0", "0", "0-0", "1"],
                    ["node1+node2", "1+2", "1-4", "4", "0-1", "+", "2-3"]], out.output
                assert "split stage ranks 1-2 (layers 1-4), predicted" in out.output, out.output
                assert "LM head: on rank 0 (node0)" in out.output, out.output
        finally:
            server.shutdown()


def test_auto_gives_fast_members_the_head_too(weights, reference, tmp_path):
    cl = machines(weights, str(tmp_path), 3, workers=FAST, extra={"link_delay_ms": 0})
    with cl:
        line = wait_log(cl, 0, "planned:")
        assert ("split stage ranks 1-2 (layers 1-4), predicted 12.0 ms/token vs pipeline 14.5 for one "
                "conversation, the LM head on the members (on rank 0: 15.7 ms)") in line, line
        wait_log(cl, 0, "ring 0 -> 1+2 -> 0")
        for rank, rows in ((1, "0-25128"), (2, "25129-50256")):
            wait_log(cl, rank, f"Loaded the LM head's rows {rows} of 50257", timeout=10)
        with cl.client() as c:
            got = c.generate(PROMPT, LONG)
        assert got["token_ids"] == reference, "the split stage running the head answers differently from one process"
        time.sleep(0.6)                     # the next heartbeats carry the head's time
        st = status(cl)
        assert st["placement"]["lm_head_ranks"] == [1, 2], st["placement"]
        assert all(n["head_ms"] and n["head_ms"] > 0 for n in st["nodes"] if n["rank"] > 0), st["nodes"]
        out = CliRunner().invoke(main, ["plan", "--from-cluster", cl.leader_addr, "--config-dir", cl.config_dir])
        assert out.exit_code == 0 and "LM head: split by vocabulary over ranks 1+2 (node1+node2), measured " \
            in out.output, out.output


def test_a_member_drained_mid_stream_leaves_the_other_members_as_the_split_stage(weights, reference, tmp_path):
    cl = machines(weights, str(tmp_path), 4)
    with cl:
        assert layers(status(cl)) == {0: [0, 0], 1: [1, 4], 2: [1, 4], 3: [1, 4]}, status(cl)["nodes"]
        started = threading.Event()
        box = generate_in_background(cl.client, PROMPT, LONG, lambda n: n == 3 and started.set())
        assert started.wait(60), "the stream never started"
        left = subprocess.run([sys.executable, "-m", "nanopipe", "leave", "--rank", "3", "--config-dir",
                               cl.config_dir], capture_output=True, text=True, timeout=300, env=cl.env)
        assert left.returncode == 0, (left.stdout, left.stderr, log_of(cl, 0)[-3000:])
        assert "rank 3 (node3) drained: ring 0 -> 1+2 -> 0" in left.stdout, left.stdout
        in_flight = len(box["times"])
        got = finish(box, timeout=180)
        assert in_flight < len(got["token_ids"]), "the stream had ended before the drain: nothing was tested"
        assert got["token_ids"] == reference, "the answer across the drain differs from one process's"
        assert cl.procs[3].wait(30) == 0, log_of(cl, 3)
        st = status(cl)
        assert layers(st) == {0: [0, 0], 1: [1, 4], 2: [1, 4]}, st["nodes"]
        line = [ln for ln in log_of(cl, 0).splitlines() if "Re-planning (rank 3 (node3) leaves)" in ln]
        assert line and "split stage ranks 1-2" in line[0], line
        assert "the LM head on rank 0 (on the members: " in line[0], line
        head_on_rank_0(cl, ranks=(1, 2, 3))


def test_a_member_gone_for_good_leaves_a_plain_stage_after_the_grace(weights, reference, tmp_path):
    cl = machines(weights, str(tmp_path), 3)
    with cl:
        t_kill = {}

        def kill_at_5(n):
            if n == 5:
                cl.kill_rank(2, signal.SIGKILL)
                t_kill["t"] = time.time()
        box = generate_in_background(cl.client, PROMPT, LONG, kill_at_5)
        wait_until("rank 2 killed", lambda: t_kill, 60)
        got = finish(box, timeout=180)
        assert got["token_ids"] == reference, "the answer across the re-plan differs from one process's"
        assert time.time() - t_kill["t"] > GRACE - 0.5, "the answer did not wait for rejoin_grace_s"
        wait_log(cl, 0, "Rank 2 (node2) is gone: down for more than rejoin_grace_s=3s")
        wait_log(cl, 0, "Re-planned (rank 2 (node2) is gone)")
        st = wait_status(cl, lambda st: st["ready"], 30, "the ring 0 -> 1 -> 0")
        assert layers(st) == {0: [0, 0], 1: [1, 4]}, st["nodes"]
        with cl.client() as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference
        assert status(cl)["placement"]["lm_head_ranks"] == [0]


def test_a_worker_joining_a_mapping_with_a_split_stage_mid_stream(weights, reference, tmp_path):
    cl = machines(weights, str(tmp_path), 3, partition="even", layer_mapping={0: [0, 0], 1: [1, 4], 2: [1, 4]})
    try:           # the mapping without rank 2: rank 1 alone
        started_without_rank_2(cl, "Rank 2 (node2) is gone: absent for more than rejoin_grace_s=3s")
        started = threading.Event()
        box = generate_in_background(cl.client, PROMPT, LONG, lambda n: n == 3 and started.set())
        assert started.wait(60), "the stream never started"
        cl.start_rank(2)
        wait_log(cl, 0, "Re-planned (rank 2 (node2) joined)", timeout=READY_S)
        in_flight = len(box["times"])
        got = finish(box, timeout=180)
        assert in_flight < len(got["token_ids"]), "the stream had ended before the join: nothing was tested"
        assert got["token_ids"] == reference, "the answer across the join differs from one process's"
        line = [ln for ln in log_of(cl, 0).splitlines() if "Re-planned (rank 2 (node2) joined)" in ln][0]
        assert line.endswith("ring 0 -> 1+2 -> 0"), line
        st = status(cl)
        assert layers(st) == {0: [0, 0], 1: [1, 4], 2: [1, 4]}
        # a hand-written mapping with split_lm_head (the default): the members run the head once split again
        assert st["placement"]["lm_head_ranks"] == [1, 2], st["placement"]
        for rank in (1, 2):
            wait_log(cl, rank, "Loaded the LM head's rows")
    finally:
        cl.stop()
