"""Where the layers go on a mixed cluster: each node measures itself, the leader solves the split.

Decoding is bound by memory, not arithmetic: every new token streams every weight of a stage
through a matrix-vector product once. So a stage's time per token is, to first order,

    t_stage = (bytes of the weights it holds) / (how fast the node streams float32 weights)

and the two numbers a node reports are that speed (GB/s of block weights through real decode
steps of blocks of the model's width: LayerNorms, matmuls, attention, GELU; for one session and
for 8 sessions at once) and the memory it may use. The leader collects them
at registration and picks the contiguous split with the best predicted time per token:

    objective "throughput" (many streams): the leader keeps `depth` batches in flight round the
        ring (one per machine); each batch visits every stage in turn and each stage serves every
        batch, so a cycle takes max(sum of the stages, depth x the slowest stage) — the slowest
        stage paces separate machines, the sum paces stages that share one machine (depth 1);
    objective "latency"    (one stream):   the token visits every stage in turn, plus every hop.

Subject to memory: a node must hold its blocks' weights plus their KV cache at max_sessions x n_ctx
(rank 0 also holds wte, wpe and ln_f, and streams wte again as the tied LM head). A node that
cannot hold a single block, or whose blocks would only slow the others, gets no layers and is left
out (the ring skips it).

Worked example: gpt2 (12 blocks of 28.35 MB; rank 0 also streams wte, 154.4 MB, as the LM head),
nodes mini1 and mini2 at 20 GB/s (40 GB/s for 8 rows) and pi5 at 5 GB/s (10), three machines
(depth 3), hops 1 ms, memory to spare. Stage times in ms per token (one row):

    even 4/4/4      13.39 + 5.67 + 22.68 + 3 hops -> one stream 22.4 tok/s; 8 streams in 3
                    batches of 3 rows: pi5 takes 11.34 + 1 ms per batch, 3 batches -> 216 tok/s
    throughput      2/8/2: 10.55, 11.34, 11.34 -> 27.6 tok/s; 8 streams: every stage 5.3-5.7 ms
                    per batch (+ 1 ms hop), 3 x 6.67 = 20 ms a cycle -> 400 tok/s (1.85x even)
    latency         12/0/0: 24.73 ms on mini1 alone beats any split plus its hops -> 40.4 tok/s;
                    mini2 and pi5 are left out (for one stream, a hop costs more than it saves)

The same three nodes as processes of one machine (depth 1) would pay the sum for 8 streams too:
even 335 tok/s, and throughput then also puts all 12 blocks on mini1 (647 tok/s).

Whether to solve at all (auto, or partition not set and the nodes differ), what unknown figures
do, and what a hop costs are decided once, by decide(): `nanopipe plan` and the leader both call it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .kernels import choose_gemv_rows, choose_layout, layout_orders, matrix_order, measuring_alone
from .partition import block_params, even, planned_by_leader, uses_mapping

GB = 1e9
MB = 1e6


# ---------------------------------------------------------------------------------------------
# what a node measures about itself


@dataclass(frozen=True)
class Capacity:
    """One node's measured (or configured) capability.

    speed_gbps   GB of float32 weights per second through a one-row matmul (decode, one stream)
    speed8_gbps  the same for a batch of 8 rows (bytes of weights per second per batch of 8)
    memory_mb    memory the node may use: min(MemAvailable, its cgroup's limit - usage)
    source       "measured" or "config" (cluster_config.yaml's `nodes:` overrides)

    A figure the node could not find out (no /proc on macOS or in a container; a bad report) is
    None: unknown. The leader plans without it (solve) and says so; it never waits for it.
    """
    name: str
    speed_gbps: float | None
    speed8_gbps: float | None
    memory_mb: float | None
    source: str = "measured"

    @classmethod
    def unknown(cls, name: str, source: str = "unknown") -> "Capacity":
        """Nothing known: a node whose report was bad, or that sent none."""
        return cls(name, None, None, None, source)

    @property
    def unknowns(self) -> list:
        """The figures not known, by field name: ["memory_mb"] for a Mac without vm_stat."""
        return [k for k in ("speed_gbps", "memory_mb") if getattr(self, k) is None]

    def as_dict(self) -> dict:
        def r(v, n):
            return None if v is None else round(v, n)
        return {"name": self.name, "speed_gbps": r(self.speed_gbps, 3), "speed8_gbps": r(self.speed8_gbps, 3),
                "memory_mb": r(self.memory_mb, 1), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Capacity":
        """From a peer's JSON (a worker's STATS at registration): every number checked, so a bad
        one is a ValueError naming the field, never a crash in the solver.

        >>> Capacity.from_dict({"name": "pi5", "speed_gbps": 4.5, "memory_mb": 900}).speed8_gbps
        4.5
        """
        if not isinstance(d, dict):
            raise ValueError(f"capacity must be a JSON object, got {type(d).__name__}")

        def num(key, default=None):
            v = d.get(key, default)
            if key == "memory_mb" and key in d and v is None:
                return None                 # the node could not tell: unknown, planned without
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"capacity field {key!r} must be a positive number, got {v!r}")
            return float(v)
        speed = num("speed_gbps")
        return cls(name=str(d.get("name", "?"))[:64], speed_gbps=speed, speed8_gbps=num("speed8_gbps", speed),
                   memory_mb=num("memory_mb"), source=str(d.get("source", "measured"))[:32])

    def overridden(self, override: dict | None) -> "Capacity":
        """This capacity with cluster_config.yaml's `nodes: {NAME: {...}}` figures put in its place."""
        if not override:
            return self
        s1 = override.get("speed_gbps", self.speed_gbps)
        s8 = override.get("speed8_gbps", s1 * self.speed8_gbps / self.speed_gbps
                          if None not in (s1, self.speed8_gbps, self.speed_gbps) else s1)
        mem = override.get("memory_mb", self.memory_mb)
        s1, s8, mem = (None if v is None else float(v) for v in (s1, s8, mem))
        full = all(k in override for k in ("speed_gbps", "memory_mb"))
        return Capacity(self.name, s1, s8, mem, "config" if full else "config+measured")


def differ(nodes: list, tolerance: float = 0.25) -> str | None:
    """Why these nodes count as different machines, or None if they are alike: the fastest and
    slowest (one-row speed), or the largest and smallest memory, more than `tolerance` apart.

    >>> differ([Capacity("a", 10, 20, 4000), Capacity("b", 9, 18, 3800)]) is None
    True
    >>> differ([Capacity("a", 10, 20, 4000), Capacity("pi5", 2.5, 5, 3800)])
    'speeds 2.5-10.0 GB/s (pi5 slowest) are more than 25% apart'
    """
    for what, key, unit, fmt in (("speeds", "speed_gbps", "GB/s", ".1f"), ("memory", "memory_mb", "MB", ".0f")):
        known = [n for n in nodes if getattr(n, key) is not None]
        if len(known) < 2:
            continue
        vals = [getattr(n, key) for n in known]     # an unknown figure differs from nothing
        lo, hi = min(vals), max(vals)
        if hi > lo * (1 + tolerance):
            low = known[vals.index(lo)].name
            return (f"{what} {lo:{fmt}}-{hi:{fmt}} {unit} ({low} {'slowest' if what == 'speeds' else 'smallest'}) "
                    f"are more than {tolerance:.0%} apart")
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def mem_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo (the kernel's estimate of what can be allocated without
    swapping), or None off Linux."""
    text = _read(meminfo)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _own_cgroup(controller: str, proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup path for a v1 controller ("memory", "cpu"), or for v2 ("" key)."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def cgroup_memory_room(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's cgroup still lets it use (limit - usage), v1 or v2; None if unlimited.

    v1: memory.limit_in_bytes - memory.usage_in_bytes under /sys/fs/cgroup/memory/<path>;
    v2: memory.max - memory.current under /sys/fs/cgroup/<path>. An unlimited v1 group reports a
    huge number (2**63 rounded down to a page), v2 the word "max".
    """
    v1 = _own_cgroup("memory", proc_cgroup)
    if v1 is not None:
        base = os.path.join(root, "memory", v1.lstrip("/"))
        limit = _read(os.path.join(base, "memory.limit_in_bytes"))
        usage = _read(os.path.join(base, "memory.usage_in_bytes"))
        if limit is not None and limit.isdigit() and int(limit) < (1 << 60):
            return max(0, int(limit) - int(usage or 0))
        return None
    v2 = _own_cgroup("", proc_cgroup)
    if v2 is not None:
        base = os.path.join(root, v2.lstrip("/"))
        limit, usage = _read(os.path.join(base, "memory.max")), _read(os.path.join(base, "memory.current"))
        if limit is not None and limit.isdigit():
            return max(0, int(limit) - int(usage or 0))
    return None


def darwin_memory_bytes(run=None) -> int | None:
    """macOS (no /proc, no cgroups): what `vm_stat` counts as free, inactive, speculative and
    purgeable pages (what the kernel hands out without paging anyone out), times the page size in
    its first line; None if it cannot be run or read. `run(argv) -> stdout`: for tests.

        Mach Virtual Memory Statistics: (page size of 16384 bytes)
        Pages free:                               61234.
        Pages inactive:                          240123.      -> (61234 + 240123 + ...) x 16384
    """
    import re
    import subprocess
    if run is None:
        def run(argv):
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
    try:
        text = run(["vm_stat"])
    except (OSError, subprocess.SubprocessError):
        return None
    page = re.search(r"page size of (\d+) bytes", text or "")
    counts = dict(re.findall(r"^Pages (free|inactive|speculative|purgeable):\s+(\d+)\.", text or "", re.M))
    if page is None or "free" not in counts:
        return None
    return sum(int(v) for v in counts.values()) * int(page.group(1))


def sysconf_free_bytes() -> int | None:
    """Free physical pages times the page size (os.sysconf; glibc asks the kernel's sysinfo(), no
    /proc needed): an underestimate of what can be had (page cache counts as used), so only the
    fallback when MemAvailable cannot be read. None where the system does not say (macOS)."""
    try:
        n, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return n * size if n > 0 and size > 0 else None


def memory_probe(platform: str | None = None) -> tuple:
    """(bytes this node can really allocate, or None if unknown; how that was found).

    Linux: the smaller of MemAvailable and the cgroup's room; without /proc (a container, a chroot)
    the cgroup's room or free pages (sysconf). macOS: vm_stat. Elsewhere, or when every probe
    fails: (None, "unknown: ..."), and the leader plans without it (placement.solve).
    """
    import sys
    platform = platform or sys.platform
    if platform == "darwin":
        b = darwin_memory_bytes()
        return (b, "vm_stat") if b else (None, "unknown: vm_stat could not be read")
    avail, room = mem_available_bytes(), cgroup_memory_room()
    if avail is not None:
        return (min(avail, room), "cgroup room") if room is not None and room < avail else (avail, "MemAvailable")
    free = sysconf_free_bytes()
    known = [(b, how) for b, how in ((room, "cgroup room"), (free, "free pages (no /proc/meminfo)")) if b]
    if known:
        return min(known)
    return None, "unknown: no /proc/meminfo, no cgroup limit, and sysconf gave nothing"


def usable_memory_bytes() -> int | None:
    """What this node can really allocate (memory_probe), or None if it cannot tell."""
    return memory_probe()[0]


def probe_blocks(n_embd: int, min_bytes: int = 96 << 20) -> list:
    """GPT-2 blocks of the model's width, laid out as the loader lays them out (matrices in this
    process's order: kernels.layout_orders), as many as make at least `min_bytes` of weights (more
    than any CPU's last-level cache, so the probe streams them from memory as a real step does), at most 8.

    gpt2 (C=768): one block is c_attn (C, 3C), attn.c_proj (C, C), mlp.c_fc (C, 4C),
    mlp.c_proj (4C, C) = 12 C^2 floats = 28.3 MB, so 4 blocks = 113 MB. The values do not matter
    to the speed, but every page must be written (an untouched page reads as zeros from one shared
    page, which is cache, not memory).
    """
    c = n_embd
    per_block = 4 * block_params(c)
    # at most 8: a tiny test model's blocks would otherwise number hundreds, and such a model's
    # stage runs from cache anyway, as the probe then does
    n = min(8, max(1, math.ceil(min_bytes / per_block)))
    order = layout_orders()[0]

    def lin(i, o, name):
        return {"w": np.full((i, o), 0.01, np.float32, order=matrix_order(order, name)), "b": np.zeros(o, np.float32)}

    def ln():
        return {"g": np.ones(c, np.float32), "b": np.zeros(c, np.float32)}
    return [{"ln_1": ln(), "attn": {"c_attn": lin(c, 3 * c, "attn.c_attn.weight"),
                                    "c_proj": lin(c, c, "attn.c_proj.weight")}, "ln_2": ln(),
             "mlp": {"c_fc": lin(c, 4 * c, "mlp.c_fc.weight"), "c_proj": lin(4 * c, c, "mlp.c_proj.weight")}}
            for _ in range(n)]


def measure_speed(n_embd: int, rows: int = 1, seconds: float = 0.25, blocks: list | None = None,
                  n_head: int | None = None, context: int = 32) -> float:
    """GB/s of block weights through real decode steps: `rows` sessions, each with `context`
    positions in its KV cache, one new token each, through `model.blocks_forward` (LayerNorms,
    the kernels `linear` chose, attention, GELU: everything a stage's step does), measured over
    >= `seconds` of wall time in whole passes over the blocks.

    Wall time, not CPU time, on purpose: a CPU quota (cgroup cpu.cfs_quota_us / cpu.max) lets the
    process run only part of every 100 ms period, and a window of a few periods shows it.
    """
    from .model import KVCache, blocks_forward
    blocks = blocks if blocks is not None else probe_blocks(n_embd)
    choose_gemv_rows(blocks)                # the steps below run the kernels this process keeps: decide them first
    n_head = n_head or max(1, n_embd // 64)
    nbytes = sum(p[g][m]["w"].nbytes for p in blocks for g, m in
                 (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")))
    caches = [KVCache(len(blocks), n_head, n_embd // n_head, context + 1) for _ in range(rows)]
    prompt = np.full((context, n_embd), 0.01, np.float32)
    for cache in caches:                    # fill each session's cache (and page in the weights)
        blocks_forward(prompt, blocks, n_head=n_head, segments=[(cache, context)])
    x = np.full((rows, n_embd), 0.01, np.float32)                   # one new row per session

    def step():
        blocks_forward(x, blocks, n_head=n_head, segments=[(cache, 1) for cache in caches])
        for cache in caches:
            cache.length = context          # the same position again next pass
    step()                                  # warm up: BLAS threads
    passes, t0 = 0, time.perf_counter()
    while True:
        step()
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return passes * nbytes / elapsed / GB


def measure(name: str, n_embd: int, seconds: float = 0.25, override: dict | None = None,
            n_head: int | None = None) -> Capacity:
    """A node's Capacity: measured speed (1 and 8 rows, `seconds` each, or NANOPIPE_PROBE_S) and
    memory; `override` (from
    cluster_config.yaml `nodes: {NAME: {speed_gbps: 9, memory_mb: 3000}}`) replaces what it sets."""
    override = override or {}
    # NANOPIPE_PROBE_S: a longer probe averages out a busy machine (the tests and `bench --placement`)
    seconds = float(os.environ.get("NANOPIPE_PROBE_S") or seconds)
    if "speed_gbps" in override and "memory_mb" in override:
        s = float(override["speed_gbps"])
        return Capacity(name, s, float(override.get("speed8_gbps", s)), float(override["memory_mb"]), "config")
    # the probe must not be what pushes a small node over its limit: at most a third of its room
    # (96 MB is more than any CPU's last-level cache; below ~32 MB a big cache flatters the speed)
    room = usable_memory_bytes() or 0
    choose_layout(n_embd)                   # the order the weights will load in, first (a no-op once loaded)
    blocks = probe_blocks(n_embd, min_bytes=int(min(96 << 20, max(16 << 20, room // 3))) if room else 96 << 20)
    with measuring_alone():                 # nodes sharing this machine take turns (kernels.measuring_alone)
        s1 = measure_speed(n_embd, 1, seconds, blocks, n_head)
        s8 = measure_speed(n_embd, 8, seconds, blocks, n_head)
    del blocks
    room = usable_memory_bytes()
    mem = None if room is None else room / MB
    source = "measured"
    if "speed_gbps" in override:
        s1 = float(override["speed_gbps"])
        s8 = float(override.get("speed8_gbps", s1 * s8 / max(s1, 1e-9)))
        source = "config+measured"
    if "memory_mb" in override:
        mem = float(override["memory_mb"])
        source = "config+measured"
    return Capacity(name, s1, s8, mem, source)


def measure_node(name: str, config, logger, *, override: dict | None = None, holding=None,
                 note: str = "") -> Capacity:
    """What the leader and every worker do once at start: measure() this node with the model's
    shape (`config`: n_embd, n_head), count the memory its loaded stage `holding` already takes as
    the model's (the plan may reload it; not when the config sets memory_mb), and log the result,
    then the BLAS report, to `logger` ("Measured this node: ..." + `note`)."""
    override = override or {}
    cap = measure(name, config.n_embd, override=override, n_head=config.n_head)
    if holding is not None and "memory_mb" not in override and cap.memory_mb is not None:
        cap = dataclasses.replace(cap, memory_mb=cap.memory_mb + holding.nbytes / 1e6)
    mem = "memory unknown (the leader plans without it)" if cap.memory_mb is None else \
        f"{cap.memory_mb:.0f} MB usable"
    logger.info(f"Measured this node: {cap.speed_gbps:.1f} GB/s (1 row), {cap.speed8_gbps:.1f} GB/s (8 rows), "
                f"{mem} ({cap.source}){note}")
    from .blas import report
    for level, line in report(cap.speed_gbps):
        logger.log(level, line)
    return cap


# ---------------------------------------------------------------------------------------------
# the model's side of the bill


@dataclass(frozen=True)
class ModelShape:
    """What the placement needs to know about the model, in bytes (float32)."""
    n_layer: int
    n_embd: int
    n_ctx: int = 1024
    n_vocab: int = 50257
    n_head: int | None = None       # how a split stage shares a block (cluster/split_plan.py); None: C / 64

    @property
    def block_bytes(self) -> int:
        """One block's weights: 4 * (12 C^2 + 13 C) bytes (28.35 MB for gpt2, 123 MB for gpt2-xl)."""
        return 4 * block_params(self.n_embd)

    def kv_bytes(self, sessions: int) -> int:
        """One block's KV cache at `sessions` full contexts: 2 (k, v) * n_ctx * C * 4 bytes each
        (6.3 MB per session for gpt2)."""
        return 2 * self.n_ctx * self.n_embd * 4 * sessions

    @property
    def rank0_bytes(self) -> int:
        """What rank 0 holds beyond its blocks: wte (V, C), wpe (n_ctx, C), ln_f; the LM head is
        wte itself (tied), not a copy."""
        c = self.n_embd
        return 4 * (self.n_vocab * c + self.n_ctx * c + 2 * c)

    @property
    def head_stream_bytes(self) -> int:
        """Bytes rank 0 streams per token for the LM head: all of wte."""
        return 4 * self.n_vocab * self.n_embd


# ---------------------------------------------------------------------------------------------
# the solver


class PlacementError(ValueError):
    """The model does not fit the cluster; the message gives needed vs available."""


@dataclass
class Placement:
    """A solved split. ranges[i] is node i's half-open (lo, hi) block range; lo == hi means the
    node holds nothing and is left out of the ring. `depth`: batches the leader keeps in flight
    round the ring (ClusterConfig.depth(): one per machine; None: one per node)."""
    ranges: list
    objective: str
    stage_s: list                       # predicted seconds per token per node (1 row), 0 if left out
    stage8_s: list                      # predicted seconds per batch of 8 rows
    hop_s: float
    notes: list = field(default_factory=list)
    depth: int | None = None

    @property
    def used(self) -> list:
        return [i for i, (lo, hi) in enumerate(self.ranges) if hi > lo or i == 0]

    def step_s(self, i: int, rows: int) -> float:
        """Node i's predicted seconds for one step of `rows` rows (see step_seconds)."""
        return step_seconds(self.stage_s[i], self.stage8_s[i], rows)

    def cycle_s(self, streams: int = 1) -> float:
        """Predicted seconds until each of `streams` streams has one more token.

        The leader splits the streams into g = min(depth, streams) batches in flight round the
        ring. A batch visits every used stage and hop in turn (the sum), and each stage serves all
        g batches once per cycle (g x the slowest stage): the larger of the two is the cycle.
        One stream, or depth 1 (stages sharing one machine), is the sum; a pipeline as deep as
        the ring on separate machines is paced by its slowest stage.
        """
        used = self.used
        hop = self.hop_s if len(used) > 1 else 0.0
        g = max(1, min(self.depth or len(self.ranges), streams))
        rows = math.ceil(streams / g)
        t = [self.step_s(i, rows) + hop for i in used]
        return max(sum(t), g * max(t))

    def tok_s(self, streams: int = 1) -> float:
        """Predicted tokens/s of `streams` concurrent streams (see cycle_s)."""
        return streams / self.cycle_s(streams)


def step_seconds(t1: float, t8: float, rows: int) -> float:
    """A step of `rows` rows from a stage's one-row time t1 and 8-row time t8: the cheaper of a gemv
    per row and one gemm per 8 rows (model.linear picks the cheaper kernel the same way)."""
    return t1 if rows == 1 else min(rows * t1, math.ceil(rows / 8) * t8)


def stage_seconds(shape: ModelShape, node: Capacity, n_blocks: int, rank0: bool, rows: int = 1) -> float:
    """Predicted seconds for one step of `rows` rows through a stage of `n_blocks` blocks."""
    nbytes = n_blocks * shape.block_bytes + (shape.head_stream_bytes if rank0 else 0)
    speed = node.speed_gbps if rows == 1 else node.speed8_gbps
    return nbytes / (speed * GB)


def max_blocks(shape: ModelShape, node: Capacity, rank0: bool, sessions: int) -> int:
    """How many blocks fit in the node's memory, with their KV cache at `sessions` contexts."""
    room = node.memory_mb * MB - (shape.rank0_bytes if rank0 else 0)
    if room <= 0:
        return -1 if rank0 else 0
    return min(shape.n_layer, int(room // (shape.block_bytes + shape.kv_bytes(sessions))))


def solve(shape: ModelShape, nodes: list, *, sessions: int = 16, hop_s: float = 0.0,
          objective: str = "throughput", min_rank0_blocks: int = 1, depth: int | None = None,
          streams: int = 8) -> Placement:
    """The contiguous split of shape.n_layer blocks over `nodes` (rank order, rank 0 first) that
    minimises the predicted time per token, by dynamic programming over (nodes, blocks).

    throughput: minimise the cycle at `streams` streams (Placement.cycle_s: with `depth` batches
    in flight, the larger of the sum of the stages and depth x the slowest); among splits that
    reach it, the one with the smallest one-stream time. latency: minimise the one-stream time
    (stages + hops). Exact: a DP over (nodes, blocks) where the cycle is a sum; otherwise one per
    candidate slowest stage to find the least cycle, then a DP keeping the Pareto front of (time at
    `streams` streams, one-stream time) for the tie-break — tests/test_placement.py checks it
    against every split. Workers may get no blocks (left out); rank 0 always takes part
    (it embeds and samples).
    """
    if objective not in ("throughput", "latency"):
        raise PlacementError(f"unknown placement objective {objective!r}; use throughput or latency")
    n, L = len(nodes), shape.n_layer
    slow = [nd.name for nd in nodes if nd.speed_gbps is None or nd.speed8_gbps is None]
    if slow:
        raise PlacementError(f"speed unknown for {', '.join(slow)}: no split can be predicted (plan it even)")
    # a node whose memory is unknown (no /proc on macOS, a container) may hold its even share and no
    # more: the plan goes ahead with what is known, and says which figures it did without
    # (or what the known nodes cannot hold, if that is more: an unknown figure never refuses a model)
    known = [max_blocks(shape, nd, i == 0, sessions) if nd.memory_mb is not None else None
             for i, nd in enumerate(nodes)]
    share = max(math.ceil(L / n), L - sum(max(c, 0) for c in known if c is not None))
    cap = [share if c is None else c for c in known]
    notes = [f"{nd.name}: memory unknown (it could not read it; set nodes: {{{nd.name}: {{memory_mb: N}}}} in "
             f"cluster_config.yaml): planned to hold at most {share} blocks"
             for nd in nodes if nd.memory_mb is None]
    if cap[0] < 0:
        raise PlacementError(
            f"{nodes[0].name} (rank 0): {nodes[0].memory_mb:.0f} MB usable, but the embeddings and LM head "
            f"alone need {shape.rank0_bytes / MB:.0f} MB")
    total_room = sum(max(c, 0) for c in cap)
    if total_room < L or cap[0] < min_rank0_blocks:
        need = L * (shape.block_bytes + shape.kv_bytes(sessions)) + shape.rank0_bytes
        have = sum(nd.memory_mb or 0 for nd in nodes) * MB
        raise PlacementError(
            f"the model does not fit the cluster: {L} blocks x ({shape.block_bytes / MB:.0f} MB + "
            f"{shape.kv_bytes(sessions) / MB:.0f} MB KV at {sessions} sessions) + "
            f"{shape.rank0_bytes / MB:.0f} MB on rank 0 = {need / MB:.0f} MB needed, "
            f"{have / MB:.0f} MB usable in all ("
            + ", ".join(f"{nd.name}: {mb(nd.memory_mb)}, at most {max(c, 0)} blocks" for nd, c in zip(nodes, cap))
            + "); add a node, lower max_sessions, or use a smaller model")
    for i, (nd, c) in enumerate(zip(nodes, cap)):
        if nd.memory_mb is None:
            continue
        if i > 0 and c == 0:
            notes.append(f"{nd.name}: {nd.memory_mb:.0f} MB usable, one block needs "
                         f"{shape.block_bytes / MB:.0f} MB + {shape.kv_bytes(sessions) / MB:.0f} MB KV at "
                         f"{sessions} sessions: it cannot hold a block and is left out")
        elif c < L:
            notes.append(f"{nd.name}: {nd.memory_mb:.0f} MB usable, one block needs "
                         f"{shape.block_bytes / MB:.0f} MB + {shape.kv_bytes(sessions) / MB:.0f} MB KV at "
                         f"{sessions} sessions: it can hold at most {c} blocks")

    INF = float("inf")
    depth = depth or n
    g = max(1, min(depth, streams))             # batches in flight at `streams` streams
    rows = math.ceil(streams / g)

    def stage(i, k, r):                         # node i holding k blocks: one step of r rows + its hop
        return step_seconds(stage_seconds(shape, nodes[i], k, i == 0, 1),
                            stage_seconds(shape, nodes[i], k, i == 0, 8), r) + hop_s

    choices = [range(min_rank0_blocks if i == 0 else 0, min(cap[i], L) + 1) for i in range(n)]
    c1 = [{k: stage(i, k, 1) for k in ks} for i, ks in enumerate(choices)]      # one stream
    cn = [{k: stage(i, k, rows) for k in ks} for i, ks in enumerate(choices)]   # `streams` streams

    def best_split(cost, bound: float = INF):
        """The split minimising the sum of cost[i][k] (tuples, compared in order) over used nodes,
        every used node's cn <= `bound`: a DP over f[j], nodes so far holding blocks 0..j-1.
        Returns (total, counts) or None."""
        zero = tuple(0.0 for _ in next(iter(cost[0].values())))
        f = [(zero, ())] + [None] * L
        for i in range(n):
            nxt = [None] * (L + 1)
            for j, entry in enumerate(f):
                if entry is None:
                    continue
                total, counts = entry
                for k in choices[i]:
                    if j + k > L:
                        break
                    used = k > 0 or i == 0
                    if used and cn[i][k] > bound * (1 + 1e-12):
                        continue
                    v = tuple(a + b for a, b in zip(total, cost[i][k])) if used else total
                    if nxt[j + k] is None or v < nxt[j + k][0]:
                        nxt[j + k] = (v, counts + (k,))
            f = nxt
        return f[L]

    def pareto(bound: float, limit: float) -> list:
        """Every split whose stages each take <= `bound` and sum to <= `limit` (at `streams`
        streams), as the Pareto front of (that sum, one-stream time): [(sum_n, sum_1, counts)]."""
        f = [[(0.0, 0.0, ())]] + [[] for _ in range(L)]
        for i in range(n):
            nxt = [[] for _ in range(L + 1)]
            for j in range(L + 1):
                for sn, s1, counts in f[j]:
                    for k in choices[i]:
                        if j + k > L:
                            break
                        if k == 0 and i > 0:
                            nxt[j].append((sn, s1, counts + (0,)))
                        elif cn[i][k] <= bound * (1 + 1e-12) and sn + cn[i][k] <= limit * (1 + 1e-12):
                            nxt[j + k].append((sn + cn[i][k], s1 + c1[i][k], counts + (k,)))
            for j in range(L + 1):                # keep the non-dominated entries only
                front, best1 = [], INF
                for e in sorted(nxt[j], key=lambda e: (e[0], e[1])):
                    if e[1] < best1 * (1 - 1e-12):
                        front.append(e)
                        best1 = e[1]
                nxt[j] = front
            f = nxt
        return f[L]

    def key_of(counts) -> tuple:
        p = predict(shape, nodes, _ranges_of(counts), hop_s=hop_s, depth=depth)
        one = p.cycle_s(1)
        return (p.cycle_s(streams), one) if objective == "throughput" else (one,)

    candidates = []
    if cap[0] >= L:     # rank 0 alone pays no hop at all, which the DP (every stage pays one) misses
        candidates.append([L] + [0] * (n - 1))
    if objective == "latency" or g == 1:
        # the cycle is a sum (one stream, or one batch at a time): additive, one DP
        found = best_split([{k: (c1[i][k],) if objective == "latency" else (cn[i][k], c1[i][k]) for k in ks}
                            for i, ks in enumerate(choices)])
        candidates += [list(found[1])] if found else []
    else:
        # cycle = max(sum, g x slowest). First its least value C: for each possible slowest stage B
        # (ascending), the least sum of splits whose stages are all <= B; stop once g x B alone is
        # worse than the best found. Then every split reaching C has stages <= C / g and a sum
        # <= C: among those, the Pareto front gives the least one-stream time.
        sums = [{k: (v,) for k, v in c.items()} for c in cn]
        best = INF
        for bound in sorted({v for i in range(n) for k, v in cn[i].items() if k > 0 or i == 0}):
            if g * bound > best * (1 + 1e-12):
                break
            found = best_split(sums, bound)
            if found:
                best = min(best, max(found[0][0], g * bound))
        if best < INF:
            candidates += [list(c) for _, _, c in pareto(best / g, best)]
    if not candidates:
        raise PlacementError("no split of the model fits these nodes")   # cannot happen: fit checked above
    counts = min(candidates, key=key_of)
    ranges = _ranges_of(counts)
    holding = [nodes[j].speed_gbps for j, k in enumerate(counts) if k > 0]
    for i, k in enumerate(counts):
        if i > 0 and k == 0 and cap[i] > 0:
            why = _why_left_out(nodes[i].speed_gbps, max(holding), hop_s, depth)
            notes.append(f"{nodes[i].name}: left out — {why}")
    return predict(shape, nodes, ranges, hop_s=hop_s, objective=objective, depth=depth, notes=notes)


def fastest_one_stream_s(shape: ModelShape, nodes: list, *, sessions: int = 16, hop_s: float = 0.0) -> float:
    """The least time per token any pipeline of these nodes gives one stream (solve, objective
    latency): what a split stage must beat (cluster/split_plan.py), whatever the objective chose."""
    return solve(shape, nodes, sessions=sessions, hop_s=hop_s, objective="latency").cycle_s(1)


def _why_left_out(speed: float, fastest: float, hop_s: float, depth) -> str:
    """Why a node that could hold blocks got none: it is slow, or (as fast as the others) a stage of
    its own costs a hop and gains nothing, as on one machine, where the stages take turns anyway.

        _why_left_out(0.5, 20, 0.001, 3) -> "at 0.5 GB/s its blocks would only slow the others"
        _why_left_out(0.9, 0.92, 0.0003, 1) -> "as fast as the nodes that hold blocks (0.9 vs 0.92
            GB/s), but a stage of its own adds a hop (0.3 ms per token), and nodes on one machine take
            turns, so splitting gains nothing"
    """
    if speed < 0.8 * fastest:
        return f"at {speed:.3g} GB/s its blocks would only slow the others"
    why = (f"as fast as the nodes that hold blocks ({speed:.3g} vs {fastest:.3g} GB/s), but a stage of its own "
           f"adds a hop ({hop_s * 1000:.2g} ms per token)")
    return why + (", and nodes on one machine take turns, so splitting gains nothing" if depth == 1 else "")


def mb(v) -> str:
    """900.4 -> '900 MB'; None -> 'memory unknown'."""
    return "memory unknown" if v is None else f"{v:.0f} MB"


def _ranges_of(counts: list) -> list:
    """[2, 8, 2] -> [(0, 2), (2, 10), (10, 12)]"""
    out, lo = [], 0
    for k in counts:
        out.append((lo, lo + k))
        lo += k
    return out


def predict(shape: ModelShape, nodes: list, ranges: list, hop_s: float = 0.0,
            objective: str = "throughput", depth: int | None = None, notes: list | None = None) -> Placement:
    """The prediction for a given split (e.g. the even one), to compare with the solved one."""
    counts = [hi - lo for lo, hi in ranges]
    return Placement(ranges=list(ranges), objective=objective,
                     stage_s=[stage_seconds(shape, nd, k, i == 0, 1) if (k or i == 0) else 0.0
                              for i, (nd, k) in enumerate(zip(nodes, counts))],
                     stage8_s=[stage_seconds(shape, nd, k, i == 0, 8) if (k or i == 0) else 0.0
                               for i, (nd, k) in enumerate(zip(nodes, counts))],
                     hop_s=hop_s, notes=list(notes or []), depth=depth)


# ---------------------------------------------------------------------------------------------
# the decision: `nanopipe plan` and the leader both ask decide(), so they cannot disagree

HOP_OVERHEAD_S = 0.0003
"""What one hop costs beyond the link's own delay: loopback/TCP, the wake-up and the framing (~0.3 ms)."""


def hop_seconds(link_delay_ms: float = 0.0) -> float:
    """One hop's predicted cost: the (simulated) link's delay plus HOP_OVERHEAD_S."""
    return link_delay_ms / 1000 + HOP_OVERHEAD_S


def cluster_figures(cluster, n_nodes: int) -> tuple:
    """(max_sessions, one hop's seconds, batches in flight) from cluster_config.yaml (a
    config.ClusterConfig), or for `nanopipe plan` without one: 16 sessions, no link delay, and one
    batch per node."""
    if cluster is None:
        return 16, hop_seconds(), n_nodes
    return cluster.max_sessions, hop_seconds(cluster.link_delay_ms), cluster.depth()


def unknown_figures(caps: list) -> list:
    """The figures nodes could not find out, one "name: fields" each: ["node1: memory_mb"]."""
    return [f"{c.name}: {', '.join(c.unknowns)}" for c in caps if c is not None and c.unknowns]


def forecast(shape: ModelShape, caps: list, ranges: list, cluster=None, objective: str = "throughput"):
    """The prediction (Placement) for `ranges` with the cluster's sessions, hop and depth; None while
    a node, or its speed, is unknown (nothing to predict with). Unknown memory does not matter here."""
    if any(c is None or c.speed_gbps is None for c in caps):
        return None
    _, hop_s, depth = cluster_figures(cluster, len(caps))
    return predict(shape, caps, ranges, hop_s=hop_s, objective=objective, depth=depth)


@dataclass(frozen=True)
class Decision:
    """What decide() chose.

    ranges     the split to run: the solved one, the even one, or the one asked for
    solved     True when placement.solve chose `ranges` (auto, and the nodes differ or auto was asked)
    why        in a few words: why it solved ("partition: auto", or what differs: differ()), or why
               auto stayed even ("the nodes measure within 25%"); None for a split as configured
    note       the same in a sentence, for the leader's log and status
    placement  the prediction for `ranges` (None while a node or its speed is unknown)
    even       the prediction for the even split, to set beside it (None likewise)
    unknown    figures planned without (unknown_figures)
    hop_s, sessions, depth: what the predictions assumed
    split      a split stage chosen for one conversation (cluster/split_plan.py's Conversation), or None
    no_split   with partition auto and 3+ nodes, why no split stage was chosen (split_plan.no_split_why)
    """
    ranges: list
    solved: bool
    why: str | None
    note: str
    placement: Placement | None
    even: Placement | None
    unknown: list
    hop_s: float
    sessions: int
    depth: int
    split: object = None
    no_split: str = ""


def decide(shape: ModelShape, caps: list, ranges: list, model, cluster=None, partition: str | None = None) -> Decision:
    """The one placement decision, for `nanopipe plan` and for the leader once every node has measured itself.

    `caps`: each node's Capacity in rank order (None: not known at all); `ranges`: the split asked for
    (under auto, the even starting point); `model`: a config.ModelConfig (partition, layer_mapping,
    placement_objective); `cluster`: a config.ClusterConfig or None; `partition`: plan's --partition.

    Not auto (planned_by_leader): the split asked for stays. Auto: unknown figures never block the
    plan — a node not known at all keeps the split asked for, an unknown speed gives the even split
    (nothing to predict with), unknown memory is planned around by solve (an even share at most).
    partition auto solves; partition not set solves only when the nodes differ by more than 25%
    (differ) and are not all one machine (one address in host_ip, no `nodes:` figures: they would
    differ by noise only). Raises PlacementError when the model does not fit.
    """
    sessions, hop_s, depth = cluster_figures(cluster, len(caps))
    configured = "layer_mapping" if uses_mapping(model, partition) else partition or model.partition or "even"
    partition = partition or model.partition
    objective = model.placement_objective
    unknown = unknown_figures(caps)
    even_ranges = even(shape.n_layer, len(caps))

    def made(chosen, note, why=None, placement=None, solved=False):
        placement = placement or forecast(shape, caps, chosen, cluster, objective)
        return Decision([tuple(r) for r in chosen], solved, why, note, placement,
                        forecast(shape, caps, even_ranges, cluster, objective), unknown, hop_s, sessions, depth)

    if not planned_by_leader(model, partition):
        return made(ranges, f"{configured}: as configured")
    if any(c is None for c in caps):
        return made(ranges, "not every node is known yet: the even starting point")
    if any(c.speed_gbps is None for c in caps):
        return made(even_ranges, f"even: a node's speed is unknown ({'; '.join(unknown)}), "
                                 "so no split can be predicted", "a node's speed is unknown")
    if partition == "auto":
        why = note = "partition: auto"
    else:
        one_machine = (cluster is not None and len({n.ip for n in cluster.nodes}) == 1
                       and not cluster.node_overrides)
        if one_machine:
            return made(even_ranges, "even: partition not set, and every node is on the same machine (one address "
                                     "in host_ip), so their measurements differ only by noise",
                        "every node on one machine")
        why = differ(caps)
        if why is None:
            return made(even_ranges, "even: partition not set, and the nodes measure within 25% of each other",
                        "the nodes measure within 25%")
        note = f"partition not set and the nodes differ: {why}"
    p = solve(shape, caps, sessions=sessions, hop_s=hop_s, objective=objective, depth=depth)
    return made(p.ranges, f"auto ({note}); objective {objective}", why, p, solved=True)
