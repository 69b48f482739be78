"""nanopipe against HF transformers through a split stage (blocks shared by heads across members).

Needs torch and transformers (requirements-parity.txt); `make parity` runs it. The model is
tests/golden/tiny-hf (4 layers, 4 heads). Two checks:

  logits   every block split over 3 members (2, 1 and 1 heads), each member's part read from the
           file as a worker reads it (load_stage share=(r, m)), summed in one process
           (model.blocks_forward_split, the arithmetic the wire does): within 1e-4 of transformers.
  greedy   a real cluster (`nanopipe serve` + 3 `nanopipe join`) whose layers 1-2 are shared by
           ranks 1 and 2 (layer 3 on rank 3): its greedy tokens equal transformers' exactly.

and the same two through the LM head split by vocabulary (the ring's last stage split; each
member's rows of wte read as a worker reads them, weights.load_head_share).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

_NEEDS = "the live parity test needs {}: pip install -r requirements-parity.txt, then `make parity`"
torch = pytest.importorskip("torch", reason=_NEEDS.format("torch"))
transformers = pytest.importorskip("transformers", reason=_NEEDS.format("transformers"))
transformers.utils.logging.disable_progress_bar()

from test_parity_live import (  # noqa: E402
    TINY_CASES,
    compare_greedy,
    compare_logits,
    load_reference,
    reference_greedy,
    reference_logits,
)

from nanopipe.decoding import SamplingParams  # noqa: E402
from nanopipe.model import (  # noqa: E402
    KVCache,
    blocks_forward_split,
    embed,
    gather_logits,
    head,
    head_share,
    vocab_share,
)
from nanopipe.tools.localcluster import LocalCluster  # noqa: E402
from nanopipe.weights import load_head_share, load_stage  # noqa: E402

TINY_DIR = Path(__file__).resolve().parent.parent / "golden" / "tiny-hf"
WEIGHTS = TINY_DIR / "model.safetensors"
IDS = max((ids for ids, _, _ in TINY_CASES), key=len)       # the golden prompts' longest


@pytest.fixture(scope="module")
def model():
    return load_reference(TINY_DIR, WEIGHTS)


def split_rows(members: int):
    """IDS through the tiny model's blocks split over `members` (model.blocks_forward_split): the
    whole stage (for embed and head), each member's heads, and the rows (T, C) before the head."""
    ids = IDS
    whole = load_stage(str(WEIGHTS))
    parts = [load_stage(str(WEIGHTS), rank0=False, share=(r, members)) for r in range(members)]
    c = whole.config
    heads = [p.share.n_head for p in parts]
    segments = [[(KVCache(c.n_layer, h, c.head_dim, c.n_ctx), len(ids))] for h in heads]
    x = embed(np.array(ids), np.arange(len(ids)), whole.wte, whole.wpe)                     # (T, C)
    x = blocks_forward_split(x, [p.blocks for p in parts], n_heads=heads, segments=segments)  # (T, C)
    return whole, heads, x


@pytest.mark.parametrize("members", [2, 3])
def test_split_logits_match_transformers(model, members):
    ids = IDS
    whole, heads, x = split_rows(members)
    got = head(x, whole.ln_f, whole.lm_head)                                               # (T, V)
    compare_logits(f"tiny split over {members} members (heads {heads}), {len(ids)} tokens", got,
                   reference_logits(model, ids))


def test_split_cluster_greedy_matches_transformers(model, tmp_path):
    mapping = {0: [0, 0], 1: [1, 2], 2: [1, 2], 3: [3, 3]}
    want, margin = reference_greedy(model, IDS, 16)
    with LocalCluster(str(WEIGHTS), nodes=4, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=120) as cl:
        with cl.client(timeout=60) as c:
            got = c.generate(IDS, SamplingParams("greedy", max_tokens=16))["token_ids"]
    compare_greedy("tiny, a cluster with layers 1-2 split over ranks 1 and 2", got, want, margin)


@pytest.mark.parametrize("members", [2, 3])
def test_split_head_logits_match_transformers(model, members):
    ids = IDS
    whole, heads, x = split_rows(members)
    c = whole.config
    shares = [load_head_share(str(WEIGHTS), vocab_share(r, members, c.n_vocab)) for r in range(members)]
    got = gather_logits([head_share(x, h["ln_f"], h["lm_head"]) for h in shares])          # (T, V)
    compare_logits(f"tiny split over {members} members, the head split by vocabulary "
                   f"{[h['vocab'] for h in shares]}, {len(ids)} tokens", got, reference_logits(model, ids))


def test_split_head_cluster_greedy_matches_transformers(model, tmp_path):
    mapping = {0: [0, 0], 1: [1, 3], 2: [1, 3]}
    want, margin = reference_greedy(model, IDS, 16)
    with LocalCluster(str(WEIGHTS), nodes=3, layer_mapping=mapping, workdir=str(tmp_path), ready_timeout=120) as cl:
        with cl.client(timeout=60) as c:
            got = c.generate(IDS, SamplingParams("greedy", max_tokens=16))["token_ids"]
        assert "Loaded the LM head's rows" in Path(cl.log_path(2)).read_text(errors="replace")
    compare_greedy("tiny, a cluster ending in layers 1-3 split over ranks 1 and 2, the head split too", got, want,
                   margin)
