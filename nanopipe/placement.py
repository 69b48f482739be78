"""Where the layers go on a mixed cluster: each node measures itself, the leader solves the split.

Decoding is bound by memory, not arithmetic: every new token streams every weight of a stage
through a matrix-vector product once. So a stage's time per token is, to first order,

    t_stage = (bytes of the weights it holds) / (how fast the node streams float32 weights)

and the two numbers a node reports are that speed (GB/s, measured with the model's own matrix
shapes, for one row and for a batch of 8 rows) and the memory it may use. The leader collects them
at registration and picks the contiguous split with the best predicted time per token:

    objective "throughput" (many streams): the slowest stage sets the pace of the pipeline;
    objective "latency"    (one stream):   the token visits every stage in turn, plus every hop.

Subject to memory: a node must hold its blocks' weights plus their KV cache at max_sessions x n_ctx
(rank 0 also holds wte, wpe and ln_f, and streams wte again as the tied LM head). A node that
cannot hold a single block, or whose blocks would only slow the others, gets no layers and is left
out (the ring skips it).

Worked example: gpt2 (12 blocks of 28.35 MB; rank 0 also streams wte, 154.4 MB, as the LM head),
nodes mini1 and mini2 at 20 GB/s (40 GB/s for 8 rows) and pi5 at 5 GB/s (10), hops 1 ms, memory
to spare. Stage times in ms per token (one row):

    even 4/4/4      13.39 + 5.67 + 22.68 -> one stream 22.4 tok/s; 8 streams: pi5 paces, 648 tok/s
    throughput      2/8/2: 10.55, 11.34, 11.34 -> 27.6 tok/s; 8 streams 1199 tok/s (1.85x even)
    latency         12/0/0: 24.73 ms on mini1 alone beats any split plus its hops -> 40.4 tok/s;
                    mini2 and pi5 are left out (for one stream, a hop costs more than it saves)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .partition import block_params

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
    """
    name: str
    speed_gbps: float
    speed8_gbps: float
    memory_mb: float
    source: str = "measured"

    def as_dict(self) -> dict:
        return {"name": self.name, "speed_gbps": round(self.speed_gbps, 3),
                "speed8_gbps": round(self.speed8_gbps, 3), "memory_mb": round(self.memory_mb, 1),
                "source": self.source}

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
        s1 = float(override.get("speed_gbps", self.speed_gbps))
        s8 = float(override.get("speed8_gbps", s1 * self.speed8_gbps / self.speed_gbps))
        mem = float(override.get("memory_mb", self.memory_mb))
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
        vals = [getattr(n, key) for n in nodes]
        lo, hi = min(vals), max(vals)
        if hi > lo * (1 + tolerance):
            low = nodes[vals.index(lo)].name
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


def usable_memory_bytes() -> int:
    """The smaller of MemAvailable and the cgroup's room: what this node can really allocate."""
    known = [b for b in (mem_available_bytes(), cgroup_memory_room()) if b is not None]
    return min(known) if known else 0


def probe_matrices(n_embd: int, min_bytes: int = 96 << 20) -> list:
    """Weight matrices of one GPT-2 block's shapes, stored as the loader stores them, repeated
    until they total at least `min_bytes` (more than any CPU's last-level cache, so the probe
    measures memory streaming, not cache hits).

    gpt2 (C=768): one block is c_attn (C, 3C), attn.c_proj (C, C), mlp.c_fc (C, 4C),
    mlp.c_proj (4C, C) = 12 C^2 floats = 28.3 MB, so 4 copies = 113 MB.
    """
    c = n_embd
    shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
    per_block = 4 * sum(a * b for a, b in shapes)
    copies = max(1, math.ceil(min_bytes / per_block))
    # the loader keeps block weights column-major (w.T is a row-major (out, in) matrix); the values
    # do not matter to the speed, but the pages must be written (an untouched page reads as zeros
    # from one shared page, which is cache, not memory)
    return [np.full(s, 0.01, np.float32, order="F") for _ in range(copies) for s in shapes]


def measure_speed(n_embd: int, rows: int = 1, seconds: float = 0.25, mats: list | None = None) -> float:
    """GB/s of weights streamed through `x @ w` for `rows` rows, measured over >= `seconds` of wall
    time in whole passes over the matrices.

    Wall time, not CPU time, on purpose: a CPU quota (cgroup cpu.cfs_quota_us / cpu.max) lets the
    process run only part of every 100 ms period, and a window of a few periods shows it.
    """
    mats = mats if mats is not None else probe_matrices(n_embd)
    nbytes = sum(w.nbytes for w in mats)
    xs = {w.shape[0]: np.ones((rows, w.shape[0]), np.float32) for w in mats}
    for w in mats[:4]:                      # warm up: page in, BLAS threads up
        (w.T @ xs[w.shape[0]].T)
    passes, t0 = 0, time.perf_counter()
    while True:
        for w in mats:
            (w.T @ xs[w.shape[0]].T)        # the engine's linear: (out, in) @ (in, T)
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return passes * nbytes / elapsed / GB


def measure(name: str, n_embd: int, seconds: float = 0.25, override: dict | None = None) -> Capacity:
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
    room = usable_memory_bytes()
    mats = probe_matrices(n_embd, min_bytes=int(min(96 << 20, max(16 << 20, room // 3))) if room else 96 << 20)
    s1 = measure_speed(n_embd, 1, seconds, mats)
    s8 = measure_speed(n_embd, 8, seconds, mats)
    del mats
    mem = usable_memory_bytes() / MB
    source = "measured"
    if "speed_gbps" in override:
        s1 = float(override["speed_gbps"])
        s8 = float(override.get("speed8_gbps", s1 * s8 / max(s1, 1e-9)))
        source = "config+measured"
    if "memory_mb" in override:
        mem = float(override["memory_mb"])
        source = "config+measured"
    return Capacity(name, s1, s8, mem, source)


# ---------------------------------------------------------------------------------------------
# the model's side of the bill


@dataclass(frozen=True)
class ModelShape:
    """What the placement needs to know about the model, in bytes (float32)."""
    n_layer: int
    n_embd: int
    n_ctx: int = 1024
    n_vocab: int = 50257

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
    node holds nothing and is left out of the ring."""
    ranges: list
    objective: str
    stage_s: list                       # predicted seconds per token per node (1 row), 0 if left out
    stage8_s: list                      # predicted seconds per batch of 8 rows
    hop_s: float
    notes: list = field(default_factory=list)

    @property
    def used(self) -> list:
        return [i for i, (lo, hi) in enumerate(self.ranges) if hi > lo or i == 0]

    def tok_s(self, streams: int = 1) -> float:
        """Predicted tokens/s. One stream visits every stage and hop in turn. Several streams keep
        a pipeline of separate machines full: batches of up to 8 rows, and the slowest stage (plus
        its outgoing hop) sets the pace."""
        used = self.used
        hops = self.hop_s * len(used) if len(used) > 1 else 0.0
        if streams == 1:
            return 1.0 / (sum(self.stage_s) + hops)
        hop = self.hop_s if len(used) > 1 else 0.0
        cycle = max(self.stage8_s[i] + hop for i in used)
        return streams / (cycle * math.ceil(streams / 8))


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
          objective: str = "throughput", min_rank0_blocks: int = 1) -> Placement:
    """The contiguous split of shape.n_layer blocks over `nodes` (rank order, rank 0 first) that
    minimises the predicted time per token, by dynamic programming over (nodes, blocks).

    throughput: minimise the slowest stage (8-row batches); among splits that reach it, the one
    with the smallest one-stream time. latency: minimise the one-stream time (stages + hops).
    Workers may get no blocks (left out); rank 0 always takes part (it embeds and samples).
    """
    if objective not in ("throughput", "latency"):
        raise PlacementError(f"unknown placement objective {objective!r}; use throughput or latency")
    n, L = len(nodes), shape.n_layer
    cap = [max_blocks(shape, nd, i == 0, sessions) for i, nd in enumerate(nodes)]
    notes = []
    if cap[0] < 0:
        raise PlacementError(
            f"{nodes[0].name} (rank 0): {nodes[0].memory_mb:.0f} MB usable, but the embeddings and LM head "
            f"alone need {shape.rank0_bytes / MB:.0f} MB")
    total_room = sum(max(c, 0) for c in cap)
    if total_room < L or cap[0] < min_rank0_blocks:
        need = L * (shape.block_bytes + shape.kv_bytes(sessions)) + shape.rank0_bytes
        have = sum(nd.memory_mb for nd in nodes) * MB
        raise PlacementError(
            f"the model does not fit the cluster: {L} blocks x ({shape.block_bytes / MB:.0f} MB + "
            f"{shape.kv_bytes(sessions) / MB:.0f} MB KV at {sessions} sessions) + "
            f"{shape.rank0_bytes / MB:.0f} MB on rank 0 = {need / MB:.0f} MB needed, "
            f"{have / MB:.0f} MB usable in all ("
            + ", ".join(f"{nd.name}: {nd.memory_mb:.0f} MB, at most {max(c, 0)} blocks" for nd, c in zip(nodes, cap))
            + "); add a node, lower max_sessions, or use a smaller model")
    for i, (nd, c) in enumerate(zip(nodes, cap)):
        if i > 0 and c == 0:
            notes.append(f"{nd.name}: {nd.memory_mb:.0f} MB usable, one block needs "
                         f"{shape.block_bytes / MB:.0f} MB + {shape.kv_bytes(sessions) / MB:.0f} MB KV at "
                         f"{sessions} sessions: it cannot hold a block and is left out")
        elif c < L:
            notes.append(f"{nd.name}: {nd.memory_mb:.0f} MB usable, one block needs "
                         f"{shape.block_bytes / MB:.0f} MB + {shape.kv_bytes(sessions) / MB:.0f} MB KV at "
                         f"{sessions} sessions: it can hold at most {c} blocks")

    def cost1(i, k):
        return stage_seconds(shape, nodes[i], k, i == 0, 1)

    def cost8(i, k):
        return stage_seconds(shape, nodes[i], k, i == 0, 8)

    lo_k = [min_rank0_blocks] + [0] * (n - 1)
    INF = float("inf")

    def run(cost, combine, hop: float, bound=None):
        """f[i][j]: best cost of nodes 0..i-1 holding blocks 0..j-1 (each used node pays `hop`,
        its outgoing link); `bound`: skip stages whose 8-row time + hop exceeds it."""
        f = [[INF] * (L + 1) for _ in range(n + 1)]
        choice = [[0] * (L + 1) for _ in range(n + 1)]
        f[0][0] = 0.0
        for i in range(n):
            for j in range(L + 1):
                if f[i][j] == INF:
                    continue
                for k in range(lo_k[i], min(cap[i], L - j) + 1):
                    used = k > 0 or i == 0
                    if used and bound is not None and cost8(i, k) + hop > bound * (1 + 1e-12):
                        continue
                    v = combine(f[i][j], cost(i, k) + hop) if used else f[i][j]
                    if v < f[i + 1][j + k]:
                        f[i + 1][j + k], choice[i + 1][j + k] = v, k
        if f[n][L] == INF:
            return None, INF
        counts, j = [], L
        for i in range(n, 0, -1):
            counts.append(choice[i][j])
            j -= choice[i][j]
        return counts[::-1], f[n][L]

    def best(hop: float):
        if objective == "throughput":
            _, slowest = run(cost8, max, hop)
            counts, _ = run(cost1, lambda a, b: a + b, hop, bound=slowest)   # fastest one stream among them
            return counts
        return run(cost1, lambda a, b: a + b, hop)[0]

    candidates = [c for c in [best(hop_s)] if c is not None]
    if cap[0] >= L:     # rank 0 alone pays no hop at all, which the DP (every stage pays one) misses
        candidates.append([L] + [0] * (n - 1))

    def key(counts):
        p = predict(shape, nodes, _ranges_of(counts), hop_s=hop_s)
        one = 1.0 / p.tok_s(1)
        return (_slowest(p), one) if objective == "throughput" else (one,)

    counts = min(candidates, key=key)
    ranges = _ranges_of(counts)
    for i, k in enumerate(counts):
        if i > 0 and k == 0 and cap[i] > 0:
            notes.append(f"{nodes[i].name}: left out — at {nodes[i].speed_gbps:.3g} GB/s its blocks would "
                         "only slow the others")
    return Placement(ranges=ranges, objective=objective,
                     stage_s=[cost1(i, k) if (k or i == 0) else 0.0 for i, k in enumerate(counts)],
                     stage8_s=[cost8(i, k) if (k or i == 0) else 0.0 for i, k in enumerate(counts)],
                     hop_s=hop_s, notes=notes)


def _ranges_of(counts: list) -> list:
    """[2, 8, 2] -> [(0, 2), (2, 10), (10, 12)]"""
    out, lo = [], 0
    for k in counts:
        out.append((lo, lo + k))
        lo += k
    return out


def _slowest(p: Placement) -> float:
    hop = p.hop_s if len(p.used) > 1 else 0.0
    return max(p.stage8_s[i] + hop for i in p.used)


def predict(shape: ModelShape, nodes: list, ranges: list, hop_s: float = 0.0,
            objective: str = "throughput") -> Placement:
    """The prediction for a given split (e.g. the even one), to compare with the solved one."""
    counts = [hi - lo for lo, hi in ranges]
    return Placement(ranges=list(ranges), objective=objective,
                     stage_s=[stage_seconds(shape, nd, k, i == 0, 1) for i, (nd, k) in enumerate(zip(nodes, counts))],
                     stage8_s=[stage_seconds(shape, nd, k, i == 0, 8) for i, (nd, k) in enumerate(zip(nodes, counts))],
                     hop_s=hop_s)
