"""How long an answer in flight pauses while a node leaves and while one joins a running cluster
(nanopipe/cluster/replan.py). Not a test: a measurement, run by hand (docs/TROUBLESHOOTING.md,
"A node joins or leaves a running cluster", has the figures).

    .venv/bin/python tests/bench_replan.py               # gpt2-small-shaped synthetic weights, 3 nodes
    .venv/bin/python tests/bench_replan.py --tiny        # the tests' tiny model: the re-plan's own cost shows

Each round: a 300-token greedy stream starts on 3 nodes; at its 10th token `nanopipe leave --rank 2`
drains rank 2; a second stream starts on the 2 left; at its 10th token `nanopipe join --leader`
brings a third node back. Per stream: the longest gap between two tokens (the pause the client
saw), the median gap and the 99th percentile, and the leader's own account of the re-plan
(`Re-planned (...) in Xs (loading Ys, ring change Zs)`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

PROMPT = [15496, 995, 11, 616, 1438]


def stream(cl: LocalCluster, n: int, box: dict) -> threading.Thread:
    def run():
        with cl.client() as c:
            c.generate(PROMPT, max_tokens=n, strategy="greedy", ignore_eos=True,
                       on_token=lambda t, _x: t is not None and box["t"].append(time.perf_counter()))
    th = threading.Thread(target=run)
    th.start()
    while len(box["t"]) < 10 and th.is_alive():
        time.sleep(0.01)
    return th


def replans(cl: LocalCluster) -> list:
    with open(cl.log_path(0), errors="replace") as f:
        return [ln for ln in f.read().splitlines() if "Re-planned" in ln]


def report(cl: LocalCluster, box: dict, th: threading.Thread, before: int, what: str):
    """Wait for the leader's next `Re-planned` line, then for the stream's end; print the gaps."""
    while len(replans(cl)) == before:
        time.sleep(0.05)
    during = th.is_alive()
    th.join()
    t = box["t"]
    gaps = sorted(b - a for a, b in zip(t, t[1:]))
    print(f"{what}: longest gap {gaps[-1] * 1000:.0f} ms, median {gaps[len(gaps) // 2] * 1000:.0f} ms, "
          f"p99 {gaps[int(len(gaps) * 0.99)] * 1000:.0f} ms over {len(t)} tokens; load average "
          f"{os.getloadavg()[0]:.1f}" + ("" if during else " (the stream had ended before the re-plan: no pause seen)")
          + f"\n    {replans(cl)[-1].split('] ', 1)[1]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model (4 layers, n_embd 64) instead of gpt2")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="nanopipe-bench-replan-")
    weights = os.path.join(folder, "model.safetensors")
    if args.tiny:
        init_weights(weights, n_layer=4, n_embd=64, n_head=4, n_ctx=128, n_vocab=50257, seed=0)
        n, extra = 120, {"link_delay_ms": 50}      # ~0.1 s a token: the stream outlasts a node's start
    else:
        init_weights(weights, size="gpt2", seed=0)
        n, extra = 300, {}
    cl = LocalCluster(weights, nodes=3, cluster_extra={"rejoin_grace_s": 30, "heartbeat_s": 0.5, **extra},
                      ready_timeout=300)
    try:
        cl.start()
        for _ in range(args.rounds):
            box, before = {"t": []}, len(replans(cl))
            th = stream(cl, n, box)
            subprocess.run([sys.executable, "-m", "nanopipe", "leave", "--rank", "2", "--config-dir", cl.config_dir],
                           capture_output=True, text=True, env=cl.env, check=True)
            report(cl, box, th, before, "a node leaves (3 -> 2 nodes)")
            cl.procs[2].wait(60)
            box, before = {"t": []}, len(replans(cl))
            th = stream(cl, n, box)
            with open(cl.log_path(2), "ab") as out:
                cl.procs[2] = subprocess.Popen([sys.executable, "-m", "nanopipe", "join", "--leader", cl.leader_addr,
                                                "--weights", weights], stdout=out, stderr=subprocess.STDOUT,
                                               env=cl.env, cwd=cl.workdir)
            report(cl, box, th, before, "a node joins (2 -> 3 nodes)")
    finally:
        cl.stop()
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
