"""A worker the plan leaves out does not join the ring, and the ring skips it: real processes, no
cgroups needed (cluster_config.yaml's `nodes:` says rank 1 is very slow, so the solver leaves it
out). Also `plan --from-cluster` and /metrics' predicted vs measured per stage."""
from __future__ import annotations

import re

from click.testing import CliRunner

from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.partition import even
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.metrics import WebMetrics, render_metrics

PROMPT = [15496, 995, 11, 616]


def test_a_worker_left_out_stands_by_and_the_ring_skips_it(tiny_weights):
    # every speed given (not measured), so the plan does not depend on what else loads this machine:
    # node2 is fast enough that its blocks beat a hop, node0 slow enough to keep only its one block
    cl = LocalCluster(tiny_weights, nodes=3, partition="auto",
                      cluster_extra={"nodes": {"node0": {"speed_gbps": 0.01, "speed8_gbps": 0.01},
                                               "node2": {"speed_gbps": 10, "speed8_gbps": 10},
                                               "node1": {"speed_gbps": 0.001, "speed8_gbps": 0.001}}})
    with cl:
        with cl.client() as c:
            st = c.status()
            params = SamplingParams("greedy", max_tokens=10)
            got = c.generate(PROMPT, params)
        one = Engine.load(tiny_weights)
        want = one.generate(list(PROMPT), params)
        assert got["token_ids"] == want["token_ids"], \
            "cluster == one process (the same calls in the same order): they must be identical"
        nodes = st["nodes"]
        assert nodes[1]["layers"] is None and nodes[1]["status"] == "left out", nodes
        assert "only slow the others" in nodes[1]["excluded"], nodes
        assert nodes[0]["layers"][1] + 1 == nodes[2]["layers"][0] <= nodes[2]["layers"][1] == one.config.n_layer - 1, \
            nodes
        log = cl.logs()
        assert "ring 0 -> 2 -> 0 is up" in log and "rank 1 left out by the plan" in log, log
        assert "[WORKER-1] Left out of the ring by the leader's plan: node1: left out" in log, log
        # auto weighed a split stage too, and says why not: three nodes on one address
        assert "Plan: no split stage: the workers share one address" in log, log

        out = CliRunner().invoke(main, ["plan", "--from-cluster", cl.leader_addr,
                                        "--config-dir", cl.config_dir])
        assert out.exit_code == 0, out.output
        assert "Split: auto (partition: auto); objective throughput\n" in out.output, out.output
        assert "note: node1: left out — at 0.001 GB/s" in out.output, out.output
        assert "Predicted tok/s   this split:" in out.output, out.output
        assert out.output.splitlines()[2].split()[:4] == ["node1", "1", "none", "0"], out.output

        text = render_metrics(WebMetrics(), st)
        assert 'nanopipe_stage_predicted_seconds{host="node0",rank="0"}' in text, text
        assert 'nanopipe_stage_predicted_seconds{host="node1"' not in text, "a node left out has no stage"
        assert 'nanopipe_predicted_tokens_per_second{streams="8"}' in text, text


def test_partition_not_set_is_auto_when_the_nodes_differ(tiny_weights):
    cl = LocalCluster(tiny_weights, nodes=3, partition=None,
                      cluster_extra={"nodes": {"node2": {"speed_gbps": 0.001, "speed8_gbps": 0.001}}})
    with cl:
        with cl.client() as c:
            st = c.status()
        log = cl.logs()
    assert re.search(r"Plan: auto \(partition not set and the nodes differ: speeds 0\.0-[\d.]+ GB/s \(node2 slowest\) "
                     r"are more than 25% apart\); objective throughput", log), log
    assert st["nodes"][2]["status"] == "left out", st["nodes"]


def test_partition_not_set_on_one_machine_stays_even(tiny_weights):
    """Three processes on one address measure apart only by noise: no re-plan."""
    with LocalCluster(tiny_weights, nodes=3, partition=None) as cl:
        with cl.client() as c:
            st = c.status()
        log = cl.logs()
    assert "Plan: even: partition not set, and every node is on the same machine" in log, log
    assert [n["layers"] for n in st["nodes"]] == [[lo, hi - 1] for lo, hi in even(st["nodes"][-1]["layers"][1] + 1, 3)]
