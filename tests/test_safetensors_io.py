"""nanopipe's safetensors reader/writer against the official `safetensors` package, and broken files."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from helpers import read_tensors
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from nanopipe.safetensors_io import (
    SafetensorsError,
    parse_header,
    read_header,
    read_tensor,
    to_float32,
    write_safetensors,
)


def sample_tensors() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((2, 3, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-2 ** 40, 2 ** 40, (4,)),
        "i32": rng.integers(-100, 100, (2, 2)).astype(np.int32),
        "i16": np.array([-32768, 0, 32767], np.int16),
        "i8": np.array([[-128, 127]], np.int8),
        "u8": np.arange(10, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------
# round trips


def test_ours_written_theirs_read(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    size = write_safetensors(path, sample_tensors(), {"n_head": 4, "note": "hi"})
    assert size == (tmp_path / "ours.safetensors").stat().st_size
    assert_same(load_file(path), sample_tensors())
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"n_head": "4", "note": "hi"}


def test_theirs_written_ours_read(tmp_path):
    path = str(tmp_path / "theirs.safetensors")
    save_file(sample_tensors(), path, metadata={"format": "pt"})
    assert_same(read_tensors(path), sample_tensors())
    assert read_header(path).metadata == {"format": "pt"}


def test_ours_round_trip_and_alignment(tmp_path):
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, sample_tensors())
    header = read_header(path)
    assert header.data_start % 8 == 0, "the data section should start 8-byte aligned"
    assert header.metadata == {}
    assert header.tensors["f32"].shape == (2, 3, 5) and header.tensors["f32"].nbytes == 120
    assert_same(read_tensors(path), sample_tensors())


def test_big_endian_arrays_are_stored_little_endian(tmp_path):
    path = str(tmp_path / "be.safetensors")
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    write_safetensors(path, {"a": a})
    assert read_header(path).tensors["a"].dtype == "F32"
    assert np.array_equal(load_file(path)["a"], a.astype("<f4"))


def test_unsupported_dtype_names_the_tensor(tmp_path):
    with pytest.raises(SafetensorsError, match="tensor 'z' has dtype complex64"):
        write_safetensors(str(tmp_path / "c.safetensors"), {"z": np.zeros(2, np.complex64)})


@pytest.mark.parametrize("bits, value", [(0x3F80, 1.0), (0xC000, -2.0), (0x3E80, 0.25), (0x0000, 0.0)])
def test_bfloat16_is_the_top_half_of_a_float32(bits, value):
    assert to_float32(np.array([bits], np.uint16), "BF16")[0] == value


def test_float16_to_float32():
    out = to_float32(np.array([1.5, -0.125], np.float16), "F16")
    assert out.dtype == np.float32 and out.tolist() == [1.5, -0.125]


# ---------------------------------------------------------------------------------------------
# broken files: a SafetensorsError that names the file


def raw_file(path, header: dict | bytes, data: bytes = b"", n: int | None = None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return str(path)


F32_2 = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def test_valid_hand_made_file(tmp_path):
    path = raw_file(tmp_path / "ok.safetensors", F32_2, np.array([1, 2], "<f4").tobytes())
    assert read_tensors(path)["a"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("make, match", [
    (lambda p: (p.write_bytes(b"\x01\x02"), str(p))[1], "too short"),
    (lambda p: raw_file(p, F32_2, b"\0" * 4), r"ends at byte 77 but the file has 73 bytes \(truncated"),
    (lambda p: raw_file(p, F32_2, b"\0" * 8, n=10 ** 12), "header claims"),
    (lambda p: raw_file(p, F32_2, b"", n=500), "header claims 500 bytes"),
    (lambda p: raw_file(p, b"{not json", b""), "not valid JSON"),
    (lambda p: raw_file(p, b"[1, 2]", b""), "not a JSON object"),
    (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [100, 108]}}, b"\0" * 8),
     "ends at byte"),
    (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     r"needs 12 bytes but its offsets are \[0, 8\)"),
    (lambda p: raw_file(p, {"a": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "unsupported dtype Q8"),
    (lambda p: raw_file(p, {"a": {"shape": [2]}}, b""), "malformed header entry"),
])
def test_broken_file_is_a_safetensors_error_naming_the_file(tmp_path, make, match):
    path = make(tmp_path / "broken.safetensors")
    with pytest.raises(SafetensorsError, match=match) as e:
        read_header(path)
    assert str(e.value).startswith(path), f"message should start with the file name: {e.value}"


def test_truncated_real_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(str(path), sample_tensors())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SafetensorsError, match=r"tensor '\w+' ends at byte \d+ but the file has \d+ bytes") as e:
        read_header(str(path))
    assert str(path) in str(e.value)


def test_file_ending_inside_a_tensor_while_reading(tmp_path):
    """A header parsed without the file size (as from a URL), then the data runs out."""
    path = raw_file(tmp_path / "short.safetensors", F32_2, b"\0" * 4)
    with open(path, "rb") as f:
        header = parse_header(f.read(8 + len(json.dumps(F32_2))), path)
        with pytest.raises(SafetensorsError, match="file ends inside tensor 'a'") as e:
            read_tensor(f, header.tensors["a"])
    assert path in str(e.value)


def test_parse_header_names_its_source():
    with pytest.raises(SafetensorsError, match="^https://example/x.safetensors: truncated header"):
        parse_header(struct.pack("<Q", 100) + b"{}", "https://example/x.safetensors")


@pytest.mark.parametrize("header, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, r"data_offsets must be two whole numbers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, r"data_offsets must be two whole numbers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]}}, r"data_offsets must be two whole numbers"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, r"unsupported dtype \['F32'\]"),
    ({"a": {"dtype": "F32", "shape": [64.5], "data_offsets": [0, 8]}}, r"shape must be a list of whole numbers"),
    ({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, r"shape must be a list of whole numbers"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, r"shape must be a list of whole numbers"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, r"shape must be a list of whole numbers"),
    ({"a": ["F32", [2], [0, 8]]}, r"malformed header entry"),
    ({"__metadata__": ["n_layer", "4"], **F32_2}, r"__metadata__ must map names to strings"),
    ({"__metadata__": "n_layer=4", **F32_2}, r"__metadata__ must map names to strings"),
    ({"__metadata__": {"n_layer": 4}, **F32_2}, r"__metadata__ must map names to strings"),
    ({**F32_2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, r"tensors 'a' and 'b' overlap"),
    ({**F32_2, "b": {"dtype": "I8", "shape": [8], "data_offsets": [0, 8]}}, r"tensors 'a' and 'b' overlap"),
    (b"[" * 100_000, r"nested too deep"),
    (b'{"a": ' + b"9" * 5000 + b"}", r"not valid JSON"),
])
def test_malformed_header_field_is_a_safetensors_error(tmp_path, header, match):
    path = raw_file(tmp_path / "broken.safetensors", header, b"\0" * 8)
    with pytest.raises(SafetensorsError, match=match) as e:
        read_header(path)
    assert str(e.value).startswith(path) and len(str(e.value)) < 500, e.value


def test_long_values_are_cut_in_messages(tmp_path):
    path = raw_file(tmp_path / "broken.safetensors", {"x" * 100_000: {"dtype": "Q" * 100_000}}, b"")
    with pytest.raises(SafetensorsError, match="malformed header entry") as e:
        read_header(path)
    assert len(str(e.value)) < 500
