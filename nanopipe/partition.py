"""Which rank holds which transformer blocks.

A plan is a list of half-open (lo, hi) layer ranges indexed by rank: rank r runs blocks[lo:hi].
The ranges are contiguous and cover every layer exactly once, in rank order, because activations
flow rank 0 -> 1 -> ... -> n-1 -> rank 0. Rank 0 (the leader) also holds the token and position
embeddings, the final LayerNorm and the LM head:

    gpt2 (12 layers) on 3 nodes, even:     [(0, 4), (4, 8), (8, 12)]
    rank 0: embed -> blocks 0-3 -> | rank 1: blocks 4-7 -> | rank 2: blocks 8-11 -> | rank 0: ln_f, head
"""
from __future__ import annotations

from collections.abc import Mapping

from . import gpt2_tensors as gt

STRATEGIES = ("even", "balanced", "mapping", "auto")   # auto: placement.solve on measured nodes


class PartitionError(ValueError):
    """A layer plan or layer_mapping is impossible; the message says which rank and layers."""


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    """[4, 4, 4] -> [(0, 4), (4, 8), (8, 12)]"""
    out, lo = [], 0
    for c in counts:
        out.append((lo, lo + c))
        lo += c
    return out


def _even_counts(n_layer: int, n_nodes: int) -> list[int]:
    q, r = divmod(n_layer, n_nodes)
    return [q + 1] * r + [q] * (n_nodes - r)


def _check_sizes(n_layer: int, n_nodes: int) -> None:
    if n_nodes < 1:
        raise PartitionError(f"need at least 1 node, got {n_nodes}")
    if n_layer < 1:
        raise PartitionError(f"the model needs at least 1 layer, got {n_layer}")
    if n_nodes > n_layer:
        raise PartitionError(f"{n_nodes} nodes but only {n_layer} layers: every node needs at least "
                             f"one layer, so use at most {n_layer} nodes")


def even(n_layer: int, n_nodes: int) -> list[tuple[int, int]]:
    """Split layers as evenly as possible; the remainder goes to the first ranks, one each.

    12 over 3 -> 4, 4, 4 -> [(0, 4), (4, 8), (8, 12)]
    12 over 5 -> 3, 3, 2, 2, 2 -> [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    """
    _check_sizes(n_layer, n_nodes)
    return _ranges(_even_counts(n_layer, n_nodes))


def head_cost_blocks(n_embd: int, n_vocab: int = 50257) -> float:
    """The LM head's matmul in units of one block's matmuls, per token.

    A block does ~12*C^2 multiply-adds per token (c_attn 3C^2, attn c_proj C^2, c_fc 4C^2,
    mlp c_proj 4C^2); the head does V*C. For gpt2: 50257*768 / (12*768^2) = 5.45 blocks.
    """
    return n_vocab * n_embd / (12 * n_embd * n_embd)


def balanced(n_layer: int, n_nodes: int, head_cost: float | None = None, n_embd: int | None = None,
             n_vocab: int = 50257) -> list[tuple[int, int]]:
    """Give rank 0 fewer blocks to make up for the LM head, minimizing the slowest stage.

    Costs are in blocks: rank 0 costs c0 + head_cost, rank r > 0 costs c_r. Pass `head_cost`, or
    `n_embd` (and `n_vocab`) to compute it with `head_cost_blocks`. For a given c0 the best split
    of the rest is the even one, so trying every c0 is an exact search.

    Worked example, gpt2 (12 layers, n_embd 768, head = 5.45 blocks) over 3 nodes:

        c0 = 1: rank 0 costs 1 + 5.45 = 6.45, the other 11 split 6/5  -> slowest 6.45
        c0 = 2: rank 0 costs 2 + 5.45 = 7.45, the other 10 split 5/5  -> slowest 7.45
        ...
        best: [(0, 1), (1, 7), (7, 12)], against 4 + 5.45 = 9.45 for the even split.
    """
    _check_sizes(n_layer, n_nodes)
    if head_cost is None:
        if n_embd is None:
            raise PartitionError("balanced partition needs head_cost or n_embd to weigh the LM head")
        head_cost = head_cost_blocks(n_embd, n_vocab)
    if n_nodes == 1:
        return [(0, n_layer)]
    best = None
    for c0 in range(1, n_layer - (n_nodes - 1) + 1):
        rest = _even_counts(n_layer - c0, n_nodes - 1)
        slowest = max(c0 + head_cost, rest[0])
        if best is None or slowest < best[0]:   # ties keep the smaller c0: less work on the leader
            best = (slowest, [c0] + rest)
    return _ranges(best[1])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_span(rank: int, value) -> tuple[int, int]:
    """One rank's layers, INCLUSIVE as people write them, -> a half-open (lo, hi).

        [3, 4, 5, 6] -> (3, 7)   every layer listed (the guide's form), consecutive
        [5]          -> (5, 6)   one layer
        [4, 7]       -> (4, 8)   [first, last]
        "4-7"        -> (4, 8)   "first-last"

    Two consecutive numbers, [3, 4], mean the same either way.
    """
    if isinstance(value, str):
        parts = value.replace(" ", "").split("-")
        try:
            first, last = (int(p) for p in parts)
        except ValueError:
            raise PartitionError(f"layer_mapping rank {rank}: {value!r} is not \"first-last\", "
                                 "e.g. \"0-3\"") from None
    elif isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        first, last = value[0], value[-1]
        if len(value) >= 3:
            for a, b in zip(value, value[1:]):
                if b != a + 1:
                    gap = (f"goes from {a} back to {b}" if b <= a else f"skips layer {a + 1}" if b == a + 2
                           else f"skips layers {layers_text(a + 1, b)}")
                    raise PartitionError(f"layer_mapping rank {rank}: {list(value)} {gap}; a rank holds "
                                         "consecutive layers: list them all, or write [first, last]")
    else:
        raise PartitionError(f"layer_mapping rank {rank}: expected a list of consecutive layers like "
                             f"[3, 4, 5, 6], [first, last] or \"first-last\" (inclusive), got {value!r}")
    if first > last:
        raise PartitionError(f"layer_mapping rank {rank}: first layer {first} is after last {last}")
    return first, last + 1


def _parse_rank(key) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise PartitionError(f"layer_mapping key {key!r} is not a rank number")


def layers_text(lo: int, hi: int) -> str:
    """Half-open (lo, hi) -> the inclusive text people type and read, the one text form of a layer
    range (--layers, file names, logs, tables): (4, 8) -> "4-7", (5, 6) -> "5-5"; (12, 12), a node
    the placement left out, -> "none". JSON shows the same range as first_last: [4, 7]."""
    return f"{lo}-{hi - 1}" if hi > lo else "none"


def first_last(lo: int, hi: int) -> list | None:
    """(4, 8) -> [4, 7]: the first and last layer a rank holds, inclusive, the one convention of every
    output ("4-7" in text, [4, 7] in JSON: /health, /config, STATUS, trace); (12, 12), a node the
    placement left out, -> None. Inside the code and on the wire between nodes, ranges stay half-open."""
    return [lo, hi - 1] if hi > lo else None


def _layers(lo: int, hi: int) -> str:
    """(4, 8) -> "layers 4-7", (7, 8) -> "layer 7"."""
    return f"layer {lo}" if hi - lo == 1 else f"layers {layers_text(lo, hi)}"


def from_mapping(mapping: Mapping, n_layer: int, n_nodes: int, n_head: int | None = None) -> list[tuple[int, int]]:
    """An explicit layer_mapping from YAML, {rank: layers} with INCLUSIVE layers (see _parse_span).

    >>> from_mapping({0: [0, 1, 2], 1: [3, 4, 5, 6], 2: [7, 8, 9, 10, 11]}, n_layer=12, n_nodes=3)
    [(0, 3), (3, 7), (7, 12)]
    >>> from_mapping({0: [0, 1], "1": "2-7", 2: [8, 11]}, n_layer=12, n_nodes=3)
    [(0, 2), (2, 8), (8, 12)]

    Two ranks given the very same layers share them, a split stage (`groups`): each holds part of
    every block (its heads and MLP columns, model.share_of), so one token's step is shared out:

    >>> from_mapping({0: [0, 3], 1: [4, 11], 2: [4, 11]}, n_layer=12, n_nodes=3)
    [(0, 4), (4, 12), (4, 12)]

    Every member holds at least one head, so with `n_head` known a stage has at most n_head members.
    """
    if n_nodes < 1 or n_layer < 1:
        _check_sizes(n_layer, n_nodes)         # (more nodes than layers is fine when some share them)
    if not isinstance(mapping, Mapping):
        raise PartitionError(f"layer_mapping must map rank -> its layers, e.g. {{0: [0, 1, 2], 1: [3, 4, 5]}}, "
                             f"got {mapping!r}")
    spans: dict[int, tuple[int, int]] = {}
    for key, value in mapping.items():
        rank = _parse_rank(key)
        if rank in spans:
            raise PartitionError(f"layer_mapping lists rank {rank} twice")
        spans[rank] = _parse_span(rank, value)

    for rank in sorted(spans):
        if not 0 <= rank < n_nodes:
            raise PartitionError(f"layer_mapping lists rank {rank} but the cluster has {n_nodes} "
                                 f"nodes (ranks 0-{n_nodes - 1}, num_nodes: {n_nodes}); give each node's "
                                 "layers once, or make num_nodes agree")
    for rank in range(n_nodes):
        if rank not in spans:
            raise PartitionError(f"layer_mapping has no entry for rank {rank} (it lists ranks "
                                 f"{sorted(spans)}; the cluster has {n_nodes} nodes, num_nodes: {n_nodes}); "
                                 "give each node its layers, or make num_nodes agree")
    for rank, (lo, hi) in spans.items():
        if lo < 0 or hi > n_layer:
            raise PartitionError(f"layer_mapping rank {rank}: layers {layers_text(lo, hi)} out of range; "
                                 f"the model has {n_layer} layers (0-{n_layer - 1})")

    _check_shared(spans, n_nodes)
    stages = sorted(set(spans.values()))                    # a group's members hold one span
    by_start = sorted(range(n_nodes), key=lambda r: (spans[r], r))
    for a, b in zip(by_start, by_start[1:]):
        if spans[a] != spans[b] and spans[b][0] < spans[a][1]:
            raise PartitionError(f"layer_mapping: ranks {min(a, b)} and {max(a, b)} both hold "
                                 f"{_layers(spans[b][0], min(spans[a][1], spans[b][1]))} but not the same "
                                 f"layers ({_describe(spans)}); two ranks either hold different layers, or "
                                 "share the very same ones (a split stage: give both the same list)")
    if by_start != list(range(n_nodes)):
        raise PartitionError(f"layer_mapping ranks are out of order ({_describe(spans)}); "
                             "activations flow rank 0 -> 1 -> 2 ..., so rank r+1 must start where "
                             "rank r ends (or hold the same layers as rank r, to split them)")

    ranges = [spans[r] for r in range(n_nodes)]
    edges = [(0, 0)] + stages + [(n_layer, n_layer)]
    for prev, nxt in zip(edges, edges[1:]):
        if nxt[0] > prev[1]:
            held = "is" if nxt[0] - prev[1] == 1 else "are"
            raise PartitionError(f"layer_mapping: {_layers(prev[1], nxt[0])} {held} held by no "
                                 f"rank ({_describe(spans)})")
    if n_head is not None:
        _check_heads(ranges, n_head)
    return ranges


def _check_heads(ranges: list, n_head: int) -> None:
    """A split stage's members each hold at least one head: no more members than heads."""
    for g in groups(ranges):
        if len(g) > n_head:
            raise PartitionError(f"layer_mapping: ranks {g[0]}-{g[-1]} share {_layers(*ranges[g[0]])} ({len(g)} "
                                 f"members) but the model has only {n_head} heads, and each member holds at least "
                                 f"one: give those layers to at most {n_head} ranks, the others layers of their own")


def _check_shared(spans: dict, n_nodes: int) -> None:
    """Ranks that share layers (a split stage) must be workers: rank 0 runs the scheduler, which
    computes its blocks alone. (Order and overlaps are checked by the caller.)"""
    shared_with_0 = [r for r in range(1, n_nodes) if spans.get(r) == spans.get(0)]
    if shared_with_0:
        raise PartitionError(f"layer_mapping: rank 0 (the leader) and rank {shared_with_0[0]} both hold "
                             f"{_layers(*spans[0])}; the leader cannot share its layers yet: give the "
                             "shared layers to two or more workers, e.g. {0: [0, 1], 1: [2, 11], 2: [2, 11]}")


def groups(ranges: list) -> list:
    """The stages of a plan, each the ranks that hold it, in ring order: ranks given the very same
    layers form one split stage (a group; `model.share_of` says which part each member holds).

        groups([(0, 4), (4, 12), (4, 12)]) -> [[0], [1, 2]]
        groups([(0, 4), (4, 8), (8, 12)])  -> [[0], [1], [2]]

    A rank the placement left out, (lo, lo) with no layers, is a stage of its own (of nothing), and
    does not part a group: with rank 2 gone, [(0, 4), (4, 12), (0, 0), (4, 12)] -> [[0], [1, 3], [2]].
    """
    out: list = []
    last = None                         # the group of the last worker that holds layers
    for r, span in enumerate(ranges):
        held = span[1] > span[0]
        if r > 0 and held and last is not None and tuple(ranges[last[0]]) == tuple(span):
            last.append(r)
        else:
            out.append([r])
            last = out[-1] if r > 0 and held else last if not held else None
    return out


def group_of(ranges: list, rank: int) -> list:
    """The ranks of `rank`'s stage: [rank] alone, or its group's members in rank order."""
    return next(g for g in groups(ranges) if rank in g)


def _describe(spans: dict) -> str:
    return ", ".join(f"rank {r}: {layers_text(*spans[r])}" for r in sorted(spans))


def plan(n_layer: int, n_nodes: int, strategy: str = "even", mapping: Mapping | None = None,
         **kw) -> list[tuple[int, int]]:
    """The layer ranges for a cluster: an explicit `mapping` wins, else `strategy`.

    `strategy` is "even", "balanced" (pass head_cost= or n_embd=), "mapping" (needs `mapping`) or
    "auto", which needs every node's measurements (placement.solve, run by the leader once the
    workers have registered); without them it is the even split, the starting point.
    """
    if mapping is None:
        _check_sizes(n_layer, n_nodes)
    if strategy not in STRATEGIES:
        raise PartitionError(f"unknown partition strategy {strategy!r}; use one of "
                             f"{', '.join(STRATEGIES)}")
    if mapping is not None:
        return from_mapping(mapping, n_layer, n_nodes, n_head=kw.get("n_head"))
    if strategy == "mapping":
        raise PartitionError("partition strategy 'mapping' needs a layer_mapping")
    if strategy == "balanced":
        return balanced(n_layer, n_nodes, **kw)
    return even(n_layer, n_nodes)     # "even", and "auto" until the nodes are measured


def block_params(n_embd: int) -> int:
    """Parameters in one transformer block: 12*C^2 + 13*C, i.e. 7,087,872 for gpt2 (C=768).

    ln_1 2C, c_attn 3C^2+3C, attn c_proj C^2+C, ln_2 2C, c_fc 4C^2+4C, mlp c_proj 4C^2+C, summed
    from the tensor table (gpt2_tensors.block_shapes).
    """
    return gt.block_params(n_embd)


def stage_bytes(n_layer_slice: int, n_embd: int, n_vocab: int, n_ctx: int, rank0: bool,
                tied: bool = True) -> int:
    """float32 bytes of weights a stage holds.

    Rank 0 adds wte (V*C), wpe (n_ctx*C) and ln_f (2C); the tied LM head is wte itself (a gemv
    on wte as stored, no transposed copy). With tied=False the checkpoint has its own
    lm_head.weight (V*C) that is held as well.

    gpt2, 4 blocks on rank 0: 4*7,087,872 + 38,597,376 + 786,432 + 1,536 = 67,736,832 params
    = 270,947,328 bytes; a worker with 4 blocks holds 4*7,087,872*4 = 113,405,952 bytes.
    """
    params = n_layer_slice * block_params(n_embd)
    if rank0:
        c, v = n_embd, n_vocab
        params += gt.head_params(c, v, n_ctx)
        if not tied:
            params += v * c
    return 4 * params


def format_plan(ranges: list[tuple[int, int]], names: list[str] | None = None,
                bytes_per_rank: list[int] | None = None, ranks: list[str] | None = None,
                heads: list[str] | None = None) -> str:
    """The plan as a table, one row per rank:

        Node    Rank  Layers  Count
        leader     0  0-3         4
        pi-1       1  4-7         4
        pi-2       2  8-11        4

    or per stage, a split stage's members one row (`ranks` and `heads`: each row's labels):

        Node       Rank  Layers  Count  Heads
        leader        0  0-3         4
        pi-1+pi-2   1+2  4-11        8  0-5 + 6-11
    """
    names = names or [f"rank{r}" for r in range(len(ranges))]
    for what, xs in (("names", names), ("bytes_per_rank", bytes_per_rank), ("ranks", ranks), ("heads", heads)):
        if xs is not None and len(xs) != len(ranges):
            raise PartitionError(f"format_plan: {len(xs)} {what} for {len(ranges)} ranks")
    heads = heads if heads and any(heads) else None
    header = ["Node", "Rank", "Layers", "Count"] + (["Weights MB"] if bytes_per_rank else []) + \
        (["Heads"] if heads else [])
    rows = []
    for r, (lo, hi) in enumerate(ranges):
        row = [names[r], ranks[r] if ranks else str(r), layers_text(lo, hi), str(hi - lo)]
        if bytes_per_rank:
            row.append(f"{bytes_per_rank[r] / 1e6:.1f}")
        if heads:
            row.append(heads[r] or "")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    right = {1, 3, 4} if bytes_per_rank else {1, 3}   # numbers right-aligned
    lines = ["  ".join(x.rjust(w) if i in right else x.ljust(w)
                       for i, (x, w) in enumerate(zip(line, widths))).rstrip()
             for line in [header] + rows]
    return "\n".join(lines)


def uses_mapping(model, partition: str | None = None) -> bool:
    """The model's layer_mapping decides the split: it has one, and `partition` (`nanopipe plan
    --partition`) names no other strategy. (The model's own `partition: even` beside a layer_mapping
    is the default the mapping overrides.)"""
    return bool(model.layer_mapping) and partition in (None, "mapping")


def planned_by_leader(model, partition: str | None = None) -> bool:
    """partition auto, or none set (even unless the nodes differ): the leader places the layers
    after every node has measured itself, so a worker learns its blocks only then. `partition`:
    `nanopipe plan --partition`, in place of the model's."""
    return (partition or model.partition) in (None, "auto") and not model.layer_mapping
