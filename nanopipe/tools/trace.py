"""One token's journey through the cluster: `nanopipe trace PROMPT`.

For every new token, the step that produced it, hop by hop. gpt2's shapes on 3 local nodes (synthetic
weights, hence the gibberish token; one shared 2-core machine, hence the noisy times):

    token 2: '598' (id 41292), p=4.07e-04    decode: 1 row goes round the ring
      node   rank  layers  sends     bytes on wire  compute ms  transit ms
      node0     0  0-3     (1, 768)          3,205       12.14        2.72  -> rank 1
      node1     1  4-7     (1, 768)          3,292      154.13        0.49  -> rank 2
      node2     2  8-11    (1, 768)          3,380      145.25        0.66  -> rank 0
      node0     0  ln_f + LM head: 11.13 ms
      top-5: '598' 4.07e-04 | '130' 1.74e-04 | ' Ukrainian' 1.36e-04 | ' dry' 1.28e-04 | ' kinds' 1.25e-04

Where the numbers come from:
  compute    each node times its own work: rank 0 its embed + blocks (and, at the end, ln_f + the
             LM head); a worker its blocks, which it appends to the ACT frame's "trace" list.
  bytes      the real size of the ACT frame a node sends on: 20-byte header + JSON meta +
             rows * C * 4 payload bytes, counted where the frame arrives (the next worker's
             "bytes_in"; the leader adds "bytes_out" for the last hop). The meta grows a little
             at each hop because it carries the trace so far.
  transit    from the end of one node's compute to the frame's arrival at the next node, on wall
             clocks ("t_in" in each trace entry): exact on one machine, right on a LAN only if the
             clocks are synchronized. "transit_total_ms" needs no clocks: the ring's round trip as
             the leader saw it, minus the workers' compute.

The leader sends this per token when a GENERATE asks for it (meta "trace": true); each TOKEN frame
then also carries "hops", "head_ms", "transit_total_ms" and "top" (the 5 likeliest ids with their
probabilities, before temperature). `sessions.step_info` builds it inside the scheduler, `decoding.top_probs` the top 5.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import WEIGHTS_DIR
from ..decoding import round_sig
from ..partition import layers_text

SYNTHETIC_PATH = os.path.join(WEIGHTS_DIR, "synthetic-gpt2.safetensors")   # weights.synthetic_name("gpt2"), shared


# ---------------------------------------------------------------------------------------------
# running a trace


class TraceError(RuntimeError):
    """The trace could not run; the message says what to fix."""


def resolve_weights(path: str | None, log=print) -> str:
    """The file to trace with: `path` if given, else synthetic gpt2 weights, written on first use."""
    if path is not None:
        if not os.path.exists(path):
            raise TraceError(f"{path}: no such weights file; run `nanopipe pull gpt2`, or leave out --weights "
                             f"to use synthetic weights ({SYNTHETIC_PATH})")
        return path
    from ..weights import ensure_synthetic
    return ensure_synthetic(SYNTHETIC_PATH, os.path.dirname(SYNTHETIC_PATH), "gpt2", log=log)


def is_synthetic(path: str) -> bool:
    """Was this file written by `init_weights` (random weights)?"""
    from ..weights import is_synthetic as synthetic
    return synthetic(path)


def run_trace(prompt: str, *, leader: str | None = None, nodes: int = 3, weights: str | None = None,
              max_tokens: int = 3, token: str | None = None, tls_ca: str | None = None, log=print,
              then: str | None = None) -> dict:
    """Generate `max_tokens` tokens for `prompt` with tracing on; returns the report `format_trace` prints.

    With `leader` ("HOST:PORT") it runs on that cluster; otherwise it starts a LocalCluster of `nodes`
    processes on 127.0.0.1 over `weights`, and stops it afterwards. `token` and `tls_ca` (the
    cluster's tls_cert) are what dialing `leader` needs. With `then` (text), a second turn: `prompt`
    runs first untraced, then prompt + its reply + `then` is traced, reusing the first turn's cache.
    """
    from ..tokenizer import get_tokenizer
    tok = get_tokenizer()
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise TraceError("the prompt is empty: give some text to trace")
    then_ids = tok.encode(then) if then else None
    if then is not None and not then_ids:
        raise TraceError("--then is empty: give the text of the second turn")
    if leader is not None:
        from ..cluster.leader_client import LeaderClient
        with LeaderClient.connect(leader, token=token, tls_ca=tls_ca) as c:
            report = _trace(c, prompt_ids, max_tokens, then_ids)
        report.update(leader=leader, weights=None, synthetic=None)
    else:
        report = _trace_local(prompt_ids, nodes, weights, max_tokens, log, then_ids)
    return _describe(report, tok.decode(report["prompt_ids"]) if then_ids else prompt, tok)


def _trace_local(prompt_ids: list, nodes: int, weights: str, max_tokens: int, log, then_ids=None) -> dict:
    import tempfile

    from ..partition import PartitionError, even
    from ..weights import read_config
    from .localcluster import LocalCluster
    n_layer = read_config(weights)[0].n_layer
    try:
        even(n_layer, nodes)
    except PartitionError as e:
        raise TraceError(f"--nodes {nodes}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="nanopipe-trace-") as workdir:
        cluster = LocalCluster(weights, nodes=nodes, workdir=workdir)
        log(f"Starting {nodes} node(s) on 127.0.0.1 with {weights} ...")
        try:
            cluster.start()
            with cluster.client() as c:
                report = _trace(c, prompt_ids, max_tokens, then_ids)
        except (RuntimeError, TimeoutError) as e:
            raise TraceError(f"the local cluster did not run: {e}") from None
        finally:
            cluster.stop()
    report.update(leader=None, weights=weights, synthetic=is_synthetic(weights))
    return report


def _trace(client, prompt_ids: list, max_tokens: int, then_ids=None) -> dict:
    """One traced generation over an open LeaderClient: the leader's TOKEN metas, as they came.
    With `then_ids`, a first turn runs untraced and prompt + its reply + then_ids is traced."""
    status = client.status()
    if then_ids:
        first = client.generate(list(prompt_ids), None, max_tokens=max_tokens, text=False)
        prompt_ids = list(prompt_ids) + list(first.get("token_ids", [])) + list(then_ids)
    events: list = []
    result = client.generate(prompt_ids, None, max_tokens=max_tokens, trace=True, text=False,
                             on_event=events.append)
    if events and "hops" not in events[0]:
        raise TraceError("the leader sent no trace data; it runs an older nanopipe: update every node")
    nodes = [{"rank": n["rank"], "host": n["host"], "layers": n["layers"]} for n in status["nodes"]]
    return {"prompt_ids": list(prompt_ids), "nodes": nodes, "strategy": result.get("decoding_strategy"),
            "events": events, "token_ids": result.get("token_ids", []),
            "cached_tokens": result.get("cached_tokens") or 0, "cached_from": result.get("cached_from")}


def _describe(raw: dict, prompt: str, tok) -> dict:
    """Name everything a reader needs: token pieces, node names; drop the wire-only keys."""
    hosts = {n["rank"]: n["host"] for n in raw["nodes"]}
    tokens = []
    for m in raw.pop("events"):
        hops = [dict(h, node=hosts.get(h["rank"], f"rank{h['rank']}")) for h in m["hops"]]
        tokens.append({"index": len(tokens), "id": m["token"], "piece": tok.pieces([m["token"]])[0],
                       "logprob": m["logprob"], "prob": round_sig(np.exp(m["logprob"])), "hops": hops,
                       "head_ms": m.get("head_ms"), "transit_total_ms": m.get("transit_total_ms"),
                       "top": [{"id": i, "piece": tok.pieces([i])[0], "prob": p} for i, p in m["top"]]})
    return {"prompt": prompt, "prompt_ids": raw["prompt_ids"], "prompt_pieces": tok.pieces(raw["prompt_ids"]),
            "leader": raw["leader"], "weights": raw["weights"], "synthetic": raw["synthetic"],
            "strategy": raw["strategy"], "nodes": raw["nodes"], "tokens": tokens,
            "cached_tokens": raw.get("cached_tokens", 0), "cached_from": raw.get("cached_from"),
            "text": tok.decode(raw["token_ids"])}


# ---------------------------------------------------------------------------------------------
# printing it


def format_trace(report: dict) -> str:
    """The report as text: a header, then one table per token (see the module docstring)."""
    n = len(report["nodes"])
    where = f"the cluster at {report['leader']}" if report["leader"] else f"a local cluster of {n} node(s)"
    lines = [f"Tracing {report['prompt']!r} on {where}, {report['strategy']} decoding"]
    if report["weights"]:
        label = ("SYNTHETIC random weights: the text is gibberish; shapes, bytes and hops are real"
                 if report["synthetic"] else "real weights")
        lines.append(f"weights: {report['weights']} ({label})")
    lines.append("plan:   " + " | ".join(f"rank {n['rank']} {n['host']} layers {_layers(n['layers'])}"
                                         for n in report["nodes"]))
    lines.append(f"prompt: {report['prompt_pieces']} -> {report['prompt_ids']}")
    cached = report.get("cached_tokens") or 0
    if cached:
        lines.append(f"prefix: {cached} of {len(report['prompt_ids'])} prompt tokens reused from the KV cache "
                     f"session {report.get('cached_from')} left on every stage; "
                     f"{len(report['prompt_ids']) - cached} prefilled")
    for t in report["tokens"]:
        rows = t["hops"][0]["shape"][0]
        route = "round the ring" if len(t["hops"]) > 1 else "through rank 0 alone"
        rest = f" (the {cached} before it reused)" if cached else ""
        kind = (f"prefill: the {rows}-row prompt{rest} goes {route}" if t["index"] == 0
                else f"decode: {rows} row{'s' if rows != 1 else ''} go{'es' if rows == 1 else ''} {route}")
        lines += ["", f"token {t['index'] + 1}: {t['piece']!r} (id {t['id']}), p={_prob(t['prob'])}    {kind}"]
        lines += _hop_table(t)
        lines.append("  top-5: " + " | ".join(f"{c['piece']!r} {_prob(c['prob'])}" for c in t["top"]))
    lines += ["", f"text: {report['text']!r}"]
    if any(h["transit_ms"] is not None and h["transit_ms"] < 0 for t in report["tokens"] for h in t["hops"]):
        lines.append("note: a negative transit means the nodes' clocks disagree; per-hop transit needs "
                     "synchronized clocks, transit_total_ms (in --json) does not")
    return "\n".join(lines)


def _hop_table(t: dict) -> list:
    n = len(t["hops"])
    wire = n > 1                            # one node: nothing goes on a wire
    header = ["node", "rank", "layers", "sends", "bytes on wire", "compute ms", "transit ms", ""]
    rows = [[h["node"], str(h["rank"]), _layers(h["layers"]), f"({h['shape'][0]}, {h['shape'][1]})",
             _num(h["bytes"], "{:,}") if wire else "-", _num(h["compute_ms"], "{:.2f}"),
             _num(h["transit_ms"], "{:.2f}") if wire else "-",
             f"-> rank {t['hops'][(i + 1) % n]['rank']}" if wire else ""]
            for i, h in enumerate(t["hops"])]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    right = {1, 4, 5, 6}
    out = ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in [header] + rows]
    out = [line.rstrip() for line in out]
    first = t["hops"][0]
    out.append(f"  {first['node'].ljust(widths[0])}  {str(first['rank']).rjust(widths[1])}  "
               f"ln_f + LM head: {_num(t['head_ms'], '{:.2f}')} ms")
    return out


def _layers(layers) -> str:
    """[4, 7] (first, last, as JSON shows them) -> "4-7", partition.layers_text's form."""
    return "?" if not layers else layers_text(layers[0], layers[1] + 1)


def _prob(p: float) -> str:
    """0.18203 -> "0.1820"; a random model's 2.03e-05 -> "2.03e-05" rather than "0.0000"."""
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.2e}"


def _num(x, fmt: str) -> str:
    return "?" if x is None else fmt.format(x)
