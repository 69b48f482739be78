"""Write the golden files that prove nanopipe's numpy GPT-2 computes what HF transformers computes.

Dev-only: needs torch and transformers (see requirements-parity.txt); the tests that read the
outputs need only numpy and nanopipe. Run it from the repository root:

    python -m venv /tmp/vref && /tmp/vref/bin/pip install -r requirements-parity.txt
    /tmp/vref/bin/pip install -e . --no-deps
    /tmp/vref/bin/python tests/golden/make_golden.py

It writes, into tests/golden/:

    tiny-hf/model.safetensors   a small random GPT2LMHeadModel, as `save_pretrained` writes it
    tiny-hf/config.json         (names behind a `transformer.` prefix, no mask buffers, no lm_head)
    tiny_golden.npz             for each prompt i: prompt_ids_i (T,), logits_i (T, V) float32 at every
                                position, greedy_i (16,) the greedy continuation from `generate`;
                                bias_i (2, 2) [[token, bias], ...] and greedy_penalized_i (16,): greedy
                                with repetition_penalty=REPETITION_PENALTY and that bias
                                (`sequence_bias`, nanopipe's logit_bias)
    tiny_golden.json            provenance: torch/transformers/numpy versions, seed, config, margins

Running it twice gives byte-identical files (fixed seeds, one thread, fixed zip timestamps), so
a diff in git means the reference changed, not the dice.

Why not GPT-2's own init (weights ~ N(0, 0.02), LayerNorm gains 1, biases 0)? With it the logits
are nearly flat, so a bug that swaps two biases or drops a LayerNorm gain would hide under the
tolerance, and greedy decoding would pick among near-ties. Here every tensor, biases and gains
included, is drawn at a scale that makes each one matter, and the script refuses to write a golden
file whose greedy choices were closer than MIN_GREEDY_MARGIN (so 1e-4 of float noise cannot flip one).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import zipfile

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "tiny-hf")
NPZ_PATH = os.path.join(HERE, "tiny_golden.npz")
JSON_PATH = os.path.join(HERE, "tiny_golden.json")

SEED = 1234
CONFIG = dict(n_layer=4, n_embd=64, n_head=4, n_positions=128, vocab_size=1000)
MAX_NEW_TOKENS = 16
REPETITION_PENALTY = 1.3  # transformers' (CTRL's) multiplicative penalty, as nanopipe's repetition_penalty
MIN_GREEDY_MARGIN = 1e-3   # top-1 minus top-2 logit at every greedy step; the test tolerance is 1e-4
# std of the random draw for each kind of tensor (see the module docstring for why not 0.02)
SCALES = {"wte": 0.2, "wpe": 0.2, "matrix": 0.15, "bias": 0.05, "ln_gain_noise": 0.2, "ln_bias": 0.1}


def prompts(vocab_size: int) -> list:
    """Four prompts of 1, 7, 20 and 100 tokens. The last one is longer than nanopipe's prefill chunk
    (64 rows), and with its continuation it fills 116 of the 128 positions. Token ids are drawn
    below vocab_size from their own seeded generator."""
    rng = np.random.default_rng(SEED + 1)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (1, 7, 20, 100)]


def build_model() -> GPT2LMHeadModel:
    """A GPT2LMHeadModel with every parameter redrawn from a seeded generator (see SCALES)."""
    torch.manual_seed(SEED)
    config = GPT2Config(**CONFIG, bos_token_id=None, eos_token_id=None,  # no <|endoftext|> in 1000 ids
                        attn_implementation="eager")  # the textbook softmax(QK^T/sqrt(d))V, not SDPA
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("wte.weight"):
                p.copy_(noise * SCALES["wte"])
            elif name.endswith("wpe.weight"):
                p.copy_(noise * SCALES["wpe"])
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith(".weight"):
                    p.copy_(1.0 + noise * SCALES["ln_gain_noise"])
                else:
                    p.copy_(noise * SCALES["ln_bias"])
            elif name.endswith(".bias"):
                p.copy_(noise * SCALES["bias"])
            elif name.endswith(".weight") and p.dim() == 2:
                p.copy_(noise * SCALES["matrix"])
            else:
                raise SystemExit(f"make_golden: no init rule for parameter {name!r} {list(p.shape)}")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    return model


def reference(model: GPT2LMHeadModel, ids: list) -> tuple:
    """(logits (T, V) float32 at every position, greedy continuation (16,), smallest greedy margin)."""
    x = torch.tensor([ids], dtype=torch.long)                    # (1, T)
    with torch.no_grad():
        logits = model(x).logits[0].float().numpy()              # (T, V)
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=True,
                             max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=0, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    greedy = out.sequences[0, len(ids):].numpy().astype(np.int64)   # (16,)
    margins = []
    for step, scores in enumerate(out.scores):                   # each (1, V)
        top2 = torch.topk(scores[0], 2).values
        margins.append(float(top2[0] - top2[1]))
        assert int(scores[0].argmax()) == int(greedy[step])
    return logits, greedy, min(margins)


def penalized_reference(model: GPT2LMHeadModel, ids: list, bias: list) -> tuple:
    """Greedy with repetition_penalty and sequence_bias {(token,): bias}: (16 ids, smallest margin).
    transformers applies the bias first, then the penalty (as nanopipe's decoding.penalize does)."""
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=True,
                             max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=0, eos_token_id=None, repetition_penalty=REPETITION_PENALTY,
                             sequence_bias={(int(t),): float(b) for t, b in bias},
                             output_scores=True, return_dict_in_generate=True)
    greedy = out.sequences[0, len(ids):].numpy().astype(np.int64)   # (16,)
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]   # after the processors
    return greedy, min(margins)


def save_npz(path: str, arrays: dict) -> None:
    """np.savez, but byte-for-byte reproducible: zip entries get a fixed timestamp."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)          # one thread: the same float summation order on every run
    torch.use_deterministic_algorithms(True)
    model = build_model()

    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    gen_cfg = os.path.join(MODEL_DIR, "generation_config.json")
    if os.path.exists(gen_cfg):       # nanopipe never reads it; keep the fixture to two files
        os.remove(gen_cfg)

    arrays, margins, penalized_margins = {}, [], []
    for i, ids in enumerate(prompts(CONFIG["vocab_size"])):
        logits, greedy, margin = reference(model, ids)
        if margin < MIN_GREEDY_MARGIN:
            raise SystemExit(f"make_golden: prompt {i} has a greedy step with top-2 margin {margin:.2e} "
                             f"< {MIN_GREEDY_MARGIN}; pick another SEED so float noise cannot flip it")
        arrays[f"prompt_ids_{i}"] = np.asarray(ids, np.int64)
        arrays[f"logits_{i}"] = logits.astype(np.float32)
        arrays[f"greedy_{i}"] = greedy
        margins.append(margin)
        # ban the token plain greedy picks first, favour the one it picks second
        bias = np.array([[greedy[0], -100.0], [greedy[1], 1.5]], np.float64)       # (2, 2)
        penalized, margin = penalized_reference(model, ids, bias.tolist())
        if margin < MIN_GREEDY_MARGIN:
            raise SystemExit(f"make_golden: prompt {i}, penalized greedy margin {margin:.2e} < {MIN_GREEDY_MARGIN}")
        arrays[f"bias_{i}"] = bias
        arrays[f"greedy_penalized_{i}"] = penalized
        penalized_margins.append(margin)
    save_npz(NPZ_PATH, arrays)

    provenance = {
        "made_by": "tests/golden/make_golden.py",
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "seed": SEED, "config": CONFIG,
        "attn_implementation": "eager", "activation_function": model.config.activation_function,
        "layer_norm_epsilon": model.config.layer_norm_epsilon, "init_scales": SCALES,
        "prompt_lengths": [int(arrays[f"prompt_ids_{i}"].size) for i in range(len(margins))],
        "generate": {"do_sample": False, "use_cache": True, "max_new_tokens": MAX_NEW_TOKENS,
                     "pad_token_id": 0, "eos_token_id": None},
        "min_greedy_margin_per_prompt": [round(m, 6) for m in margins],
        "penalized": {"repetition_penalty": REPETITION_PENALTY, "sequence_bias": "bias_i in the npz",
                      "min_greedy_margin_per_prompt": [round(m, 6) for m in penalized_margins]},
    }
    with open(JSON_PATH, "w") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)
        f.write("\n")
    sizes = {p: os.path.getsize(p) for p in (os.path.join(MODEL_DIR, "model.safetensors"),
                                             os.path.join(MODEL_DIR, "config.json"), NPZ_PATH, JSON_PATH)}
    for p, n in sizes.items():
        print(f"{n:>9,d}  {os.path.relpath(p)}")
    print(f"{sum(sizes.values()):>9,d}  total; smallest greedy margin {min(margins):.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
