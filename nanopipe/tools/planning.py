"""Which node runs which layers, from which weights file: what `plan`, `serve`, `join` and `demo` work out
before anything runs, as plain functions (the CLI only prints and exits; tests call these directly).

    configs = Configs("configs")                      # gpt2, 12 layers, num_nodes 3, partition even
    ranges = plan_ranges(configs.model, model_shape(configs, None))     # [(0, 4), (4, 8), (8, 12)]
    stage = setup_rank(configs, None, rank=2)                           # pulls blocks 8..11 if missing
    stage.weights_path                                                  # weights/gpt2.layers-8-11.safetensors

Every function takes the command's `Configs` (config.py), which reads each file once.

A worker can plan its slice before it has any weights: the layer count is in the config, and for the
balanced split of a model of no known GPT-2 size, the remote file's header (two small Range requests)
gives n_embd and n_vocab (planning_shape).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .. import placement  # placement.measure / .decide looked up at the call: tests count the calls
from ..cluster.group import plan_lines
from ..cluster.split_plan import conversation_ms, decide_with_split, split_lines, split_link
from ..config import WEIGHTS_DIR, ConfigError, Configs, check_agree, weights_file
from ..gpt2_tensors import base_name
from ..model import GPTConfig, vocab_share
from ..partition import PartitionError, group_of, groups, planned_by_leader, stage_bytes, uses_mapping
from ..partition import plan as make_plan
from ..placement import Capacity, ModelShape, PlacementError, forecast, hop_seconds
from ..safetensors_io import SafetensorsError, read_header
from ..weights import KNOWN_N_HEAD, SIZES, WeightsError, is_synthetic, read_config, synthetic_name
from .pull import PullError, ensure_weights, remote_header


class SetupError(RuntimeError):
    """A node cannot get ready (its weights are missing and cannot be pulled): the message says what to do."""


def configured_weights(configs: Configs, weights_path: str | None) -> str:
    """--weights if given, else weights/<filename> from model_weights.yaml for the chosen model."""
    return weights_path or weights_file(configs.weights().filename)


def plan_ranges(mc, cfg, nodes=None, partition=None):
    """The layer ranges per rank: the model's layer_mapping if it has one (for its num_nodes),
    else the `partition` strategy (default: the model's)."""
    nodes = nodes or mc.num_nodes
    if uses_mapping(mc, partition):
        if nodes != mc.num_nodes:
            raise PartitionError(f"the model's layer_mapping is for {mc.num_nodes} nodes, not {nodes}; "
                                 "for another number of nodes pass --partition even or balanced")
        return make_plan(cfg.n_layer, nodes, "mapping", mapping=mc.layer_mapping, n_head=cfg.n_head)
    partition = partition or mc.partition or "even"
    return make_plan(cfg.n_layer, nodes, partition, n_embd=cfg.n_embd, n_vocab=cfg.n_vocab)


def model_shape(configs: Configs, weights_path):
    """The model's shape: from the weights file when there is one, else from the known GPT-2 sizes."""
    mc = configs.model
    path = configured_weights(configs, weights_path)
    if os.path.exists(path):
        return read_config(path, mc.n_head)[0]
    L, C, H = SIZES.get(mc.weights_model_name, (mc.num_layers, 768, mc.n_head or KNOWN_N_HEAD[768]))
    return GPTConfig(n_layer=mc.num_layers, n_embd=C, n_head=mc.n_head or H)


def planning_shape(configs: Configs):
    """The model's shape, for a worker to work out its slice before it has any weights.

    The even split and a layer_mapping need only the layer count. The balanced split also weighs
    the LM head (n_embd, n_vocab): for a model of no known GPT-2 size, the remote file's header
    (two small Range requests) says what they are.
    """
    mc, src = configs.model, configs.weights()
    cfg = model_shape(configs, None)
    full = weights_file(src.filename)
    if mc.partition != "balanced" or os.path.exists(full) or mc.weights_model_name in SIZES:
        return cfg
    shapes = {base_name(n): t.shape for n, t in remote_header(src.url).tensors.items()}
    if "wte.weight" not in shapes:
        return cfg
    n_vocab, n_embd = shapes["wte.weight"]
    return dataclasses.replace(cfg, n_embd=n_embd, n_vocab=n_vocab)


@dataclass(frozen=True)
class Plan:
    """What `nanopipe plan` prints: per rank its layers [lo, hi), node name and weight bytes; each
    node's placement.Capacity (None: unknown) and lines of predictions (plan_placement)."""
    ranges: list
    names: list
    bytes_per_rank: list
    caps: list = dataclasses.field(default_factory=list)
    lines: list = dataclasses.field(default_factory=list)


def plan_table(configs: Configs, weights_path=None, nodes=None, partition=None, here=None) -> Plan:
    """The plan of model_config.yaml (and cluster_config.yaml's node names, if there is one).

    Without --nodes the cluster file must agree with the model's num_nodes; with --nodes it plans
    for another size and names the extra nodes node3, node4, ...
    `here`: which node this machine is (measured; default the server); the other nodes' speed and
    memory come from cluster_config.yaml's `nodes:` or are unknown. With partition auto (or not set)
    and every node known, the ranges are the ones the leader would choose.
    """
    mc = configs.model
    cluster = configs.cluster_or_none()
    if cluster is not None and nodes is None:
        try:
            check_agree(mc, cluster, configs.path("model_config.yaml"))
        except ConfigError as e:
            raise SetupError(f"{e} (or pass --nodes N to plan for another size)") from None
    cfg = model_shape(configs, weights_path)
    ranges = plan_ranges(mc, cfg, nodes, partition)
    names = [cluster.nodes[r].host if cluster and r < len(cluster.nodes) else f"node{r}" for r in range(len(ranges))]
    caps = plan_capacities(cluster, names, cfg, here)
    placed, lines = plan_placement(mc, cluster, cfg, caps, ranges, partition or mc.partition, asked=partition)
    ranges = placed or ranges
    if any(len(g) > 1 for g in groups(ranges)) and not any(ln.startswith("Split stage") for ln in lines):
        # a layer_mapping's split stage: the placement model runs stages one after another, so the
        # split is predicted by split_plan (one conversation), beside the even pipeline's prediction
        lines = [ln for ln in lines if not ln.startswith("Predicted tok/s")] + \
            split_stage_lines(cfg, caps, ranges, names, cluster)
    # a member of a split stage holds 1/m of its blocks (its LayerNorms whole: a few KB more), and
    # when the members run the LM head (the lines above say so), its rows of wte and ln_f
    head_members = any(ln.startswith(("LM head: on the members", "LM head split by vocabulary")) for ln in lines)
    sizes = [stage_bytes(hi - lo, cfg.n_embd, cfg.n_vocab, cfg.n_ctx, rank0=(r == 0)) // len(group_of(ranges, r))
             + (head_share_bytes(r, ranges, cfg) if head_members else 0) for r, (lo, hi) in enumerate(ranges)]
    return Plan(ranges, names, sizes, caps, lines)


def head_share_bytes(rank: int, ranges: list, cfg) -> int:
    """float32 bytes of the LM head a member of the ring's last split stage holds when the members
    run it: its rows of wte (model.vocab_share) and ln_f; 0 for any other rank.

        gpt2, ranks 1 and 2 sharing blocks 4-11: rank 1 25129 x 768 x 4 + 2 x 768 x 4 = 77,202,432
    """
    group = group_of(ranges, rank)
    if rank == 0 or len(group) < 2 or ranges[rank][1] != max(hi for _, hi in ranges):
        return 0
    v0, v1 = vocab_share(group.index(rank), len(group), cfg.n_vocab)
    return ((v1 - v0) * cfg.n_embd + 2 * cfg.n_embd) * 4


def split_stage_lines(cfg, caps, ranges, names, cluster) -> list:
    """A configured split stage, predicted for one conversation (split_plan.split_lines) beside the
    even pipeline; while a member's speed is unknown, what the link alone costs (group.plan_lines)."""
    link = split_link(cluster)
    by_link = plan_lines(ranges, names, [c.speed_gbps if c else None for c in caps], cfg.n_embd, link[:2],
                         [n.ip for n in cluster.nodes] if cluster else None, n_vocab=cfg.n_vocab,
                         head=cluster.split_lm_head if cluster else True)
    if any(c is None or c.speed_gbps is None for c in caps):
        return by_link
    shape = ModelShape(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_ctx=cfg.n_ctx, n_vocab=cfg.n_vocab, n_head=cfg.n_head)
    hop_s = hop_seconds(cluster.link_delay_ms if cluster else 0.0)
    pred = conversation_ms(shape, caps, ranges, link, hop_s, [n.ip for n in cluster.nodes] if cluster else None,
                           head_split=cluster.split_lm_head if cluster else True)
    even = forecast(shape, caps, make_plan(cfg.n_layer, len(ranges), "even"), cluster, "latency")
    return split_lines(pred, names, even.cycle_s(1) * 1000 if even else None, "the even pipeline") + \
        [ln for ln in by_link if ln.startswith("LM head split")]


def plan_capacities(cluster, names, cfg, here) -> list:
    """Each node's Capacity: this machine measured (as `here`, default the server), once for every
    node at its address (the shipped configs run all three on 127.0.0.1); others from
    cluster_config.yaml's `nodes:` when it gives both speed and memory, else None (unknown)."""
    overrides = cluster.node_overrides if cluster else {}
    here = here or names[0]
    if here not in names:
        raise SetupError(f"--here {here}: not a node of this cluster ({', '.join(names)})")
    ips = {n.host: n.ip for n in cluster.nodes} if cluster else {}
    mine = ips.get(here)
    measured = None         # this machine, measured once
    caps = []
    for name in names:
        o = overrides.get(name, {})
        if name == here or (mine is not None and ips.get(name) == mine and not o):
            if measured is None or o:
                m = placement.measure(name, cfg.n_embd, override=o, n_head=cfg.n_head)
                measured = measured or (None if o else m)
            else:
                m = measured
            source = m.source if o else "measured here" if name == here else f"measured here (same machine as {here})"
            caps.append(Capacity(name, m.speed_gbps, m.speed8_gbps, m.memory_mb, source))
        elif "speed_gbps" in o and "memory_mb" in o:
            caps.append(Capacity(name, o["speed_gbps"], o.get("speed8_gbps", o["speed_gbps"]), o["memory_mb"],
                                 "config"))
        else:
            caps.append(None)
    return caps


def format_capacities(names, caps) -> str:
    """The plan's second table: each node's speed (1 and 8 rows), usable memory and where they come from."""
    rows = [["Node", "GB/s 1 row", "GB/s 8 rows", "Memory MB", "Source"]]
    for name, c in zip(names, caps):
        rows.append([name, "unknown", "unknown", "unknown", "unknown: measured when it joins (or set `nodes:` "
                     "in cluster_config.yaml)"] if c is None else
                    [name, _fig(c.speed_gbps, ".1f"), _fig(c.speed8_gbps, ".1f"), _fig(c.memory_mb, ".0f"),
                     c.source + (f" ({', '.join(c.unknowns)} unknown: planned without)" if c.unknowns else "")])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3)] + [r[4]])
                     for r in rows)


def _fig(v, fmt: str) -> str:
    return "unknown" if v is None else f"{v:{fmt}}"


def plan_placement(mc, cluster, cfg, caps, ranges, partition, asked=None) -> tuple:
    """(ranges the leader would choose, or None to keep `ranges`; lines of predictions):
    placement.decide, the leader's own decision, put in words. `asked`: plan's --partition, if given."""
    shape = ModelShape(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_ctx=cfg.n_ctx, n_vocab=cfg.n_vocab, n_head=cfg.n_head)
    try:
        d = decide_with_split(shape, caps, ranges, mc, cluster, partition)
    except PlacementError as e:
        raise SetupError(str(e)) from None
    auto = planned_by_leader(mc, partition)
    unknown = [r for r, c in enumerate(caps) if c is None]
    if unknown:
        return None, [f"Predicted tok/s: not until every node's speed and memory are known ({len(unknown)} unknown; "
                      "`nanopipe plan --from-cluster HOST:PORT` asks a running leader, whose nodes measured "
                      "themselves; or give them in cluster_config.yaml's `nodes:`)"
                      + ("; the leader places the layers once every node has joined and measured itself, so the "
                         "split above is the even starting point" if auto else "")]
    if d.split is not None:                 # a split stage, predicted for one conversation (split_plan)
        return d.ranges, [f"Split: {d.note}"] + split_lines(d.split, [c.name for c in caps])
    if d.placement is None:                 # a speed unknown: the leader runs the even split, unpredicted
        return d.ranges, [f"Split: {d.note}"]
    placed = d.ranges if d.solved else None
    how = (f"auto ({d.why}), objective {mc.placement_objective}" if placed
           else f"even ({d.why})" if auto else "layer_mapping" if uses_mapping(mc, asked) else partition or "even")
    chosen, ev = d.placement, d.even
    lines = [f"Split: {how}; max_sessions {d.sessions}, hops {d.hop_s * 1000:.1f} ms, "
             f"{d.depth} batch{'es' if d.depth > 1 else ''} in flight",
             f"Predicted tok/s   this split: {chosen.tok_s(1):.1f} (1 stream), {chosen.tok_s(8):.1f} (8 streams)"
             f"   even split: {ev.tok_s(1):.1f}, {ev.tok_s(8):.1f}"]
    if d.no_split:                          # auto weighed a split stage and kept the pipeline: say why
        lines.append(f"Split stage: none, {d.no_split}")
    return placed, lines + [f"note: {n}" for n in (chosen.notes if placed else [])]


def rank_weights(configs: Configs, rank, log=print) -> str:
    """This rank's weights file, pulled if it is not here yet.

    Rank 0 needs the whole file, weights/<filename>. A worker uses the whole file if it is here,
    else only its own blocks lo..hi-1, pulled into weights/<name>.layers-<first>-<last>.safetensors
    (inclusive, like --layers; `pull.slice_path`): rank 2 of gpt2 on 3 nodes fetches blocks 8..11,
    113 of the file's 548 MB, into weights/gpt2.layers-8-11.safetensors.
    """
    mc, src = configs.model, configs.weights()
    entry = {"url": src.url, "filename": src.filename, "sha256": src.sha256}
    try:
        if rank == 0:
            return ensure_weights(mc.weights_model_name, entry, WEIGHTS_DIR, log=log)
        lo, hi = plan_ranges(mc, planning_shape(configs), len(configs.cluster.nodes))[rank]
        return ensure_weights(mc.weights_model_name, entry, WEIGHTS_DIR, layers=(lo, hi), rank0=False,
                              log=log)
    except PullError as e:
        raise SetupError(str(e)) from None


@dataclass(frozen=True)
class RankSetup:
    """What a node needs to start: the model's shape, every rank's layers, and its own weights file."""
    cfg: object                 # model.GPTConfig
    ranges: list                # [(lo, hi)] per rank
    weights_path: str


def setup_rank(configs: Configs, weights_path, rank, log=print) -> RankSetup:
    """Check the configs agree, find (or pull) this rank's weights, and plan the layers.

    `log` gets the guide's "Checking for model weights (<name>)..." and "Model weights ready at: <path>".
    """
    mc, cc = configs.model, configs.cluster
    check_agree(mc, cc, configs.path("model_config.yaml"))  # before anything is downloaded
    if weights_path is None and rank > 0 and planned_by_leader(mc):
        # the leader says which blocks once every node is measured: pull them then (join's fetch);
        # weights_path stays None unless the whole file is here
        full = weights_file(configs.weights().filename)
        weights_path = full if os.path.exists(full) else None
        if weights_path is None:
            offer_synthetic(mc, full)
    elif weights_path is None:
        offer_synthetic(mc, os.path.join(WEIGHTS_DIR, configs.weights().filename))
        weights_path = rank_weights(configs, rank, log)
    else:
        log(f"Checking for model weights ({mc.weights_model_name})...")
        if not os.path.exists(weights_path):
            raise SetupError(f"{weights_path}: no such weights file; run `nanopipe pull {mc.weights_model_name}` or "
                             f"`nanopipe init-weights {weights_path}` for synthetic weights")
        log(f"Model weights ready at: {weights_path}")
    cfg = model_shape(configs, weights_path)
    return RankSetup(cfg, plan_ranges(mc, cfg, len(cc.nodes)), weights_path)


def synthetic_stand_in(mc, folder: str = WEIGHTS_DIR) -> str | None:
    """A whole synthetic file in `folder` with the model's shape (what `nanopipe demo --synthetic` or
    `init-weights` wrote, e.g. weights/synthetic-gpt2.safetensors for gpt2), else None."""
    want = SIZES.get(mc.weights_model_name)
    for path in sorted(glob.glob(os.path.join(folder, "synthetic-*.safetensors"))):
        try:
            header = read_header(path)
            if not is_synthetic(header) or "nanopipe_blocks" in header.metadata:     # a slice serves one rank only
                continue
            cfg = read_config(path)[0]
        except (OSError, SafetensorsError, WeightsError):
            continue
        if (cfg.n_layer, cfg.n_embd, cfg.n_head) == want if want else (
                cfg.n_layer == mc.num_layers and (mc.n_head is None or cfg.n_head == mc.n_head)):
            return path
    return None


def offer_synthetic(mc, full: str):
    """The configured weights file is missing: if nothing of the model is here (neither the file nor a
    slice of it) but synthetic weights of its shape are, say so and how to use them (or get the real
    ones) instead of trying the hub. Returns quietly otherwise, and the node pulls as usual."""
    stem = full[:-len(".safetensors")] if full.endswith(".safetensors") else full
    if os.path.exists(full) or glob.glob(f"{glob.escape(stem)}.layers-*.safetensors"):
        return
    stand_in = synthetic_stand_in(mc, os.path.dirname(full) or ".")
    if stand_in is None:
        return
    c = read_config(stand_in)[0]
    size = next((name for name, shape in SIZES.items() if (c.n_layer, c.n_embd, c.n_head) == shape
                 and os.path.basename(stand_in) == synthetic_name(name)), None)
    shape = ("" if size == "gpt2" else f" --size {size}" if size else
             f" --n-layer {c.n_layer} --n-embd {c.n_embd} --n-head {c.n_head} --n-ctx {c.n_ctx}"
             + (f" --n-vocab {c.n_vocab}" if c.n_vocab != 50257 else ""))
    raise SetupError(
        f"no weights at {full} (model {mc.name!r}), but {stand_in} is here: synthetic weights of the same "
        "shape (random, the text is gibberish), as `nanopipe demo --synthetic` or `init-weights` wrote them. "
        f"To run on them, give `--weights {stand_in}`, or `nanopipe init-weights{shape} {full}` (a second name "
        f"for the same file, no copy). For the real weights: `nanopipe pull {mc.weights_model_name}` on a "
        f"machine with internet, or copy the file to {full} (README, \"On real machines\")")


def slice_fetcher(name: str, entry: dict, log):
    """fetch(lo, hi) -> the path of a file holding blocks lo..hi-1, pulled if missing."""
    def fetch(lo, hi):
        try:
            return ensure_weights(name, entry, WEIGHTS_DIR, layers=(lo, hi), rank0=False, log=log)
        except PullError as e:
            raise WeightsError(str(e)) from None
    return fetch


def cluster_stages(nodes: list) -> tuple:
    """A running cluster's nodes (its STATUS, or GET /cluster) as the stages of its ring: a split
    stage's members (the same layers, each its heads) one row. -> (ranges, names, ranks, heads),
    a label each, for partition.format_plan:

        nodes 0: [0, 0]; 1: [1, 4] heads [0, 1]; 2: [1, 4] heads [2, 3]
        -> [(0, 1), (1, 5)], ["node0", "node1+node2"], ["0", "1+2"], ["", "0-1 + 2-3"]
    """
    ranges = [(n["layers"][0], n["layers"][1] + 1) if n.get("layers") else (0, 0) for n in nodes]   # [first, last]
    out: tuple = ([], [], [], [])
    for g in groups(ranges):
        members = [nodes[i] for i in g]
        heads = [m.get("heads") for m in members]
        out[0].append(ranges[g[0]])
        out[1].append("+".join(str(m["host"]) for m in members))
        out[2].append("+".join(str(m["rank"]) for m in members))
        out[3].append(" + ".join(f"{h[0]}-{h[1]}" for h in heads) if len(g) > 1 and all(heads) else "")
    return out


def lm_head_line(nodes: list, ranks: list | None, missing: list | None = None) -> str | None:
    """Where a running cluster's LM head runs (its plan's `lm_head_ranks`), in words, with the time
    each member said its share takes (its heartbeat's head_ms) once it has run; None if not said.
    `missing`: the plan's `lm_head_missing`, the members that hold no share of it and why.

        [0] -> "LM head: on rank 0 (mini1)"
        [0], [{rank: 2, why: "its weights file ... has no wte"}]
            -> "LM head: on rank 0 (mini1): member rank 2 holds no share (its weights file ... has no wte)"
        [1, 2] -> "LM head: split by vocabulary over ranks 1+2 (pi1+pi2), measured 6.1 + 6.0 ms per step"
    """
    if not ranks:
        return None
    by_rank = {n.get("rank"): n for n in nodes}
    who = "+".join(str(by_rank.get(r, {}).get("host", "?")) for r in ranks)
    if ranks == [0]:
        why = "; ".join(f"member rank {m.get('rank')} holds no share ({m.get('why')})" for m in missing or ())
        return f"LM head: on rank 0 ({who})" + (f": {why}" if why else "")
    ms = [by_rank.get(r, {}).get("head_ms") for r in ranks]
    measured = all(isinstance(m, (int, float)) and m > 0 for m in ms)
    return (f"LM head: split by vocabulary over ranks {'+'.join(map(str, ranks))} ({who})"
            + (f", measured {' + '.join(f'{m:.1f}' for m in ms)} ms per step" if measured else ""))


def read_cluster_page(url: str, api_token: str | None = None, timeout: float = 10.0) -> dict:
    """`plan --from-cluster URL`: the web app's GET /cluster (nanopipe/web/cluster_view.py) as JSON.

    "http://pi1:8000" -> GET http://pi1:8000/cluster; a URL that names a path is used as it is.
    Sends the API token (api_token / NANOPIPE_API_TOKEN) when there is one."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        url = url.rstrip("/") + "/cluster"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_token}"} if api_token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            said = json.loads(e.read()).get("error")
        except (ValueError, AttributeError):
            said = None
        hint = (": give the web app's API token (api_token in cluster_config.yaml, or NANOPIPE_API_TOKEN)"
                if e.code == 401 else "")
        raise SetupError(f"--from-cluster {url}: HTTP {e.code}" + (f": {said}" if said else "") + hint) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SetupError(f"--from-cluster {url}: cannot reach it ({reason}); is `nanopipe web` running there? "
                         "(HOST:PORT without http:// asks the leader itself)") from None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("nodes"), list):
        raise SetupError(f"--from-cluster {url}: not the web app's cluster JSON (GET /cluster); "
                         "give the address `nanopipe web` serves, e.g. http://HOST:8000")
    return body
