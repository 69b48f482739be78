"""The guide's log lines through the standard logging module.

The SmolCluster guide tells users what a healthy start looks like ("Server Output", "Worker
Output") and its troubleshooting says to look for those lines. A real `nanopipe serve` and real
`nanopipe join` processes must print them, in the guide's order, with the guide's prefixes
`[LEADER] ` and `[WORKER-R] `; nanopipe's own detail may follow a guide line or come between them.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import log_of, status, wait_until

from nanopipe.config import load_cluster_config
from nanopipe.tools.localcluster import LocalCluster, write_configs


def in_order(lines: list, expected: list) -> list:
    """The expected line starts that are missing, or out of order, in `lines` ([] when all are there)."""
    at = 0
    for i, want in enumerate(expected):
        hit = next((j for j in range(at, len(lines)) if lines[j].startswith(want)), None)
        if hit is None:
            return expected[i:]
        at = hit + 1
    return []


def wait_in_order(cl: LocalCluster, rank: int, expected: list, timeout: float = 15.0):
    """Poll rank's log until every expected line is there in order (a worker logs its last line
    just after the leader sees it ready)."""
    wait_until(f"rank {rank}'s log holding, in the guide's order, {expected}",
               lambda: not in_order(log_of(cl, rank).splitlines(), expected), timeout,
               detail=lambda: f"missing: {in_order(log_of(cl, rank).splitlines(), expected)}\n{log_of(cl, rank)}")


@pytest.fixture(scope="module")
def layers(cluster) -> dict:
    """rank -> (lo, hi), half-open, the layers each node of conftest's 3-node cluster holds (the
    status reports them [first, last], inclusive)."""
    return {n["rank"]: (n["layers"][0], n["layers"][1] + 1) for n in status(cluster)["nodes"]}


def test_a_real_leader_prints_the_guides_server_output_in_order(cluster, layers, tiny_weights):
    ip, port = "127.0.0.1", cluster.cluster["port"]
    lo, hi = layers[0]
    wait_in_order(cluster, 0, [
        f"[LEADER] Server will bind to IP: {ip}, Port: {port}",
        "[LEADER] Checking for model weights (local)...",
        f"[LEADER] Model weights ready at: {os.path.abspath(tiny_weights)}",
        "[LEADER] Model initialized on device: cpu (numpy ",
        "[LEADER] Loading server's share of model layers (rank 0)...",
        f"[LEADER] Server loaded {hi - lo} layers",
        f"[LEADER] Server listening on {ip}:{port}",
    ])


@pytest.mark.parametrize("rank", [1, 2])
def test_a_real_worker_prints_the_guides_worker_output_in_order(cluster, layers, tiny_weights, rank):
    server = f"127.0.0.1:{cluster.cluster['port']}"
    lo, hi = layers[rank]
    tag = f"[WORKER-{rank}]"
    expected = [
        f"{tag} Worker {rank} starting. Connecting to server at {server}",
        f"{tag} Model initialized on device: cpu (numpy ",
        f"{tag} Checking for model weights (local)...",
        f"{tag} Model weights ready at: {os.path.abspath(tiny_weights)}",
        f"{tag} Loaded {hi - lo} layers for worker {rank}",
        f"{tag} Connected to server at {server} on attempt ",
        f"{tag} Registering as worker {rank} with server...",
        f"{tag} Received start_inference command from server.",
        f"{tag} Waiting for generation requests...",
    ]
    wait_in_order(cluster, rank, expected)
    connected = next(line for line in log_of(cluster, rank).splitlines() if line.startswith(expected[5]))
    assert re.fullmatch(re.escape(expected[5]) + r"[1-9]\d*", connected), connected


def test_in_order_finds_what_is_missing_or_out_of_order():
    lines = ["[LEADER] a", "[LEADER] x", "[LEADER] b 2 layers (detail)"]
    assert in_order(lines, ["[LEADER] a", "[LEADER] b 2 layers"]) == []
    assert in_order(lines, ["[LEADER] b", "[LEADER] a"]) == ["[LEADER] a"]
    assert in_order(lines, ["[LEADER] a", "[LEADER] c"]) == ["[LEADER] c"]


# ---------------------------------------------------------------------------------------------
# the logging module: caplog, levels, -v / -q


def test_a_worker_logs_through_logging_with_the_guides_prefix(tiny_weights, tmp_path, caplog):
    """In-process, caplog sees a worker's records: it loads its layers, then fails to reach a
    leader that is not there, at ERROR level."""
    from nanopipe.cluster.worker import Worker
    write_configs(str(tmp_path), weights=tiny_weights, nodes=2, n_layer=4)
    cc = load_cluster_config(str(tmp_path))
    worker = Worker(cc, 1, tiny_weights, max_attempts=1, layers=(2, 4))
    with caplog.at_level(logging.INFO, logger="nanopipe"), pytest.raises(SystemExit):
        worker.run()
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records[0][:2] == ("nanopipe.cluster.worker", logging.INFO)
    assert records[0][2].startswith("[WORKER-1] Loaded 2 layers for worker 1 (layers 2-3, "), records
    assert records[-1][1] == logging.ERROR
    assert records[-1][2].startswith(f"[WORKER-1] cannot reach server at 127.0.0.1:{cc.leader.port}"), records


@pytest.mark.parametrize("args, level", [([], logging.INFO), (["-v"], logging.DEBUG), (["-q"], logging.WARNING),
                                         (["-qq"], logging.ERROR), (["-v", "-q"], logging.INFO)])
def test_v_and_q_on_the_nanopipe_group_set_the_log_level(args, level, tmp_path):
    from nanopipe.tools.cli import main
    result = CliRunner().invoke(main, args + ["init-weights", str(tmp_path / "w.safetensors"), "--n-layer", "1",
                                              "--n-embd", "8", "--n-head", "2", "--n-ctx", "8", "--n-vocab", "16"])
    assert result.exit_code == 0, result.output
    assert logging.getLogger("nanopipe").level == level


def test_q_leader_logs_warnings_only(tiny_weights, tmp_path):
    """`nanopipe -q serve`: the no-auth_token WARNING still shows, the guide's INFO lines do not."""
    cluster = write_configs(str(tmp_path), weights=tiny_weights, nodes=2, n_layer=4)
    cmd = [sys.executable, "-m", "nanopipe", "-q", "serve", "--config-dir", str(tmp_path),
           "--weights", tiny_weights]
    log_path = tmp_path / "leader.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def warned():
            assert proc.poll() is None, log_path.read_text()
            return "WARNING: no auth_token set" in log_path.read_text()
        wait_until("the leader's WARNING", warned, 30, detail=log_path.read_text)
    finally:
        proc.terminate()
        proc.wait(10)
    text = log_path.read_text()
    assert "[LEADER] WARNING: no auth_token set" in text, text
    assert "Server listening" not in text and "Checking for model weights" not in text, text
    assert "linear:" not in text and "Model initialized" not in text, text      # every INFO line, kernels too
    assert str(cluster["port"]) not in text, text
