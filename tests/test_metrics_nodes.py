"""/metrics against a real 3-node cluster: each node's transit agrees with `nanopipe trace`, and the
per-node memory and status gauges and the cluster events counter say what the leader says."""
from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner
from helpers import node, status, wait_status
from prometheus_client.parser import text_string_to_metric_families

from nanopipe.decoding import SamplingParams
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.app import create_app, settings_from_configs
from nanopipe.web.metrics import WebMetrics, render_metrics

DELAY_MS = 20.0        # the simulated link on every hop: transit is this and a little more
MAX_TOKENS = 8


def samples(text: str) -> dict:
    """/metrics text -> {(sample name, ((label, value), ...)): value}, parsed by prometheus_client."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: dict, name: str, **labels) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def delayed(tiny_weights, tmp_path_factory):
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path_factory.mktemp("metricsnodes")),
                      cluster_extra={"link_delay_ms": DELAY_MS})
    with cl:
        yield cl


def test_per_node_transit_in_metrics_agrees_with_the_trace(delayed):
    web = create_app(settings_from_configs(delayed.config_dir, leader=delayed.leader_addr)).test_client()
    r = web.post("/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": MAX_TOKENS,
                                          "temperature": 0})
    assert r.status_code == 200, r.get_data(as_text=True)
    steps = r.json["usage"]["completion_tokens"]
    assert steps >= 3, r.json
    m = samples(web.get("/metrics").get_data(as_text=True))

    out = CliRunner().invoke(main, ["trace", "The quick brown fox", "--leader", delayed.leader_addr,
                                    "--config-dir", delayed.config_dir, "--max-tokens", str(MAX_TOKENS), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    for rank in (0, 1, 2):
        traced = [h["transit_ms"] for t in report["tokens"] for h in t["hops"]
                  if h["rank"] == rank and h["transit_ms"] is not None]
        assert traced, f"the trace has no transit for rank {rank}: {report}"
        trace_ms = statistics.mean(traced)
        # one prompt chunk, then one step per further token: `steps` trips round the ring
        total_s = value(m, "nanopipe_node_transit_seconds_total", rank=str(rank)) or 0.0
        metrics_ms = total_s * 1000 / steps
        print(f"rank {rank}: /metrics transit {metrics_ms:.3f} ms per step (total {total_s * 1000:.3f} ms over "
              f"{steps} steps), trace {trace_ms:.3f} ms per hop (mean of {len(traced)}); "
              f"difference {abs(metrics_ms - trace_ms):.3f} ms")
        assert metrics_ms > DELAY_MS / 2, f"rank {rank}'s transit in /metrics is {metrics_ms} ms per step"
        assert abs(metrics_ms - trace_ms) < max(10.0, 0.5 * trace_ms), (rank, metrics_ms, trace_ms)


def test_node_memory_status_and_events_follow_a_worker_leaving_and_rejoining(delayed):
    web = create_app(settings_from_configs(delayed.config_dir, leader=delayed.leader_addr)).test_client()
    st = status(delayed)
    m = samples(web.get("/metrics").get_data(as_text=True))
    for rank in range(3):
        lab = {"rank": str(rank), "host": f"node{rank}"}
        usable_mb = (node(st, rank)["capacity"] or {}).get("memory_mb")
        print(f"rank {rank}: rss {node(st, rank)['rss_mb']} MB, usable {usable_mb} MB")
        assert usable_mb, f"rank {rank} measured no usable memory: {node(st, rank)}"
        assert value(m, "nanopipe_node_memory_usable_bytes", **lab) == int(usable_mb * 2**20), (rank, m)
        assert value(m, "nanopipe_node_rss_bytes", **lab) > 10 * 2**20, (rank, m)
        assert value(m, "nanopipe_node_status", **lab, nanopipe_node_status="up") == 1, (rank, m)
        assert value(m, "nanopipe_node_status", **lab, nanopipe_node_status="down") == 0, (rank, m)
    assert value(m, "nanopipe_cluster_events_total", kind="joined") == 2, m     # the two workers
    assert value(m, "nanopipe_cluster_events_total", kind="left") == 0, m
    assert value(m, "nanopipe_cluster_events_total", kind="rejoined") == 0, m

    delayed.kill_rank(2)
    wait_status(delayed, lambda st: node(st, 2)["status"] == "down", 30, "rank 2 down")
    m = samples(web.get("/metrics").get_data(as_text=True))
    lab = {"rank": "2", "host": "node2"}
    assert value(m, "nanopipe_node_status", **lab, nanopipe_node_status="down") == 1, m
    assert value(m, "nanopipe_node_status", **lab, nanopipe_node_status="up") == 0, m
    assert value(m, "nanopipe_node_up", **lab) == 0, m
    assert value(m, "nanopipe_cluster_events_total", kind="left") == 1, m

    delayed.start_rank(2)
    st = wait_status(delayed, lambda st: st["ready"], 60, "the ring whole again")
    assert st["events"]["rejoined"] == 1 and st["events"]["joined"] == 2, st["events"]
    m = samples(web.get("/metrics").get_data(as_text=True))
    assert value(m, "nanopipe_node_status", **lab, nanopipe_node_status="up") == 1, m
    assert value(m, "nanopipe_cluster_events_total", kind="rejoined") == 1, m


def test_node_gauges_from_a_status():
    status = {"ready": True, "events": {"joined": 2, "left": 1, "slow_stage": "x"},
              "nodes": [{"rank": 0, "host": "a", "status": "up", "rss_mb": 10, "capacity": {"memory_mb": 100}},
                        {"rank": 1, "host": "b", "status": "left out", "rss_mb": float("nan"), "capacity": None},
                        {"rank": 2, "host": "c", "status": "joining", "capacity": {"memory_mb": -3}}]}
    m = samples(render_metrics(WebMetrics(), status))
    assert value(m, "nanopipe_node_rss_bytes", rank="0", host="a") == 10 * 2**20
    assert value(m, "nanopipe_node_memory_usable_bytes", rank="0", host="a") == 100 * 2**20
    assert value(m, "nanopipe_node_rss_bytes", rank="1", host="b") is None, "NaN is not shown"
    assert value(m, "nanopipe_node_memory_usable_bytes", rank="2", host="c") is None, "nor a negative size"
    states = {dict(k[1])["nanopipe_node_status"]: v for k, v in m.items()
              if k[0] == "nanopipe_node_status" and dict(k[1])["rank"] == "1"}
    assert states == {"up": 0, "joining": 0, "down": 0, "left out": 1}, states
    assert value(m, "nanopipe_node_status", rank="2", host="c", nanopipe_node_status="joining") == 1
    assert value(m, "nanopipe_cluster_events_total", kind="joined") == 2
    assert value(m, "nanopipe_cluster_events_total", kind="left") == 1
    assert value(m, "nanopipe_cluster_events_total", kind="rejoined") == 0, "every kind is shown from 0"
    assert value(m, "nanopipe_cluster_events_total", kind="slow_stage") == 0, "a bad count shows 0"


def test_planned_and_slow_stage_events_are_counted(tiny_weights):
    # every node claims to be far faster than it is: the plan predicts microseconds a step, the
    # stages take much longer, and the leader warns that they run slow
    fast = {"speed_gbps": 1000, "speed8_gbps": 1000}
    cl = LocalCluster(tiny_weights, nodes=3, partition="auto",
                      cluster_extra={"nodes": {f"node{r}": fast for r in range(3)}})
    with cl:
        with cl.client() as c:
            c.generate([464, 2068, 7586], SamplingParams("greedy", max_tokens=40))
        st = wait_status(cl, lambda st: st["events"]["slow_stage"] >= 1, 30, "a slow stage warned about")
        m = samples(render_metrics(WebMetrics(), st))
        print(st["events"])
        assert value(m, "nanopipe_cluster_events_total", kind="planned") == st["events"]["planned"] >= 1, m
        assert value(m, "nanopipe_cluster_events_total", kind="slow_stage") == st["events"]["slow_stage"], m
        assert "off its predicted" in cl.logs(), cl.logs()


def test_transit_without_the_workers_clocks_goes_to_rank_0():
    # a worker that sends no "t_in" (an older one), or clocks that disagree (a hop that comes out
    # negative): each hop cannot be timed, so the ring's clock-free transit (round trip minus the
    # workers' compute) goes to rank 0, as before, and no worker gets a made-up one
    import time

    from nanopipe.sessions import Batch, add_times
    for stamps in ({}, {"t_in": time.time() + 60}):       # no clock; a clock a minute ahead
        t0 = time.perf_counter() - 0.100                  # the batch left 100 ms ago, 10 ms of it rank 0's
        trace = [{"rank": 1, "compute_ms": 30.0, **stamps}, {"rank": 2, "compute_ms": 20.0, **stamps}]
        trace[-1]["t_back"] = time.time()
        node_ms = {}
        t_back = time.perf_counter()
        add_times(node_ms, Batch(id=0, sessions=[], counts=[], t0=t0, front_ms=10.0), trace, t_back, t_back)
        print(stamps, node_ms)
        assert node_ms[1] == {"compute": 30.0, "transit": 0.0} and node_ms[2] == {"compute": 20.0, "transit": 0.0}
        # 100 - 10 - 30 - 20 ms, and the time these lines take (generous: a loaded machine)
        assert 40.0 <= node_ms[0]["transit"] < 60.0, node_ms
