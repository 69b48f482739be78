"""Nodes join and leave a running cluster, and the leader re-plans between steps (cluster/replan.py).

Real processes on 127.0.0.1 (LocalCluster), each test a generation streaming while the cluster changes:

    a node joins      ranks 0 and 1 run (rank 2, configured, is absent: after rejoin_grace_s the
                      cluster serves without it); mid-stream `nanopipe join --leader` brings a third
                      node -> re-planned over three, the stream's tokens equal one process's
    a node is drained mid-stream `nanopipe leave --rank 2` -> re-planned over two, same tokens,
                      rank 2 stops saying why, the leave command returns once it is drained
    a standby helps   partition auto leaves a slow node out; once a node is drained and rank 0 has no
                      room for its blocks, the re-plan gives the standby layers
    a node is gone    rank 2 killed for good mid-stream -> after rejoin_grace_s the cluster re-plans
                      over the rest and the answer goes on, same tokens; the status (and so /health)
                      stops listing rank 2

Each prints the longest pause the stream saw (the largest gap between two tokens) beside its usual
gap; docs/TROUBLESHOOTING.md quotes them. A simulated link delay makes each token take ~0.1 s, so
the stream is still running when a new process has started and measured itself.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import (
    finish,
    generate_in_background,
    log_of,
    node,
    run_nanopipe,
    status,
    wait_log,
    wait_status,
    wait_until,
)

from nanopipe.sampling_params import SamplingParams
from nanopipe.tools.localcluster import LocalCluster, free_ports

PROMPT = [15496, 995, 11, 616, 1438]               # "Hello world, my name"
LONG = SamplingParams("greedy", max_tokens=120)     # 5 + 120 positions: within the tiny model's n_ctx of 128
GRACE = 3
EXTRA = {"rejoin_grace_s": GRACE, "heartbeat_s": 0.2, "link_delay_ms": 50}
READY_S = 90


@pytest.fixture(scope="module")
def reference(tiny_engine):
    return tiny_engine.generate(list(PROMPT), LONG)["token_ids"]


def stream(cl: LocalCluster, on_token=None) -> dict:
    """A generation on its own thread (helpers.generate_in_background): box["times"] (perf_counter of
    each token), then box["result"] or box["error"]."""
    return generate_in_background(cl.client, PROMPT, LONG, on_token)


def pause_report(box: dict, what: str) -> tuple:
    """(longest gap, median gap) between two tokens of the stream, in seconds; printed."""
    t = box["times"]
    gaps = sorted(b - a for a, b in zip(t, t[1:]))
    longest, median = gaps[-1], gaps[len(gaps) // 2]
    print(f"\n{what}: longest pause between two tokens {longest * 1000:.0f} ms "
          f"(median gap {median * 1000:.0f} ms, {len(t)} tokens)")
    return longest, median


def ranks(st: dict) -> list:
    return [n["rank"] for n in st["nodes"]]


def test_a_node_joins_mid_stream_and_the_cluster_replans_over_three(tiny_weights, reference, tmp_path):
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), cluster_extra=EXTRA)
    try:
        cl.start_rank(0)
        cl.wait_leader()
        cl.start_rank(1)
        # rank 2 is configured but absent: once rejoin_grace_s has passed, the cluster runs without it
        st = wait_status(cl, lambda st: st["ready"], READY_S, "the ring 0 -> 1 -> 0 up without rank 2")
        assert ranks(st) == [0, 1], st["nodes"]
        wait_log(cl, 0, "Rank 2 (node2) is gone: absent for more than rejoin_grace_s=3s")
        assert [n["layers"] for n in st["nodes"]] == [[0, 1], [2, 3]], st["nodes"]

        started = threading.Event()
        box = stream(cl, on_token=lambda n: n == 3 and started.set())
        assert started.wait(60), "the stream never started"
        # a bare third node: it knows only the leader's address (and has the weights file)
        with open(cl.log_path(2), "ab") as out:
            cl.procs[2] = subprocess.Popen([sys.executable, "-m", "nanopipe", "join", "--leader", cl.leader_addr,
                                            "--weights", cl.weights], stdout=out, stderr=subprocess.STDOUT,
                                           env=cl.env, cwd=cl.workdir)
        wait_log(cl, 0, "Re-planned (rank 2 (node2) joined)", timeout=READY_S)
        in_flight = len(box["times"])
        got = finish(box, timeout=120)
        assert in_flight < len(got["token_ids"]), (f"the stream had ended ({in_flight} tokens) before the re-plan: "
                                                   "the test saw no join mid-stream")
        assert got["token_ids"] == reference, "the answer across the join differs from one process's"
        pause_report(box, "a node joined")
        st = status(cl)
        assert ranks(st) == [0, 1, 2] and all(n["status"] == "up" for n in st["nodes"]), st["nodes"]
        assert [n["layers"] for n in st["nodes"]] == [[0, 1], [2, 2], [3, 3]], st["nodes"]
        assert st["events"]["replanned"] >= 2 and st["events"]["gone"] == 1, st["events"]
        # the new ring answers on its own too
        with cl.client() as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference
    finally:
        cl.stop()


def test_a_node_drained_mid_stream_with_nanopipe_leave(tiny_weights, reference, tmp_path):
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), cluster_extra=EXTRA, ready_timeout=READY_S)
    try:
        cl.start()
        started = threading.Event()
        box = stream(cl, on_token=lambda n: n == 3 and started.set())
        assert started.wait(60), "the stream never started"
        left = subprocess.run([sys.executable, "-m", "nanopipe", "leave", "--rank", "2", "--config-dir",
                               cl.config_dir], capture_output=True, text=True, timeout=300, env=cl.env)
        assert left.returncode == 0, (left.stdout, left.stderr, cl.logs())
        assert "rank 2 (node2) drained: ring 0 -> 1 -> 0" in left.stdout, left.stdout
        in_flight = len(box["times"])
        got = finish(box, timeout=120)
        assert in_flight < len(got["token_ids"]), "the stream had ended before the drain: nothing was tested"
        assert got["token_ids"] == reference, "the answer across the drain differs from one process's"
        pause_report(box, "a node left")
        # the drained worker stops by itself, saying why, with status 0
        assert cl.procs[2].wait(30) == 0, log_of(cl, 2)
        assert "The leader has drained this node" in log_of(cl, 2)
        st = status(cl)
        assert ranks(st) == [0, 1] and st["ready"], st["nodes"]
        assert st["events"]["drained"] == 1 and st["events"]["replanned"] == 1, st["events"]
        # the page's log: rank 2 was drained and went, as told; it did not die
        kinds = [(e["kind"], e["text"]) for e in st["event_log"] if e["rank"] == 2]
        assert [k for k, _ in kinds][-2:] == ["drained", "left"], kinds
        # asking again, or for the leader, or for a rank there is not: a clear answer, no traceback
        for rank, says in ((2, "rank 2 (node2) is not in the cluster: drained by `nanopipe leave`"),
                           (0, "rank 0 is the leader"), (7, "no worker rank 7")):
            r = subprocess.run([sys.executable, "-m", "nanopipe", "leave", "--rank", str(rank), "--config-dir",
                                cl.config_dir], capture_output=True, text=True, timeout=60, env=cl.env)
            assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, (rank, r.stderr)
        # the page's way, POST /cluster/leave with the API token, gets the leader's own answer
        from nanopipe.web.app import create_app
        web = create_app({"TESTING": True, "LEADER": cl.leader_addr, "LEADER_TOKEN": cl.token,
                          "API_TOKEN": "page-secret"}).test_client()
        r = web.post("/cluster/leave", json={"rank": 2}, headers={"Authorization": "Bearer page-secret"})
        assert r.status_code == 400 and "rank 2 (node2) is not in the cluster" in r.get_json()["error"], r.get_json()
        metrics = web.get("/metrics", headers={"Authorization": "Bearer page-secret"}).get_data(as_text=True)
        for kind in ("drained", "replanned"):
            assert f'nanopipe_cluster_events_total{{kind="{kind}"}} 1.0' in metrics, metrics
        with cl.client() as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference
    finally:
        cl.stop()


def test_a_drained_node_that_joins_again_is_not_told_the_old_reason(tiny_weights, reference, tmp_path):
    """Rank 2 drained, then the same machine runs `nanopipe join --leader`: it registers as rank 2
    again and stands by for a moment until the re-plan gives it layers. What the leader logs and
    tells it in that moment is that it is back, not the drain that is over."""
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), cluster_extra=EXTRA, ready_timeout=READY_S)
    try:
        cl.start()
        # on a loaded machine rank 2 may have come after the grace (gone, then planned back in): wait for it
        wait_status(cl, lambda st: ranks(st) == [0, 1, 2] and st["ready"], READY_S, "the ring 0 -> 1 -> 2 up")
        with cl.client() as c:
            c.leave(2)
        assert cl.procs[2].wait(30) == 0, log_of(cl, 2)
        before, leader_before = len(log_of(cl, 2)), len(log_of(cl, 0))
        with open(cl.log_path(2), "ab") as out:
            cl.procs[2] = subprocess.Popen([sys.executable, "-m", "nanopipe", "join", "--leader", cl.leader_addr,
                                            "--weights", cl.weights], stdout=out, stderr=subprocess.STDOUT,
                                           env=cl.env, cwd=cl.workdir)
        wait_until("the re-plan bringing rank 2 back", lambda: "Re-planned (rank 2 (node2) joined)" in
                   log_of(cl, 0)[leader_before:], READY_S, detail=cl.logs)
        line = [x for x in log_of(cl, 0)[leader_before:].splitlines() if "Worker 2 registered from" in x]
        assert len(line) == 1 and "standing by: back after it was drained by `nanopipe leave`; the next re-plan " \
            "places it" in line[0], line
        rejoined = log_of(cl, 2)[before:]
        told = [x for x in rejoined.splitlines() if "Left out of the ring" in x]
        assert told and all("back after it was drained" in x for x in told), rejoined
        assert "Left out of the ring by the leader's plan: drained by" not in rejoined, rejoined
        st = status(cl)
        assert ranks(st) == [0, 1, 2] and node(st, 2)["status"] == "up" and node(st, 2)["excluded"] is None, st
        with cl.client() as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference
    finally:
        cl.stop()


def test_a_standby_takes_blocks_when_a_node_leaves_and_rank_0_cannot_hold_them(tiny_weights, reference, tmp_path):
    """partition auto, speeds and rank 0's memory given: node1 is too slow to help while node2 runs
    (left out, standing by), but once node2 is drained rank 0 has room for 2 of the 4 blocks only,
    so the re-plan gives node1 the rest."""
    nodes = {"node0": {"speed_gbps": 0.01, "speed8_gbps": 0.01, "memory_mb": 16},
             "node1": {"speed_gbps": 0.001, "speed8_gbps": 0.001}, "node2": {"speed_gbps": 10, "speed8_gbps": 10}}
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), partition="auto", ready_timeout=READY_S,
                      cluster_extra={**EXTRA, "nodes": nodes})
    try:
        cl.start()
        st = status(cl)
        assert node(st, 1)["status"] == "left out" and node(st, 1)["layers"] is None, st["nodes"]
        started = threading.Event()
        box = stream(cl, on_token=lambda n: n == 3 and started.set())
        assert started.wait(60), "the stream never started"
        with cl.client() as c:
            c.leave(2)
        got = finish(box, timeout=120)
        assert got["token_ids"] == reference, "the answer across the re-plan differs from one process's"
        st = status(cl)
        assert ranks(st) == [0, 1] and node(st, 1)["status"] == "up", st["nodes"]
        first, last = node(st, 1)["layers"]
        assert node(st, 0)["layers"][1] + 1 == first and last == 3 and last - first + 1 >= 2, st["nodes"]
        wait_log(cl, 1, "Loaded")
        with cl.client() as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference
    finally:
        cl.stop()


def test_a_node_gone_for_good_the_rest_replan_after_the_grace(tiny_weights, reference, tmp_path):
    cl = LocalCluster(tiny_weights, nodes=3, workdir=str(tmp_path), cluster_extra=EXTRA, ready_timeout=READY_S)
    try:
        cl.start()
        t_kill = {}

        def kill_at_5(n):
            if n == 5:
                cl.kill_rank(2, signal.SIGKILL)
                t_kill["t"] = time.time()
        box = stream(cl, on_token=kill_at_5)
        wait_until("rank 2 killed", lambda: t_kill, 60)
        wait_status(cl, lambda st: node(st, 2)["status"] == "down", 10, "rank 2 shown down within its grace")
        got = finish(box, timeout=120)
        waited = time.time() - t_kill["t"]
        assert got["token_ids"] == reference, "the answer across the re-plan differs from one process's"
        assert waited > GRACE - 0.5, f"the answer ended {waited:.1f}s after the kill: it did not wait for the grace"
        wait_log(cl, 0, "Rank 2 (node2) is gone: down for more than rejoin_grace_s=3s; re-planning over the rest")
        wait_log(cl, 0, "Re-planned (rank 2 (node2) is gone)")
        st = status(cl)
        assert ranks(st) == [0, 1] and st["ready"], st["nodes"]
        assert [n["layers"] for n in st["nodes"]] == [[0, 1], [2, 3]], st["nodes"]
        # the web app's /health: every node it lists is up, and the gone one is not listed
        from nanopipe.web.app import create_app
        app = create_app({"TESTING": True, "LEADER": cl.leader_addr, "LEADER_TOKEN": cl.token})
        health = app.test_client().get("/health")
        assert health.status_code == 200, health.get_json()
        assert [n["rank"] for n in health.get_json()["nodes"]] == [0, 1], health.get_json()
        with cl.client() as c:
            assert c.generate(PROMPT, LONG)["token_ids"] == reference
    finally:
        cl.stop()


def test_leave_without_a_leader_says_what_to_do(tmp_path):
    r = run_nanopipe("leave", "--rank", "1", "--config-dir", str(tmp_path))
    assert r.returncode == 1 and "pass --leader HOST:PORT" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_leave_asks_a_leader_that_is_not_there(tmp_path):
    port = free_ports(1)[0]
    r = run_nanopipe("leave", "--rank", "1", "--leader", f"127.0.0.1:{port}", "--config-dir", str(tmp_path))
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# POST /cluster/leave against the fake leader: the route's own checks


def test_the_leave_route_drains_through_the_leader(leader):
    from helpers import make_app
    web = make_app(leader, API_TOKEN="page-secret")
    assert web.post("/cluster/leave", json={"rank": 2}).status_code == 401, "the API token is required"
    r = web.post("/cluster/leave", json={"rank": 2}, headers={"Authorization": "Bearer page-secret"})
    assert r.status_code == 200 and r.get_json() == {"left": 2, "message": "rank 2 drained: ring 0 -> 1 -> 0"}
    assert leader.calls == [{"leave": 2}]


@pytest.mark.parametrize("body, says", [({"rank": "2"}, "rank: must be a worker's rank"),
                                        ({"rank": 0}, "rank: must be a worker's rank"),
                                        ({"rank": True}, "rank: must be a worker's rank"),
                                        ({"rnak": 2}, "unknown field 'rnak' (did you mean 'rank'?)")])
def test_the_leave_route_refuses_a_bad_rank(leader, body, says):
    from helpers import make_app
    r = make_app(leader).post("/cluster/leave", json=body)
    assert r.status_code == 400 and says in r.get_json()["error"], r.get_json()
    assert leader.calls == [], "a bad request reached the leader"


def test_the_leave_route_passes_the_leaders_refusal_and_absence(leader):
    from helpers import make_app

    from nanopipe.cluster.leader_client import ClientError
    leader.fail = ClientError("rank 2 (pi1) is not in the cluster: drained by `nanopipe leave`", "invalid")
    r = make_app(leader).post("/cluster/leave", json={"rank": 2})
    assert r.status_code == 400 and r.get_json()["error"].startswith("rank 2 (pi1) is not in the cluster"), r.get_json()
    leader.down = True
    r = make_app(leader).post("/cluster/leave", json={"rank": 2})
    assert r.status_code == 503 and "unreachable" in r.get_json()["error"], r.get_json()


# ---------------------------------------------------------------------------------------------
# a node whose new plan gives it fewer of its blocks loads nothing


def test_a_stage_narrows_to_fewer_of_its_blocks_sharing_their_arrays(tiny_weights):
    from nanopipe.weights import load_stage
    whole = load_stage(tiny_weights, 0, 4, rank0=True)
    part = whole.narrowed(0, 2)
    assert (part.lo, part.hi, len(part.blocks), part.has_head) == (0, 2, 2, True)
    assert part.blocks[1] is whole.blocks[1] and part.wte is whole.wte, "narrowing copied what it holds"
    loaded = load_stage(tiny_weights, 0, 2, rank0=True)
    assert part.nbytes == loaded.nbytes
    with pytest.raises(ValueError, match="a stage of blocks 0..3 cannot narrow to 2..4"):
        whole.narrowed(2, 5)
    assert whole.narrowed(2, 4).blocks == whole.blocks[2:4] and not whole.holds(3, 3)
