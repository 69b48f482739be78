"""Downloading weights against a real HTTP server on 127.0.0.1 (tests/httpserver.py).

The served file is a tiny synthetic GPT-2 in the official hub layout (4 blocks, C=32, V=100,
n_ctx=16, mask buffers included), written in sorted-name order as the hub's writer does, so the
mask buffers sit between a block's other tensors just as in the real file.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from httpserver import FileServer, closed_port

from nanopipe.safetensors_io import TensorInfo, read_header, read_tensor, write_safetensors
from nanopipe.tools import pull as P
from nanopipe.tools.pull import PullError, gpt2_tensor_shapes, parse_layers, pull, slice_path, verify

L, C, V, T = 4, 32, 100, 16


def hub_tensors(prefix: str = "", lm_head: bool = False) -> dict:
    rng = np.random.default_rng(0)
    shapes = gpt2_tensor_shapes(L, C, V, T)           # the official hub layout, mask buffers included
    tensors = {prefix + n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    for i in range(L):
        tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32)).reshape(1, 1, T, T)
    if lm_head:
        tensors["lm_head.weight"] = rng.standard_normal((V, C)).astype(np.float32)
    return dict(sorted(tensors.items()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    out = {}
    layouts = {"/gpt2/model.safetensors": {},
               "/hf/model.safetensors": dict(prefix="transformer.", lm_head=True)}
    for key, kw in layouts.items():
        path = str(d / key.strip("/").replace("/", "_"))
        write_safetensors(path, hub_tensors(**kw), {"format": "pt", "n_head": "4"})
        with open(path, "rb") as f:
            out[key] = (path, f.read())
    return out


@pytest.fixture
def server(files):
    s = FileServer({k: data for k, (_, data) in files.items()}).start()
    yield s
    s.stop()


@pytest.fixture
def source(files):
    path, data = files["/gpt2/model.safetensors"]
    return path, data, hashlib.sha256(data).hexdigest()


def fetch(server, dest, **kw):
    kw.setdefault("out", io.StringIO())
    kw.setdefault("chunk", 4096)
    kw.setdefault("timeout", 5)
    return pull(server.url(kw.pop("path", "/gpt2/model.safetensors")), str(dest), **kw)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# full downloads


def test_full_download_equals_source(server, source, tmp_path):
    _, data, sha = source
    dest = tmp_path / "w" / "model.safetensors"
    assert fetch(server, dest, sha256=sha) == str(dest)
    assert read_bytes(dest) == data
    assert not os.path.exists(str(dest) + ".part")
    assert server.requests == [("/gpt2/model.safetensors", None)]


def test_dropped_connection_is_resumed_with_a_range_request(server, source, tmp_path):
    _, data, sha = source
    server.cut_after, server.cuts = 50_000, 1
    out = io.StringIO()
    dest = tmp_path / "model.safetensors"
    fetch(server, dest, sha256=sha, out=out)
    assert read_bytes(dest) == data
    assert server.requests == [("/gpt2/model.safetensors", None), ("/gpt2/model.safetensors", "bytes=50000-")]
    assert "resuming at byte 50000" in out.getvalue()


def test_interrupted_download_keeps_part_and_next_pull_resumes(server, source, tmp_path):
    _, data, sha = source
    server.cut_after, server.cuts = 30_000, P.RESUMES + 1     # every attempt of this pull is cut
    dest = tmp_path / "model.safetensors"
    with pytest.raises(PullError, match="run the same command again to resume") as e:
        fetch(server, dest, sha256=sha)
    assert server.url("/gpt2/model.safetensors") in str(e.value)
    assert not dest.exists()
    have = os.path.getsize(str(dest) + ".part")
    assert have == 30_000 * (P.RESUMES + 1)
    assert read_bytes(str(dest) + ".part") == data[:have]

    server.requests.clear()
    fetch(server, dest, sha256=sha)
    assert read_bytes(dest) == data
    assert server.requests == [("/gpt2/model.safetensors", f"bytes={have}-")]


def test_server_without_range_restarts_from_zero(server, source, tmp_path):
    _, data, sha = source
    server.ranges = False
    dest = tmp_path / "model.safetensors"
    with open(str(dest) + ".part", "wb") as f:
        f.write(data[:20_000])
    out = io.StringIO()
    fetch(server, dest, sha256=sha, out=out)
    assert read_bytes(dest) == data
    assert "restarting from zero" in out.getvalue()
    assert server.requests == [("/gpt2/model.safetensors", "bytes=20000-")]


def test_part_longer_than_file_starts_again(server, source, tmp_path):
    _, data, sha = source
    dest = tmp_path / "model.safetensors"
    with open(str(dest) + ".part", "wb") as f:
        f.write(data + b"junk")
    fetch(server, dest, sha256=sha)        # the server answers 416 to the resume
    assert read_bytes(dest) == data


def test_corrupted_once_is_fetched_again(server, source, tmp_path):
    _, data, sha = source
    server.corrupt = 1
    out = io.StringIO()
    dest = tmp_path / "model.safetensors"
    fetch(server, dest, sha256=sha, out=out)
    assert read_bytes(dest) == data
    assert "sha256" in out.getvalue() and "downloading again" in out.getvalue()
    assert len(server.requests) == 2


def test_corrupted_every_time_is_rejected_and_never_left_at_dest(server, source, tmp_path):
    _, _, sha = source
    server.corrupt = 10
    dest = tmp_path / "model.safetensors"
    with pytest.raises(PullError, match="failed verification twice") as e:
        fetch(server, dest, sha256=sha)
    assert "sha256" in str(e.value) and server.url("/gpt2/model.safetensors") in str(e.value)
    assert not dest.exists() and not os.path.exists(str(dest) + ".part")
    assert len(server.requests) == 2       # fetched again exactly once


def test_truncated_file_is_rejected_without_a_checksum(server, source, tmp_path):
    _, data, _ = source
    server.files["/gpt2/model.safetensors"] = data[: len(data) - 1000]   # server itself serves a short file
    dest = tmp_path / "model.safetensors"
    with pytest.raises(PullError, match="truncated"):
        fetch(server, dest)
    assert not dest.exists() and not os.path.exists(str(dest) + ".part")


def test_existing_verified_file_makes_no_request(server, source, tmp_path):
    _, data, sha = source
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(data)
    assert fetch(server, dest, sha256=sha) == str(dest)
    assert server.requests == []


def test_existing_bad_file_is_fetched_again(server, source, tmp_path):
    _, data, sha = source
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(data[:5000])
    fetch(server, dest, sha256=sha)
    assert read_bytes(dest) == data


def test_progress_line_has_rate_and_eta(server, source, tmp_path):
    out = io.StringIO()
    fetch(server, tmp_path / "model.safetensors", out=out, progress=True)
    text = out.getvalue()
    assert "\r" in text and "MB/s" in text and "ETA" in text and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert "100%" in last and "ETA 0:00" in last


def test_progress_line_format():
    bar = P.Progress(total=10_000_000, done=0, out=io.StringIO())
    bar.done = 4_000_000           # 4 MB in 2 s: 2 MB/s, 6 MB left: 3 s
    assert bar.line(now=bar.t0 + 2.0).split() == ["4.0", "MB", "/", "10.0", "MB", "40%",
                                                  "2.0", "MB/s", "ETA", "0:03"]


# ---------------------------------------------------------------------------------------------
# errors


def test_404_names_the_url(server, tmp_path):
    dest = tmp_path / "model.safetensors"
    with pytest.raises(PullError) as e:
        fetch(server, dest, path="/nope.safetensors")
    msg = str(e.value)
    assert "404" in msg and server.url("/nope.safetensors") in msg and "init-weights" in msg
    assert not dest.exists()


def test_connection_refused_names_the_url_and_what_to_do(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/model.safetensors"
    dest = tmp_path / "model.safetensors"
    with pytest.raises(PullError) as e:
        pull(url, str(dest), out=io.StringIO(), timeout=5)
    msg = str(e.value)
    assert url in msg and "cannot reach" in msg and f"nanopipe init-weights {dest}" in msg
    assert not dest.exists()


def test_disk_full_says_how_much_and_where(server, source, tmp_path):
    dest = tmp_path / "model.safetensors"
    os.symlink("/dev/full", str(dest) + ".part")       # every write fails with ENOSPC
    with pytest.raises(PullError, match="disk full") as e:
        fetch(server, dest)
    assert str(dest) + ".part" in str(e.value) and f"{len(source[1]) / 1e6:.1f} MB" in str(e.value)
    assert not dest.exists()


def test_not_enough_space_is_caught_before_downloading(server, tmp_path, monkeypatch):
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(PullError, match="not enough disk space") as e:
        fetch(server, tmp_path / "model.safetensors")
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# slices


def block_names():
    return ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias"]


def assert_same_tensors(slice_file, source_file, names):
    got, src = read_header(slice_file), read_header(source_file)
    assert set(got.tensors) == set(names)
    with open(slice_file, "rb") as a, open(source_file, "rb") as b:
        for n in names:
            want = read_tensor(b, src.tensors[n])
            np.testing.assert_array_equal(read_tensor(a, got.tensors[n]), want, err_msg=n)


def test_worker_slice_has_only_its_blocks(server, source, tmp_path):
    path, _, _ = source
    dest = slice_path(str(tmp_path / "model.safetensors"), 1, 3)
    assert dest == str(tmp_path / "model.layers-1-2.safetensors")      # inclusive, like --layers 1-2
    url = server.url("/gpt2/model.safetensors")
    fetch(server, dest, layers=(1, 3), rank0=False)
    assert_same_tensors(dest, path, [f"h.{i}.{n}" for i in (1, 2) for n in block_names()])
    meta = read_header(dest).metadata
    assert meta["n_head"] == "4" and meta["nanopipe_blocks"] == "1-2" and meta["nanopipe_source"] == url
    assert (meta["n_layer"], meta["n_vocab"], meta["n_ctx"]) == (str(L), str(V), str(T))
    # header: first 8 bytes, then the JSON; then one request per block (its mask buffer splits the runs)
    n = read_header(path).data_start - 8
    ranges = [r for _, r in server.requests]
    assert ranges[:2] == ["bytes=0-7", f"bytes=8-{8 + n - 1}"] and len(ranges) == 4


def test_rank0_slice_adds_embeddings_and_final_norm(server, source, tmp_path):
    path, _, _ = source
    dest = str(tmp_path / "model.layers-0-2.safetensors")
    fetch(server, dest, layers=(0, 2), rank0=True)
    names = [f"h.{i}.{n}" for i in (0, 1) for n in block_names()]
    assert_same_tensors(dest, path, names + ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"])
    assert len(server.requests) == 2 + 3   # h.0 run, h.1 run, ln_f..wte run (adjacent, merged)


def test_slice_of_save_pretrained_layout_keeps_names_and_lm_head(server, files, tmp_path):
    path, _ = files["/hf/model.safetensors"]
    dest = str(tmp_path / "hf.layers-3-4.safetensors")
    fetch(server, dest, layers=(3, 4), rank0=True, path="/hf/model.safetensors")
    names = [f"transformer.h.3.{n}" for n in block_names()]
    names += ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
              "transformer.ln_f.bias", "lm_head.weight"]
    assert_same_tensors(dest, path, names)


def test_slice_loads_with_the_official_safetensors_package(server, source, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path, _, _ = source
    dest = str(tmp_path / "s.safetensors")
    fetch(server, dest, layers=(2, 4), rank0=False)
    loaded = st.load_file(dest)
    assert sorted(loaded) == sorted(read_header(dest).tensors)
    np.testing.assert_array_equal(loaded["h.3.mlp.c_fc.weight"], st.load_file(path)["h.3.mlp.c_fc.weight"])


def test_slice_resumes_mid_tensor_after_a_drop(server, source, tmp_path):
    path, _, _ = source
    server.cut_after, server.cuts = 10_000, 1      # header requests are shorter, the first block run is cut
    dest = str(tmp_path / "s.safetensors")
    fetch(server, dest, layers=(1, 3), rank0=False)
    assert_same_tensors(dest, path, [f"h.{i}.{n}" for i in (1, 2) for n in block_names()])
    src = read_header(path).tensors
    first_run = (src["h.1.attn.c_attn.bias"].begin, src["h.1.mlp.c_proj.weight"].end)
    ranges = [r for _, r in server.requests]
    assert ranges[2] == f"bytes={first_run[0]}-{first_run[1] - 1}"            # cut after 10 000 bytes
    assert ranges[3] == f"bytes={first_run[0] + 10_000}-{first_run[1] - 1}"   # the rest of that run


def test_slice_without_range_support_is_a_clear_error(server, tmp_path):
    server.ranges = False
    dest = str(tmp_path / "s.safetensors")
    with pytest.raises(PullError) as e:
        fetch(server, dest, layers=(1, 3))
    msg = str(e.value)
    assert "Range" in msg and "without --layers" in msg and server.url("/gpt2/model.safetensors") in msg
    assert not os.path.exists(dest)


def test_slice_outside_the_model_is_a_clear_error(server, tmp_path):
    with pytest.raises(PullError, match=r"holds 4 blocks \(0..3\)"):
        fetch(server, tmp_path / "s.safetensors", layers=(2, 6))


def test_existing_slice_makes_no_request_but_wrong_layers_refetch(server, tmp_path):
    dest = str(tmp_path / "s.safetensors")
    fetch(server, dest, layers=(1, 3), rank0=False)
    server.requests.clear()
    fetch(server, dest, layers=(1, 3), rank0=False)
    assert server.requests == []
    fetch(server, dest, layers=(2, 4), rank0=False)    # same name, other blocks: fetched again
    assert read_header(dest).metadata["nanopipe_blocks"] == "2-3"


def test_slice_bytes_match_the_file(files):
    path, _ = files["/gpt2/model.safetensors"]
    header = read_header(path)
    for lo, hi, rank0 in [(0, 4, True), (1, 3, False), (0, 1, True), (3, 4, False)]:
        total, part = P.total_and_slice_bytes(header, lo, hi, rank0)
        full_data, want = P.slice_bytes_for(L, C, V, T, lo, hi, rank0)
        assert part == want
        assert total == header.data_start + full_data == os.path.getsize(path)


def test_slice_bytes_by_hand():
    # n_layer = n_embd = n_vocab = n_ctx = 1: 30 floats in the file, 25 of them in block 0 minus its mask
    assert P.slice_bytes_for(1, 1, 1, 1, 0, 1, rank0=False) == (120, 100)
    assert P.slice_bytes_for(1, 1, 1, 1, 0, 1, rank0=True) == (120, 116)


def test_merge_ranges():
    infos = [TensorInfo(f"t{b}", "U8", (e - b,), b, e) for b, e in [(300, 400), (100, 200), (200, 260)]]
    assert P.merge_ranges(infos) == [(100, 260), (300, 400)]


# ---------------------------------------------------------------------------------------------
# names, verify, ensure_weights


@pytest.mark.parametrize("text, want", [("4-7", (4, 8)), ("5", (5, 6)), (" 0 - 11 ", (0, 12))])
def test_parse_layers(text, want):
    assert parse_layers(text) == want


@pytest.mark.parametrize("text, msg", [("7-4", "backwards"), ("a-b", "expected a block range"),
                                       ("", "expected a block range"), ("1-2-3", "expected a block range"),
                                       ("-3", "expected a block range")])
def test_parse_layers_rejects(text, msg):
    with pytest.raises(PullError, match=msg):
        parse_layers(text)


def test_verify(source, tmp_path):
    path, data, sha = source
    assert set(verify(path, sha, len(data)).tensors) == set(read_header(path).tensors)
    with pytest.raises(PullError, match="server announced"):
        verify(path, expected_size=len(data) + 1)
    with pytest.raises(PullError, match="sha256"):
        verify(path, sha256="0" * 64)
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[:-4])
    with pytest.raises(PullError, match=str(short)):
        verify(str(short))


def test_ensure_weights_full_then_cached(server, source, tmp_path):
    _, data, sha = source
    entry = {"url": server.url("/gpt2/model.safetensors"), "filename": "model.safetensors", "sha256": sha}
    lines = []
    wd = str(tmp_path / "weights")
    path = P.ensure_weights("gpt2", entry, wd, log=lines.append, out=io.StringIO(), timeout=5)
    assert path == os.path.join(wd, "model.safetensors") and read_bytes(path) == data
    assert lines == ["Checking for model weights (gpt2)...", f"Model weights ready at: {path}"]
    server.requests.clear()
    assert P.ensure_weights("gpt2", entry, wd, layers=(1, 3), rank0=False, log=lines.append) == path
    assert server.requests == []           # a full file on disk serves any stage


def test_ensure_weights_worker_pulls_a_slice(server, tmp_path):
    entry = {"url": server.url("/gpt2/model.safetensors"), "filename": "model.safetensors"}
    wd = str(tmp_path / "weights")
    path = P.ensure_weights("gpt2", entry, wd, layers=(2, 4), rank0=False, log=lambda s: None,
                            out=io.StringIO(), timeout=5)
    assert path == os.path.join(wd, "model.layers-2-3.safetensors")
    assert read_header(path).metadata["nanopipe_blocks"] == "2-3"
    assert not os.path.exists(os.path.join(wd, "model.safetensors"))


def test_ensure_weights_without_url_says_what_to_do(tmp_path):
    dest = os.path.join(str(tmp_path), "model.safetensors")
    with pytest.raises(PullError, match=r"no url for 'gpt2'.*init-weights"):
        P.ensure_weights("gpt2", {"filename": "model.safetensors"}, str(tmp_path), log=lambda s: None)
    assert not os.path.exists(dest)


# ---------------------------------------------------------------------------------------------
# a file that changed on the server, a published checksum, headers that claim too much


def changed(data: bytes) -> bytes:
    """The same header, other tensor values: a new version of the file, byte for byte as long."""
    start = read_header_bytes_len(data)
    return data[:start] + bytes(b ^ 0x55 for b in data[start:])


def read_header_bytes_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def cut_every_attempt(server, dest):
    server.cut_after, server.cuts = 30_000, P.RESUMES + 1
    with pytest.raises(PullError, match="run the same command again to resume"):
        fetch(server, dest)
    server.cuts = 0
    return os.path.getsize(str(dest) + ".part")


def test_file_changed_between_cut_and_resume_is_fetched_whole_again(server, source, tmp_path):
    _, data, sha = source
    dest = tmp_path / "model.safetensors"
    cut_every_attempt(server, dest)
    new = changed(data)
    server.files["/gpt2/model.safetensors"] = new
    server.requests.clear()
    server.if_ranges.clear()
    out = io.StringIO()
    fetch(server, dest, out=out)
    assert read_bytes(dest) == new, "the result must be the new file whole, not half of each"
    assert server.if_ranges == [f'"{sha}"'], "the resume must carry If-Range with the first answer's ETag"
    assert "changed on the server" in out.getvalue() and "restarting from zero" in out.getvalue()
    assert not os.path.exists(str(dest) + ".part.seen")


def test_unchanged_file_resumes_with_if_range(server, source, tmp_path):
    _, data, sha = source
    dest = tmp_path / "model.safetensors"
    have = cut_every_attempt(server, dest)
    server.requests.clear()
    server.if_ranges.clear()
    fetch(server, dest)
    assert read_bytes(dest) == data
    assert server.requests == [("/gpt2/model.safetensors", f"bytes={have}-")]
    assert server.if_ranges == [f'"{sha}"']


def test_server_ignoring_if_range_is_caught_by_its_published_checksum(server, source, tmp_path):
    _, data, _ = source
    server.if_range, server.publish_sha256 = False, True   # a cache that answers 206 from the new file
    dest = tmp_path / "model.safetensors"
    cut_every_attempt(server, dest)
    new = changed(data)
    server.files["/gpt2/model.safetensors"] = new
    out = io.StringIO()
    fetch(server, dest, out=out)
    assert read_bytes(dest) == new
    said = out.getvalue()
    assert "server publishes" in said and "X-Linked-Etag" in said and f"moved it to {dest}.corrupt" in said
    spliced = read_bytes(str(dest) + ".corrupt")
    assert spliced[:30_000] == data[:30_000] and spliced[-1000:] == new[-1000:]


def test_published_checksum_mismatch_moves_the_file_to_corrupt(server, source, tmp_path):
    server.publish_sha256, server.corrupt = True, 10
    dest = tmp_path / "model.safetensors"
    with pytest.raises(PullError, match="failed verification twice") as e:
        fetch(server, dest)
    assert "X-Linked-Etag" in str(e.value) and f"{dest}.corrupt" in str(e.value)
    assert not dest.exists() and os.path.exists(f"{dest}.corrupt")


def test_checksum_published_on_a_redirect_is_checked(server, source, tmp_path):
    """The hub puts X-Linked-Etag on its 302 to the CDN, not on the CDN's answer."""
    _, data, _ = source
    server.redirects = {"/resolve/model.safetensors": "/gpt2/model.safetensors"}
    dest = tmp_path / "model.safetensors"
    assert read_bytes(fetch(server, dest, path="/resolve/model.safetensors")) == data
    server.corrupt = 10
    with pytest.raises(PullError, match="X-Linked-Etag"):
        fetch(server, tmp_path / "again.safetensors", path="/resolve/model.safetensors")


def with_metadata(data: bytes, **meta) -> bytes:
    """The file `data` with its __metadata__ extended by `meta` (the header re-padded to 8 bytes)."""
    import json
    import struct
    n = read_header_bytes_len(data)
    header = json.loads(data[8:n])
    header["__metadata__"].update(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data[n:]


def test_header_claiming_a_billion_layers_is_moved_aside_and_fetched_again(server, source, tmp_path):
    _, data, _ = source
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(with_metadata(data, n_layer="1000000000"))
    out = io.StringIO()
    fetch(server, dest, out=out)
    assert read_bytes(dest) == data
    assert "n_layer='1000000000'" in out.getvalue() and f"moved it to {dest}.corrupt" in out.getvalue()


@pytest.mark.parametrize("entry, says", [
    ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "data_offsets must be two whole numbers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}, "data_offsets must be two whole numbers"),
    ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
    ({"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]}, "shape must be a list of whole numbers"),
])
def test_malformed_header_on_disk_is_moved_to_corrupt(server, source, tmp_path, entry, says):
    import json
    import struct
    _, data, _ = source
    blob = json.dumps({"wte.weight": entry}).encode()
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
    out = io.StringIO()
    fetch(server, dest, out=out)
    assert read_bytes(dest) == data
    assert says in out.getvalue() and f"moved it to {dest}.corrupt" in out.getvalue()


def test_slice_header_claiming_a_terabyte_is_refused_before_reading_it(server, source, tmp_path):
    """Content-Range '/*' gives no file size to check the claim against: the format's own cap must."""
    import struct
    _, data, _ = source
    server.files["/huge/model.safetensors"] = struct.pack("<Q", 2 ** 40) + data[8:]
    server.sizes, server.lengths = False, False
    with pytest.raises(PullError, match=r"header claims 1099511627776 bytes \(a safetensors header has at most"):
        fetch(server, slice_path(str(tmp_path / "model.safetensors"), 0, 1), path="/huge/model.safetensors",
              layers=(0, 1))


def test_slice_of_a_file_that_changed_between_runs_is_fetched_again(server, source, tmp_path):
    """The slice's header records the source's ETag, so a part begun from the old version no longer
    matches and is started again: the slice holds only the new version's bytes."""
    _, data, _ = source
    dest = str(tmp_path / "s.safetensors")
    server.cut_after, server.cuts = 10_000, P.RESUMES + 1
    with pytest.raises(PullError, match="run the same command again to resume"):
        fetch(server, dest, layers=(1, 3), rank0=False)
    server.cuts = 0
    new = changed(data)
    server.files["/gpt2/model.safetensors"] = new
    fetch(server, dest, layers=(1, 3), rank0=False)
    fresh = tmp_path / "new.safetensors"
    fresh.write_bytes(new)
    assert_same_tensors(dest, str(fresh), [f"h.{i}.{n}" for i in (1, 2) for n in block_names()])
    assert read_header(dest).metadata["nanopipe_source_version"] == f'"{hashlib.sha256(new).hexdigest()}"'


def test_slice_source_changing_mid_fetch_is_a_clear_error(server, source, tmp_path):
    _, data, _ = source
    original = server._serve

    def serve_then_change(h):          # the header's two requests see the old file, the blocks the new
        if len(server.requests) == 2:  # changed before the third is served (the server answers each
            server.files["/gpt2/model.safetensors"] = changed(data)     # request in its own thread)
        original(h)

    server._serve = serve_then_change
    with pytest.raises(PullError, match="the file changed on the server while its blocks were being fetched"):
        fetch(server, str(tmp_path / "s.safetensors"), layers=(1, 3), rank0=False)
