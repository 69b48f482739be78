"""How long a bare worker takes to get its slice: from the leader over the cluster's connection
(nanopipe/cluster/slices.py), from another worker's data port (the same server code, in a `nanopipe
join` process that runs blocks 6-11), vs `nanopipe pull --layers` from a local HTTP server
(tests/httpserver.py, with Range), all over loopback. Not a test: a measurement, run by hand (docs/PERFORMANCE.md has
the figures).

    .venv/bin/python tests/bench_slice_transfer.py            # blocks 6-11 of gpt2-small-shaped weights

Each run is a fresh process in an empty folder, timed from start to exit (Python's start and imports
included, as a worker pays them). The leader is a real `nanopipe serve` process; the HTTP server runs
in a process of its own. The leader's first answer also reads the slice once to compute its sha256
(kept afterwards): that run is shown apart as "cold"; so is the worker's. The load average is
printed before and after (the machine is shared).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

HERE = os.path.dirname(os.path.abspath(__file__))

FROM_LEADER = """
import sys
from nanopipe.tools.from_leader import fetch_from_leader
print(fetch_from_leader("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), token=None,
                        log=lambda m: None, progress=False))
"""

HTTP_SERVER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from httpserver import FileServer
server = FileServer.serving({"/model.safetensors": sys.argv[1]})
print(server.url("/model.safetensors"), flush=True)
while True:
    time.sleep(60)
"""


def timed(cmd, cwd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def fresh(folder: str) -> str:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "weights"))
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", default="6-11", help="inclusive, as `pull --layers`")
    args = ap.parse_args()
    first, last = map(int, args.layers.split("-"))
    tmp = tempfile.mkdtemp(prefix="nanopipe-bench-slice-")
    try:
        weights = os.path.join(tmp, "model.safetensors")
        init_weights(weights, size="gpt2", seed=0)
        cl = LocalCluster(weights, nodes=2, workdir=os.path.join(tmp, "leader"), ready_timeout=300)
        http = subprocess.Popen([sys.executable, "-c", HTTP_SERVER, weights, HERE], stdout=subprocess.PIPE, text=True)
        try:
            url = http.stdout.readline().strip()
            load_before = os.getloadavg()
            cl.start()
            port = cl.cluster["port"]
            worker = os.path.join(tmp, "worker")
            leader_cmd = [sys.executable, "-c", FROM_LEADER, str(port), str(first), str(last + 1)]
            pull_cmd = [sys.executable, "-m", "nanopipe", "pull", "local", "--layers", args.layers, "--url", url,
                        "--out", "weights", "--config-dir", cl.config_dir]
            peer_cmd = [sys.executable, "-c", FROM_LEADER, str(cl.cluster["workers"][0]["port"]), str(first),
                        str(last + 1)]
            cold = timed(leader_cmd, fresh(worker))
            peer_cold = timed(peer_cmd, fresh(worker))
            size = sum(os.path.getsize(os.path.join(worker, "weights", f)) for f in os.listdir(os.path.join(worker,
                                                                                                          "weights")))
            leader_s, peer_s, http_s = [], [], []
            for _ in range(args.runs):
                leader_s.append(timed(leader_cmd, fresh(worker)))
                peer_s.append(timed(peer_cmd, fresh(worker)))
                http_s.append(timed(pull_cmd, fresh(worker)))
            load_after = os.getloadavg()
        finally:
            http.kill()
            cl.stop()
        print(f"blocks {args.layers} of gpt2-small: {size / 1e6:.1f} MB, loopback, median of {args.runs} runs, "
              "each a fresh process in an empty folder; load average (1 min) "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
        print(f"{'source':<44} {'s':>6} {'MB/s':>6}")
        for name, s in (("leader (cluster connection), cold: +sha256", cold),
                        ("leader (cluster connection)", statistics.median(leader_s)),
                        ("worker's data port, cold: +sha256", peer_cold),
                        ("worker's data port", statistics.median(peer_s)),
                        ("HTTP server with Range (`nanopipe pull`)", statistics.median(http_s))):
            print(f"{name:<44} {s:6.2f} {size / s / 1e6:6.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
