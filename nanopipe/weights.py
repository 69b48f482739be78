"""Load a stage's slice of GPT-2 straight from a safetensors file; write synthetic weights.

Both layouts of real files are accepted:
  - the official hub file: `wte.weight`, `h.0.attn.c_attn.weight`, ... plus `h.N.attn.bias` causal-mask
    buffers, no `lm_head` (tied to wte);
  - transformers' `save_pretrained`: the same names behind a `transformer.` prefix, no mask buffers.
A stage reads only its own tensors (blocks lo..hi-1, plus wte/wpe/ln_f when it is rank 0), each
straight into its final float32 array, so peak memory stays near the slice's size. A member of a
split stage (`load_stage(share=(r, m))`) reads only its columns and rows of those blocks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from . import gpt2_tensors as gt
from .config import WEIGHTS_DIR
from .kernels import choose_layout, layout_orders, matrix_order
from .model import GPTConfig, Share, SplitError, share_of
from .pages import Arena
from .partition import layers_text
from .safetensors_io import (
    Header,
    SafetensorsError,
    read_header,
    read_part,
    read_tensor,
    shown,
    to_float32,
    write_safetensors,
)

KNOWN_N_HEAD = {768: 12, 1024: 16, 1280: 20, 1600: 25}   # gpt2, -medium, -large, -xl
SIZES = {  # n_layer, n_embd, n_head
    "gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25),
}
BLOCK_PARAMS = gt.BLOCK_PARAMS


class WeightsError(ValueError):
    """A weights file cannot serve the requested stage; the message names the file and tensor."""


@dataclass
class StageWeights:
    """What one pipeline stage holds: blocks lo..hi-1, plus embeddings and head on rank 0.

    blocks[i] is a dict shaped for `model.block(x, **blocks[i])`:
        {"ln_1": {"g", "b"}, "attn": {"c_attn": {"w", "b"}, "c_proj": {...}}, "ln_2": {...},
         "mlp": {"c_fc": {"w", "b"}, "c_proj": {...}}}
    """
    config: GPTConfig
    lo: int
    hi: int
    blocks: list
    wte: np.ndarray | None = None        # (V, C)
    wpe: np.ndarray | None = None        # (n_ctx, C)
    ln_f: dict | None = None             # {"g": (C,), "b": (C,)}
    lm_head: np.ndarray | None = None    # (V, C): wte itself when tied (no copy), else lm_head.weight
    source: str = ""
    metadata: dict = field(default_factory=dict)
    share: Share | None = None           # a member's part of every block (model.shard_block), or None: whole

    @property
    def has_head(self) -> bool:
        return self.wte is not None

    @property
    def synthetic(self) -> bool:
        """Random weights from `init_weights` (or a slice of them): the output is gibberish."""
        return is_synthetic(self.metadata)

    @property
    def nbytes(self) -> int:
        arrays = [self.wte, self.wpe] + ([self.lm_head] if self.lm_head is not self.wte else [])
        arrays += list(self.ln_f.values()) if self.ln_f else []
        arrays += [a for p in self.blocks for a in _leaves(p)]
        return sum(a.nbytes for a in arrays if a is not None)

    def holds(self, lo: int, hi: int) -> bool:
        """Does this stage hold blocks lo..hi-1 (and so can narrow to them without loading)?"""
        return self.lo <= lo < hi <= self.hi

    def narrowed(self, lo: int, hi: int) -> "StageWeights":
        """Blocks lo..hi-1 of this stage's, sharing their arrays (and rank 0's embeddings and head):
        a node whose new plan gives it fewer of the blocks it holds loads nothing.

            StageWeights(lo=0, hi=6, ...).narrowed(0, 4) -> StageWeights(lo=0, hi=4), blocks[0:4] the same dicts
        """
        if not self.holds(lo, hi):
            raise ValueError(f"a stage of blocks {self.lo}..{self.hi - 1} cannot narrow to {lo}..{hi - 1}")
        return dataclasses.replace(self, lo=lo, hi=hi, blocks=self.blocks[lo - self.lo:hi - self.lo])


def _leaves(d):
    for v in d.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


# ---------------------------------------------------------------------------------------------
# reading the header: layout, sizes and n_head


def _prefix(header: Header, path: str) -> str:
    prefix = gt.file_prefix(header.tensors)
    if prefix is not None:
        return prefix
    raise WeightsError(f"{path}: no GPT-2 tensors found (expected names like 'wte.weight' or "
                       f"'h.0.attn.c_attn.weight'); is this a GPT-2 safetensors file?")


def layer_indices(header: Header, prefix: str = "") -> list:
    """The block indices present in a file: [0, 1, ..., 11] for gpt2, [4, 5, 6, 7] for a slice."""
    return gt.block_indices(header.tensors, prefix)


def resolve_n_head(header: Header, path: str, n_embd: int, n_head: int | None = None) -> int:
    """n_head cannot be read off tensor shapes. In order: the caller, the file's metadata,
    a config.json beside the file, the four known GPT-2 sizes; otherwise a clear error."""
    source = "the caller"
    if n_head is None and "n_head" in header.metadata:
        n_head, source = check_metadata(header, path)["n_head"], f"{path} metadata"
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if n_head is None and os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        if "n_head" in cfg or "num_attention_heads" in cfg:
            n_head, source = int(cfg.get("n_head", cfg.get("num_attention_heads"))), cfg_path
    if n_head is None and n_embd in KNOWN_N_HEAD:
        n_head, source = KNOWN_N_HEAD[n_embd], f"the known GPT-2 size for n_embd={n_embd}"
    if n_head is None:
        raise WeightsError(f"{path}: cannot tell n_head for n_embd={n_embd}: pass --n-head, put "
                           "'n_head' in the safetensors metadata, or put a config.json with n_head beside the file")
    if n_head < 1 or n_embd % n_head:
        raise WeightsError(f"{path}: n_head={n_head} (from {source}) does not divide n_embd={n_embd}")
    return n_head


def read_config(path: str, n_head: int | None = None) -> tuple:
    """Infer (GPTConfig, Header, prefix) from a file's tensor shapes. n_layer counts the blocks the
    file holds unless its metadata records the full model's ('n_layer'), as slice files do."""
    try:
        header = read_header(path)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file; run `nanopipe pull gpt2` or "
                           f"`nanopipe init-weights {path}` for synthetic weights") from None
    except SafetensorsError as e:
        raise WeightsError(str(e)) from None
    prefix, claims = _prefix(header, path), check_metadata(header, path)
    t = header.tensors
    layers = layer_indices(header, prefix)
    if not layers:
        raise WeightsError(f"{path}: holds no transformer blocks ('{prefix}h.N.*')")
    n_embd = _dim(t, f"{prefix}h.{layers[0]}.ln_1.weight", path)
    n_layer = claims.get("n_layer", layers[-1] + 1)
    if f"{prefix}wte.weight" in t:
        n_vocab, n_ctx = _dim(t, f"{prefix}wte.weight", path), _dim(t, f"{prefix}wpe.weight", path)
    else:  # a worker's slice file: the sizes come from its metadata
        n_vocab, n_ctx = claims.get("n_vocab", 50257), claims.get("n_ctx", 1024)
    config = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=resolve_n_head(header, path, n_embd, n_head),
                       n_ctx=n_ctx, n_vocab=n_vocab)
    return config, header, prefix


# ---------------------------------------------------------------------------------------------
# loading a stage


def _checked(header: Header, name: str, shape: tuple, path: str):
    """The header's entry for `name`, or an error naming the tensor: missing, or of another shape."""
    info = header.tensors.get(name)
    if info is None:
        raise WeightsError(f"{path}: missing tensor {name!r}")
    if tuple(info.shape) != tuple(shape):
        raise WeightsError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} "
                           "(weights of another model size?)")
    return info


def _load(f, header: Header, name: str, shape: tuple, path: str, rows=None, cols=None, order="C",
          arena: Arena | None = None) -> np.ndarray:
    """The tensor `name`, checked to have `shape`, as float32; only rows r0..r1-1 and the column
    ranges `cols` of it when given (read_part: the rest is never held in memory), laid out
    column-major when order="F" (on the way, through read_part's small buffer: never a second copy).
    `arena`: the stage's memory in 2 MB pages (pages.Arena); a float32 tensor is read straight
    into it, another dtype converted into it."""
    info = _checked(header, name, shape, path)
    kept = np.empty if arena is None else arena.empty
    read_empty = kept if info.dtype == "F32" else np.empty       # float16/bfloat16: converted below
    try:
        if rows is None and cols is None and order == "C":
            raw = read_tensor(f, info, empty=read_empty)
        else:
            raw = read_part(f, info, rows, cols, order=order, empty=read_empty)
    except SafetensorsError as e:
        raise WeightsError(str(e)) from None
    if info.dtype == "F32" and raw.dtype.isnative:
        return raw
    out = kept(raw.shape, np.float32, order=order)
    out[...] = to_float32(raw, info.dtype)
    return out


def _block(f, header, prefix, i, config, path, order: str, arena: Arena | None = None) -> dict:
    """Block i, its matrices kept in `order` (this process's choice, at load, once: one letter, or one
    per matrix: kernels.matrix_order; see kernels.product)."""
    shapes = gt.block_shapes(config.n_embd)
    t = {k: _load(f, header, f"{prefix}h.{i}.{k}", shapes[k], path,
                  order=matrix_order(order, k) if k in gt.MATRICES else "C", arena=arena)
         for k in BLOCK_PARAMS}
    return {
        "ln_1": {"g": t["ln_1.weight"], "b": t["ln_1.bias"]},
        "attn": {"c_attn": {"w": t["attn.c_attn.weight"], "b": t["attn.c_attn.bias"]},
                 "c_proj": {"w": t["attn.c_proj.weight"], "b": t["attn.c_proj.bias"]}},
        "ln_2": {"g": t["ln_2.weight"], "b": t["ln_2.bias"]},
        "mlp": {"c_fc": {"w": t["mlp.c_fc.weight"], "b": t["mlp.c_fc.bias"]},
                "c_proj": {"w": t["mlp.c_proj.weight"], "b": t["mlp.c_proj.bias"]}},
    }


def _block_share(f, header, prefix, i, config, path, share: Share, order: str, arena: Arena | None = None) -> dict:
    """Member `share.member`'s part of block i, read straight from the file: the arrays
    model.shard_block cuts from the whole block, without reading the whole block into memory."""
    shapes = gt.block_shapes(config.n_embd)
    (a0, a1), (f0, f1) = share.attn_rows, share.hidden

    def part(k, rows=None, cols=None):
        return _load(f, header, f"{prefix}h.{i}.{k}", shapes[k], path, rows, cols, arena=arena)

    def matrix(k, rows=None, cols=None):        # in its order, as _block keeps them
        return _load(f, header, f"{prefix}h.{i}.{k}", shapes[k], path, rows, cols, order=matrix_order(order, k),
                     arena=arena)

    def bias(k):                            # member 0 adds it; the others hold zeros (see shard_block)
        if share.adds_bias:
            return part(k)
        _checked(header, f"{prefix}h.{i}.{k}", shapes[k], path)                       # checked, not read
        return np.zeros(shapes[k], np.float32)

    return {
        "ln_1": {"g": part("ln_1.weight"), "b": part("ln_1.bias")},
        "attn": {"c_attn": {"w": matrix("attn.c_attn.weight", cols=share.qkv_columns),
                            "b": part("attn.c_attn.bias", cols=share.qkv_columns)},
                 "c_proj": {"w": matrix("attn.c_proj.weight", rows=(a0, a1)),
                            "b": bias("attn.c_proj.bias")}},
        "ln_2": {"g": part("ln_2.weight"), "b": part("ln_2.bias")},
        "mlp": {"c_fc": {"w": matrix("mlp.c_fc.weight", cols=[(f0, f1)]),
                         "b": part("mlp.c_fc.bias", cols=[(f0, f1)])},
                "c_proj": {"w": matrix("mlp.c_proj.weight", rows=(f0, f1)),
                           "b": bias("mlp.c_proj.bias")}},
    }


def load_stage(path: str, lo: int = 0, hi: int | None = None, *, rank0: bool = True,
               n_head: int | None = None, expect: GPTConfig | None = None,
               share: tuple | None = None, choose_order: bool = False) -> StageWeights:
    """Load blocks lo..hi-1 (and, for rank 0, wte, wpe, ln_f and the LM head) from `path`.

    `expect`, when given, is the configuration the cluster agreed on: a file of another model size
    is refused here, at load, with the tensor and both shapes named.

    `share=(r, m)` loads member r of m's part of every block (model.share_of: its heads' columns of
    attn.c_attn and rows of attn.c_proj, its columns of mlp.c_fc and rows of mlp.c_proj), reading
    only those from the file: load_stage(path, 4, 12, rank0=False, share=(1, 2)).

    The block matrices and the LM head are kept in this process's memory orders (kernels.layout_orders).
    `choose_order=True` (a process's start: the engine, a node) first decides them if nobody has,
    measured on synthetic matrices of this model's shapes (kernels.choose_layout); without it an
    undecided process keeps the pinned or untimed orders, never timing the machine (a unit test).
    """
    config, header, prefix = read_config(path, n_head)
    if share is not None:
        try:
            member = share_of(*share, config.n_head, config.n_embd)
        except SplitError as e:
            raise WeightsError(f"{path}: cannot load share {share[0]} of {share[1]}: {e}") from None
    hi = config.n_layer if hi is None else hi
    if expect is not None and (config.n_embd, config.n_layer) != (expect.n_embd, expect.n_layer):
        raise WeightsError(f"{path}: holds a model with n_layer={config.n_layer}, n_embd={config.n_embd}, but the "
                           f"cluster runs n_layer={expect.n_layer}, n_embd={expect.n_embd}; "
                           "use the same weights everywhere")
    if not 0 <= lo <= hi <= config.n_layer:
        raise WeightsError(f"{path}: layers {lo}..{hi - 1} requested, but the model has {config.n_layer} layers")
    present = set(layer_indices(header, prefix))
    missing = [i for i in range(lo, hi) if i not in present]     # hi <= n_layer <= METADATA_LIMITS
    if missing:
        raise WeightsError(f"{path}: lacks layers {missing[0]}..{missing[-1]} that this stage needs "
                           f"(it holds {_ranges(sorted(present))}); "
                           f"pull them with `nanopipe pull NAME --layers {layers_text(lo, hi)}`")
    shapes = gt.head_shapes(config.n_embd, config.n_vocab, config.n_ctx)
    if choose_order:
        # rank 0 holds the LM head; a split stage's member may run its share of it (load_head_share)
        choose_layout(config.n_embd, config.n_vocab if rank0 or share is not None else None)
    block_order, head_order = layout_orders()
    arena = Arena()                 # this stage's memory, in 2 MB pages where the OS allows (pages.py)
    with open(path, "rb") as f:
        blocks = [_block(f, header, prefix, i, config, path, block_order, arena) if share is None else
                  _block_share(f, header, prefix, i, config, path, member, block_order, arena)
                  for i in range(lo, hi)]
        stage = StageWeights(config, lo, hi, blocks, source=path, metadata=dict(header.metadata),
                             share=None if share is None else member)
        if rank0:
            tied = "lm_head.weight" not in header.tensors
            # wte is the embedding and, tied, the head: kept in the head's order (a lookup takes either)
            stage.wte = _load(f, header, prefix + "wte.weight", shapes["wte.weight"], path,
                              order=head_order if tied else "C", arena=arena)
            stage.wpe = _load(f, header, prefix + "wpe.weight", shapes["wpe.weight"], path, arena=arena)
            stage.ln_f = {"g": _load(f, header, prefix + "ln_f.weight", shapes["ln_f.weight"], path),
                          "b": _load(f, header, prefix + "ln_f.bias", shapes["ln_f.bias"], path)}
            if not tied:
                stage.lm_head = _load(f, header, "lm_head.weight", shapes["lm_head.weight"], path,
                                      order=head_order, arena=arena)                     # (V, C)
            else:  # tied: the head is wte itself (model.head does a gemv on it as stored)
                stage.lm_head = stage.wte
    return stage


def load_head_share(path: str, vocab: tuple, n_head: int | None = None,
                    expect: GPTConfig | None = None) -> dict:
    """A split stage member's part of the LM head (model.head_share): ln_f and rows v0..v1-1 of the
    head (lm_head.weight when the file has one, else wte: tied), read straight from the file, only
    those rows (the rest is never held in memory), in this process's head order (kernels.layout_orders):

        load_head_share(path, (0, 25129)) -> {"ln_f": {"g": (C,), "b": (C,)}, "lm_head": (25129, C),
                                              "vocab": (0, 25129)}

    A file without the head (a worker's slice of blocks) raises WeightsError naming the tensor."""
    config, header, prefix = read_config(path, n_head)
    if expect is not None and (config.n_embd, config.n_vocab) != (expect.n_embd, expect.n_vocab):
        raise WeightsError(f"{path}: holds a head of n_vocab={config.n_vocab}, n_embd={config.n_embd}, but the "
                           f"cluster runs n_vocab={expect.n_vocab}, n_embd={expect.n_embd}")
    v0, v1 = vocab
    if not 0 <= v0 < v1 <= config.n_vocab:
        raise WeightsError(f"{path}: vocabulary rows {v0}..{v1 - 1} requested, the model has {config.n_vocab}")
    shapes = gt.head_shapes(config.n_embd, config.n_vocab, config.n_ctx)
    name = "lm_head.weight" if "lm_head.weight" in header.tensors else prefix + "wte.weight"
    with open(path, "rb") as f:
        ln_f = {"g": _load(f, header, prefix + "ln_f.weight", shapes["ln_f.weight"], path),
                "b": _load(f, header, prefix + "ln_f.bias", shapes["ln_f.bias"], path)}
        rows = _load(f, header, name, shapes["lm_head.weight"], path, rows=(v0, v1),
                     order=layout_orders()[1], arena=Arena())                                 # (v1-v0, C)
    return {"ln_f": ln_f, "lm_head": rows, "vocab": (v0, v1)}


def _ranges(idx: list) -> str:
    return f"{idx[0]}..{idx[-1]}" if idx else "none"


# ---------------------------------------------------------------------------------------------
# synthetic weights in the official hub layout

SYNTHETIC_KEY = "nanopipe_synthetic"     # in the safetensors metadata of every file init_weights writes
SYNTHETIC_NOTE = "SYNTHETIC: random weights, output is gibberish"


def is_synthetic(source) -> bool:
    """Was this written by `init_weights` (random weights)? `source`: a path, a Header or a metadata dict.

    Files of older versions carry {"nanopipe_synthetic": "seed=0"}, newer ones {"nanopipe_synthetic": "1"}.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_header(os.fspath(source))
    metadata = source.metadata if isinstance(source, Header) else (source or {})
    return str(metadata.get(SYNTHETIC_KEY, "0")).strip() not in ("", "0", "false")


def synthetic_note(synthetic) -> str:
    """' (SYNTHETIC: random weights, output is gibberish)' to append to a log line, or ''."""
    return f" ({SYNTHETIC_NOTE})" if synthetic else ""


# what a cluster says of its weights (synthetic_summary; the leader's status carries them): random, or mixed?
WEIGHTS_STATUS_KEYS = ("synthetic", "weights_mixed", "weights_note")


def synthetic_summary(flags: dict) -> dict:
    """What a cluster says about its weights, from each rank's `synthetic` flag (None: not known yet).

        synthetic_summary({0: True, 1: True})  -> {"synthetic": True, "weights_mixed": False,
                                                    "weights_note": "SYNTHETIC: random weights, ..."}
        synthetic_summary({0: False, 1: True}) -> {"synthetic": True, "weights_mixed": True,
                                                    "weights_note": "MIXED: rank 1 runs synthetic ..."}
    """
    fake = sorted(r for r, f in flags.items() if f)
    real = sorted(r for r, f in flags.items() if f is False)
    note = None
    if fake and real:
        note = (f"MIXED: rank {', '.join(map(str, fake))} run{'s' if len(fake) == 1 else ''} synthetic (random) "
                f"weights, rank {', '.join(map(str, real))} real ones; output is gibberish. "
                "Give every node the same real weights")
    elif fake:
        note = SYNTHETIC_NOTE
    return dict(zip(WEIGHTS_STATUS_KEYS, (bool(fake), bool(fake and real), note)))


def _shape(size: str, n_layer, n_embd, n_head, n_ctx, n_vocab) -> GPTConfig:
    if size not in SIZES:
        raise WeightsError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    L0, C0, H0 = SIZES[size]
    L, C = n_layer or L0, n_embd or C0
    H = n_head or (H0 if C == C0 else KNOWN_N_HEAD.get(C))
    if H is None or C % H:
        raise WeightsError(f"n_head={H} must be given and divide n_embd={C}")
    return GPTConfig(n_layer=L, n_embd=C, n_head=H, n_ctx=n_ctx or 1024, n_vocab=n_vocab)


def _shape_tag(c: GPTConfig) -> str:
    return f"n_layer={c.n_layer},n_embd={c.n_embd},n_head={c.n_head},n_ctx={c.n_ctx},n_vocab={c.n_vocab}"


def init_weights(path: str, size: str = "gpt2", n_layer: int | None = None, n_embd: int | None = None,
                 n_head: int | None = None, n_ctx: int | None = None, n_vocab: int = 50257, seed: int = 0,
                 masks: bool = True, layers: tuple | None = None, rank0: bool | None = None) -> GPTConfig:
    """Write random GPT-2 weights in the official hub layout, deterministic from `seed`.

    GPT-2's init statistics: weights ~ N(0, 0.02), the residual projections (attn.c_proj, mlp.c_proj)
    scaled by 1/sqrt(2 * n_layer), biases 0, LayerNorm gains 1. The output is gibberish, but every
    shape, name and dtype is the real file's, so everything can be tested offline. The metadata
    says so: {"nanopipe_synthetic": "1", "nanopipe_seed": "0", "nanopipe_shape": "n_layer=12,..."}.

    layers=(lo, hi) writes only blocks lo..hi-1 (plus wte, wpe and ln_f when rank0, by default
    when lo == 0): a worker's slice file, holding the very values the full file of the same seed
    holds (the generator runs through the blocks it skips).
    """
    c = _shape(size, n_layer, n_embd, n_head, n_ctx, n_vocab)
    L, C, V, n_ctx = c.n_layer, c.n_embd, c.n_vocab, c.n_ctx
    lo, hi = layers if layers is not None else (0, L)
    if not 0 <= lo < hi <= L:
        raise WeightsError(f"blocks {lo}..{hi - 1} asked for, but the model has {L} blocks (0..{L - 1})")
    rank0 = (lo == 0) if rank0 is None else rank0
    rng = np.random.default_rng(seed)
    proj_std = 0.02 / np.sqrt(2 * L)
    std = {"wte.weight": 0.02, "wpe.weight": 0.01}
    std.update({k: 0.02 for k in gt.MATRICES})
    std.update({k: proj_std for k in gt.RESIDUAL_PROJECTIONS})
    mask = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None] if masks else None  # (1, 1, n_ctx, n_ctx)
    tensors = {}
    for name, shape in gt.hub_shapes(L, C, V, n_ctx, masks).items():
        i, rest = gt.split_block(name)
        keep = lo <= i < hi if i is not None else rank0
        if rest in std:      # every normal is drawn, kept or not, so a slice matches the full file
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std[rest])
        elif rest in gt.MASK_BUFFERS:
            value = mask
        elif rest.endswith(".bias"):
            value = np.zeros(shape, np.float32)
        else:                # LayerNorm gains
            value = np.ones(shape, np.float32)
        if keep:
            tensors[name] = value
    meta = {"format": "pt", "n_head": c.n_head, SYNTHETIC_KEY: "1", "nanopipe_seed": seed,
            "nanopipe_shape": _shape_tag(c)}
    if layers is not None:   # a slice: what its own tensor shapes cannot say
        meta.update(n_layer=L, n_vocab=V, n_ctx=n_ctx, nanopipe_blocks=layers_text(lo, hi))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, tensors, meta)
    return c


def synthetic_name(size: str = "gpt2", n_layer: int | None = None, n_embd: int | None = None,
                   n_head: int | None = None, n_ctx: int | None = None, n_vocab: int = 50257, seed: int = 0) -> str:
    """The one shared file name for synthetic weights of a shape and seed.

        synthetic_name() -> "synthetic-gpt2.safetensors"
        synthetic_name(n_layer=2, n_embd=32, n_head=2) -> "synthetic-L2-C32-H2-T1024-V50257.safetensors"
    """
    c = _shape(size, n_layer, n_embd, n_head, n_ctx, n_vocab)
    if (c.n_layer, c.n_embd, c.n_head, c.n_ctx, c.n_vocab) == (*SIZES[size], 1024, 50257):
        tag = size
    else:
        tag = f"L{c.n_layer}-C{c.n_embd}-H{c.n_head}-T{c.n_ctx}-V{c.n_vocab}"
    return f"synthetic-{tag}{'' if seed == 0 else f'-seed{seed}'}.safetensors"


def _is_shared_synthetic(path: str, c: GPTConfig, seed: int) -> bool:
    try:
        meta = read_header(path).metadata
    except (OSError, SafetensorsError):
        return False
    return (is_synthetic(meta) and meta.get("nanopipe_shape") == _shape_tag(c)
            and meta.get("nanopipe_seed") == str(seed) and "nanopipe_blocks" not in meta)


def ensure_synthetic(path: str | None = None, folder: str = WEIGHTS_DIR, size: str = "gpt2", *,
                     n_layer: int | None = None, n_embd: int | None = None, n_head: int | None = None,
                     n_ctx: int | None = None, n_vocab: int = 50257, seed: int = 0, log=print) -> str:
    """Synthetic weights of this shape, written once per shape and shared by every command.

    The one copy is `folder/synthetic_name(...)`, written on first use. A `path` of another name
    (`nanopipe init-weights weights/gpt2.safetensors`) becomes a hard link to it: a second name,
    no second 548 MB. Where a hard link is impossible (another file system) the file is copied.
    Returns the path to use (`path`, or the shared file when `path` is None).
    """
    c = _shape(size, n_layer, n_embd, n_head, n_ctx, n_vocab)
    if path is not None and folder is None:
        folder = os.path.dirname(path)
    shared = os.path.join(folder, synthetic_name(size, n_layer, n_embd, n_head, n_ctx, n_vocab, seed))
    if not _is_shared_synthetic(shared, c, seed):
        log(f"Writing synthetic weights to {shared} ({SYNTHETIC_NOTE}; written once, shared by every command)")
        init_weights(shared, size, n_layer, n_embd, n_head, n_ctx, n_vocab, seed)
    if path is None or os.path.abspath(path) == os.path.abspath(shared):
        return shared
    if os.path.exists(path) and os.path.samefile(path, shared):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.link(shared, tmp)
    except OSError:
        import shutil
        shutil.copyfile(shared, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# what a header claims, checked against the tensors it holds


# What a file's metadata may claim about the model, checked before anything is sized from it. Where
# the file's own tensors can say (the blocks it holds, wte's and wpe's shapes), the claim must agree;
# where they cannot (a worker's slice holds neither the other blocks nor wte), it must be at most this.
METADATA_LIMITS = {"n_layer": 4096, "n_head": 4096, "n_ctx": 1 << 16, "n_vocab": 1 << 20}


def check_metadata(header: Header, path: str) -> dict:
    """The model sizes a file's metadata claims, as ints, checked against the tensors present.

        {"n_layer": "12", "n_head": "12"} in a file holding blocks 0..3 -> {"n_layer": 12, "n_head": 12}
        {"n_layer": "1000000000"} -> WeightsError (no GPT-2 has that many blocks)
        {"n_layer": "2"} in a file holding blocks 0..3 -> WeightsError (it holds more than that)
    """
    meta, claims = header.metadata, {}
    for key, limit in METADATA_LIMITS.items():
        if key not in meta:
            continue
        text = meta[key].strip()
        if not (text.isascii() and text.isdigit() and len(text) < 12 and 1 <= int(text) <= limit):
            raise WeightsError(f"{path}: metadata says {key}={shown(meta[key])}, which is not a whole number in "
                               f"1..{limit}; the file is damaged or not a GPT-2 file: pull it again")
        claims[key] = int(text)
    prefix = gt.file_prefix(header.tensors)
    if prefix is None:
        return claims
    layers = layer_indices(header, prefix)
    if layers and layers[-1] >= METADATA_LIMITS["n_layer"]:
        raise WeightsError(f"{path}: holds a block h.{layers[-1]}, past the {METADATA_LIMITS['n_layer']} "
                           "blocks any GPT-2 has; the file is damaged: pull it again")
    if layers and claims.get("n_layer", layers[-1] + 1) <= layers[-1]:
        raise WeightsError(f"{path}: metadata says n_layer={claims['n_layer']} but the file holds block "
                           f"h.{layers[-1]}; the file is damaged: pull it again")
    for key, tensor, dim in (("n_vocab", "wte.weight", 0), ("n_ctx", "wpe.weight", 0)):
        info = header.tensors.get(prefix + tensor)
        if key in claims and info is not None and info.shape and info.shape[dim] != claims[key]:
            raise WeightsError(f"{path}: metadata says {key}={claims[key]} but {prefix}{tensor} has shape "
                               f"{list(info.shape)}; the file is damaged: pull it again")
    return claims


def slice_metadata(header: Header, source: str, lo: int, hi: int, version: str | None = None) -> dict:
    """The metadata of a slice file cut from `header`'s file (blocks lo..hi-1): the source's own,
    plus what a loader cannot read off the slice's tensor shapes (n_layer, n_vocab, n_ctx, which
    check_metadata checks), the blocks, and where they came from (a url, or a node of the cluster):

        gpt2's header, "http://hub/model.safetensors", 4, 8
            -> {..., "n_layer": "12", "n_vocab": "50257", "n_ctx": "1024", "nanopipe_blocks": "4-7",
                "nanopipe_source": "http://hub/model.safetensors"}

    `version` (the source's ETag) goes in too: a part file begun from another version has another
    header, so it is started again rather than continued."""
    meta = dict(header.metadata)
    if version:
        meta["nanopipe_source_version"] = version
    t = {gt.base_name(n): v for n, v in header.tensors.items()}
    idx = gt.block_indices(t)
    meta.setdefault("n_layer", str(idx[-1] + 1 if idx else 0))
    if "wte.weight" in t:
        meta.setdefault("n_vocab", str(t["wte.weight"].shape[0]))
    if "wpe.weight" in t:
        meta.setdefault("n_ctx", str(t["wpe.weight"].shape[0]))
    meta.pop("nanopipe_layers", None)                 # older versions' half-open tag
    meta["nanopipe_blocks"] = layers_text(lo, hi)     # inclusive, like --layers and the file name
    meta["nanopipe_source"] = source
    return meta


def _dim(tensors: dict, name: str, path: str) -> int:
    """The first dimension of a tensor the sizes are read from, or a clear error."""
    info = tensors.get(name)
    if info is None or len(info.shape) < 1 or info.shape[0] < 1:
        raise WeightsError(f"{path}: tensor {shown(name)} is missing or has shape "
                           f"{list(info.shape) if info else None}; the file is damaged or not a GPT-2 file")
    return info.shape[0]


# ---------------------------------------------------------------------------------------------
# synthetic weights a leader can describe and a worker can remake: a seed and a shape


RECIPE_LIMITS = dict(METADATA_LIMITS, n_embd=1 << 14)


def synthetic_recipe(path: str) -> dict | None:
    """The seed and shape a synthetic file was made from (its metadata), or None when it does not
    say (not synthetic, or not made by init_weights):

        synthetic_recipe("weights/synthetic-gpt2.safetensors")
            -> {"seed": 0, "shape": "n_layer=12,n_embd=768,n_head=12,n_ctx=1024,n_vocab=50257"}
    """
    try:
        meta = read_header(path).metadata
    except (OSError, SafetensorsError):
        return None
    if not is_synthetic(meta) or "nanopipe_seed" not in meta or "nanopipe_shape" not in meta:
        return None
    recipe = {"seed": meta["nanopipe_seed"], "shape": meta["nanopipe_shape"]}
    try:
        seed, _ = parse_recipe(recipe)
    except WeightsError:
        return None
    return {"seed": seed, "shape": recipe["shape"]}


def parse_recipe(recipe) -> tuple:
    """A recipe from a peer -> (seed, init_weights' shape keywords), every number checked:

        {"seed": 0, "shape": "n_layer=2,n_embd=32,n_head=2,n_ctx=64,n_vocab=50257"}
            -> (0, {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_ctx": 64, "n_vocab": 50257})
    """
    if not isinstance(recipe, dict):
        raise WeightsError(f"expected {{seed, shape}}, got {shown(recipe)}")
    seed, tag = recipe.get("seed"), recipe.get("shape")
    if isinstance(seed, str) and seed.isascii() and seed.isdigit() and len(seed) < 12:
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise WeightsError(f"seed must be a whole number in 0..2^32-1, got {shown(seed)}")
    if not isinstance(tag, str) or len(tag) > 200:
        raise WeightsError(f"shape must be text like 'n_layer=12,n_embd=768,...', got {shown(tag)}")
    shape = {}
    for part in tag.split(","):
        key, _, text = part.partition("=")
        limit = RECIPE_LIMITS.get(key)
        if limit is None or key in shape or not (text.isascii() and text.isdigit() and len(text) < 12
                                                  and 1 <= int(text) <= limit):
            raise WeightsError(f"shape {shown(tag)}: {shown(part)} is not one of n_layer, n_embd, n_head, "
                               "n_ctx, n_vocab with a sensible whole number")
        shape[key] = int(text)
    if set(shape) != set(RECIPE_LIMITS):
        raise WeightsError(f"shape {shown(tag)} must give each of {', '.join(RECIPE_LIMITS)} once")
    if shape["n_embd"] % shape["n_head"]:
        raise WeightsError(f"shape {shown(tag)}: n_embd must be a multiple of n_head")
    # making a slice draws every tensor once (wte the largest): at most gpt2-xl's order of size
    if shape["n_vocab"] * shape["n_embd"] > 1 << 27 or 12 * shape["n_layer"] * shape["n_embd"] ** 2 > 1 << 32:
        raise WeightsError(f"shape {shown(tag)} is far larger than any GPT-2 (gpt2-xl has 1.5 billion parameters)")
    return seed, shape
