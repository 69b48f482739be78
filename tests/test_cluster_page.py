"""GET /cluster, the JSON the page's Cluster view draws and `plan --from-cluster URL` reads: from a
scripted leader status (every node status the page knows), guarded like the other API routes, and
against a real 3-node cluster whose worker dies, stays away past the grace, and comes back."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from helpers import make_app, serve_app, wait_until

from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster, free_ports
from nanopipe.web.app import create_app, settings_from_configs
from nanopipe.web.cluster_view import TokenRate, page_status

NOW = 1_800_000_000.0
GRACE_S = 10.0


def scripted_status() -> dict:
    """A leader's status (cluster/leader.py status()) with one node in each state the page tells apart."""
    def worker(rank, status, **kw):
        return {"rank": rank, "host": f"pi{rank}", "layers": [rank, rank], "status": status, "addr": f"10.0.0.{rank}:1",
                "rss_mb": 100.0 + rank, "capacity": {"name": f"pi{rank}", "memory_mb": 1000.0, "speed_gbps": 2.0,
                                                     "speed8_gbps": 1.0, "source": "measured"},
                "blas": "OpenBLAS 0.3.21", "transit_ms": 0.4, "last_seen_s": 0.2, "down_s": None, **kw}
    nodes = [
        {**worker(0, "up"), "host": "mini", "layers": [0, 0], "addr": None, "transit_ms": 0.3},
        worker(1, "up", heads=[0, 5]),                      # a stage split by heads says which
        worker(2, "down", down_s=3.0),                      # died 3 s ago: within the grace
        worker(3, "down", down_s=30.0),                     # died 30 s ago: past it
        worker(4, "left out", layers=[4, 3], excluded="pi4: slower than the rest"),
        worker(5, "down"),                                  # never came (no died event)
        worker(6, "joining"),                               # died, and is back, loading
        worker(7, "joining"),                               # its first time
    ]
    log = [{"t": NOW - 60, "kind": "joined", "rank": 1, "text": "Worker 1 (pi1) joined from 10.0.0.1:1"},
           {"t": NOW - 40, "kind": "died", "rank": 6, "text": "Worker 6 (pi6) is down: it went"},
           {"t": NOW - 30, "kind": "died", "rank": 3, "text": "Worker 3 (pi3) is down: it went"},
           {"t": NOW - 3, "kind": "died", "rank": 2, "text": "Worker 2 (pi2) is down: it went"}]
    stages = [{"rank": 0, "host": "mini", "layers": [0, 0], "predicted_ms": 4.0, "measured_ms": 5.0, "samples": 30,
               "off": 0.25},
              {"rank": 1, "host": "pi1", "layers": [1, 1], "predicted_ms": 8.0, "measured_ms": None, "samples": 0,
               "off": None}]
    return {"model": "gpt2", "ready": False, "nodes": nodes, "live_sessions": 2, "requests": 5, "tokens": 120,
            "errors": 0, "n_ctx": 1024, "uptime_s": 99.0, "now": NOW, "rejoin_grace_s": GRACE_S,
            "events": {"joined": 1, "rejoined": 0, "left": 3, "planned": 1, "slow_stage": 0}, "event_log": log,
            "placement": {"partition": "auto", "objective": "throughput", "note": "auto: balanced by speed",
                          "pending": False, "stages": stages, "predicted_tok_s_1": 20.5, "predicted_tok_s_8": 61.0}}


@pytest.fixture
def scripted(leader):
    leader.status = scripted_status
    return leader


def test_every_node_status_the_page_shows(scripted):
    r = make_app(scripted).get("/cluster")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.json
    got = {n["rank"]: n["status"] for n in body["nodes"]}
    assert got == {0: "up", 1: "up", 2: "rejoining", 3: "gone", 4: "standby", 5: "joining", 6: "rejoining",
                   7: "joining"}, got
    assert body["ok"] is False and body["ready"] is False and body["model"] == "gpt2"
    assert body["ring"] == [0, 1, 2, 3, 5, 6, 7], "standby holds no layers: not in the ring"
    assert body["rejoin_grace_s"] == GRACE_S
    standby = body["nodes"][4]
    assert standby["standby_reason"] == "pi4: slower than the rest"


def test_a_node_says_what_the_page_shows(scripted):
    nodes = make_app(scripted).get("/cluster").json["nodes"]
    n0, n1 = nodes[0], nodes[1]
    assert n0["host"] == "mini" and n0["layers"] == [0, 0]
    assert n0["memory_mb"] == {"used": 100.0, "usable": 1000.0}
    assert n0["blas"] == "OpenBLAS 0.3.21"
    assert n0["ms_per_step"] == {"measured": 5.0, "predicted": 4.0, "off": 0.25, "samples": 30}
    assert n0["tokens_per_s"] == 200.0          # 1000 ms / 5 ms a step: what this stage alone keeps up with
    assert n0["transit_ms"] == 0.3
    assert n1["ms_per_step"]["measured"] is None and n1["tokens_per_s"] is None, "not measured yet: not made up"
    assert n1["heads"] == [0, 5], "a split stage's heads are shown"
    assert "heads" not in n0, "a whole stage has no heads field"
    assert "split" not in n0 and "split" not in n1, "no two nodes hold the same layers"
    assert nodes[2]["down_s"] == 3.0 and nodes[2]["leader_status"] == "down"


def test_a_stage_split_between_nodes_is_marked(leader):
    """Two nodes with the very same layers share that stage (each a part of the heads)."""
    st = scripted_status()
    st["nodes"] = [dict(n) for n in st["nodes"][:3]]
    st["nodes"][2].update(layers=[1, 1], status="up")
    leader.status = lambda: st
    nodes = make_app(leader).get("/cluster").json["nodes"]
    assert "split" not in nodes[0]
    assert nodes[1]["split"] == {"members": [1, 2], "member": 0}
    assert nodes[2]["split"] == {"members": [1, 2], "member": 1}


def test_the_cluster_figures_and_events(scripted):
    body = make_app(scripted).get("/cluster").json
    assert body["tokens_per_s"]["predicted_1"] == 20.5 and body["tokens_per_s"]["predicted_8"] == 61.0
    # one stream measured: not while a ring stage has no measured time
    assert body["tokens_per_s"]["one_stream_measured"] is None
    assert body["plan"]["note"] == "auto: balanced by speed"
    assert [(e["kind"], e["rank"], e["ago_s"]) for e in body["events"]] == [
        ("joined", 1, 60.0), ("died", 6, 40.0), ("died", 3, 30.0), ("died", 2, 3.0)]
    assert body["event_counts"]["left"] == 3


@pytest.mark.parametrize("said, died, down_s, expected", [
    ("up", False, None, "up"), ("left out", False, None, "standby"), ("joining", False, None, "joining"),
    ("joining", True, None, "rejoining"), ("down", True, 3.0, "rejoining"), ("down", True, 12.0, "gone"),
    ("down", False, None, "joining"), ("down", True, None, "rejoining"), ("draining", False, None, "draining")])
def test_page_status(said, died, down_s, expected):
    assert page_status(said, died, down_s, 10.0) == expected


def test_tokens_per_second_now():
    rate = TokenRate()
    assert rate.add(100.0, 50) is None, "one sample: no rate yet"
    assert rate.add(100.5, 55) is None, "half a second: too short to say"
    assert rate.add(102.0, 74) == 12.0          # 24 tokens in 2 s
    assert rate.add(103.0, 3) is None, "the count went down (a new leader): start over"
    assert rate.add(105.0, 23) == 10.0
    for t in range(106, 130):                    # a long quiet spell: the window moves on
        rate.add(float(t), 23)
    assert rate.add(130.0, 23) == 0.0
    assert rate.add(131.0, None) is None


def test_cluster_needs_the_api_token(leader):
    app = make_app(leader, API_TOKEN="s3cret")
    r = app.get("/cluster")
    assert r.status_code == 401 and "API token" in r.json["error"], r.json
    r = app.get("/cluster", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and [n["status"] for n in r.json["nodes"]] == ["up", "up", "up"], r.json


def test_cluster_when_the_leader_is_down(leader):
    leader.down = True
    r = make_app(leader).get("/cluster")
    assert r.status_code == 503
    assert r.json["ok"] is False and r.json["leader"]["reachable"] is False and r.json["nodes"] == []
    assert "unreachable" in r.json["error"], r.json


# ---------------------------------------------------------------------------------------------
# A real cluster: 3 processes on 127.0.0.1; a worker dies, stays away past the grace, comes back

REAL_GRACE_S = 15.0


@pytest.fixture(scope="module")
def real(tiny_weights):
    with LocalCluster(tiny_weights, nodes=3, ready_timeout=90, cluster_extra={"rejoin_grace_s": REAL_GRACE_S}) as cl:
        app = create_app(settings_from_configs(cl.config_dir, leader=cl.leader_addr))
        url, srv = serve_app(app)
        yield cl, app.test_client(), url
        srv.shutdown()


def cluster_json(web) -> dict:
    r = web.get("/cluster")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.json


def wait_cluster(web, what: str, ok, timeout: float) -> dict:
    """Poll GET /cluster until ok(body); return that body."""
    seen = {}

    def check():
        seen["body"] = cluster_json(web)
        return seen["body"] if ok(seen["body"]) else None
    return wait_until(what, check, timeout, interval=0.25, detail=lambda: seen.get("body"))


def test_real_cluster_shows_each_node_measured(real):
    cl, web, _ = real
    for prompt in ("The three small computers on my desk", "Once upon a time"):
        r = web.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.get_data(as_text=True)
    body = wait_cluster(web, "every stage measured",
                        lambda b: all(n["ms_per_step"]["measured"] is not None for n in b["nodes"]), 30)
    assert body["ok"] and body["ready"] and body["ring"] == [0, 1, 2], body
    for rank, n in enumerate(body["nodes"]):
        print(f"rank {rank}: {n['ms_per_step']} transit {n['transit_ms']} ms, memory {n['memory_mb']}")
        assert n["status"] == "up" and n["host"] == f"node{rank}" and n["layers"], n
        assert n["memory_mb"]["used"] > 10 and n["memory_mb"]["usable"] > n["memory_mb"]["used"], n
        assert n["blas"], n
        # every hop of the ring has a link transit, rank 0's to worker 1 and the last worker's back to rank 0
        assert n["transit_ms"] is not None and n["transit_ms"] > 0, n
        assert n["ms_per_step"]["predicted"] > 0 and n["tokens_per_s"] > 0, n
    assert body["tokens_per_s"]["one_stream_measured"] > 0, body["tokens_per_s"]
    kinds = [e["kind"] for e in body["events"]]
    assert kinds[:2] == ["joined", "joined"] and "ring_up" in kinds, kinds


def test_real_cluster_worker_dies_is_gone_after_the_grace_and_comes_back(real):
    cl, web, _ = real
    cl.kill_rank(2)
    body = wait_cluster(web, "rank 2 not up", lambda b: b["nodes"][2]["status"] != "up", 30)
    assert body["nodes"][2]["status"] == "rejoining", body["nodes"][2]
    assert body["nodes"][2]["down_s"] < REAL_GRACE_S and body["ok"] is False
    died = [e for e in body["events"] if e["kind"] == "died"]
    assert len(died) == 1 and died[0]["rank"] == 2 and "Worker 2 (node2) is down" in died[0]["text"], died

    body = wait_cluster(web, "rank 2 gone", lambda b: b["nodes"][2]["status"] == "gone", REAL_GRACE_S + 30)
    assert body["nodes"][2]["down_s"] > REAL_GRACE_S, body["nodes"][2]

    def ring_up_after_rejoin(b):    # all up can be seen a moment before the ring_up event is written
        kinds = [e["kind"] for e in b["events"]]
        return "rejoined" in kinds and "ring_up" in kinds[kinds.index("rejoined"):]

    cl.start_rank(2)            # the cluster re-planned over ranks 0 and 1 (ok without it); back, it is planned in
    body = wait_cluster(web, "rank 2 back up", lambda b: b["ok"] and [n["status"] for n in b["nodes"]] == ["up"] * 3
                        and ring_up_after_rejoin(b), 90)
    assert [n["status"] for n in body["nodes"]] == ["up", "up", "up"]
    kinds = [e["kind"] for e in body["events"]]
    assert kinds.index("rejoined") > kinds.index("died") and "ring_up" in kinds[kinds.index("rejoined"):], kinds


def test_plan_from_cluster_reads_the_page_json(real):
    cl, web, url = real
    wait_cluster(web, "the ring up", lambda b: b["ok"], 90)
    out = CliRunner().invoke(main, ["plan", "--from-cluster", url, "--config-dir", cl.config_dir])
    assert out.exit_code == 0, out.output
    print(out.output)
    for rank in range(3):
        assert f"node{rank}" in out.output
    assert out.output.count("measured") >= 3, "each node's measured speed and memory"
    assert "BLAS  node1" in out.output and "Split: " in out.output


def test_plan_from_cluster_says_what_is_wrong_with_the_url(leader, tmp_path):
    unused = free_ports(1)[0]
    out = CliRunner().invoke(main, ["plan", "--from-cluster", f"http://127.0.0.1:{unused}",
                                    "--config-dir", str(tmp_path)])
    assert out.exit_code != 0 and "cannot reach it" in out.output and "nanopipe web" in out.output, out.output
    assert "Traceback" not in out.output

    url, srv = serve_app(create_app({"CLIENT_FACTORY": leader.connect, "API_TOKEN": "s3cret", "MODEL_DEFAULTS": {}}))
    try:
        out = CliRunner().invoke(main, ["plan", "--from-cluster", url, "--config-dir", str(tmp_path)])
        assert out.exit_code != 0 and "HTTP 401" in out.output and "NANOPIPE_API_TOKEN" in out.output, out.output
        out = CliRunner(env={"NANOPIPE_API_TOKEN": "s3cret"}).invoke(
            main, ["plan", "--from-cluster", url, "--config-dir", str(tmp_path)])
        assert out.exit_code == 0, out.output
        assert "mini2" in out.output and "pi1" in out.output, out.output
    finally:
        srv.shutdown()


def test_a_node_the_plan_leaves_out_is_standby_and_plan_reads_the_same_either_way(tiny_weights):
    # as in test_placement_ring: node1 so slow (as configured) that the plan leaves it out
    cl = LocalCluster(tiny_weights, nodes=3, partition="auto", ready_timeout=90,
                      cluster_extra={"nodes": {"node0": {"speed_gbps": 0.01, "speed8_gbps": 0.01},
                                               "node2": {"speed_gbps": 10, "speed8_gbps": 10},
                                               "node1": {"speed_gbps": 0.001, "speed8_gbps": 0.001}}})
    with cl:
        app = create_app(settings_from_configs(cl.config_dir, leader=cl.leader_addr))
        body = wait_cluster(app.test_client(), "the ring up", lambda b: b["ready"], 60)
        assert [n["status"] for n in body["nodes"]] == ["up", "standby", "up"], body["nodes"]
        assert body["ok"] and body["ring"] == [0, 2], body
        assert "only slow the others" in body["nodes"][1]["standby_reason"], body["nodes"][1]
        assert body["nodes"][1]["layers"] is None

        url, srv = serve_app(app)
        try:
            by_url = CliRunner().invoke(main, ["plan", "--from-cluster", url, "--config-dir", cl.config_dir])
        finally:
            srv.shutdown()
        by_leader = CliRunner().invoke(main, ["plan", "--from-cluster", cl.leader_addr, "--config-dir", cl.config_dir])
        assert by_url.exit_code == 0 and by_leader.exit_code == 0, (by_url.output, by_leader.output)
        # no traffic in between: the same nodes, measurements, split and predictions, line for line
        assert by_url.output == by_leader.output
        assert "note: node1: left out" in by_url.output, by_url.output
