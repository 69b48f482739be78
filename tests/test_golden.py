"""nanopipe's numpy GPT-2 against golden outputs of HF transformers: logits at every position, greedy tokens.

tests/golden/make_golden.py (run with torch + transformers) saved a small random GPT-2 with
`save_pretrained` and recorded what transformers computes from it. This test needs neither torch
nor transformers: it loads the same file with nanopipe and demands

    max |logits_nanopipe - logits_transformers| <= 1e-4   at every position of every prompt
    greedy continuation (16 tokens)            identical

for both layouts GPT-2 files come in: as `save_pretrained` writes them (`transformer.` prefix) and as
the official hub file is laid out (no prefix, causal-mask buffers `h.N.attn.bias`, n_head only in
the config.json beside it), the latter derived from the former here, at test time.
Run with `pytest -s tests/test_golden.py` to see the largest difference for every case.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from floats import assert_same
from helpers import GOLDEN, GOLDEN_CASES, GOLDEN_PROVENANCE, HF_DIR

from nanopipe.decoding import SamplingParams
from nanopipe.engine import Engine
from nanopipe.safetensors_io import read_header, read_tensor, write_safetensors

ATOL = 1e-4
LAYOUTS = ("transformers", "hub")
CASES, PROVENANCE = GOLDEN_CASES, GOLDEN_PROVENANCE        # tests/helpers.py loads them


def to_hub_layout(src_dir: Path, dst_dir: Path) -> Path:
    """Rewrite a `save_pretrained` file the way the official hub's gpt2 model.safetensors is laid out.

    transformer.h.0.attn.c_attn.weight -> h.0.attn.c_attn.weight  (and so on for every tensor)
    lm_head.weight                     -> dropped (tied to wte; the hub file has none)
    (new) h.N.attn.bias                   lower-triangular ones, float32 (1, 1, n_ctx, n_ctx): the
                                          causal mask old GPT-2 code kept as a buffer
    __metadata__                       -> {"format": "pt"} only: no n_head, so the loader must find it
                                          in the config.json copied beside the file
    """
    src = src_dir / "model.safetensors"
    header = read_header(str(src))
    tensors = {}
    with open(src, "rb") as f:
        for name, info in header.tensors.items():
            if name == "lm_head.weight":
                continue
            tensors[name.removeprefix("transformer.")] = read_tensor(f, info)
    n_ctx = tensors["wpe.weight"].shape[0]
    mask = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]     # (1, 1, n_ctx, n_ctx)
    n_layer = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("h."))
    for i in range(n_layer):
        tensors[f"h.{i}.attn.bias"] = mask
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "model.safetensors"
    write_safetensors(str(dst), dict(sorted(tensors.items())), {"format": "pt"})
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    return dst


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """layout name -> path of the tiny model's weights in that layout."""
    return {"transformers": HF_DIR / "model.safetensors",
            "hub": to_hub_layout(HF_DIR, tmp_path_factory.mktemp("hub-layout"))}


@pytest.fixture(scope="module")
def engines(weight_files):
    return {layout: Engine.load(str(path)) for layout, path in weight_files.items()}


def test_golden_files_describe_the_committed_model():
    """The provenance, config.json and the weights agree on the model they describe."""
    cfg = json.loads((HF_DIR / "config.json").read_text())
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        assert cfg[key] == PROVENANCE["config"][key], f"tiny-hf/config.json {key} != tiny_golden.json"
    assert [len(ids) for ids, _, _ in CASES] == PROVENANCE["prompt_lengths"]
    for ids, logits, greedy in CASES:
        assert logits.dtype == np.float32 and logits.shape == (len(ids), cfg["vocab_size"])
        assert len(greedy) == PROVENANCE["generate"]["max_new_tokens"]


def test_hub_layout_is_really_the_hub_layout(weight_files):
    """Guard the fixture itself: without this, a derivation bug could test the same layout twice."""
    hf, hub = read_header(str(weight_files["transformers"])), read_header(str(weight_files["hub"]))
    assert all(name.startswith("transformer.") for name in hf.tensors)
    assert not any(name.startswith("transformer.") or name == "lm_head.weight" for name in hub.tensors)
    n_layer, n_ctx = PROVENANCE["config"]["n_layer"], PROVENANCE["config"]["n_positions"]
    for i in range(n_layer):
        assert hub.tensors[f"h.{i}.attn.bias"].shape == (1, 1, n_ctx, n_ctx)
    assert "n_head" not in hub.metadata and "n_head" not in hf.metadata


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_is_read_from_the_files(engines, layout):
    """Sizes come from tensor shapes; n_head (4 here, not guessable from n_embd=64) from config.json."""
    c, want = engines[layout].config, PROVENANCE["config"]
    assert (c.n_layer, c.n_embd, c.n_head, c.n_ctx, c.n_vocab) == (
        want["n_layer"], want["n_embd"], want["n_head"], want["n_positions"], want["vocab_size"])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{len(c[0])}tok" for c in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(engines, layout, case):
    ids, want, _ = CASES[case]
    got = engines[layout].logits(ids)                                   # (T, V)
    assert got.shape == want.shape and got.dtype == np.float32
    diff = float(np.abs(got - want).max())
    worst = np.unravel_index(np.abs(got - want).argmax(), want.shape)
    print(f"\n[golden {layout}, {len(ids)} tokens] max abs logit diff vs transformers: {diff:.3e} "
          f"(position {worst[0]}, token {worst[1]})")
    assert diff <= ATOL, (f"{layout} layout, prompt of {len(ids)} tokens: logits differ from transformers "
                          f"by up to {diff:.3e} (> {ATOL}) at position {worst[0]}, token {worst[1]}")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{len(c[0])}tok" for c in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_match_transformers(engines, layout, case):
    ids, _, want = CASES[case]
    params = SamplingParams(strategy="greedy", max_tokens=len(want))
    got = engines[layout].generate(ids, params)["token_ids"]
    first_bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, (f"{layout} layout, prompt of {len(ids)} tokens: greedy continuation differs from "
                         f"transformers at step {first_bad}:\n  nanopipe     {got}\n  transformers {want}")


def _penalized_cases():
    with np.load(GOLDEN / "tiny_golden.npz") as z:
        return [(z[f"prompt_ids_{i}"].tolist(), z[f"bias_{i}"].tolist(), z[f"greedy_penalized_{i}"].tolist())
                for i in range(len(CASES))]


PENALIZED = _penalized_cases()


@pytest.mark.parametrize("case", range(len(PENALIZED)), ids=[f"{len(c[0])}tok" for c in PENALIZED])
def test_greedy_with_repetition_penalty_and_logit_bias_matches_transformers(engines, case):
    """transformers' generate(repetition_penalty=1.3, sequence_bias={(t,): b}) == nanopipe's greedy with
    repetition_penalty=1.3 and logit_bias {t: b}: the penalties, their order and the batched path."""
    ids, bias, want = PENALIZED[case]
    penalty = PROVENANCE["penalized"]["repetition_penalty"]
    params = SamplingParams(strategy="greedy", max_tokens=len(want), repetition_penalty=penalty,
                            logit_bias={int(t): b for t, b in bias}).validate()
    engine = engines["transformers"]
    got = engine.generate(ids, params)["token_ids"]
    first_bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, (f"prompt of {len(ids)} tokens, repetition_penalty={penalty}, logit_bias={bias}: greedy "
                         f"differs from transformers at step {first_bad}:\n  nanopipe     {got}\n  transformers {want}")
    bias_only = engine.generate(ids, SamplingParams(strategy="greedy", max_tokens=len(want),
                                                    logit_bias=params.logit_bias))["token_ids"]
    assert bias_only != want and CASES[case][2] != want, "both the bias and the penalty must change the answer"


def test_both_layouts_give_bit_identical_logits(engines):
    """Same float32 weights, same code: the layout must not change a single bit."""
    ids = CASES[-1][0]
    a, b = engines["transformers"].logits(ids), engines["hub"].logits(ids)
    assert_same(a, b, "both layouts load into the same float32 arrays and run the very same calls")
