"""Clients of a TLS cluster: everything that dials the leader pins the cluster's certificate.

A cluster with `tls_cert` / `tls_key` in cluster_config.yaml speaks TLS on every link, so the leader
answers a plaintext client with nothing at all. Each way in must therefore pass the cluster's
tls_cert as the CA it checks the leader against:

    LocalCluster.client() / wait_ready       tls_ca = cluster_extra["tls_cert"]
    nanopipe generate / trace --leader       tls_ca = tls_cert of --config-dir's cluster_config.yaml
    the web app (settings_from_configs)      LEADER_TLS_CA, passed on by dial_leader
"""
from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from helpers import self_signed_cert

from nanopipe.decoding import SamplingParams
from nanopipe.tokenizer import get_tokenizer
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.app import create_app, settings_from_configs

TEXT = "Hello world, my name"
GREEDY = SamplingParams("greedy", max_tokens=8)


@pytest.fixture(scope="module")
def tls_cluster(tiny_weights, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tls"))
    cert, key = self_signed_cert(folder)
    cl = LocalCluster(tiny_weights, nodes=3, workdir=folder, ready_timeout=30,
                      cluster_extra={"tls_cert": cert, "tls_key": key})
    with cl:                # start() waits for the ring through cl.client(): already over TLS
        yield cl


@pytest.fixture(scope="module")
def reference(tiny_engine):
    return tiny_engine.generate(get_tokenizer().encode(TEXT), GREEDY)["token_ids"]


def test_local_cluster_client_speaks_tls(tls_cluster, reference):
    with tls_cluster.client() as c:
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        got = c.generate(get_tokenizer().encode(TEXT), GREEDY)
    assert got["token_ids"] == reference


def test_cli_generate_leader_over_tls(tls_cluster, reference):
    r = CliRunner().invoke(main, ["generate", TEXT, "--json", "--leader", tls_cluster.leader_addr,
                                  "--config-dir", tls_cluster.config_dir, "--strategy", "greedy", "--max-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["token_ids"] == reference


def test_cli_trace_leader_over_tls(tls_cluster, reference):
    r = CliRunner().invoke(main, ["trace", TEXT, "--json", "--leader", tls_cluster.leader_addr,
                                  "--config-dir", tls_cluster.config_dir, "--max-tokens", "2"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [t["id"] for t in report["tokens"]] == reference[:2]       # the cluster's default is greedy
    assert [h["rank"] for h in report["tokens"][0]["hops"]] == [0, 1, 2]


def test_web_app_dials_the_leader_over_tls(tls_cluster, reference):
    settings = settings_from_configs(tls_cluster.config_dir)
    assert settings["LEADER_TLS_CA"] == tls_cluster.tls_ca
    client = create_app(dict(settings, TESTING=True)).test_client()
    health = client.get("/health")
    assert health.status_code == 200, health.get_json()
    assert [n["status"] for n in health.get_json()["nodes"]] == ["up", "up", "up"]
    chat = client.post("/chat", json={"text": TEXT, "decoding_strategy": "greedy", "max_tokens": 8})
    assert chat.status_code == 200, chat.get_json()
    assert chat.get_json()["response"] == get_tokenizer().decode(reference)


def test_concurrent_chats_over_tls_never_cross_and_the_leader_survives(tls_cluster, tiny_engine):
    """Many full-duplex TLS connections at once: each client's sender and reader threads on the
    leader, the workers' heartbeats, the ring. (CI once lost the leader to two threads inside one
    SSL object; see tests/test_tls_stream.py.)"""
    tok = get_tokenizer()
    prompts = [tok.encode(f"Chat number {i} says") for i in range(6)]
    params = [SamplingParams("greedy", max_tokens=12), SamplingParams("sampling", max_tokens=12, temperature=0.9,
                                                                     seed=7)]
    expected = {(i, j): tiny_engine.generate(p, params[j])["token_ids"]
                for i, p in enumerate(prompts) for j in range(2)}
    got, errors = {}, []

    def chat(i, j):
        try:
            with tls_cluster.client(timeout=30) as c:
                got[i, j] = c.generate(prompts[i], params[j])["token_ids"]
        except Exception as e:  # reported below
            errors.append(f"chat {i}/{j}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=chat, args=key) for key in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == expected
    assert all(p.poll() is None for p in tls_cluster.procs.values()), tls_cluster.logs()
    assert "Traceback" not in tls_cluster.logs()
