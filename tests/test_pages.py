"""The stage's memory (nanopipe/pages.py): arrays carved from 2 MB-aligned mappings that Linux backs
with huge pages, and plain np.empty where the OS has no such advice."""
import os
import sys

import numpy as np
import pytest

import nanopipe.pages as pages
from nanopipe.pages import Arena
from nanopipe.weights import load_stage

needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or pages.thp_mode() not in ("always", "madvise")
    or not pages.huge_pages_possible(),
    reason="transparent huge pages are off or absent here (Linux with THP 'madvise' or 'always' shows them)")


def mapping_of(a: np.ndarray) -> dict:
    """The /proc/self/smaps entry of the mapping that holds array a's first byte: its fields in kB."""
    addr = a.__array_interface__["data"][0]
    entry = None
    with open(f"/proc/{os.getpid()}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                entry = {"range": (lo, hi)} if lo <= addr < hi else None
            elif entry is not None and head[0] == "VmFlags:":          # the entry's last line
                break
            elif entry is not None and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                entry[head[0][:-1]] = int(head[1])
    if entry is None or "Rss" not in entry:
        raise AssertionError(f"no mapping holds address {addr:#x}")
    return entry


def test_arena_arrays_are_what_np_empty_gives_aligned_and_apart():
    arena = Arena(chunk=1 << 20)                            # at least two huge pages: 4 MB here
    a = arena.empty((64, 48), np.float32, order="F")
    b = arena.empty((100,), np.float32)
    c = arena.empty((1500, 1024), np.float32)             # 6 MB, larger than a chunk: a mapping of its own
    assert (a.shape, a.dtype, a.flags.f_contiguous) == ((64, 48), np.float32, True)
    assert (b.shape, c.shape) == ((100,), (1500, 1024)) and c.flags.c_contiguous
    for x in (a, b, c):
        assert x.flags.writeable and x.flags.aligned
        assert x.__array_interface__["data"][0] % pages.ALIGN == 0, "an array must start on a cache line"
    a[...], b[...], c[...] = 1.0, 2.0, 3.0                 # no two arrays share a byte
    assert (a == 1).all() and (b == 2).all() and (c == 3).all()
    assert not np.shares_memory(a, b)


def test_without_the_advice_an_arena_is_plain_np_empty(monkeypatch):
    monkeypatch.setattr(pages, "huge_pages_possible", lambda: False)     # macOS, Windows
    a = Arena().empty((4, 4), np.float32, order="F")
    assert a.flags.owndata and a.flags.f_contiguous, "without huge pages the arrays are numpy's own"


@needs_thp
def test_a_loaded_stage_lies_in_huge_pages(tmp_path):
    """Before pages.py a small model's matrices lay in malloc's heap, in 4 KB pages (AnonHugePages 0);
    now the mapping that holds them is in 2 MB pages."""
    from nanopipe.weights import init_weights
    path = str(tmp_path / "tiny.safetensors")
    init_weights(path, n_layer=2, n_embd=64, n_head=4, n_ctx=64, seed=0)
    st = load_stage(path)
    w = st.blocks[0]["attn"]["c_attn"]["w"]
    got = mapping_of(w)
    assert got.get("AnonHugePages", 0) * 1024 >= pages.huge_page_size(), f"c_attn's mapping is not in huge pages: {got}"
    lo, hi = got["range"]
    assert lo <= st.blocks[1]["mlp"]["c_proj"]["w"].__array_interface__["data"][0] < hi, \
        "the stage's small matrices share one chunk"


@needs_thp
def test_an_arena_makes_resident_only_what_it_carved_plus_one_huge_page():
    arena = Arena(chunk=64 << 20)
    a = arena.empty((3 << 20,), np.uint8)                   # 3 MB of a chunk of 64 MB or more
    before = mapping_of(a)["Rss"]       # Linux may merge the chunk with a neighbouring mapping: count what grows
    a[...] = 1
    grew = mapping_of(a)["Rss"] - before
    page_kb = pages.huge_page_size() >> 10
    assert grew <= (3 << 10) + page_kb, f"{arena.chunk >> 20} MB mapped, 3 MB written: {grew} kB more resident"


def test_the_kernels_line_says_how_much_memory_is_in_huge_pages_and_why_none(tmp_path, monkeypatch):
    from nanopipe.kernels import describe_kernels
    monkeypatch.setattr(pages, "huge_page_bytes", lambda: 482 << 20)
    monkeypatch.setattr(pages, "huge_page_size", lambda: 2 << 20)
    knob = tmp_path / "enabled"
    knob.write_text("always [madvise] never\n")
    monkeypatch.setattr(pages, "THP_ENABLED", str(knob))
    assert describe_kernels().endswith("; memory in 2 MB pages: 505 MB")
    knob.write_text("always madvise [never]\n")
    line = describe_kernels()
    assert "memory in 2 MB pages: none (transparent huge pages are 'never' in " in line and "madvise" in line
    monkeypatch.setattr(pages, "huge_page_bytes", lambda: None)        # no /proc: macOS says nothing
    assert "pages" not in describe_kernels()


@needs_thp
def test_the_bench_compares_huge_pages_with_numpys_own_in_one_process(tmp_path):
    """bench.compare_pages loads the weights twice, once as the loader does and once where numpy's
    allocator puts them, and times decode steps of both in turn. A tiny model's block arrays are all
    under numpy's 4 MB threshold and its 12.9 MB wte starts anywhere, so numpy's copy holds fewer
    huge pages than the loader's (wte whole, and the blocks' chunk)."""
    from nanopipe.tools.bench import compare_pages
    from nanopipe.weights import init_weights
    path = str(tmp_path / "tiny.safetensors")
    init_weights(path, n_layer=2, n_embd=64, n_head=4, n_ctx=64, seed=0)
    lines = []
    got = compare_pages(path, steps=3, position=4, echo=lines.append)
    assert set(got) == {"numpy", "huge"}
    assert got["huge"]["pages_mb"] > got["numpy"]["pages_mb"], got
    for row in got.values():
        assert row["wall_min"] > 0 and row["floor_ms"] > 0
    assert any("weights in huge's pages" in ln for ln in lines), lines
