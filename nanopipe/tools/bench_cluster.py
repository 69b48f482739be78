"""Benchmarks of the cluster and of concurrency: `nanopipe bench --nodes 3 --sweep --positions --links`.

- `bench_cluster`: one stream through a local N-node cluster next to one process, in the same run,
  with each hop's compute and transit per token;
- `sweep`: 1, 2, 3, 4, 8, 16 concurrent streams, one process and a cluster, each with the old
  always-gemm kernels and with the kernels each process chose (model.linear): aggregate tokens/s,
  per-stream tokens/s, p50/p95 time per token (continuous batching is what makes 8 streams cheap);
- `positions`: time per token at context positions 16, 256 and 1000 (the KV cache keeps it flat);
- `links`: a simulated link on every hop (latency + bandwidth) for 2..8 nodes, measured, next to the
  model  time per token = sum of stage compute + hops x (latency + bytes / bandwidth);
- `conversation`: a multi-turn chat on a cluster over a simulated WiFi link, first-token time of
  every turn with prefix reuse (nanopipe/prefix.py) and without (prefix_cache_mb: 0), in one run.

All of it runs the real code: the scheduler of `engine.py`, real `serve`/`join` processes.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from .. import kernels
from ..cgroups import CGroup, why_not_writable
from ..cluster.wire import HEADER, Msg, encode_frame
from ..decoding import SamplingParams
from ..engine import Engine, Request
from ..partition import layers_text
from .bench import (
    DEFAULT_WEIGHTS,
    bench_prompt,
    ensure_weights,
    generate_fixed,
    kernels_as,
    quick_bench,
    run_bench,
    verdict,
    write_csv,
)
from .bench_tp import bench_tp, compare_reduce
from .bench_tp import format_rows as format_tp
from .localcluster import LocalCluster

LINKS = {  # name: (latency ms, Mbit/s)
    "loopback": (0.0, 0.0),
    "thunderbolt": (0.05, 10_000.0),
    "ethernet": (0.2, 1_000.0),
    "wifi": (3.0, 100.0),
}


# ---------------------------------------------------------------------------------------------
# measuring streams


def _stats(streams: list, n_tokens: int) -> dict:
    """streams: [{"t_start", "token_times"}] of one run -> aggregate and per-stream numbers."""
    t0 = min(s["t_start"] for s in streams)
    t_end = max(s["token_times"][-1] for s in streams)
    total = sum(len(s["token_times"]) for s in streams)
    gaps = np.concatenate([np.diff(s["token_times"]) for s in streams]) * 1000      # ms between tokens
    per_stream = [len(s["token_times"]) / (s["token_times"][-1] - s["t_start"]) for s in streams]
    return {"streams": len(streams), "tokens": total, "aggregate_tok_s": round(total / (t_end - t0), 2),
            "per_stream_tok_s": round(float(np.mean(per_stream)), 2),
            "p50_ms_per_token": round(float(np.percentile(gaps, 50)), 2),
            "p95_ms_per_token": round(float(np.percentile(gaps, 95)), 2)}


def streams_single(engine: Engine, n_streams: int, prompt_len: int, n_tokens: int) -> dict:
    """n_streams requests submitted at once to one process's scheduler (batched together)."""
    streams = [{"token_times": []} for _ in range(n_streams)]
    for i, s in enumerate(streams):
        def emit(kind, data, s=s):
            if kind == "token":
                s["token_times"].append(time.perf_counter())
        params = SamplingParams("greedy", max_tokens=n_tokens)
        s["t_start"] = time.perf_counter()
        engine.scheduler.submit(Request(bench_prompt(prompt_len, seed=i), params, emit, stop_at_eot=False))
    engine.scheduler.run_until_idle()
    return _stats(streams, n_tokens)


def streams_cluster(cluster: LocalCluster, n_streams: int, prompt_len: int, n_tokens: int,
                    trace: bool = False) -> dict:
    """n_streams clients at once, each on its own connection to the leader."""
    streams = [{"token_times": [], "events": []} for _ in range(n_streams)]
    errors = []

    def run(i, s):
        try:
            with cluster.client(timeout=30) as c:
                s["t_start"] = time.perf_counter()
                s["done"] = c.generate(bench_prompt(prompt_len, seed=i), strategy="greedy", max_tokens=n_tokens,
                                       ignore_eos=True, text=False, trace=trace,
                                       on_token=lambda t, _x: t is not None and s["token_times"].append(
                                           time.perf_counter()),
                                       on_event=s["events"].append if trace else None)
        except Exception as e:  # reported below; a benchmark must not hang on one failed stream
            errors.append(f"stream {i}: {e}")

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    out = _stats(streams, n_tokens)
    out["_streams"] = streams
    return out


# ---------------------------------------------------------------------------------------------
# one stream: cluster vs one process, and where a token's time goes


def hop_breakdown(events: list) -> list:
    """Median per-token compute and transit of each hop, from TOKEN frames with `hops` (decode steps
    only: the first token's step is the prefill)."""
    decode = [e["hops"] for e in events[1:] if e.get("hops")]
    if not decode:
        return []
    out = []
    for i, hop in enumerate(decode[0]):
        comp = [d[i]["compute_ms"] for d in decode if i < len(d)]
        tran = [d[i]["transit_ms"] for d in decode if i < len(d) and d[i]["transit_ms"] is not None]
        out.append({"rank": hop["rank"], "layers": hop["layers"], "shape": hop["shape"], "bytes": hop["bytes"],
                    "compute_ms": round(float(np.median(comp)), 3),
                    "transit_ms": round(float(np.median(tran)), 3) if tran else None})
    head = [e.get("head_ms") for e in events[1:] if e.get("head_ms") is not None]
    if head:
        out.append({"rank": 0, "layers": "head", "compute_ms": round(float(np.median(head)), 3), "transit_ms": None})
    return out


def serialize_cost(n_embd: int, repeats: int = 2000) -> dict:
    """What building one decode frame costs (header + meta JSON + tobytes), in microseconds."""
    x = np.ones((1, n_embd), np.float32)
    meta = {"batch": 1, "epoch": 1, "sessions": [{"id": "s1", "pos": 7, "n": 1}], "dtype": "float32",
            "shape": [1, n_embd], "trace": [{"rank": 1, "compute_ms": 1.0}]}
    t = time.perf_counter()
    for _ in range(repeats):
        frame = encode_frame(Msg.ACT, meta, x)
    us = (time.perf_counter() - t) / repeats * 1e6
    return {"encode_us": round(us, 2), "frame_bytes": len(frame), "header_bytes": HEADER.size}


def bench_cluster(weights: str, nodes: int, prompt_len: int = 32, n_tokens: int = 64, repeats: int = 3,
                  extra: dict | None = None) -> dict:
    """One stream: a local `nodes`-node cluster and one process, measured alternately in one run."""
    engine = Engine.load(weights, prefix_cache_bytes=0)   # every prompt computed in full
    ids = bench_prompt(prompt_len)
    generate_fixed(engine, ids, 2)
    single, multi, events = [], [], []
    n_embd = engine.config.n_embd
    with LocalCluster(weights, nodes=nodes, cluster_extra={**(extra or {}), **NO_REUSE}) as cl:
        streams_cluster(cl, 1, prompt_len, 2)                                   # warm-up
        for _ in range(repeats):
            r = generate_fixed(engine, ids, n_tokens)
            single.append(1.0 / float(np.median(np.diff(r["token_times"]))))
            c = streams_cluster(cl, 1, prompt_len, n_tokens, trace=True)
            s = c["_streams"][0]
            multi.append(1.0 / float(np.median(np.diff(s["token_times"]))))
            events = s["events"]
            same = s["done"]["token_ids"] == r["token_ids"]
    del engine
    one, many = float(np.median(single)), float(np.median(multi))
    return {"nodes": nodes, "single_tok_s": round(one, 2), "cluster_tok_s": round(many, 2),
            "ratio": round(many / one, 3), "identical_tokens": same, "hops": hop_breakdown(events),
            "serialize": serialize_cost(n_embd)}


def format_hops(result: dict) -> str:
    lines = [f"{'rank':>4} {'layers':>8} {'sends':>10} {'bytes':>7} {'compute ms':>10} {'transit ms':>10}"]
    for h in result["hops"]:
        layers = h["layers"] if isinstance(h["layers"], str) else layers_text(h["layers"][0], h["layers"][1] + 1)
        shape = f"({h['shape'][0]}, {h['shape'][1]})" if h.get("shape") else ""
        lines.append(f"{h['rank']:>4} {layers:>8} {shape:>10} {h.get('bytes') or '':>7} {h['compute_ms']:>10.3f} "
                     f"{'' if h['transit_ms'] is None else format(h['transit_ms'], '.3f'):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the sweep, the positions, the links


OLD_KERNELS = {"NANOPIPE_GEMV_ROWS": "1", "NANOPIPE_PREFILL_ROWS": "64",   # the old fixed choice: always one gemm
               "NANOPIPE_HEAD_ROWS": "1"}
# the benchmarks send the same prompts again and again: without this, every repeat after the first
# would reuse the first one's KV cache (nanopipe/prefix.py) and time almost no prefill at all
NO_REUSE = {"prefix_cache_mb": 0}


def node_kernels(cluster: LocalCluster) -> list:
    """Each rank's `linear:` log line: what it chose and what it measured (kernels.describe_kernels)."""
    out = []
    for rank in sorted(cluster.procs):
        try:
            with open(cluster.log_path(rank), errors="replace") as f:
                lines = [ln.strip() for ln in f if "linear:" in ln]
        except OSError:
            lines = []
        out.append({"rank": rank, "line": lines[-1] if lines else "(no kernel line in its log)"})
    return out


def sweep(weights: str, counts=(1, 2, 3, 4, 8, 16), nodes: int = 3, prompt_len: int = 16, n_tokens: int = 48,
          compare_old: bool = True, also: tuple = (), echo=print) -> list:
    """Concurrent streams in one process and on a local cluster of `nodes` nodes.

    With compare_old, every point runs twice in this one run: "before", the always-gemm kernels and
    64-row prompt chunks (NANOPIPE_GEMV_ROWS=1, NANOPIPE_PREFILL_ROWS=64, NANOPIPE_HEAD_ROWS=1), and "after", what each
    process chose at start (measured, unless those variables are set). Rows carry "kernels".
    `also`: more (name, (gemv_rows, prefill_rows)) modes for the one-process part, e.g. a choice a
    quiet machine measured, to see it on a loaded one.
    """
    rows = []
    engine = Engine.load(weights, prefix_cache_bytes=0)   # chooses this process's kernels; no reuse
    k = kernels.kernels
    chosen = (k.gemv_rows, k.prefill_rows, k.head_rows)
    echo(f"  one process: {kernels.describe_kernels()}")
    modes = [("before", (1, 64, 1)), ("after", chosen)] if compare_old else [("after", chosen)]
    streams_single(engine, 1, prompt_len, 2)
    for n in counts:
        for mode, (g, pf, *h) in modes + list(also):
            with kernels_as(g, pf, *h):
                rows.append(dict(streams_single(engine, n, prompt_len, n_tokens), setup="1 process", kernels=mode,
                                 gemv_rows=g))
            echo(f"  1 process, {n} stream(s), {mode}: {rows[-1]['aggregate_tok_s']} tok/s aggregate")
    del engine
    if nodes > 1:
        for mode, _ in modes:
            with LocalCluster(weights, nodes=nodes, env=OLD_KERNELS if mode == "before" else None,
                              cluster_extra=NO_REUSE) as cl:
                streams_cluster(cl, 1, prompt_len, 2)
                deadline = time.time() + 10             # a worker reports its choice with its next heartbeat
                while True:
                    with cl.client() as c:
                        chose = {n["rank"]: n.get("gemv_rows") for n in c.status()["nodes"]}
                    if None not in chose.values() or time.time() > deadline:
                        break
                    time.sleep(0.2)
                for k in node_kernels(cl):
                    echo(f"  {nodes} nodes, {mode}: rank {k['rank']}: {k['line']}")
                for n in counts:
                    r = streams_cluster(cl, n, prompt_len, n_tokens)
                    r.pop("_streams")
                    rows.append(dict(r, setup=f"{nodes} nodes (loopback)", kernels=mode,
                                     gemv_rows="/".join(str(chose[k]) for k in sorted(chose))))
                    echo(f"  {nodes} nodes, {n} stream(s), {mode}: {rows[-1]['aggregate_tok_s']} tok/s aggregate")
    return rows


def sweep_summary(rows: list) -> list:
    """Per setup and kernel mode: 2 and 4 streams vs 1, and each point vs "before"."""
    lines = []
    for setup in dict.fromkeys(r["setup"] for r in rows):
        got = {(r["kernels"], r["streams"]): r["aggregate_tok_s"] for r in rows if r["setup"] == setup}
        modes = list(dict.fromkeys(m for m, _ in got))
        for mode in modes:
            one = got.get((mode, 1))
            if one:
                scale = ", ".join(f"{n} streams {got[(mode, n)] / one:.2f}x" for n in (2, 4) if (mode, n) in got)
                lines.append(f"{setup}, {mode}: {scale} the aggregate of 1 stream (targets 1.6x and 2.2x)")
        for mode in modes:
            pairs = [(n, got[(mode, n)] / got[("before", n)]) for (m, n) in got if m == mode and ("before", n) in got]
            if mode != "before" and pairs:
                lines.append(f"{setup}, {mode} / before: " + ", ".join(f"{n}: {x:.2f}x" for n, x in sorted(pairs))
                             + ("" if all(x >= 1 for _, x in pairs) else "  (a point slower: noise or a regression)"))
    return lines


def positions(weights: str, at=(16, 256, 1000), n_tokens: int = 16) -> list:
    """Decode time per token once the context holds `at` positions (one process)."""
    engine = Engine.load(weights, prefix_cache_bytes=0)   # every prompt computed in full
    n_ctx = engine.config.n_ctx
    rows = []
    generate_fixed(engine, bench_prompt(8), 2)
    for p in at:
        n = min(n_tokens, n_ctx - p)
        r = generate_fixed(engine, bench_prompt(p), n)
        gaps = np.diff(r["token_times"]) * 1000
        rows.append({"position": p, "ms_per_token": round(float(np.median(gaps)), 2),
                     "tok_s": round(1000 / float(np.median(gaps)), 2)})
    return rows


def predict_ms(compute_ms: float, overhead_ms: float, hops: int, latency_ms: float, mbps: float,
               frame_bytes: int) -> float:
    """The link model: time per token = stage compute + what loopback hops cost anyway (kernel,
    wake-ups) + hops x (latency + bytes / bandwidth)."""
    wire = frame_bytes * 8 / (mbps * 1e6) * 1000 if mbps > 0 else 0.0
    return compute_ms + overhead_ms + hops * (latency_ms + wire)


def links(weights: str, node_counts=(2, 3, 4, 8), names=("loopback", "thunderbolt", "ethernet", "wifi"),
          prompt_len: int = 16, n_tokens: int = 32, echo=print) -> list:
    """Measured tokens/s over simulated links, next to the model's prediction.

    Each run's own stage compute (from the trace) goes into its prediction, so the check is of the
    link term alone: on a shared 2-core machine the compute of 8 processes varies run to run."""
    rows = []
    for nodes in node_counts:
        overhead = None
        for name in names:
            latency, mbps = LINKS[name]
            extra = {"link_delay_ms": latency, "link_mbps": mbps}
            with LocalCluster(weights, nodes=nodes, cluster_extra={**extra, **NO_REUSE}) as cl:
                streams_cluster(cl, 1, prompt_len, 2)
                r = streams_cluster(cl, 1, prompt_len, n_tokens, trace=True)
            s = r["_streams"][0]
            measured = float(np.median(np.diff(s["token_times"]))) * 1000
            hops = hop_breakdown(s["events"])
            compute = sum(h["compute_ms"] for h in hops)
            sized = [h["bytes"] for h in hops if h.get("bytes")]
            frame = int(np.mean(sized)) if sized else 3200
            if overhead is None:       # loopback: what the hops cost with no link delay at all
                overhead = max(0.0, measured - compute)
            pred = predict_ms(compute, overhead, nodes, latency, mbps, frame)
            rows.append({"nodes": nodes, "link": name, "latency_ms": latency, "mbps": mbps,
                         "compute_ms": round(compute, 2), "measured_ms_per_token": round(measured, 2),
                         "predicted_ms_per_token": round(pred, 2), "measured_tok_s": round(1000 / measured, 2),
                         "predicted_tok_s": round(1000 / pred, 2),
                         "error_pct": round((measured - pred) / pred * 100, 1)})
            echo(f"  {nodes} nodes over {name}: {rows[-1]['measured_tok_s']} tok/s "
                 f"(model {rows[-1]['predicted_tok_s']})")
    return rows


class Conversation:
    """One chat as a client holds it: turn 1 sends a system prompt + a user message; each later turn
    sends everything so far (prompts and greedy replies) + a new user message. `seed` picks the
    (random-id) messages, so two Conversations with one seed send the same turns."""

    def __init__(self, seed: int, system_len: int, user_len: int, reply_len: int):
        self.rng = np.random.default_rng(seed)
        self.user_len, self.reply_len = user_len, reply_len
        self.prompt = self.words(system_len) + self.words(user_len)

    def words(self, n: int) -> list:
        return [int(t) for t in self.rng.integers(300, 40000, n)]

    def turn(self, client) -> dict:
        """Send the next turn: prompt tokens, tokens reused, and the first token's time as the client
        sees it (request sent -> first TOKEN frame)."""
        first = {}
        t0 = time.perf_counter()
        r = client.generate(list(self.prompt), SamplingParams("greedy", max_tokens=self.reply_len), text=False,
                            ignore_eos=True, on_token=lambda _t, _x: first.setdefault("t", time.perf_counter()))
        row = {"prompt_tokens": len(self.prompt), "cached_tokens": r.get("cached_tokens", 0),
               "first_token_ms": (first["t"] - t0) * 1000, "token_ids": r["token_ids"]}
        self.prompt = self.prompt + r["token_ids"] + self.words(self.user_len)
        return row


def conversation(weights: str, nodes: int = 3, n_turns: int = 6, link: str = "wifi", system_len: int = 64,
                 user_len: int = 24, reply_len: int = 16, repeats: int = 3, echo=print) -> list:
    """First-token time of each turn of a conversation, with prefix reuse and without
    (prefix_cache_mb: 0), on two `nodes`-node loopback clusters whose every hop is the simulated
    `link` (LINKS). Both clusters run side by side and take turns, the same turn on one right after
    the other, so a noisy machine slows both alike; `repeats` conversations (new messages each
    time), median per turn. Target: turn 6's first token >= 5x sooner with reuse; the greedy
    replies must be the same tokens both ways."""
    latency, mbps = LINKS[link]
    extra = {"link_delay_ms": latency, "link_mbps": mbps}
    echo(f"{repeats} x a {n_turns}-turn conversation, two {nodes}-node clusters over simulated {link} "
         f"({latency} ms, {mbps:g} Mbit/s per hop): prefix reuse and full prefill, turn by turn ...")
    times = {"reuse": [[] for _ in range(n_turns)], "full": [[] for _ in range(n_turns)]}
    first_run, same = {}, True
    with LocalCluster(weights, nodes=nodes, cluster_extra=extra) as reuse, \
            LocalCluster(weights, nodes=nodes, cluster_extra={**extra, "prefix_cache_mb": 0}) as full, \
            reuse.client(timeout=300) as a, full.client(timeout=300) as b:
        for rep in range(repeats):
            chats = {"reuse": Conversation(rep, system_len, user_len, reply_len),
                     "full": Conversation(rep, system_len, user_len, reply_len)}
            for i in range(n_turns):
                got = {"reuse": chats["reuse"].turn(a), "full": chats["full"].turn(b)}
                same = same and got["reuse"]["token_ids"] == got["full"]["token_ids"]
                for mode in got:
                    times[mode][i].append(got[mode]["first_token_ms"])
                if rep == 0:
                    first_run[i] = got
    rows = []
    for i in range(n_turns):
        ms_reuse, ms_full = float(np.median(times["reuse"][i])), float(np.median(times["full"][i]))
        rows.append({"turn": i + 1, "prompt_tokens": first_run[i]["reuse"]["prompt_tokens"],
                     "reused_tokens": first_run[i]["reuse"]["cached_tokens"],
                     "first_token_ms_reuse": round(ms_reuse, 1), "first_token_ms_full": round(ms_full, 1),
                     "speedup": round(ms_full / ms_reuse, 2), "same_tokens": same})
    return rows


def table(rows: list, cols: list) -> str:
    """A plain text table of `cols` (key names) for `rows` (dicts)."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def plot_sweep(rows: list, path: str) -> str | None:
    """A PNG of aggregate tokens/s against streams, when matplotlib is installed (the plot extra)."""
    try:    # imported here: matplotlib is optional (the plot extra); without it, no PNG
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): draws to files, no display
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for setup, mode in dict.fromkeys((r["setup"], r.get("kernels", "")) for r in rows):
        pts = [r for r in rows if r["setup"] == setup and r.get("kernels", "") == mode]
        ax.plot([r["streams"] for r in pts], [r["aggregate_tok_s"] for r in pts], marker="o",
                linestyle="--" if mode == "before" else "-", label=f"{setup}, {mode}" if mode else setup)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("nanopipe: continuous batching, gpt2-small shape")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# everything, as `nanopipe bench` runs it


# rank 0's memory for at most 6 gpt2 blocks at max_sessions 16 (MB, 10^6 bytes): wte + wpe + ln_f
# (157.5 MB) + 6 x (28.35 MB of weights + 100.7 MB of KV cache) = 932 MB
RANK0_SIX_BLOCKS_MB = 940


def placement(weights: str, n_tokens: int = 32, prompt_len: int = 16, quota: float = 0.25, slow_rank: int = 2,
              echo=print) -> list:
    """3 nodes on loopback, worker `slow_rank` under a CPU quota of `quota` of one core (a cgroup v1
    child group; needs root); in this one run: the even split, `partition: auto`, and `auto` with
    rank 0's memory set to hold at most 6 blocks (so the plan must use a worker); 1 and 8 streams:
    measured tok/s beside the leader's prediction, and each stage's predicted vs measured one-row
    decode time.

    The three nodes share this machine, so the leader keeps one batch in flight (depth 1) and
    predicts the sum of the stages; nodes take turns measuring themselves (kernels.measuring_alone).
    """
    why = why_not_writable("cpu")
    if why is not None:
        echo(f"placement bench skipped: {why} (it puts one worker under a CPU quota)")
        return []
    rows = []
    setups = [("even", "even", {}), ("auto", "auto", {}),
              ("auto, rank 0 <= 6 blocks", "auto", {"nodes": {"node0": {"memory_mb": RANK0_SIX_BLOCKS_MB}}})]
    with CGroup("cpu", {"cpu.cfs_period_us": 100000, "cpu.cfs_quota_us": int(100000 * quota)}) as cg:
        for label, partition, extra in setups:
            with LocalCluster(weights, nodes=3, partition=partition, wrap={slow_rank: cg.wrapper()},
                              cluster_extra={"heartbeat_s": 0.2, **NO_REUSE, **extra}, ready_timeout=180,
                              env={"NANOPIPE_PROBE_S": "1.0"}) as cl:     # 10 quota periods per probe
                streams_cluster(cl, 1, prompt_len, 4)                   # warm-up
                for n in (1, 8):
                    r = streams_cluster(cl, n, prompt_len, n_tokens)
                    time.sleep(0.5)                                     # the workers' last STATS
                    with cl.client() as c:
                        st = c.status()
                    pl = st.get("placement") or {}
                    stages = pl.get("stages") or []
                    rows.append({
                        "partition": label, "streams": n,
                        "split": "/".join(str(nd["layers"][1] - nd["layers"][0] + 1) if nd["layers"] else "0"
                                          for nd in st["nodes"]),
                        "measured_tok_s": r["aggregate_tok_s"], "predicted_tok_s": pl.get(f"predicted_tok_s_{n}"),
                        "stage_predicted_ms": "/".join(f"{x['predicted_ms']:.1f}" for x in stages),
                        "stage_measured_ms": "/".join("-" if x["measured_ms"] is None else f"{x['measured_ms']:.1f}"
                                                      for x in stages),
                        "speeds_gbps": "/".join(f"{nd['capacity']['speed_gbps']:.1f}" if nd.get("capacity") else "?"
                                                for nd in st["nodes"])})
                    echo(f"  {label}, {n} stream(s): {rows[-1]}")
    for n in (1, 8):
        ev = next(r for r in rows if r["partition"] == "even" and r["streams"] == n)
        for label, _, _ in setups[1:]:
            au = next(r for r in rows if r["partition"] == label and r["streams"] == n)
            echo(f"{n} stream(s): {label} ({au['split']}) {au['measured_tok_s']} tok/s vs even "
                 f"{ev['measured_tok_s']} tok/s: {au['measured_tok_s'] / ev['measured_tok_s']:.2f}x (target >= 1.5x)")
        echo(f"{n} stream(s): predicted / measured: " + ", ".join(
            f"{r['partition']} {_ratio(r)}" for r in rows if r["streams"] == n) + " (target: within 25%)")
    return rows


def plot_placement(rows: list, path: str) -> str | None:
    """A PNG of predicted against measured: tokens/s per split and stream count (left), one-row ms
    per stage (right), with the line predicted = measured and a +-25% band."""
    try:    # imported here: matplotlib is optional (the plot extra); without it, no PNG
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): draws to files, no display
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, pts, unit in ((a, [(r["measured_tok_s"], r["predicted_tok_s"], f"{r['partition']} {r['split']}, "
                                f"{r['streams']} stream{'s' if r['streams'] > 1 else ''}")
                               for r in rows if r.get("predicted_tok_s")], "tokens/s"),
                          (b, [(float(m), float(p), f"{r['partition']} rank {i}")
                               for r in rows if r["streams"] == 1
                               for i, (p, m) in enumerate(zip(r["stage_predicted_ms"].split("/"),
                                                              r["stage_measured_ms"].split("/"))) if m != "-"],
                           "ms per one-row step")):
        if not pts:
            continue
        hi = max(max(x, y) for x, y, _ in pts) * 1.15
        ax.plot([0, hi], [0, hi], color="black", lw=1, label="predicted = measured")
        ax.fill_between([0, hi], [0, hi * 0.75], [0, hi * 1.25], color="grey", alpha=0.15, label="within 25%")
        for x, y, label in pts:
            ax.scatter([x], [y], marker="o" if "even" in label else "s")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"predicted {unit}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    a.set_title("tokens/s: even vs auto split")
    b.set_title("each stage's decode step")
    fig.suptitle("nanopipe placement: prediction vs measurement (3 nodes, one at 25% of a core)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ratio(row) -> str:
    p, m = row.get("predicted_tok_s"), row.get("measured_tok_s")
    return f"{p / m:.2f}" if p and m else "n/a"


def run_all(weights: str | None = None, *, n_tokens: int = 64, prompt_len: int = 32, bandwidth_mb: int = 1024,
            nodes: int = 1, link_delay_ms: float = 0.0, link_mbps: float = 0.0, sweep: bool = False,
            positions: bool = False, links: bool = False, single: bool = True, out_dir: str | None = None,
            reference=None, llama=None, placement_bench: bool = False, conversation: bool = False,
            full: bool = False, tp: bool = False, echo=print) -> dict:
    """Every benchmark asked for. The one-process part is the short table (bench.quick_bench) unless
    `full`, or a reference to compare with (`make bench`), asks for the whole report (bench.run_bench)."""
    weights = weights or ensure_weights(DEFAULT_WEIGHTS, echo)
    report = {}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    def save(name, rows):
        if out_dir and rows:
            write_csv(rows, os.path.join(out_dir, f"{name}.csv"))

    if single and not (full or reference or llama):
        echo("== one process ==")
        report["single"] = quick_bench(weights, n_tokens=n_tokens, prompt_len=prompt_len,
                                       bandwidth_mb=bandwidth_mb, echo=echo)
        save("single", report["single"]["rows"])
    elif single:
        echo("== one process ==")
        report["single"] = run_bench(weights, n_tokens=n_tokens, prompt_len=prompt_len, reference=reference,
                                     bandwidth_mb=bandwidth_mb, llama=llama, echo=echo)
        save("single", report["single"]["rows"])
    if nodes > 1:
        echo(f"== {nodes} nodes on loopback vs one process, 1 stream ==")
        if link_delay_ms or link_mbps:
            echo(f"(simulated link: {link_delay_ms} ms, {link_mbps or 'unlimited'} Mbit/s per hop)")
        r = bench_cluster(weights, nodes, prompt_len, n_tokens, extra={"link_delay_ms": link_delay_ms,
                                                                        "link_mbps": link_mbps})
        report["cluster"] = r
        echo(f"one process {r['single_tok_s']} tok/s, {nodes} nodes {r['cluster_tok_s']} tok/s: "
             f"{r['ratio']:.2f}x: {verdict(r['ratio'], 0.9)} on loopback; greedy tokens "
             f"{'identical' if r['identical_tokens'] else 'DIFFER'}")
        echo("per token (median of decode steps):")
        echo(format_hops(r))
        if r.get("serialize"):
            echo(f"serializing one decode frame: {r['serialize']['encode_us']} us for {r['serialize']['frame_bytes']}"
                 " bytes (header + meta + payload); the rest of a hop's transit is the kernel and the wake-up")
        save("cluster_hops", r["hops"])
    if sweep:
        echo(f"== concurrency sweep ({max(nodes, 3)}-node cluster and one process) ==")
        rows = globals()["sweep"](weights, nodes=max(nodes, 3), echo=echo)
        report["sweep"] = rows
        echo(table(rows, ["setup", "kernels", "gemv_rows", "streams", "aggregate_tok_s", "per_stream_tok_s",
                          "p50_ms_per_token", "p95_ms_per_token"]))
        for line in sweep_summary(rows):
            echo(line)
        one = next(r for r in rows if r["setup"] == "1 process" and r["streams"] == 1 and r["kernels"] == "after")
        eight = next((r for r in rows if r["setup"] == "1 process" and r["streams"] == 8
                      and r["kernels"] == "after"), None)
        if eight:
            ratio = eight['aggregate_tok_s'] / one['aggregate_tok_s']
            echo(f"8 streams vs 1, one process: {ratio:.2f}x aggregate: {verdict(ratio, 4)}")
        save("sweep", rows)
        if out_dir:
            png = plot_sweep(rows, os.path.join(out_dir, "sweep.png"))
            echo(f"wrote {png}" if png else "matplotlib not installed: no chart (pip install nanopipe[plot])")
    if positions:
        echo("== time per token by context position (one process) ==")
        rows = globals()["positions"](weights)
        report["positions"] = rows
        echo(table(rows, ["position", "ms_per_token", "tok_s"]))
        save("positions", rows)
    if links:
        echo("== simulated links (1 stream): measured vs model ==")
        rows = globals()["links"](weights, echo=echo)
        report["links"] = rows
        echo(table(rows, ["nodes", "link", "latency_ms", "mbps", "compute_ms", "measured_ms_per_token",
                          "predicted_ms_per_token", "measured_tok_s", "predicted_tok_s", "error_pct"]))
        save("links", rows)
    if placement_bench:
        echo("== placement: 3 nodes on one machine, one worker at 25% of a core: even vs auto ==")
        rows = placement(weights, echo=echo)
        report["placement"] = rows
        if rows:
            echo(table(rows, ["partition", "streams", "split", "speeds_gbps", "measured_tok_s", "predicted_tok_s",
                              "stage_predicted_ms", "stage_measured_ms"]))
        save("placement", rows)
        if out_dir and rows:
            png = plot_placement(rows, os.path.join(out_dir, "placement.png"))
            echo(f"wrote {png}" if png else "matplotlib not installed: no chart")
    if tp:
        echo("== tensor parallelism: gpt2-medium, one conversation: 1 core vs a split stage vs a pipeline on 2 ==")
        rows = bench_tp(echo=echo)
        report["tp"] = rows
        echo(format_tp(rows))
        save("tp", [{k: v for k, v in r.items() if k != "token_ids"} for r in rows])
        echo("== the all-reduce alone, members on loopback: direct vs gather ==")
        report["reduce"] = compare_reduce(echo=echo)
        save("reduce", report["reduce"])
    if conversation:
        echo("== a 6-turn conversation over WiFi: prefix reuse vs full prefill ==")
        rows = globals()["conversation"](weights, nodes=max(nodes, 3), echo=echo)
        report["conversation"] = rows
        echo(table(rows, ["turn", "prompt_tokens", "reused_tokens", "first_token_ms_reuse", "first_token_ms_full",
                          "speedup", "same_tokens"]))
        last = rows[-1]
        echo(f"turn {last['turn']}: first token {last['speedup']:.2f}x sooner with reuse: "
             f"{verdict(last['speedup'], 5)}; greedy "
             f"replies {'identical' if all(r['same_tokens'] for r in rows) else 'DIFFER'}")
        save("conversation", rows)
    return report
