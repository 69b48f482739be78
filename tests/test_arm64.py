"""A Raspberry Pi worker, emulated: an x86 leader and an arm64 worker on loopback (`make test-arm64`).

The worker runs in an arm64 Debian bookworm root under qemu-user (tests/arm64/run.sh builds and
caches it: Python 3.11, Debian's numpy 1.24 on the reference BLAS, PyYAML, click, and the checkout on
PYTHONPATH: the lean worker install). It shares this machine's network, so it dials the leader on
127.0.0.1. The claim: a different CPU, BLAS and numpy are only another place to run blocks[lo:hi],
so greedy tokens equal one x86 process's and logprobs agree within the suite's tolerance; and a
worker with no /proc (as on macOS) joins, gets its layers at once, and answers.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
from floats import max_diff
from helpers import log_of, node, status

from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.weights import init_weights

ROOT = os.environ.get("NANOPIPE_ARM64_ROOT", "")
CHECKOUT = "/opt/nanopipe"                      # where run.sh copies the checkout inside the root
pytestmark = pytest.mark.skipif(
    not (ROOT and os.path.exists(os.path.join(ROOT, "usr/bin/python3")) and os.geteuid() == 0),
    reason="needs the arm64 root that `make test-arm64` prepares (as root, with qemu-user)")

SHAPE = dict(n_layer=6, n_embd=64, n_head=4, n_ctx=128)
PROMPT = [15496, 995, 11, 616]                  # "Hello world, my"
GREEDY = SamplingParams("greedy", max_tokens=8)
TOL = 1e-4                                      # the cluster tests' tolerance (tests/test_cluster.py)
READY_S = 240                                   # qemu: the worker's start and speed probe are slow


class MixedCluster(LocalCluster):
    """LocalCluster whose workers run in the arm64 root: `chroot ROOT env -C DIR python3 -m nanopipe
    join ...`, every path seen from inside the root (the workdir lies in it)."""

    def command(self, rank: int) -> list:
        cmd = super().command(rank)
        if rank == 0:
            return cmd
        inside = [a[len(ROOT):] if a.startswith(ROOT + "/") else a for a in cmd[3:]]   # after `python -m nanopipe`
        return ["chroot", ROOT, "/usr/bin/env", "-C", self.workdir[len(ROOT):], f"PYTHONPATH={CHECKOUT}",
                "PYTHONUNBUFFERED=1", "python3", "-m", "nanopipe"] + inside


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="nanopipe-arm64-", dir=os.path.join(ROOT, "tmp"))
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture(scope="module")
def weights(workdir) -> str:
    path = os.path.join(workdir, "tiny6.safetensors")
    init_weights(path, **SHAPE, seed=0)
    return path


@pytest.fixture(scope="module")
def reference(weights) -> dict:
    return Engine.load(weights).generate(PROMPT, GREEDY)


@pytest.fixture
def proc_mounted():
    target = os.path.join(ROOT, "proc")
    subprocess.run(["mount", "-t", "proc", "proc", target], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", target], check=True)


def generate_and_compare(cl, reference, what: str) -> float:
    with cl.client() as c:
        got = c.generate(PROMPT, GREEDY)
    assert got["token_ids"] == reference["token_ids"], \
        f"{what}: cluster gave {got['token_ids']}, one x86 process {reference['token_ids']}"
    diff = max_diff(got["logprobs"], reference["logprobs"])
    print(f"\n{what}: greedy tokens equal one x86 process; largest logprob difference {diff:.3g}")
    assert diff <= TOL, f"{what}: logprobs differ from one x86 process by up to {diff:.3g} (> {TOL:g})"
    return diff


def test_an_arm64_worker_answers_as_one_x86_process(weights, workdir, reference, proc_mounted):
    with MixedCluster(weights, nodes=2, workdir=os.path.join(workdir, "b"), ready_timeout=READY_S) as cl:
        st = status(cl)
        assert node(st, 1)["status"] == "up" and node(st, 1)["layers"] == [3, 5]
        generate_and_compare(cl, reference, "x86 leader + arm64 worker (Debian numpy)")
        log = log_of(cl, 1)
    blas = next(line for line in log.splitlines() if "BLAS: " in line)
    print(f"the arm64 node's BLAS line: {blas.strip()}")
    # Debian's python3-numpy without libopenblas0: the reference BLAS, and the warning with the fix
    assert "reference BLAS" in blas
    assert "sudo apt install libopenblas0" in log


def test_an_arm64_worker_without_proc_joins_and_answers(weights, workdir, reference):
    """No /proc in the root (as on macOS: no /proc/meminfo, no cgroups). The plan is the leader's
    (partition auto), and must come at once: the worker's memory is whatever it could find out."""
    assert not os.path.exists(os.path.join(ROOT, "proc/meminfo")), "/proc is still mounted in the root"
    # speeds fixed so the emulated worker is not left out for being slow; memory stays probed.
    # node0 may hold 12.9 MB of embeddings and ~3 blocks (with their KV cache), so the worker gets the rest
    nodes = {"node0": {"speed_gbps": 5.0, "memory_mb": 12.9 + 3 * 1.2}, "node1": {"speed_gbps": 5.0}}
    with MixedCluster(weights, nodes=2, workdir=os.path.join(workdir, "c"), partition="auto",
                      cluster_extra={"nodes": nodes}, ready_timeout=READY_S) as cl:
        st = status(cl)
        w = node(st, 1)
        assert w["status"] == "up" and w["layers"][1] == 5 and w["layers"][0] <= 5, w
        generate_and_compare(cl, reference, "x86 leader + arm64 worker without /proc")
        log = log_of(cl, 1)
    measured = next(line for line in log.splitlines() if "Measured this node" in line)
    print(f"the worker without /proc: {measured.strip()}")
    assert "Waiting for the leader's layer plan" in log
