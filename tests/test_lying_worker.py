"""An authenticated worker that lies never breaks the leader's monitoring, nor anyone's answer.

A real leader (`nanopipe serve`, its own process) and, as rank 1, a real Worker running in this test
process with its frames altered on the way out:

    heartbeat   "decode_ms": "abc", a negative rss_mb: logged once with the rank and left out;
                STATUS (so /health) keeps answering, and the watchdog still drops it when it falls silent
    trace       a negative or NaN compute_ms: left out of the timings (logged once); the web app's
                generation answers 200 (no negative increment of a Prometheus counter)
    activations NaN rows: the sessions they belong to fail with a message naming rank 1, not
                "internal error in the leader"; the next clean request is answered
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import log_of, node, status, wait_log, wait_status, wait_until

from nanopipe.cluster.leader_client import ClientError
from nanopipe.cluster.wire import Msg, send_frame
from nanopipe.cluster.worker import Worker
from nanopipe.config import load_cluster_config
from nanopipe.decoding import SamplingParams
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.app import create_app, settings_from_configs

PROMPT = [15496, 995, 11, 616, 1438]
HEARTBEAT_S = 0.2


class LyingWorker(Worker):
    """A Worker whose outgoing frames are altered as its `lie` set says: "stats", "trace", "nan",
    "silent" (no heartbeats at all)."""

    lie: set = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        send = self.data.down.send              # every frame this stage passes on goes through it

        def lying_send(msg, meta, array):
            if msg is Msg.ACT and "trace" in self.lie:
                meta = dict(meta, trace=[dict(h, compute_ms=-5.0) for h in meta["trace"]])
            if msg is Msg.ACT and "nan" in self.lie:
                array = np.full_like(array, np.nan)
            return send(msg, meta, array)
        self.data.down.send = lying_send

    def _heartbeat(self, sock):
        while not self.stop_event.is_set():
            if "silent" not in self.lie:
                meta = {"rank": self.rank, "rss_mb": 12.5, "compute_ms": 1.0, "sessions": len(self.data.caches),
                        "decode_ms": 0.1, "decode_samples": 1, "kv_cache_bytes": 0}
                if "stats" in self.lie:
                    meta.update(decode_ms="abc", decode_samples=20, rss_mb=-3, kv_cache_bytes=float("nan"))
                try:
                    with self.control_lock:
                        send_frame(sock, Msg.STATS, meta)
                except OSError:
                    return
            self.stop_event.wait(HEARTBEAT_S)


@pytest.fixture(scope="module")
def liar(tiny_weights, tmp_path_factory):
    """(cluster, worker): the leader as a process, rank 1 as a LyingWorker in this process."""
    cl = LocalCluster(tiny_weights, nodes=2, workdir=str(tmp_path_factory.mktemp("liar")),
                      cluster_extra={"heartbeat_s": HEARTBEAT_S, "rejoin_grace_s": 30})
    cl.start_rank(0)
    try:
        cl.wait_leader(30)
        worker = LyingWorker(load_cluster_config(cl.config_dir), 1, tiny_weights, host=cl.host_of(1),
                             max_attempts=1)
        thread = threading.Thread(target=serve, args=(worker,), daemon=True, name="lying-worker")
        thread.start()
        cl.wait_ready(30)
        yield cl, worker
        worker.stop_event.set()
    finally:
        LyingWorker.lie = set()
        cl.stop()


def serve(worker):
    try:
        worker.run()
    except SystemExit:      # it could not reach the leader again: the cluster was stopped
        pass


def generate(cl, **fields):
    with cl.client(timeout=30) as c:
        return c.generate(PROMPT, SamplingParams("greedy", max_tokens=8), **fields)


def test_a_negative_compute_ms_in_a_trace_never_fails_a_web_generation(liar):
    cl, worker = liar
    app = create_app(settings_from_configs(cl.config_dir, leader=cl.leader_addr))
    LyingWorker.lie = {"trace"}
    try:
        r = app.test_client().post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.get_json()
        assert len(r.get_json()["choices"][0]["text"]) > 0
        wait_log(cl, 0, "Rank 1 reported compute_ms -5.0 in a trace")
        metrics = app.test_client().get("/metrics").get_data(as_text=True)
        assert 'nanopipe_node_compute_seconds_total{rank="1"}' not in metrics, "a lying hop's time was counted"
        result = generate(cl, trace=True)
        assert "1" not in result["node_ms"] and len(result["token_ids"]) == 8
    finally:
        LyingWorker.lie = set()


def test_nan_activations_fail_their_session_naming_the_rank(liar):
    cl, worker = liar
    LyingWorker.lie = {"nan"}
    try:
        with pytest.raises(ClientError) as e:
            generate(cl)
    finally:
        LyingWorker.lie = set()
    print(f"NaN activations: {e.value}")
    assert str(e.value).startswith("rank 1 (node1) sent non-finite activations (NaN or inf) for this request")
    assert "internal error" not in str(e.value)
    assert len(generate(cl)["token_ids"]) == 8, "the next request failed too"
    assert "scheduler error" not in log_of(cl, 0)


def test_a_heartbeat_that_lies_leaves_status_and_the_watchdog_working(liar):
    cl, worker = liar
    LyingWorker.lie = {"stats"}
    # STATUS answers, with the lies left out (the last honest heartbeat said rss_mb 12.5)
    st = wait_until("the lying heartbeat read", lambda: (lambda s: node(s, 1)["rss_mb"] is None and s)(status(cl)), 10)
    assert node(st, 1)["status"] == "up"
    wait_log(cl, 0, "Worker 1 sent a bad decode_ms in its heartbeat ('abc'")
    wait_log(cl, 0, "Worker 1 sent a bad rss_mb in its heartbeat (-3")
    assert st["placement"]["stages"], "no prediction to check against: this test would prove nothing"
    assert [s["measured_ms"] for s in st["placement"]["stages"] if s["rank"] == 1] == [None]
    assert log_of(cl, 0).count("sent a bad decode_ms") == 1, "logged once, not at every heartbeat"
    assert len(generate(cl)["token_ids"]) == 8
    LyingWorker.lie = {"stats", "silent"}           # then it falls silent: the watchdog must notice
    wait_log(cl, 0, "Worker 1", "silent for", timeout=20)
    wait_status(cl, lambda s: node(s, 1)["status"] != "up", 10, "rank 1 dropped")
    assert "watchdog:" not in log_of(cl, 0)
    LyingWorker.lie = set()                         # and it comes back: the ring heals
    wait_until("the ring back up", lambda: status(cl)["ready"], 30, detail=cl.logs)
    assert len(generate(cl)["token_ids"]) == 8


def test_heartbeat_keeps_good_figures_and_its_blas_text_and_drops_bad_ones():
    """checked_stats by itself: numbers must be finite and >= 0, the BLAS line a short printable
    string; anything else is left out and logged once per field."""
    from nanopipe.cluster.registry import WorkerState, checked_stats
    logged = []
    w = WorkerState(rank=1, host="node1", layers=(0, 1))
    good = checked_stats(w, {"rss_mb": 12.5, "decode_ms": None, "blas": "OpenBLAS 0.3.21 (Haswell), 4 threads"},
                         lambda msg, *level: logged.append(msg))
    assert good == {"rss_mb": 12.5, "decode_ms": None, "blas": "OpenBLAS 0.3.21 (Haswell), 4 threads"}
    assert logged == []
    for _ in range(2):
        bad = checked_stats(w, {"rss_mb": -1, "decode_ms": "abc", "blas": ["x"] * 3},
                            lambda msg, *level: logged.append(msg))
        assert bad == {}
    assert checked_stats(w, {"blas": "x" * 201}, lambda msg, *level: logged.append(msg)) == {}
    assert len(logged) == 3, logged             # once per field, not per heartbeat
    assert any("bad blas" in m and "Worker 1" in m for m in logged), logged
