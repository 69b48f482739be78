"""Tensor parallelism measured: one conversation on one core, on a split stage over two, on a pipeline over two.

Each node is a real `nanopipe serve`/`join` process pinned to one core (`taskset -c`), with one BLAS
thread: each core stands for a machine. The weights are gpt2-medium shaped (24 blocks of C=1024,
16 heads; ~1.4 GB of float32, far larger than a last-level cache, so every token streams them from
memory) and synthetic. Three setups, measured in turn, round after round, in one run:

    (a) one node   rank 0 on core 0 holds every block and the head
    (b) split      rank 0 (embed, block 0, head) and member 0 of the split stage on core 0, member 1
                   on core 1; blocks 1-23 split by heads and MLP columns (layer_mapping
                   {0: [0, 0], 1: [1, 23], 2: [1, 23]}), `split_lm_head: false`: the head on rank 0.
                   For one conversation rank 0 and member 0 never run at once (the ring is
                   sequential), so they share core 0 as one machine.
    (b+h) split head  (b) with the LM head split by vocabulary over the two members (the default):
                   each computes the logits of half the vocabulary, member 0 sends rank 0 logits.
    (c) pipeline   rank 0 (blocks 0-11 and the head) on core 0, rank 1 (blocks 12-23) on core 1

Each setup runs two greedy streams a round. The untraced one gives the ms/token compared (what a
client's greedy chat gets; with the split head, the members' compact reply). The traced one (its
trace asks top-5 logprobs, so a split head sends whole logits) says where a token's time goes:
rank 0's blocks and LM head, each member's compute and the part of it spent in all-reduces (waiting
for the other member and adding), and the ring's hops.
The link model for a split stage (what `nanopipe plan` prints) is cluster/group.py's predict_split.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

from ..cluster.group import GroupLinks, GroupPlace, Link
from ..cluster.net import tune
from ..fast_decode import decode_blocks
from ..kernels import BLOCK_ORDER_ENV, HEAD_ORDER_ENV
from ..model import KVCache, head_share, vocab_share
from ..weights import WEIGHTS_DIR, ensure_synthetic, load_head_share, load_stage, read_config
from .bench import bench_prompt, write_csv
from .localcluster import LocalCluster, free_ports

BLAS_ONE = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "VECLIB_MAXIMUM_THREADS": "1"}


def one_core_orders(cfg, pin: str | None, echo=print) -> dict:
    """The memory orders (kernels.choose_layout) one pinned core with one BLAS thread finds faster,
    measured once in a child process on core 0, and pinned for every node of every setup: nine nodes
    each timing itself at start, while the others start, would not all choose alike. The caller's
    NANOPIPE_BLOCK_ORDER / NANOPIPE_HEAD_ORDER win."""
    if os.environ.get(BLOCK_ORDER_ENV) and os.environ.get(HEAD_ORDER_ENV):
        return {}
    code = ("from nanopipe.kernels import choose_layout; "
            f"k = choose_layout({cfg.n_embd}, {cfg.n_vocab}); print(k.block_order, k.head_order, '|', k.layout_how)")
    out = subprocess.run(([pin, "-c", "0"] if pin else []) + [sys.executable, "-c", code],
                         env={**os.environ, **BLAS_ONE}, capture_output=True, text=True, timeout=300,
                         check=True).stdout.strip()
    (block, head), how = out.split("|")[0].split(), out.split("|", 1)[1].strip()
    echo(f"memory orders for every node (one core, one BLAS thread): blocks {block}, head {head} ({how})")
    return {BLOCK_ORDER_ENV: os.environ.get(BLOCK_ORDER_ENV) or block,
            HEAD_ORDER_ENV: os.environ.get(HEAD_ORDER_ENV) or head}


def setups(n_layer: int) -> dict:
    """name -> (nodes, layer_mapping or None, {rank: core}, cluster_config extras)"""
    last, half = n_layer - 1, n_layer // 2
    split = {0: [0, 0], 1: [1, last], 2: [1, last]}
    return {
        "a: 1 node, 1 core": (1, None, {0: 0}, {}),
        "b: split, head on rank 0": (3, split, {0: 0, 1: 0, 2: 1}, {"split_lm_head": False}),
        "b+h: split, head split": (3, split, {0: 0, 1: 0, 2: 1}, {"split_lm_head": True}),
        "c: pipeline, 2 cores": (2, {0: [0, half - 1], 1: [half, last]}, {0: 0, 1: 1}, {}),
    }


def one_stream(cl, prompt_len: int, n_tokens: int, trace: bool = True) -> dict:
    """One greedy stream, with per-hop traces or without: {"token_times", "events", "done"}
    (bench_cluster's streams_cluster for one stream; that module runs this one, so it is not
    imported here). A trace asks each step's top-5 logprobs, so a split head then sends whole
    logits; untraced, a greedy step gets the members' compact reply (TOP)."""
    s = {"token_times": [], "events": []}
    with cl.client(timeout=60) as c:
        s["t_start"] = time.perf_counter()
        s["done"] = c.generate(bench_prompt(prompt_len), strategy="greedy", max_tokens=n_tokens, ignore_eos=True,
                               text=False, trace=trace, on_event=s["events"].append,
                               on_token=lambda t, _x: t is not None and s["token_times"].append(time.perf_counter()))
    return s


def _status(cl) -> dict:
    with cl.client(timeout=30) as c:
        return c.status()


def _worker_totals(st: dict) -> dict:
    return {n["rank"]: (n.get("compute_ms") or 0.0, n.get("frames") or 0, n.get("reduce_ms") or 0.0,
                        n.get("head_ms") or 0.0, n.get("compute_cpu_ms") or 0.0, n.get("reduce_sleeps") or 0)
            for n in st["nodes"] if n["rank"] > 0}


def measure(cl, prompt_len: int, n_tokens: int, heartbeat_s: float) -> dict:
    """Two greedy streams: median ms per decode token untraced (the figure compared: what a
    client's greedy chat gets), then traced, and per token where the traced one's time went."""
    time.sleep(3 * heartbeat_s)
    plain = one_stream(cl, prompt_len, n_tokens, trace=False)
    m = _measure_traced(cl, prompt_len, n_tokens, heartbeat_s)
    m["traced_ms_per_token"] = m["ms_per_token"]
    m["ms_per_token"] = round(float(np.median(np.diff(plain["token_times"]))) * 1000, 2)
    m["tok_s"] = round(1000 / m["ms_per_token"], 2)
    m["same_tokens_traced"] = plain["done"]["token_ids"] == m["token_ids"]
    return m


def _measure_traced(cl, prompt_len: int, n_tokens: int, heartbeat_s: float) -> dict:
    """One traced greedy stream: median ms per decode token, and per token where it went."""
    time.sleep(3 * heartbeat_s)
    before = _worker_totals(_status(cl))
    load0 = os.getloadavg()[0]
    s = one_stream(cl, prompt_len, n_tokens)
    load1 = os.getloadavg()[0]
    time.sleep(3 * heartbeat_s)                     # the workers' next heartbeats carry this run's totals
    after = _worker_totals(_status(cl))
    ms = float(np.median(np.diff(s["token_times"]))) * 1000
    decode = [e for e in s["events"][1:] if e.get("hops")]
    parts = {}
    if decode:
        parts["rank 0 blocks"] = float(np.median([e["hops"][0]["compute_ms"] for e in decode]))
        parts["rank 0 head+sampling"] = float(np.median([e["head_ms"] for e in decode if e.get("head_ms") is not None]))
        for i in range(1, len(decode[0]["hops"])):
            hop = decode[0]["hops"][i]
            parts[f"rank {hop['rank']} compute"] = float(np.median([e["hops"][i]["compute_ms"] for e in decode]))
            if "reduce_ms" in hop:
                parts[f"rank {hop['rank']} all-reduce"] = float(np.median([e["hops"][i].get("reduce_ms", 0)
                                                                           for e in decode]))
        known = sum(v for k, v in parts.items() if "all-reduce" not in k)
        parts["hops and scheduler"] = ms - known
    for rank, (c1, f1, r1, h1, u1, s1) in after.items():     # every worker, the members without a hop of their own too
        c0, f0, r0, h0, u0, s0 = before.get(rank, (0.0, 0, 0.0, 0.0, 0.0, 0))
        if f1 > f0 and f"rank {rank} compute" not in parts:
            parts[f"rank {rank} compute (mean)"] = (c1 - c0) / (f1 - f0)
            if r1 > r0:
                parts[f"rank {rank} all-reduce (mean)"] = (r1 - r0) / (f1 - f0)
        if f1 > f0 and h1 > h0:     # a member's share of the LM head (and, on the hop, gathering the others')
            parts[f"rank {rank} head (mean)"] = (h1 - h0) / (f1 - f0)
            if f"rank {rank} compute" in parts and "hops and scheduler" in parts:
                parts["hops and scheduler"] -= parts[f"rank {rank} head (mean)"]
        if f1 > f0:                                 # load-independent: CPU time in compute, sleeps in all-reduces
            parts[f"rank {rank} compute on CPU (mean)"] = (u1 - u0) / (f1 - f0)
            if s1 > s0:
                parts[f"rank {rank} all-reduce sleeps (mean)"] = (s1 - s0) / (f1 - f0)
    return {"ms_per_token": round(ms, 2), "tok_s": round(1000 / ms, 2), "token_ids": s["done"]["token_ids"],
            "parts": {k: round(v, 2) for k, v in parts.items()}, "load": round(max(load0, load1), 2)}


def bench_tp(weights: str | None = None, *, size: str = "gpt2-medium", n_tokens: int = 48, prompt_len: int = 16,
             rounds: int = 2, nice: int = 0, echo=print) -> list:
    """(a), (b) and (c) side by side: all three clusters up at once, measured in turn, `rounds` times.
    `nice` < 0 runs the nodes at that priority (root only): on a machine that others load, a node
    then waits less for its core, as a machine of its own would not wait at all."""
    weights = weights or ensure_synthetic(folder=WEIGHTS_DIR, size=size, log=echo)
    cfg = read_config(weights)[0]
    pin = shutil.which("taskset")
    if pin is None:
        echo("note: no taskset here: the nodes are not pinned to cores, so (a) may use both")
    heartbeat_s = 0.2
    env = {**BLAS_ONE, **one_core_orders(cfg, pin, echo)}
    clusters = {}
    rows = []
    try:
        for name, (nodes, mapping, cores, extra) in setups(cfg.n_layer).items():
            wrap = {r: (["nice", "-n", str(nice)] if nice else []) + ([pin, "-c", str(c)] if pin else [])
                    for r, c in cores.items()}
            echo(f"starting {name}: {nodes} node(s)" + (f", layer_mapping {mapping}" if mapping else ""))
            cl = LocalCluster(weights, nodes=nodes, layer_mapping=mapping, env=env, wrap=wrap, ready_timeout=600,
                              cluster_extra={"heartbeat_s": heartbeat_s, "prefix_cache_mb": 0, **extra})
            clusters[name] = cl.start()
            one_stream(cl, prompt_len, 4)                                        # warm-up
        for rnd in range(1, rounds + 1):
            for name, cl in clusters.items():
                m = measure(cl, prompt_len, n_tokens, heartbeat_s)
                rows.append({"round": rnd, "setup": name, **m})
                echo(f"round {rnd} {name}: {m['ms_per_token']} ms/token ({m['tok_s']} tok/s; traced "
                     f"{m['traced_ms_per_token']}), load {m['load']}")
    finally:
        for cl in clusters.values():
            cl.stop()
    one = {r["round"]: r for r in rows if r["setup"].startswith("a:")}
    for r in rows:
        base = one[r["round"]]
        r["speedup_vs_a"] = round(base["ms_per_token"] / r["ms_per_token"], 3)
        r["same_tokens_as_a"] = r["token_ids"] == base["token_ids"] and r["same_tokens_traced"]
    return rows


def format_rows(rows: list) -> str:
    lines = [f"{'round':>5}  {'setup':<26} {'ms/token':>8} {'tok/s':>7} {'vs (a)':>7} {'same':>5} {'traced':>7} "
             f"{'load':>5}  where a traced token's time goes (ms)"]
    for r in rows:
        parts = ", ".join(f"{k} {v}" for k, v in r["parts"].items())
        lines.append(f"{r['round']:>5}  {r['setup']:<26} {r['ms_per_token']:>8.2f} {r['tok_s']:>7.2f} "
                     f"{r['speedup_vs_a']:>6.2f}x {str(r['same_tokens_as_a']):>5} {r['traced_ms_per_token']:>7.2f} "
                     f"{r['load']:>5}  {parts}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# direct or gather: the all-reduce alone, m processes on loopback


def _reduce_member(index: int, ports: list, how: str, rows: int, n_embd: int, repeats: int, out):
    """One member of `reduce_bench`: link up with the others (member j dials each member i < j),
    then time `repeats` all-reduces of a (rows, C) partial through GroupLinks."""

    m = len(ports)
    srv = socket.create_server(("127.0.0.1", ports[index]), backlog=m)
    links = {}
    for i in range(index):
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", ports[i]))
                break
            except OSError:
                time.sleep(0.05)
        tune(s)
        s.sendall(bytes([index]))
        links[i] = Link(s, f"member {i}", 1 << 30)
    for _ in range(index + 1, m):
        s, _ = srv.accept()
        tune(s)
        j = s.recv(1)[0]
        links[j] = Link(s, f"member {j}", 1 << 30)
    g = GroupLinks(GroupPlace({"members": [[r, "127.0.0.1", p] for r, p in enumerate(ports)], "member": index,
                               "how": how}), 1 << 30)
    g.links, g.epoch = links, 1
    x = np.full((rows, n_embd), index + 1, np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        total = g.all_reduce(x)
        times.append(time.perf_counter() - t)
    out.send((float(np.median(times[repeats // 10:])) * 1e6, float(total.sum())))
    for link in links.values():
        link.flush()
    time.sleep(0.5)                         # the others read their last frames before the links close
    for link in links.values():
        link.close()
    srv.close()


def reduce_bench(members: int, how: str, rows: int = 1, n_embd: int = 1024, repeats: int = 400) -> dict:
    """Median microseconds per all-reduce, seen by member 0, of m processes on loopback."""

    ctx = mp.get_context("fork")
    ports = free_ports(members)
    pipes, procs = [], []
    for i in range(members):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_reduce_member, args=(i, ports, how, rows, n_embd, repeats, b), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    got = []
    for a in pipes:
        try:
            got.append(a.recv() if a.poll(120) else (float("nan"), float("nan")))
        except EOFError:                    # that member failed (its traceback is on stderr)
            got.append((float("nan"), float("nan")))
    for p in procs:
        p.join(10)
    sums = {s for _, s in got}
    return {"members": members, "how": how, "rows": rows, "us_per_all_reduce": round(got[0][0], 1),
            "same_sum_everywhere": len(sums) == 1, "load": round(os.getloadavg()[0], 2)}


def compare_reduce(sizes=(2, 3, 4), rows=(1, 16), rounds: int = 2, echo=print) -> list:
    """direct vs gather, side by side, `rounds` times: the numbers behind group.REDUCE_HOW."""
    out = []
    for rnd in range(1, rounds + 1):
        for m in sizes:
            for r in rows:
                for how in ("direct", "gather") if m > 2 else ("direct",):
                    row = {"round": rnd, **reduce_bench(m, how, rows=r)}
                    out.append(row)
                    echo(f"round {rnd}: {m} members, {r} row(s), {how}: {row['us_per_all_reduce']} us "
                         f"(load {row['load']})")
    return out


# ---------------------------------------------------------------------------------------------
# the LM head alone: one core for all of it, or m cores for a share each at once


def _head_member(path: str, member: int, members: int, repeats: int, barrier, out):
    """One member of `head_bench` (a fresh process, one BLAS thread): pinned to core member % cores,
    its rows of the head read from `path`; times `repeats` one-row head_shares, each started with
    the other members' at once (a barrier)."""
    os.sched_setaffinity(0, {member % os.cpu_count()})
    part = load_head_share(path, vocab_share(member, members, read_config(path)[0].n_vocab))
    x = np.random.default_rng(0).standard_normal((1, part["lm_head"].shape[1])).astype(np.float32)   # (1, C)
    times = []
    for _ in range(repeats):
        barrier.wait()
        t = time.perf_counter()
        head_share(x, part["ln_f"], part["lm_head"])                                   # (1, v1-v0)
        times.append(time.perf_counter() - t)
    out.send(float(np.median(times[repeats // 5:])) * 1000)


def head_bench(path: str, members: int, repeats: int = 60) -> dict:
    """Median ms of one row's LM head: `members` processes on their own cores, each with its share
    of the vocabulary, started at once (members=1: the whole head on one core). The slowest
    member's median is what a split head costs before its gather."""
    ctx = mp.get_context("spawn")                  # fresh processes: their BLAS starts with one thread
    saved = {k: os.environ.get(k) for k in BLAS_ONE}
    os.environ.update(BLAS_ONE)
    barrier = ctx.Barrier(members)
    pipes, procs = [], []
    for i in range(members):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_head_member, args=(path, i, members, repeats, barrier, b), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    got = [a.recv() if a.poll(300) else float("nan") for a in pipes]
    for p in procs:
        p.join(10)
    return {"members": members, "ms_per_member": [round(g, 2) for g in got], "slowest_ms": round(max(got), 2),
            "load": round(os.getloadavg()[0], 2)}


def compare_head(path: str | None = None, rounds: int = 3, echo=print) -> list:
    """The LM head on one core against split over two, side by side, `rounds` times."""
    path = path or ensure_synthetic(folder=WEIGHTS_DIR, size="gpt2-medium", log=echo)
    out = []
    for rnd in range(1, rounds + 1):
        for m in (1, 2):
            row = {"round": rnd, **head_bench(path, m)}
            out.append(row)
            echo(f"round {rnd}: LM head over {m} core(s): {row['ms_per_member']} ms (load {row['load']})")
    return out


# ---------------------------------------------------------------------------------------------
# the ceiling: what the cores' shared memory allows a split stage, with no exchange at all


def _blocks_member(path: str, lo: int, hi: int, member: int, members: int, core: int, repeats: int,
                   position: int, barrier, out):
    """One process of `blocks_bench` (fresh, one BLAS thread) pinned to `core`: blocks lo..hi-1, its
    share of them (member of members; members=1: whole blocks), one decode row at `position` through
    fast_decode.decode_blocks `repeats` times; with `barrier`, each repetition starts with the others'.
    The all-reduce is left out (`reduce` returns the partial itself): what is timed is what the
    member's core and memory do, nothing the wire does."""
    os.sched_setaffinity(0, {core % os.cpu_count()})
    st = load_stage(path, lo, hi, rank0=False, share=None if members == 1 else (member, members))
    c = st.config
    n_head = c.n_head if st.share is None else st.share.n_head
    cache = KVCache(hi - lo, n_head, c.head_dim, position + 1)
    cache.reserve(position + 1)
    cache.k[:], cache.v[:] = 0.5, 0.25                                               # any finite keys, values
    x = np.random.default_rng(0).standard_normal((1, c.n_embd)).astype(np.float32)   # (1, C)
    times = []
    for _ in range(repeats):
        if barrier is not None:
            barrier.wait()
        cache.length = position                                                     # the same position each time
        t = time.perf_counter()
        decode_blocks(x, st.blocks, n_head=n_head, segments=[(cache, 1)], reduce=lambda part: part)
        times.append(time.perf_counter() - t)
    out.send(float(np.median(times[repeats // 5:])) * 1000)


def blocks_bench(path: str, lo: int, hi: int, members: int, at_once: bool, repeats: int = 40,
                 position: int = 32) -> list:
    """Median ms per token of blocks lo..hi-1 for each of `members` processes, member i pinned to core
    i: members=1 the whole blocks on core 0; at_once=False each member alone (one after another),
    True all started together every repetition (a barrier), as a split stage runs them."""
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in BLAS_ONE}
    os.environ.update(BLAS_ONE)
    try:
        def run(which):
            barrier = ctx.Barrier(len(which)) if len(which) > 1 else None
            pipes, procs = [], []
            for i in which:
                a, b = ctx.Pipe()
                p = ctx.Process(target=_blocks_member, daemon=True,
                                args=(path, lo, hi, i, members, i, repeats, position, barrier, b))
                p.start()
                pipes.append(a)
                procs.append(p)
            got = [a.recv() if a.poll(600) else float("nan") for a in pipes]
            for p in procs:
                p.join(10)
            return got
        if at_once:
            return [round(g, 2) for g in run(list(range(members)))]
        return [round(run([i])[0], 2) for i in range(members)]
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def compare_ceiling(path: str | None = None, rounds: int = 2, echo=print) -> list:
    """What this machine allows (b) at best, measured: blocks 1-23 (the split stage's) on one core,
    then each member's half alone, then both halves at once on two cores, no exchange. On two
    machines each half would run as fast as alone; on one machine's two cores the halves share its
    memory bandwidth, and best-alone / whole is the split's ceiling here."""
    path = path or ensure_synthetic(folder=WEIGHTS_DIR, size="gpt2-medium", log=echo)
    n_layer = read_config(path)[0].n_layer
    out = []
    for rnd in range(1, rounds + 1):
        load = os.getloadavg()[0]
        whole = blocks_bench(path, 1, n_layer, 1, False)[0]
        alone = blocks_bench(path, 1, n_layer, 2, False)
        together = blocks_bench(path, 1, n_layer, 2, True)
        row = {"round": rnd, "whole_ms": whole, "halves_alone_ms": " ".join(map(str, alone)),
               "halves_at_once_ms": " ".join(map(str, together)),
               "ceiling_two_machines": round(whole / max(alone), 3),
               "ceiling_this_machine": round(whole / max(together), 3),
               "load": round(max(load, os.getloadavg()[0]), 2)}
        out.append(row)
        echo(f"round {rnd}: blocks 1-{n_layer - 1}, one row, no exchange: whole on 1 core {whole} ms; halves alone "
             f"{alone} ms; halves at once on 2 cores {together} ms -> at most {row['ceiling_this_machine']:.2f}x "
             f"here, {row['ceiling_two_machines']:.2f}x on two machines (load {row['load']})")
    return out


def main(out_dir: str = "artifacts/bench", echo=print) -> dict:
    """`make bench-tp`: (a), (b), (c) twice, then direct vs gather, the LM head alone and the
    ceiling (blocks with no exchange); CSVs in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    echo(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rows = bench_tp(echo=echo)
    echo(format_rows(rows))
    write_csv([{k: v for k, v in r.items() if k != "token_ids"} for r in rows], os.path.join(out_dir, "tp.csv"))
    reduce = compare_reduce(echo=echo)
    write_csv(reduce, os.path.join(out_dir, "reduce.csv"))
    heads = compare_head(echo=echo)
    write_csv([{**r, "ms_per_member": " ".join(map(str, r["ms_per_member"]))} for r in heads],
              os.path.join(out_dir, "head.csv"))
    ceiling = compare_ceiling(echo=echo)
    write_csv(ceiling, os.path.join(out_dir, "tp_ceiling.csv"))
    echo(f"load average after: {os.getloadavg()[0]:.2f}")
    return {"tp": rows, "reduce": reduce, "head": heads, "ceiling": ceiling}


if __name__ == "__main__":
    import sys
    main(*sys.argv[1:2])
