"""The web app's /config, /health, /reconnect and /metrics, its settings and the `nanopipe web`
command; and the fake leader checked against the real client.

The fake leader (helpers.FakeLeader, fixtures `leader`, `app`, `client` in conftest.py) stands in for
the cluster behind the app's CLIENT_FACTORY: it streams scripted tokens, answers status, and can be
switched to "down", "fails mid-reply" or "refuses the request", so each error path is checked without
starting processes.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from helpers import CONFIG_DIR, FakeClient, FakeLeader, parse_metrics, signature_drift

from nanopipe.cluster.leader_client import ClientError, LeaderClient
from nanopipe.web.api import dial_leader
from nanopipe.web.app import settings_from_configs
from nanopipe.web.metrics import WebMetrics, render_metrics

# ---------------------------------------------------------------------------------------------
# /config, /health, /reconnect


def test_config_lists_defaults_model_and_nodes(client):
    r = client.get("/config")
    assert r.status_code == 200
    c = r.json
    assert (c["max_tokens"], c["temperature"], c["top_k"], c["top_p"], c["active_strategy"]) == (50, 0.8, 50, 0.9,
                                                                                                 "top_p")
    assert c["strategies"]["top_k"] == {"temperature": 0.8, "top_k": 40, "top_p": 1.0}
    assert c["strategy_uses"]["greedy"] == []
    assert c["model"] == "fake-gpt2" and c["n_ctx"] == 64 and c["leader_up"] is True
    assert [(n["rank"], n["host"], n["layers"]) for n in c["nodes"]] == [(0, "mini1", [0, 3]), (1, "mini2", [4, 7]),
                                                                         (2, "pi1", [8, 11])]


def test_health_is_200_when_every_node_is_up(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json["ok"] is True
    assert r.json["leader"] == {"addr": "10.0.0.1:65432", "reachable": True, "authorized": True, "ready": True,
                                "model": "fake-gpt2"}
    assert [(n["rank"], n["host"], n["layers"], n["status"]) for n in r.json["nodes"]] == [
        (0, "mini1", [0, 3], "up"), (1, "mini2", [4, 7], "up"), (2, "pi1", [8, 11], "up")]
    assert r.json["nodes"][2]["last_seen_s"] == 0.7


def test_health_is_503_naming_the_node_that_is_down(client, leader):
    leader.nodes[2].update(status="down", last_seen_s=41.0)
    r = client.get("/health")
    assert r.status_code == 503 and r.json["ok"] is False
    assert r.json["error"] == "not ready: rank 2 (pi1) is down"
    assert r.json["nodes"][2]["last_seen_s"] == 41.0


def test_reconnect_redials_with_retries_and_reports(client, leader):
    r = client.post("/reconnect")
    assert r.status_code == 200
    assert r.json == {"ok": True, "leader": "10.0.0.1:65432", "model": "fake-gpt2", "ready": True, "nodes_up": 3,
                      "nodes": 3}
    assert leader.connections[-1].attempts == 3 and leader.connections[-1].closed.is_set()


@pytest.mark.parametrize("method, path, body", [
    ("post", "/chat", {"text": "Hello"}),
    ("post", "/chat", {"text": "Hello", "stream": True}),
    ("post", "/v1/completions", {"prompt": "Hello"}),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ("get", "/health", None),
    ("post", "/reconnect", None),
])
def test_leader_down_is_a_503_with_a_clear_message(client, leader, method, path, body):
    leader.down = True
    r = getattr(client, method)(path, json=body)
    assert r.status_code == 503 and r.mimetype == "application/json"
    message = r.json["error"]["message"] if path.startswith("/v1/") else r.json["error"]
    assert "leader at 10.0.0.1:65432 is unreachable" in message
    assert message.count("nanopipe serve --rank 0") == 1, message      # the hint once, not twice


def test_leader_down_still_serves_config_metrics_and_models(client, leader):
    leader.down = True
    c = client.get("/config")
    assert c.status_code == 200 and c.json["leader_up"] is False and c.json["nodes"] == []
    assert c.json["active_strategy"] == "top_p" and "unreachable" in c.json["leader_error"]
    m = client.get("/metrics")
    assert m.status_code == 200 and parse_metrics(m.get_data(as_text=True))[("nanopipe_leader_up", ())] == 0
    assert client.get("/v1/models").json["data"][0]["id"] == "gpt2"


def test_a_cluster_failure_without_streaming_is_a_503(client, leader):
    leader.fail = ClientError("rank 1 (mini2) did not come back within rejoin_grace_s=30s", "cluster")
    r = client.post("/chat", json={"text": "Hello"})
    assert r.status_code == 503 and "rank 1 (mini2)" in r.json["error"]


# ---------------------------------------------------------------------------------------------
# /metrics


def test_metrics_count_requests_tokens_times_and_nodes(client, leader):
    for stream in (False, True):
        client.post("/chat", json={"text": "Hello", "max_tokens": 3, "stream": stream})
    client.post("/chat", json={"text": ""})                                    # one invalid request
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    m = parse_metrics(r.get_data(as_text=True))
    assert m[("nanopipe_web_requests_total", (("route", "chat"),))] == 2
    assert m[("nanopipe_web_tokens_total", ())] == 6
    assert m[("nanopipe_web_errors_total", (("kind", "invalid"),))] == 1
    assert m[("nanopipe_web_ttft_seconds_count", ())] == 2                     # one first token per reply
    assert m[("nanopipe_web_time_per_token_seconds_count", ())] == 4           # and the gaps between the others
    assert m[("nanopipe_web_ttft_seconds_bucket", (("le", "+Inf"),))] == 2
    assert m[("nanopipe_node_compute_seconds_total", (("rank", "0"),))] == pytest.approx(2 * 6.0 / 1000)
    assert m[("nanopipe_node_transit_seconds_total", (("rank", "0"),))] == pytest.approx(2 * 2.0 / 1000)
    assert m[("nanopipe_node_compute_seconds_total", (("rank", "2"),))] == pytest.approx(2 * 4.0 / 1000)
    assert m[("nanopipe_node_rss_bytes", (("rank", "1"), ("host", "mini2")))] == int(300.5 * 1024 * 1024)
    assert m[("nanopipe_node_up", (("rank", "2"), ("host", "pi1")))] == 1
    assert m[("nanopipe_live_sessions", ())] == 1 and m[("nanopipe_leader_up", ())] == 1
    assert m[("nanopipe_leader_tokens_total", ())] == 99


def test_histogram_buckets_are_cumulative():
    m = WebMetrics()
    for v in (0.005, 0.01, 0.05, 3.0):          # 0.01 belongs in le="0.01": buckets are "less or equal"
        m.observe_token(v, first=True)
    got = parse_metrics(render_metrics(m, None))
    ttft = "nanopipe_web_ttft_seconds"
    assert [got[(f"{ttft}_bucket", (("le", le),))] for le in ("0.01", "0.1", "+Inf")] == [2, 3, 4]
    assert got[(f"{ttft}_sum", ())] == pytest.approx(3.065) and got[(f"{ttft}_count", ())] == 4


def test_each_app_has_its_own_metrics():
    """A registry per app: two apps in one process count apart, and neither touches the global one."""
    import prometheus_client
    a, b = WebMetrics(), WebMetrics()
    a.count_request("chat")
    assert parse_metrics(render_metrics(a, None))[("nanopipe_web_requests_total", (("route", "chat"),))] == 1
    assert parse_metrics(render_metrics(b, None))[("nanopipe_web_requests_total", (("route", "chat"),))] == 0
    assert prometheus_client.REGISTRY.get_sample_value("nanopipe_web_requests_total", {"route": "chat"}) is None


# ---------------------------------------------------------------------------------------------
# Settings and the `nanopipe web` command


def test_settings_from_the_repository_configs():
    s = settings_from_configs(str(CONFIG_DIR))
    assert s["LEADER"] == "127.0.0.1:65432" and s["MODEL_NAME"] == "gpt2"
    assert s["MODEL_DEFAULTS"]["active_decoding_strategy"] == "top_p"
    assert s["CORS_ORIGINS"] == () and s["API_TOKEN"] is None


def test_web_command_serves_on_localhost_by_default(monkeypatch):
    import nanopipe.tools.cli
    import nanopipe.web.server
    from nanopipe.tools.cli import main
    seen = {}
    monkeypatch.setattr(nanopipe.web.server, "serve", lambda app, host, port, **kw: seen.update(
        host=host, port=port, app=app, **kw))
    # nothing is served here: whether port 8000 happens to be taken on this machine is not the question
    monkeypatch.setattr(nanopipe.tools.cli, "check_port_free", lambda host, port: None)
    r = CliRunner().invoke(main, ["web", "--config-dir", str(CONFIG_DIR)])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"], seen["grace_s"]) == ("127.0.0.1", 8000, 10.0)
    assert seen["app"].config["LEADER"] == "127.0.0.1:65432"
    assert "http://127.0.0.1:8000/" in r.output and "WARNING" not in r.output

    r = CliRunner().invoke(main, ["web", "--config-dir", str(CONFIG_DIR), "--host", "0.0.0.0", "--port", "9000",
                                  "--leader", "10.0.0.5:7000"])
    assert r.exit_code == 0 and (seen["host"], seen["port"]) == ("0.0.0.0", 9000)
    assert seen["app"].config["LEADER"] == "10.0.0.5:7000" and "without api_token" in r.output


def test_web_command_rejects_a_malformed_leader_address():
    from nanopipe.tools.cli import main
    r = CliRunner().invoke(main, ["web", "--config-dir", str(CONFIG_DIR), "--leader", "nohost"])
    assert r.exit_code == 1 and "--leader: address 'nohost' must be HOST:PORT" in r.output


# ---------------------------------------------------------------------------------------------
# The fake leader every test above runs against: shaped like the real client, so it cannot drift


def test_the_fake_leader_client_has_the_real_signatures():
    # the factory: the app calls CLIENT_FACTORY as it calls web.api.dial_leader
    drift = signature_drift(FakeLeader.connect, dial_leader)
    # the connection: every public method the real client has, with the same parameters
    public = sorted(name for name in vars(LeaderClient) if not name.startswith("_") and name != "connect")
    assert public, "LeaderClient has no public methods?"
    for name in public:
        assert callable(getattr(FakeClient, name, None)), f"FakeClient has no {name}(), LeaderClient has"
        drift += signature_drift(getattr(FakeClient, name), getattr(LeaderClient, name))
    extra = sorted(name for name in vars(FakeClient) if not name.startswith("_") and name not in public)
    assert not extra, f"FakeClient has methods LeaderClient does not: {extra}"
    assert not drift, "the fake leader no longer matches the real one:\n  " + "\n  ".join(drift)
    # and what the app reads of a connection besides its methods
    fake = FakeLeader().connect("10.0.0.1:65432", None)
    assert isinstance(fake.welcome, dict) and fake.addr == "10.0.0.1:65432"
