"""Load a stage's slice of GPT-2 straight from a safetensors file; write synthetic weights.

Both layouts of real files are accepted:
  - the official hub file: `wte.weight`, `h.0.attn.c_attn.weight`, ... plus `h.N.attn.bias` causal-mask
    buffers, no `lm_head` (tied to wte);
  - transformers' `save_pretrained`: the same names behind a `transformer.` prefix, no mask buffers.
A stage reads only its own tensors (blocks lo..hi-1, plus wte/wpe/ln_f when it is rank 0), each
straight into its final float32 array, so peak memory stays near the slice's size.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .model import GPTConfig
from .safetensors_io import Header, SafetensorsError, read_header, read_tensor, to_float32, write_safetensors

KNOWN_N_HEAD = {768: 12, 1024: 16, 1280: 20, 1600: 25}   # gpt2, -medium, -large, -xl
SIZES = {  # n_layer, n_embd, n_head
    "gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25),
}
BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")


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
    lm_head: np.ndarray | None = None    # (C, V), a contiguous copy of wte.T (or lm_head.weight.T)
    source: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def has_head(self) -> bool:
        return self.wte is not None

    @property
    def nbytes(self) -> int:
        arrays = [self.wte, self.wpe, self.lm_head]
        arrays += list(self.ln_f.values()) if self.ln_f else []
        arrays += [a for p in self.blocks for a in _leaves(p)]
        return sum(a.nbytes for a in arrays if a is not None)


def _leaves(d):
    for v in d.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


# ---------------------------------------------------------------------------------------------
# reading the header: layout, sizes and n_head


def _prefix(header: Header, path: str) -> str:
    for prefix in ("", "transformer."):
        if prefix + "wte.weight" in header.tensors or prefix + "h.0.ln_1.weight" in header.tensors:
            return prefix
    # a slice file may start at any block
    for name in header.tensors:
        if name.startswith("transformer.h."):
            return "transformer."
        if name.startswith("h."):
            return ""
    raise WeightsError(f"{path}: no GPT-2 tensors found (expected names like 'wte.weight' or "
                       f"'h.0.attn.c_attn.weight'); is this a GPT-2 safetensors file?")


def layer_indices(header: Header, prefix: str = "") -> list:
    """The block indices present in a file: [0, 1, ..., 11] for gpt2, [4, 5, 6, 7] for a slice."""
    start = prefix + "h."
    return sorted({int(n[len(start):].split(".")[0]) for n in header.tensors
                   if n.startswith(start) and n[len(start):].split(".")[0].isdigit()})


def resolve_n_head(header: Header, path: str, n_embd: int, n_head: int | None = None) -> int:
    """n_head cannot be read off tensor shapes. In order: the caller, the file's metadata,
    a config.json beside the file, the four known GPT-2 sizes; otherwise a clear error."""
    source = "the caller"
    if n_head is None and "n_head" in header.metadata:
        n_head, source = int(header.metadata["n_head"]), f"{path} metadata"
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
    prefix = _prefix(header, path)
    t = header.tensors
    layers = layer_indices(header, prefix)
    if not layers:
        raise WeightsError(f"{path}: holds no transformer blocks ('{prefix}h.N.*')")
    n_embd = t[f"{prefix}h.{layers[0]}.ln_1.weight"].shape[0]
    n_layer = int(header.metadata.get("n_layer", layers[-1] + 1))
    if f"{prefix}wte.weight" in t:
        n_vocab, n_ctx = t[f"{prefix}wte.weight"].shape[0], t[f"{prefix}wpe.weight"].shape[0]
    else:  # a worker's slice file: the sizes come from its metadata
        n_vocab, n_ctx = int(header.metadata.get("n_vocab", 50257)), int(header.metadata.get("n_ctx", 1024))
    config = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=resolve_n_head(header, path, n_embd, n_head),
                       n_ctx=n_ctx, n_vocab=n_vocab)
    return config, header, prefix


# ---------------------------------------------------------------------------------------------
# loading a stage


def _expected_shapes(c: GPTConfig) -> dict:
    C = c.n_embd
    return {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
            "mlp.c_proj.bias": (C,)}


def _load(f, header: Header, name: str, shape: tuple, path: str) -> np.ndarray:
    info = header.tensors.get(name)
    if info is None:
        raise WeightsError(f"{path}: missing tensor {name!r}")
    if tuple(info.shape) != tuple(shape):
        raise WeightsError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} "
                           "(weights of another model size?)")
    try:
        return np.ascontiguousarray(to_float32(read_tensor(f, info), info.dtype))
    except SafetensorsError as e:
        raise WeightsError(str(e)) from None


def _block(f, header, prefix, i, config, path) -> dict:
    shapes = _expected_shapes(config)
    t = {k: _load(f, header, f"{prefix}h.{i}.{k}", shapes[k], path) for k in BLOCK_PARAMS}
    for k in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
        t[k] = np.asfortranarray(t[k])      # column-major, once, at load: see model.linear
    return {
        "ln_1": {"g": t["ln_1.weight"], "b": t["ln_1.bias"]},
        "attn": {"c_attn": {"w": t["attn.c_attn.weight"], "b": t["attn.c_attn.bias"]},
                 "c_proj": {"w": t["attn.c_proj.weight"], "b": t["attn.c_proj.bias"]}},
        "ln_2": {"g": t["ln_2.weight"], "b": t["ln_2.bias"]},
        "mlp": {"c_fc": {"w": t["mlp.c_fc.weight"], "b": t["mlp.c_fc.bias"]},
                "c_proj": {"w": t["mlp.c_proj.weight"], "b": t["mlp.c_proj.bias"]}},
    }


def load_stage(path: str, lo: int = 0, hi: int | None = None, *, rank0: bool = True,
               n_head: int | None = None, expect: GPTConfig | None = None) -> StageWeights:
    """Load blocks lo..hi-1 (and, for rank 0, wte, wpe, ln_f and the LM head) from `path`.

    `expect`, when given, is the configuration the cluster agreed on: a file of another model size
    is refused here, at load, with the tensor and both shapes named.
    """
    config, header, prefix = read_config(path, n_head)
    hi = config.n_layer if hi is None else hi
    if expect is not None and (config.n_embd, config.n_layer) != (expect.n_embd, expect.n_layer):
        raise WeightsError(f"{path}: holds a model with n_layer={config.n_layer}, n_embd={config.n_embd}, but the "
                           f"cluster runs n_layer={expect.n_layer}, n_embd={expect.n_embd}; "
                           "use the same weights everywhere")
    if not 0 <= lo <= hi <= config.n_layer:
        raise WeightsError(f"{path}: layers {lo}..{hi - 1} requested, but the model has {config.n_layer} layers")
    present = set(layer_indices(header, prefix))
    missing = [i for i in range(lo, hi) if i not in present]
    if missing:
        raise WeightsError(f"{path}: lacks layers {missing[0]}..{missing[-1]} that this stage needs "
                           f"(it holds {_ranges(sorted(present))}); "
                           f"pull them with `nanopipe pull NAME --layers {lo}-{hi - 1}`")
    C, V = config.n_embd, config.n_vocab
    with open(path, "rb") as f:
        blocks = [_block(f, header, prefix, i, config, path) for i in range(lo, hi)]
        stage = StageWeights(config, lo, hi, blocks, source=path, metadata=dict(header.metadata))
        if rank0:
            stage.wte = _load(f, header, prefix + "wte.weight", (V, C), path)
            stage.wpe = _load(f, header, prefix + "wpe.weight", (config.n_ctx, C), path)
            stage.ln_f = {"g": _load(f, header, prefix + "ln_f.weight", (C,), path),
                          "b": _load(f, header, prefix + "ln_f.bias", (C,), path)}
            if "lm_head.weight" in header.tensors:
                stage.lm_head = np.ascontiguousarray(_load(f, header, "lm_head.weight", (V, C), path).T)
            else:  # tied: a transposed contiguous copy makes the per-token (1, C) @ (C, V) ~30% faster
                stage.lm_head = np.ascontiguousarray(stage.wte.T)
    return stage


def _ranges(idx: list) -> str:
    return f"{idx[0]}..{idx[-1]}" if idx else "none"


# ---------------------------------------------------------------------------------------------
# synthetic weights in the official hub layout


def init_weights(path: str, size: str = "gpt2", n_layer: int | None = None, n_embd: int | None = None,
                 n_head: int | None = None, n_ctx: int | None = None, n_vocab: int = 50257, seed: int = 0,
                 masks: bool = True) -> GPTConfig:
    """Write random GPT-2 weights in the official hub layout, deterministic from `seed`.

    GPT-2's init statistics: weights ~ N(0, 0.02), the residual projections (attn.c_proj, mlp.c_proj)
    scaled by 1/sqrt(2 * n_layer), biases 0, LayerNorm gains 1. The output is gibberish, but every
    shape, name and dtype is the real file's, so everything can be tested offline.
    """
    if size not in SIZES:
        raise WeightsError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    L0, C0, H0 = SIZES[size]
    L, C = n_layer or L0, n_embd or C0
    H = n_head or (H0 if C == C0 else KNOWN_N_HEAD.get(C))
    if H is None or C % H:
        raise WeightsError(f"n_head={H} must be given and divide n_embd={C}")
    T, V = n_ctx or 1024, n_vocab
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    proj_std = 0.02 / np.sqrt(2 * L)
    tensors = {"wte.weight": normal(V, C), "wpe.weight": normal(T, C, std=0.01)}
    mask = np.tril(np.ones((T, T), np.float32))[None, None] if masks else None  # (1, 1, T, T)
    for i in range(L):
        p = f"h.{i}."
        tensors.update({
            p + "ln_1.weight": np.ones(C, np.float32), p + "ln_1.bias": np.zeros(C, np.float32),
            p + "attn.c_attn.weight": normal(C, 3 * C), p + "attn.c_attn.bias": np.zeros(3 * C, np.float32),
            p + "attn.c_proj.weight": normal(C, C, std=proj_std), p + "attn.c_proj.bias": np.zeros(C, np.float32),
            p + "ln_2.weight": np.ones(C, np.float32), p + "ln_2.bias": np.zeros(C, np.float32),
            p + "mlp.c_fc.weight": normal(C, 4 * C), p + "mlp.c_fc.bias": np.zeros(4 * C, np.float32),
            p + "mlp.c_proj.weight": normal(4 * C, C, std=proj_std), p + "mlp.c_proj.bias": np.zeros(C, np.float32),
        })
        if masks:
            tensors[p + "attn.bias"] = mask
    tensors.update({"ln_f.weight": np.ones(C, np.float32), "ln_f.bias": np.zeros(C, np.float32)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, tensors, {"format": "pt", "n_head": H, "nanopipe_synthetic": f"seed={seed}"})
    return GPTConfig(n_layer=L, n_embd=C, n_head=H, n_ctx=T, n_vocab=V)
