"""nanopipe against HF transformers, live: both run here, on the same weights, side by side.

Needs torch and transformers (requirements-parity.txt); `make parity` runs it. Two models:

  tiny        tests/golden/tiny-hf, the model the default suite's golden files come from. Also
              checks that today's transformers still computes the committed golden outputs, so a
              stale golden file (or a reference that changed under us) is caught here.
  gpt2-small  a synthetic gpt2-shaped model (12 layers, 768 wide, 12 heads, 1024 positions,
              50257 tokens) written by `nanopipe.weights.init_weights` in the official hub layout
              and loaded by `GPT2LMHeadModel.from_pretrained`.

Compared: logits at every position (max abs diff <= 1e-4, printed; run `pytest -s` to see them)
and greedy continuations (exactly equal, stopping at <|endoftext|> like nanopipe does). Seeded
sampling is not compared: torch and numpy draw from different random number generators.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

_NEEDS = "the live parity test needs {}: pip install -r requirements-parity.txt, then `make parity`"
torch = pytest.importorskip("torch", reason=_NEEDS.format("torch"))
transformers = pytest.importorskip("transformers", reason=_NEEDS.format("transformers"))
transformers.utils.logging.disable_progress_bar()   # "Loading weights: 100%" says nothing here

from nanopipe.decoding import SamplingParams  # noqa: E402
from nanopipe.engine import EOT, Engine  # noqa: E402
from nanopipe.safetensors_io import read_header, read_tensor  # noqa: E402
from nanopipe.weights import init_weights  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
TINY_DIR = GOLDEN / "tiny-hf"
ATOL = 1e-4
# "The pipeline splits GPT-2 across small machines: each one holds a few layers and passes
# activations on." in GPT-2 token ids (23 tokens), written out so this test needs no tokenizer
SENTENCE_IDS = [464, 11523, 30778, 402, 11571, 12, 17, 1973, 1402, 8217, 25, 1123, 530, 6622, 257, 1178,
                11685, 290, 8318, 1753, 602, 319, 13]
SMALL_GREEDY_TOKENS = 20


# ---------------------------------------------------------------------------------------------
# the reference side


def load_reference(model_dir: Path, weights: Path):
    """GPT2LMHeadModel.from_pretrained, refusing a partial load.

    transformers fills any weight it did not find in the file with fresh random values and only
    logs it; here a missing or mis-shaped key fails the test, and every tensor the model holds is
    compared bit for bit with the file, so "loaded" means loaded.
    """
    model, info = transformers.GPT2LMHeadModel.from_pretrained(
        str(model_dir), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"], \
        f"{weights}: transformers initialized {sorted(info['missing_keys'])} afresh (not in the file)"
    assert not info["mismatched_keys"], f"{weights}: shape mismatches {info['mismatched_keys']}"
    state = model.state_dict()
    header = read_header(str(weights))
    with open(weights, "rb") as f:
        for name, tinfo in header.tensors.items():
            if name.endswith(".attn.bias") and len(tinfo.shape) == 4:
                continue                               # the hub's causal-mask buffers: not parameters
            key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
            assert key in state, f"{weights}: tensor {name!r} has no counterpart {key!r} in the model"
            assert np.array_equal(state[key].numpy(), read_tensor(f, tinfo)), \
                f"{weights}: transformers holds different values for {name!r} than the file"
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight), "lm_head is not tied to wte"
    return model.eval()


def reference_logits(model, ids: list) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()        # (T, V)


def reference_greedy(model, ids: list, n: int, **processors) -> tuple:
    """transformers' greedy continuation, cut after <|endoftext|> as nanopipe stops there, and the
    smallest top-1/top-2 logit margin met on the way (how close a step came to a tie).
    `processors`: e.g. repetition_penalty=1.3, sequence_bias={(13,): -100.0}."""
    x = torch.tensor([ids])
    eos = EOT if model.config.vocab_size > EOT else None
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=True,
                             max_new_tokens=n, pad_token_id=eos if eos is not None else 0, eos_token_id=eos,
                             output_scores=True, return_dict_in_generate=True, **processors)
    tokens = out.sequences[0, len(ids):].tolist()
    if eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores[:len(tokens)]]
    return tokens, min(margins)


def compare_logits(label: str, got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape, f"{label}: logits shape {got.shape}, transformers {want.shape}"
    err = np.abs(got - want)
    diff = float(err.max())
    pos, tok = np.unravel_index(err.argmax(), err.shape)
    print(f"\n[parity {label}] max abs logit diff: {diff:.3e} (position {pos}, token {tok}; "
          f"logits span {float(want.min()):.2f}..{float(want.max()):.2f})")
    assert diff <= ATOL, f"{label}: logits off by up to {diff:.3e} (> {ATOL}) at position {pos}, token {tok}"


def compare_greedy(label: str, got: list, want: list, margin: float):
    print(f"\n[parity {label}] greedy {len(want)} tokens; smallest top-2 margin {margin:.3e}")
    bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, (f"{label}: greedy tokens differ from step {bad} (smallest top-2 margin on the way "
                         f"{margin:.2e}):\n  nanopipe     {got}\n  transformers {want}")


# ---------------------------------------------------------------------------------------------
# tiny: the golden model


def _tiny_cases():
    with np.load(GOLDEN / "tiny_golden.npz") as z:
        n = len([k for k in z.files if k.startswith("prompt_ids_")])
        return [(z[f"prompt_ids_{i}"].tolist(), z[f"logits_{i}"], z[f"greedy_{i}"].tolist())
                for i in range(n)]


TINY_CASES = _tiny_cases()
TINY_IDS = [f"{len(ids)}tok" for ids, _, _ in TINY_CASES]


@pytest.fixture(scope="module")
def tiny():
    """(transformers model, nanopipe engine) on tests/golden/tiny-hf."""
    weights = TINY_DIR / "model.safetensors"
    return load_reference(TINY_DIR, weights), Engine.load(str(weights))


@pytest.mark.parametrize("case", range(len(TINY_CASES)), ids=TINY_IDS)
def test_golden_files_are_what_transformers_computes_today(tiny, case):
    ids, logits, greedy = TINY_CASES[case]
    model, _ = tiny
    compare_logits(f"transformers {transformers.__version__} vs golden file, tiny, {len(ids)} tokens",
                   reference_logits(model, ids), logits)
    tokens, margin = reference_greedy(model, ids, len(greedy))
    made_with = json.loads((GOLDEN / "tiny_golden.json").read_text())["transformers"]
    assert tokens == greedy, (f"transformers {transformers.__version__} no longer produces the golden greedy "
                              f"tokens for the {len(ids)}-token prompt (golden made with {made_with}); "
                              "rerun tests/golden/make_golden.py")


@pytest.mark.parametrize("case", range(len(TINY_CASES)), ids=TINY_IDS)
def test_penalized_golden_is_what_transformers_computes_today(tiny, case):
    ids = TINY_CASES[case][0]
    with np.load(GOLDEN / "tiny_golden.npz") as z:
        bias, greedy = z[f"bias_{case}"].tolist(), z[f"greedy_penalized_{case}"].tolist()
    penalty = json.loads((GOLDEN / "tiny_golden.json").read_text())["penalized"]["repetition_penalty"]
    model, engine = tiny
    want, margin = reference_greedy(model, ids, len(greedy), repetition_penalty=penalty,
                                    sequence_bias={(int(t),): float(b) for t, b in bias})
    assert want == greedy, "transformers no longer produces the penalized golden tokens; rerun make_golden.py"
    params = SamplingParams(strategy="greedy", max_tokens=len(greedy), repetition_penalty=penalty,
                            logit_bias={int(t): b for t, b in bias})
    compare_greedy(f"tiny, {len(ids)} tokens, repetition_penalty {penalty}, logit_bias {bias}",
                   engine.generate(ids, params)["token_ids"], want, margin)


@pytest.mark.parametrize("case", range(len(TINY_CASES)), ids=TINY_IDS)
def test_tiny_logits_live(tiny, case):
    ids = TINY_CASES[case][0]
    model, engine = tiny
    compare_logits(f"tiny, {len(ids)} tokens", engine.logits(ids), reference_logits(model, ids))


@pytest.mark.parametrize("case", range(len(TINY_CASES)), ids=TINY_IDS)
def test_tiny_greedy_live(tiny, case):
    ids = TINY_CASES[case][0]
    model, engine = tiny
    want, margin = reference_greedy(model, ids, 16)
    got = engine.generate(ids, SamplingParams(strategy="greedy", max_tokens=16))["token_ids"]
    compare_greedy(f"tiny, {len(ids)} tokens", got, want, margin)


def reference_score(model, context: list, continuation: list) -> tuple:
    """What an evaluation harness computes from transformers for a context/continuation pair:
    (sum of the continuation's logprobs, is_greedy: every continuation token is the argmax)."""
    ids = context + continuation
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)      # (T, V)
    positions = range(len(context) - 1, len(ids) - 1)
    return (float(sum(lp[j, ids[j + 1]] for j in positions)),
            all(int(lp[j].argmax()) == ids[j + 1] for j in positions))


def test_tiny_scoring_live(tiny):
    """Scoring-only requests (echo, max_tokens 0, logprobs 1), as harnesses send them: summed
    continuation logprobs within 1e-4 of transformers', greedy-match flags identical. Pairs cut
    from the golden prompts, and each prompt followed by transformers' own greedy continuation."""
    model, engine = tiny
    pairs = [(ids[:c], ids[c:]) for ids, c in ((TINY_CASES[1][0], 3), (TINY_CASES[2][0], 12),
                                                 (TINY_CASES[3][0], 1), (TINY_CASES[3][0], 70))]
    for ids, _, _ in TINY_CASES[:3]:
        pairs.append((ids, reference_greedy(model, ids, 6)[0]))
    worst = 0.0
    for context, continuation in pairs:
        want, want_greedy = reference_score(model, context, continuation)
        r = engine.generate(context + continuation, SamplingParams("greedy", max_tokens=1), echo=True,
                            top_logprobs=1, score_only=True)
        positions = range(len(context) - 1, len(context) + len(continuation) - 1)
        got = sum(r["prompt_logprobs"][j] for j in positions)
        got_greedy = all(r["prompt_top_logprobs"][j][0]["id"] == (context + continuation)[j + 1] for j in positions)
        worst = max(worst, abs(got - want))
        print(f"\n[parity scoring] context {len(context)}, continuation {len(continuation)}: {got:.6f} vs "
              f"{want:.6f}; greedy {got_greedy} vs {want_greedy}")
        assert abs(got - want) <= ATOL, f"summed logprob {got} vs transformers {want}"
        assert got_greedy == want_greedy
        assert r["token_ids"] == []
    assert any(reference_score(model, c, k)[1] for c, k in pairs), "no pair exercises is_greedy=True"
    print(f"\n[parity scoring] largest difference of a summed continuation logprob: {worst:.2e}")


# ---------------------------------------------------------------------------------------------
# gpt2-small shaped, synthetic, official hub layout


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(transformers model, nanopipe engine) on one synthetic gpt2-small file in the hub layout.

    The file is named model.safetensors, with a config.json beside it, because that is what
    from_pretrained looks for in a directory.
    """
    d = tmp_path_factory.mktemp("gpt2-small-synthetic")
    weights = d / "model.safetensors"
    cfg = init_weights(str(weights), size="gpt2", seed=0)
    header = read_header(str(weights))
    assert {"h.0.attn.bias", "wte.weight"} <= set(header.tensors), "init_weights: not the hub layout"
    transformers.GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_ctx,
                            vocab_size=cfg.n_vocab).save_pretrained(str(d))
    model = load_reference(d, weights)
    engine = Engine.load(str(weights))
    assert (engine.config.n_layer, engine.config.n_embd, engine.config.n_head, engine.config.n_ctx,
            engine.config.n_vocab) == (12, 768, 12, 1024, 50257)
    yield model, engine
    weights.unlink()     # 550 MB; pytest keeps the last few temp dirs around


@pytest.mark.slow
def test_gpt2_small_logits_live(small):
    model, engine = small
    compare_logits(f"gpt2-small synthetic, {len(SENTENCE_IDS)} tokens",
                   engine.logits(SENTENCE_IDS), reference_logits(model, SENTENCE_IDS))


@pytest.mark.slow
def test_gpt2_small_greedy_live(small):
    model, engine = small
    want, margin = reference_greedy(model, SENTENCE_IDS, SMALL_GREEDY_TOKENS)
    params = SamplingParams(strategy="greedy", max_tokens=SMALL_GREEDY_TOKENS)
    got = engine.generate(SENTENCE_IDS, params)["token_ids"]
    compare_greedy(f"gpt2-small synthetic, {len(SENTENCE_IDS)} tokens", got, want, margin)


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [1.2, 2.0])
def test_gpt2_small_greedy_with_repetition_penalty_live(small, penalty):
    """Greedy GPT-2 loops; repetition_penalty is what transformers' users reach for. Same answer."""
    model, engine = small
    want, margin = reference_greedy(model, SENTENCE_IDS, SMALL_GREEDY_TOKENS, repetition_penalty=penalty)
    params = SamplingParams(strategy="greedy", max_tokens=SMALL_GREEDY_TOKENS, repetition_penalty=penalty)
    got = engine.generate(SENTENCE_IDS, params)["token_ids"]
    compare_greedy(f"gpt2-small synthetic, repetition_penalty {penalty}", got, want, margin)
