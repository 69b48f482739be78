"""Loading a stage's slice of GPT-2 from safetensors, and writing synthetic weights."""
from __future__ import annotations

import filecmp
import json
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import read_tensors

import nanopipe.weights as weights_mod
from nanopipe import gpt2_tensors
from nanopipe.kernels import layout_orders, matrix_order
from nanopipe.safetensors_io import Header, read_header, read_part, read_tensor, write_safetensors
from nanopipe.weights import (
    BLOCK_PARAMS,
    WeightsError,
    init_weights,
    load_stage,
    read_config,
    resolve_n_head,
)

# conftest's tiny_weights: n_layer=4, n_embd=64, n_head=4, n_ctx=128, n_vocab=50257
C, V = 64, 50257


def to_transformers_layout(src, dst, lm_head=None, metadata=None):
    """The `save_pretrained` layout: `transformer.` prefix, no mask buffers, maybe an lm_head.weight."""
    tensors = {"transformer." + k: v for k, v in read_tensors(src).items() if not k.endswith(".attn.bias")}
    if lm_head is not None:
        tensors["lm_head.weight"] = lm_head
    write_safetensors(str(dst), tensors, metadata if metadata is not None else {"format": "pt", "n_head": "4"})
    return str(dst)


def leaves(stage) -> dict:
    """Every array a stage holds, by a readable name."""
    out = {"wte": stage.wte, "wpe": stage.wpe, "lm_head": None if stage.lm_head is stage.wte else stage.lm_head}
    out.update({f"ln_f.{k}": v for k, v in (stage.ln_f or {}).items()})

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v
    for i, p in enumerate(stage.blocks):
        walk(f"h.{stage.lo + i}.", p)
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# both layouts


def test_hub_layout_loads(tiny_weights, tiny_config):
    st = load_stage(tiny_weights)
    assert st.config == tiny_config
    assert (st.lo, st.hi, len(st.blocks), st.has_head) == (0, 4, 4, True)
    raw = read_tensors(tiny_weights)
    assert np.array_equal(st.blocks[2]["attn"]["c_attn"]["w"], raw["h.2.attn.c_attn.weight"])
    assert np.array_equal(st.blocks[3]["mlp"]["c_proj"]["b"], raw["h.3.mlp.c_proj.bias"])
    assert np.array_equal(st.ln_f["g"], raw["ln_f.weight"])
    assert st.nbytes == sum(a.nbytes for a in leaves(st).values())


def test_transformers_layout_loads_the_same_arrays(tiny_weights, tmp_path):
    path = to_transformers_layout(tiny_weights, tmp_path / "model.safetensors")
    assert not any(k.endswith(".attn.bias") for k in read_header(path).tensors)
    hub, hf = leaves(load_stage(tiny_weights)), leaves(load_stage(path))
    assert hub.keys() == hf.keys()
    for name in hub:
        assert np.array_equal(hub[name], hf[name]), name


def test_lm_head_weight_is_used_when_present(tiny_weights, tmp_path):
    lm = np.random.default_rng(5).standard_normal((V, C)).astype(np.float32)
    st = load_stage(to_transformers_layout(tiny_weights, tmp_path / "model.safetensors", lm_head=lm))
    assert np.array_equal(st.lm_head, lm)               # (V, C), as stored
    assert not np.array_equal(st.lm_head, st.wte)
    assert st.nbytes == load_stage(tiny_weights).nbytes + lm.nbytes      # its own head is held too


def test_tied_lm_head_is_wte_itself_not_a_copy(tiny_weights):
    """No transposed copy of wte (154 MB for gpt2); the head is a gemv on wte as stored."""
    st = load_stage(tiny_weights)
    assert st.lm_head is st.wte and st.lm_head.shape == (V, C)          # (V, C)
    held = st.wte.nbytes + st.wpe.nbytes + sum(a.nbytes for a in st.ln_f.values())
    held += sum(a.nbytes for p in st.blocks for a in _all_leaves(p))
    assert st.nbytes == held, "wte is counted once"


def _all_leaves(d):
    for v in d.values():
        yield from _all_leaves(v) if isinstance(v, dict) else [v]


def test_stage_arrays_are_float32_and_contiguous(tiny_weights):
    """Arranged once at load: float32 everywhere; block matrices and wte (the tied head) in this
    process's orders (column-major and as stored, as the tests pin them, or the other way round:
    kernels.choose_layout), everything else row-major, so the per-token path never converts or copies."""
    flag = {"C": "C_CONTIGUOUS", "F": "F_CONTIGUOUS"}
    blocks, head = layout_orders()
    for name, a in leaves(load_stage(tiny_weights)).items():
        matrix = name.endswith(".w") and "c_" in name and a.ndim == 2
        assert a.dtype == np.float32, name
        # a leaf's name: "h.0.attn.c_attn.w" -> the file's "attn.c_attn.weight"
        order = (matrix_order(blocks, name.split(".", 2)[2][:-2] + ".weight") if matrix else
                 head if name == "wte" else "C")
        assert a.flags[flag[order]], name


# ---------------------------------------------------------------------------------------------
# float16 and bfloat16 files are converted once, at load


def write_bf16(path, tensors: dict, metadata: dict):
    """A BF16 safetensors file by hand (numpy has no bfloat16): keep the top 16 bits of each float32."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        raw = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(blobs))
    return str(path)


def test_float16_file_is_float32_at_load(tiny_weights, tmp_path):
    raw = read_tensors(tiny_weights)
    path = tmp_path / "f16.safetensors"
    write_safetensors(str(path), {k: v.astype(np.float16) for k, v in raw.items()}, {"n_head": "4"})
    assert read_header(str(path)).tensors["wte.weight"].dtype == "F16"
    st = load_stage(str(path))
    for name, a in leaves(st).items():
        assert a.dtype == np.float32 and (a.flags["C_CONTIGUOUS"] or a.flags["F_CONTIGUOUS"]), name
    want = raw["h.1.mlp.c_fc.weight"].astype(np.float16).astype(np.float32)
    assert np.array_equal(st.blocks[1]["mlp"]["c_fc"]["w"], want)


def test_bfloat16_file_is_float32_at_load(tiny_weights, tmp_path):
    raw = read_tensors(tiny_weights)
    path = write_bf16(tmp_path / "bf16.safetensors", raw, {"n_head": "4"})
    st = load_stage(path)
    for name, a in leaves(st).items():
        assert a.dtype == np.float32 and (a.flags["C_CONTIGUOUS"] or a.flags["F_CONTIGUOUS"]), name
    w = raw["h.0.attn.c_attn.weight"]
    truncated = (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    assert np.array_equal(st.blocks[0]["attn"]["c_attn"]["w"], truncated)
    assert np.abs(truncated - w).max() <= np.abs(w).max() * 2 ** -7       # bf16 keeps 8 significant bits


# ---------------------------------------------------------------------------------------------
# n_head: caller > metadata > config.json beside the file > known sizes > error


def header_with(metadata: dict) -> Header:
    return Header(tensors={}, metadata=metadata, data_start=8)


def test_n_head_from_known_size(tmp_path):
    path = str(tmp_path / "model.safetensors")
    assert resolve_n_head(header_with({}), path, n_embd=768) == 12
    assert resolve_n_head(header_with({}), path, n_embd=1600) == 25


def test_n_head_from_config_json_beats_known_size(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 8}))
    assert resolve_n_head(header_with({}), str(tmp_path / "model.safetensors"), n_embd=768) == 8


def test_n_head_from_config_json_num_attention_heads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    assert resolve_n_head(header_with({}), str(tmp_path / "model.safetensors"), n_embd=64) == 2


def test_n_head_from_metadata_beats_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 8}))
    assert resolve_n_head(header_with({"n_head": "4"}), str(tmp_path / "model.safetensors"), n_embd=768) == 4


def test_n_head_from_caller_beats_everything(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 8}))
    assert resolve_n_head(header_with({"n_head": "4"}), str(tmp_path / "m.safetensors"), 768, n_head=16) == 16


def test_n_head_unknown_is_a_clear_error(tmp_path):
    path = str(tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"cannot tell n_head for n_embd=64.*--n-head") as e:
        resolve_n_head(header_with({}), path, n_embd=64)
    assert path in str(e.value)


def test_n_head_must_divide_n_embd(tmp_path):
    with pytest.raises(WeightsError, match=r"n_head=5 \(from .*metadata\) does not divide n_embd=64"):
        resolve_n_head(header_with({"n_head": "5"}), str(tmp_path / "m.safetensors"), n_embd=64)


def test_n_head_through_the_loader(tiny_weights, tmp_path):
    """A file with no n_head anywhere: refused, then found in config.json, then overridden by the caller."""
    path = to_transformers_layout(tiny_weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="cannot tell n_head"):
        load_stage(path)
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2}))
    assert read_config(path)[0].n_head == 2
    assert load_stage(path, n_head=8).config.n_head == 8


# ---------------------------------------------------------------------------------------------
# clear errors at load


def test_shape_mismatch_names_the_tensor(tiny_weights, tmp_path):
    raw = read_tensors(tiny_weights)
    raw["h.2.mlp.c_fc.weight"] = raw["h.2.mlp.c_fc.weight"][:, :100].copy()
    path = tmp_path / "bad.safetensors"
    write_safetensors(str(path), raw, {"n_head": "4"})
    with pytest.raises(WeightsError, match=r"'h\.2\.mlp\.c_fc\.weight' has shape \[64, 100\], expected \[64, 256\]"):
        load_stage(str(path))


def test_missing_tensor_names_it(tiny_weights, tmp_path):
    raw = read_tensors(tiny_weights)
    del raw["h.1.ln_2.bias"]
    path = tmp_path / "bad.safetensors"
    write_safetensors(str(path), raw, {"n_head": "4"})
    with pytest.raises(WeightsError, match=r"missing tensor 'h\.1\.ln_2\.bias'"):
        load_stage(str(path))


def test_slice_file_missing_layers_names_them(tiny_weights, tiny_config, tmp_path):
    """A worker's slice file holding blocks 2..3 of the 4: it serves 2..3, but not 1..2."""
    raw = read_tensors(tiny_weights)
    part = {k: v for k, v in raw.items() if k.startswith(("h.2.", "h.3."))}
    path = str(tmp_path / "slice.safetensors")
    write_safetensors(path, part, {"n_head": "4", "n_layer": "4", "n_ctx": "128", "n_vocab": "50257"})
    st = load_stage(path, 2, 4, rank0=False)
    assert st.config == tiny_config and len(st.blocks) == 2
    assert np.array_equal(st.blocks[0]["ln_1"]["g"], raw["h.2.ln_1.weight"])
    with pytest.raises(WeightsError, match=r"lacks layers 1\.\.1 .*holds 2\.\.3") as e:
        load_stage(path, 1, 3, rank0=False)
    assert path in str(e.value)


def test_layers_out_of_range_and_wrong_model(tiny_weights):
    with pytest.raises(WeightsError, match="model has 4 layers"):
        load_stage(tiny_weights, 2, 6)
    with pytest.raises(WeightsError, match=r"n_layer=4, n_embd=64.*cluster runs n_layer=12, n_embd=768"):
        load_stage(tiny_weights, expect=weights_mod.GPTConfig())


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file.*init-weights"):
        load_stage(str(tmp_path / "nope.safetensors"))


def test_not_gpt2_names_the_file(tmp_path):
    path = str(tmp_path / "other.safetensors")
    write_safetensors(path, {"encoder.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="no GPT-2 tensors found"):
        load_stage(path)


# ---------------------------------------------------------------------------------------------
# a stage reads only its slice


@pytest.fixture
def reads(monkeypatch):
    """The names of the tensors the loader reads (whole, or through read_part: a column-major matrix)."""
    names = []

    def recording(f, info, **kwargs):
        names.append(info.name)
        return read_tensor(f, info, **kwargs)

    def recording_part(f, info, *args, **kwargs):
        names.append(info.name)
        return read_part(f, info, *args, **kwargs)
    monkeypatch.setattr(weights_mod, "read_tensor", recording)
    monkeypatch.setattr(weights_mod, "read_part", recording_part)
    return names


def test_worker_slice_reads_only_its_blocks(tiny_weights, reads):
    load_stage(tiny_weights, 1, 3, rank0=False)
    assert sorted(reads) == sorted(f"h.{i}.{p}" for i in (1, 2) for p in BLOCK_PARAMS)


def test_rank0_reads_its_blocks_embeddings_and_final_norm(tiny_weights, reads):
    load_stage(tiny_weights, 0, 1, rank0=True)
    assert sorted(reads) == sorted([f"h.0.{p}" for p in BLOCK_PARAMS]
                                   + ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"])
    assert not any(n.endswith(".attn.bias") for n in reads), "the causal-mask buffers are never needed"




@pytest.mark.slow
def test_loading_a_slice_peaks_near_the_slice_size(small_weights):
    """Blocks 4..7 of gpt2-small (113 MB) must load without ever holding more than slice + 60 MB."""
    from nanopipe.tools.bench import load_rss
    m = load_rss(small_weights, 4, 8)                   # a fresh process: peak RSS growth while it loads
    m["slice"] = m["held"]
    growth, budget = m["growth"], m["slice"] + 60 * 2 ** 20
    print(f"\nslice {m['slice'] / 2**20:.1f} MB, peak RSS growth {growth / 2**20:.1f} MB, "
          f"budget {budget / 2**20:.1f} MB (RSS after imports {m['base'] / 2**20:.1f} MB)")
    assert m["slice"] == 4 * sum(int(np.prod(s)) for s in gpt2_tensors.block_shapes(
        weights_mod.GPTConfig().n_embd).values()) * 4
    assert growth <= budget, f"peak RSS grew by {growth / 2**20:.1f} MB loading a {m['slice'] / 2**20:.1f} MB slice"


# ---------------------------------------------------------------------------------------------
# init_weights


@pytest.fixture(scope="module")
def tiny_raw(tiny_weights):
    return read_tensors(tiny_weights)


def test_init_weights_is_deterministic_from_seed(tmp_path):
    kw = dict(n_layer=2, n_embd=32, n_head=2, n_ctx=16, n_vocab=100)
    a, b, c = (str(tmp_path / f"{n}.safetensors") for n in "abc")
    init_weights(a, seed=3, **kw)
    init_weights(b, seed=3, **kw)
    init_weights(c, seed=4, **kw)
    assert filecmp.cmp(a, b, shallow=False)
    assert not np.array_equal(read_tensors(a)["wte.weight"], read_tensors(c)["wte.weight"])


def test_init_weights_has_the_official_names(tiny_raw, tiny_weights):
    want = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    want |= {f"h.{i}.{p}" for i in range(4) for p in BLOCK_PARAMS + ("attn.bias",)}
    assert set(tiny_raw) == want                                # no lm_head: tied to wte
    header = read_header(tiny_weights)
    assert header.metadata["n_head"] == "4"
    assert header.tensors["h.3.attn.bias"].shape == (1, 1, 128, 128)
    assert header.tensors["wte.weight"].shape == (50257, 64) and header.tensors["wpe.weight"].shape == (128, 64)
    assert np.array_equal(tiny_raw["h.0.attn.bias"][0, 0], np.tril(np.ones((128, 128), np.float32)))


def test_official_safetensors_package_reads_init_weights(tiny_raw, tiny_weights):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    theirs = load_file(tiny_weights)
    assert theirs.keys() == tiny_raw.keys()
    for name in theirs:
        assert theirs[name].dtype == np.float32 and np.array_equal(theirs[name], tiny_raw[name]), name
    with safe_open(tiny_weights, framework="np") as f:
        assert f.metadata()["n_head"] == "4"


def test_init_weights_follows_gpt2_init_statistics(tiny_raw):
    proj_std = 0.02 / np.sqrt(2 * 4)
    assert tiny_raw["h.0.attn.c_attn.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert tiny_raw["h.1.mlp.c_fc.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert tiny_raw["wte.weight"].std() == pytest.approx(0.02, rel=0.01)
    assert tiny_raw["h.2.attn.c_proj.weight"].std() == pytest.approx(proj_std, rel=0.1)
    assert tiny_raw["h.2.mlp.c_proj.weight"].std() == pytest.approx(proj_std, rel=0.1)
    assert abs(tiny_raw["h.0.attn.c_attn.weight"].mean()) < 0.002
    assert np.all(tiny_raw["h.0.attn.c_attn.bias"] == 0) and np.all(tiny_raw["h.3.ln_2.weight"] == 1)


def test_init_weights_bad_sizes(tmp_path):
    with pytest.raises(WeightsError, match="unknown size 'gpt5'"):
        init_weights(str(tmp_path / "x.safetensors"), size="gpt5")
    with pytest.raises(WeightsError, match="n_head=5 must be given and divide n_embd=64"):
        init_weights(str(tmp_path / "x.safetensors"), n_embd=64, n_head=5)


# ---------------------------------------------------------------------------------------------
# metadata is checked against the tensors before anything is sized from it


def with_metadata(tiny_weights, path, **meta) -> str:
    tensors = read_tensors(tiny_weights)
    write_safetensors(str(path), tensors, {**read_header(tiny_weights).metadata, **meta})
    return str(path)


def test_a_billion_layers_claimed_is_a_clear_error_without_a_huge_allocation(tiny_weights, tmp_path):
    """Run under a 3 GB address-space limit: building anything n_layer long would be a MemoryError."""
    path = with_metadata(tiny_weights, tmp_path / "claims.safetensors", n_layer="1000000000")
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from nanopipe.weights import WeightsError, load_stage
        try:
            load_stage({path!r}, 0, 1)
        except WeightsError as e:
            print("WeightsError:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WeightsError:" in done.stdout and "n_layer='1000000000'" in done.stdout, done.stdout


@pytest.mark.parametrize("meta, says", [
    ({"n_layer": "2"}, "metadata says n_layer=2 but the file holds block h.3"),
    ({"n_layer": "twelve"}, "n_layer='twelve', which is not a whole number"),
    ({"n_layer": "-4"}, "n_layer='-4', which is not a whole number"),
    ({"n_ctx": "4096"}, "metadata says n_ctx=4096 but wpe.weight has shape [128, 64]"),
    ({"n_vocab": "7"}, "metadata says n_vocab=7 but wte.weight has shape [50257, 64]"),
    ({"n_head": "0"}, "n_head='0', which is not a whole number"),
])
def test_metadata_that_disagrees_with_the_tensors_is_refused(tiny_weights, tmp_path, meta, says):
    path = with_metadata(tiny_weights, tmp_path / "claims.safetensors", **meta)
    with pytest.raises(WeightsError, match=re.escape(says)) as e:
        load_stage(path, 0, 1)
    assert path in str(e.value)


def test_a_block_number_past_any_gpt2_is_refused(tiny_weights, tmp_path):
    tensors = read_tensors(tiny_weights)
    tensors["h.1000000000.ln_1.weight"] = tensors["h.0.ln_1.weight"]
    path = str(tmp_path / "far.safetensors")
    write_safetensors(path, tensors, read_header(tiny_weights).metadata)
    with pytest.raises(WeightsError, match=r"holds a block h.1000000000, past the 4096 blocks"):
        load_stage(path, 0, 1)
