"""One table of GPT-2's tensors (nanopipe/gpt2_tensors.py), and the four users that agree with it:
the loader, synthetic weights, pull's slice selection and the partition's memory estimate."""
from __future__ import annotations

from nanopipe import gpt2_tensors as gt
from nanopipe.partition import block_params, stage_bytes
from nanopipe.safetensors_io import read_header
from nanopipe.tools.pull import select_tensors, slice_bytes_for
from nanopipe.weights import init_weights, load_stage

L, C, H, T, V = 3, 16, 2, 8, 40


def test_hand_checkable_block():
    """C=1: ln_1 2, c_attn 3+3, attn.c_proj 1+1, ln_2 2, c_fc 4+4, mlp.c_proj 4+1 = 25 = 12*1 + 13*1."""
    assert gt.block_params(1) == 25 == block_params(1)
    assert gt.block_params(768) == 7_087_872
    assert gt.head_params(1, 1, 1) == 4          # wte 1, wpe 1, ln_f 2


def test_names_and_prefix_parse():
    assert gt.split_block(gt.base_name("transformer.h.7.attn.c_attn.weight")) == (7, "attn.c_attn.weight")
    assert gt.split_block("wte.weight") == (None, "wte.weight")
    assert gt.file_prefix(["transformer.h.4.ln_1.weight"]) == "transformer."
    assert gt.file_prefix(["h.4.ln_1.weight"]) == "" and gt.file_prefix(["foo"]) is None
    assert gt.block_indices(["h.2.ln_1.weight", "transformer.h.5.ln_1.weight", "wte.weight"]) == [2, 5]
    assert gt.block_indices(["h.2.ln_1.weight", "transformer.h.5.ln_1.weight"], "transformer.") == [5]
    assert not gt.stage_needs("h.1.attn.bias", 0, 3, True) and gt.stage_needs("h.1.attn.c_attn.bias", 1, 2, False)
    assert gt.stage_needs("ln_f.bias", 2, 3, True) and not gt.stage_needs("ln_f.bias", 2, 3, False)


def test_synthetic_file_is_the_table_in_order(tmp_path):
    path = str(tmp_path / "w.safetensors")
    init_weights(path, n_layer=L, n_embd=C, n_head=H, n_ctx=T, n_vocab=V)
    header = read_header(path)
    assert [(n, t.shape) for n, t in header.tensors.items()] == list(gt.hub_shapes(L, C, V, T).items())


def test_memory_estimate_and_download_size_match_what_is_loaded(tmp_path):
    path = str(tmp_path / "w.safetensors")
    init_weights(path, n_layer=L, n_embd=C, n_head=H, n_ctx=T, n_vocab=V)
    header = read_header(path)
    for lo, hi, rank0 in ((0, 1, True), (1, 3, False)):
        stage = load_stage(path, lo, hi, rank0=rank0)
        assert stage.nbytes == stage_bytes(hi - lo, C, V, T, rank0), (lo, hi)
        fetched = sum(t.nbytes for t in select_tensors(header, lo, hi, rank0))
        assert fetched == slice_bytes_for(L, C, V, T, lo, hi, rank0)[1], (lo, hi)
