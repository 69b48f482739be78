"""GPT-2's tensors in one table: names, shapes, layouts, the `transformer.` prefix, block indices.

The loader (weights.py), synthetic weights (weights.init_weights), pull's slice selection (pull.py)
and the partition's memory estimate (partition.py) all read GPT-2's layout from here.

The official hub file (openai-community/gpt2 `model.safetensors`) holds, for C = n_embd,
V = n_vocab and n_ctx positions:

    wte.weight (V, C)   wpe.weight (n_ctx, C)                     embeddings (rank 0)
    h.{i}.ln_1.weight (C,)            h.{i}.ln_1.bias (C,)
    h.{i}.attn.c_attn.weight (C, 3C)  h.{i}.attn.c_attn.bias (3C,)  q, k, v side by side
    h.{i}.attn.c_proj.weight (C, C)   h.{i}.attn.c_proj.bias (C,)
    h.{i}.ln_2.weight (C,)            h.{i}.ln_2.bias (C,)
    h.{i}.mlp.c_fc.weight (C, 4C)     h.{i}.mlp.c_fc.bias (4C,)
    h.{i}.mlp.c_proj.weight (4C, C)   h.{i}.mlp.c_proj.bias (C,)
    h.{i}.attn.bias (1, 1, n_ctx, n_ctx)                             causal-mask buffer, not a weight
    ln_f.weight (C,)  ln_f.bias (C,)                                 final LayerNorm (rank 0)

Matrices are stored (in, out) ("Conv1D" layout), so a layer is `x @ w + b` with no transpose.
There is no lm_head.weight: the head is tied to wte. transformers' `save_pretrained` writes the
same tensors behind a `transformer.` prefix, without the mask buffers (and sometimes an lm_head).

    >>> split_block(base_name("transformer.h.7.attn.c_attn.weight"))
    (7, 'attn.c_attn.weight')
    >>> block_params(768)            # 12*C^2 + 13*C
    7087872
"""
from __future__ import annotations

PREFIX = "transformer."                 # save_pretrained's prefix; the hub file has none

# one block's parameters, in the hub file's order
BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")
MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out)
RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight")   # init scaled by 1/sqrt(2 * n_layer)
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")                     # per-block buffers a loader skips
HEAD_TENSORS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight")  # rank 0's


def block_shapes(n_embd: int) -> dict:
    """One block's parameter name (after 'h.{i}.') -> shape, in file order."""
    C = n_embd
    return {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
            "mlp.c_proj.bias": (C,)}


def head_shapes(n_embd: int, n_vocab: int, n_ctx: int) -> dict:
    """Rank 0's tensors besides its blocks (hub names) -> shape; lm_head.weight only in untied files."""
    C = n_embd
    return {"wte.weight": (n_vocab, C), "wpe.weight": (n_ctx, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
            "lm_head.weight": (n_vocab, C)}


def mask_shape(n_ctx: int) -> tuple:
    return (1, 1, n_ctx, n_ctx)


def hub_shapes(n_layer: int, n_embd: int, n_vocab: int, n_ctx: int, masks: bool = True) -> dict:
    """name -> shape of the whole official hub file, in its order: wte, wpe, h.0 .. h.{L-1}, ln_f."""
    head = head_shapes(n_embd, n_vocab, n_ctx)
    shapes = {k: head[k] for k in ("wte.weight", "wpe.weight")}
    for i in range(n_layer):
        shapes.update({f"h.{i}.{k}": s for k, s in block_shapes(n_embd).items()})
        if masks:
            shapes[f"h.{i}.attn.bias"] = mask_shape(n_ctx)
    shapes.update({k: head[k] for k in ("ln_f.weight", "ln_f.bias")})
    return shapes


def base_name(name: str) -> str:
    """'transformer.h.0.ln_1.weight' (save_pretrained) -> 'h.0.ln_1.weight' (hub file)."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def split_block(base: str) -> tuple:
    """'h.7.attn.c_attn.weight' -> (7, 'attn.c_attn.weight'); anything else -> (None, base)."""
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "h" and parts[1].isascii() and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, base


def block_indices(names, prefix: str | None = None) -> list:
    """The sorted block indices among tensor names: [0, 1, ..., 11] for gpt2, [4, 5, 6, 7] for a slice.

    prefix=None accepts both layouts; '' or 'transformer.' accepts only that one.
    """
    found = set()
    for n in names:
        if prefix is not None and not (n.startswith(prefix + "h.") if prefix else n.startswith("h.")):
            continue
        i, _ = split_block(base_name(n) if prefix is None else n[len(prefix):])
        if i is not None:
            found.add(i)
    return sorted(found)


def file_prefix(names) -> str | None:
    """'' for a hub file, 'transformer.' for save_pretrained, None if no GPT-2 tensor is named."""
    names = set(names)
    for prefix in ("", PREFIX):
        if prefix + "wte.weight" in names or prefix + "h.0.ln_1.weight" in names:
            return prefix
    for name in names:      # a slice file may start at any block
        if name.startswith(PREFIX + "h."):
            return PREFIX
        if name.startswith("h."):
            return ""
    return None


def stage_needs(name: str, lo: int, hi: int, rank0: bool) -> bool:
    """Does the stage running blocks lo..hi-1 (plus embeddings and head when rank0) need `name`?

    Mask buffers are never needed: the model builds its causal mask itself.
    """
    i, rest = split_block(base_name(name))
    if i is not None:
        return lo <= i < hi and rest not in MASK_BUFFERS
    return rank0 and base_name(name) in HEAD_TENSORS


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def block_params(n_embd: int) -> int:
    """Parameters in one transformer block: 12*C^2 + 13*C, i.e. 7,087,872 for gpt2 (C=768)."""
    return sum(numel(s) for s in block_shapes(n_embd).values())


def head_params(n_embd: int, n_vocab: int, n_ctx: int) -> int:
    """Parameters rank 0 holds besides its blocks, as stored: wte (V*C), wpe (n_ctx*C), ln_f (2C)."""
    head = head_shapes(n_embd, n_vocab, n_ctx)
    return sum(numel(head[k]) for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"))
