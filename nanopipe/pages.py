"""Where a stage's weights live: memory the OS may back with 2 MB pages instead of 4 KB ones.

A decode step streams every weight matrix from memory once (498 MB a token for gpt2-small). With
4 KB pages that is 120,000 page translations a token, and a translation the TLB misses costs a
walk of the page tables (two walks in a virtual machine); a 2 MB page covers 512 of them at once.
Linux backs anonymous memory with 2 MB pages ("transparent huge pages") where a program asks for
them (madvise MADV_HUGEPAGE) over a range that covers whole 2 MB-aligned pages.

numpy already asks for its large arrays, but only for arrays of 4 MB and more, and a malloc'd
array starts anywhere: its first and last partial 2 MB stay in 4 KB pages, and gpt2's 2.4 MB
attn.c_proj matrices get none. Measured here: 380-390 of gpt2-small's 498 MB of matrices were in
2 MB pages, and the same matrices all in 2 MB pages made a token's matmuls 6-11% faster and a
decode step 7% (docs/PERFORMANCE.md, "Huge pages"). So the loader carves the arrays it keeps out
of a few large mappings (`Arena`), each aligned to 2 MB and asked for huge pages once:

    arena = Arena()
    w = arena.empty((768, 2304), np.float32, order="F")       # a view into the current chunk
    w[...] = ...                                              # the pages appear as it is written

Where the OS has no such advice (macOS, Windows) or refuses it, `empty` is plain np.empty. A chunk
is freed when the last array carved from it is (each view keeps its mapping alive). Memory: an
untouched part of a mapping is not resident; at most the one huge page the carving stops in is
touched beyond the arrays, per chunk. The huge page is the kernel's (`huge_page_size`: 2 MB here,
32 MB on a Raspberry Pi 5's 16 KB-page kernel).
"""
from __future__ import annotations

import math
import mmap

import numpy as np

HUGE_PAGE = 2 << 20             # x86-64's and arm64's (4 KB pages) transparent huge page, when Linux does not say
CHUNK = 64 << 20                # one mapping holds ~2 gpt2-small blocks; a larger array gets its own
ALIGN = 64                      # every array starts on a cache line
PMD_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_size() -> int:
    """The size of this kernel's transparent huge page: 2 MB on x86-64 and on arm64 with 4 KB pages,
    32 MB on a Raspberry Pi 5's 16 KB-page kernel (Linux says it in PMD_SIZE)."""
    try:
        with open(PMD_SIZE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return HUGE_PAGE


def huge_pages_possible() -> bool:
    """Can this process ask the OS for 2 MB pages (Linux: mmap.MADV_HUGEPAGE exists)?"""
    return hasattr(mmap, "MADV_HUGEPAGE")


def _mapping(nbytes: int, page: int) -> np.ndarray | None:
    """An anonymous mapping of at least `nbytes` starting on a boundary of `page` (the huge page),
    advised to use huge pages, as a (nbytes,) uint8 array; None where the advice is refused (then
    use np.empty)."""
    # private: a shared anonymous mapping is shmem, which takes huge pages only where shmem_enabled says
    m = mmap.mmap(-1, nbytes + page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)      # + a page to align
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                                 # THP compiled out, or disabled for this process
        m.close()
        return None
    raw = np.frombuffer(m, np.uint8)                # the view keeps m alive (and m keeps its pages)
    start = -raw.ctypes.data % page
    return raw[start:start + nbytes]


class Arena:
    """Arrays kept for the life of a stage, carved in order out of 2 MB-aligned huge-page mappings.

    One per load (weights.load_stage): a stage loaded later gets its own chunks, so dropping a
    stage frees its memory whole."""

    def __init__(self, chunk: int = CHUNK):
        self.enabled = huge_pages_possible()
        self.page = huge_page_size() if self.enabled else HUGE_PAGE
        self.chunk = max(chunk, 2 * self.page)
        self.free = None            # the current chunk's uncarved rest, (n,) uint8

    def empty(self, shape, dtype=np.float32, order: str = "C") -> np.ndarray:
        """np.empty(shape, dtype, order=order), in huge-page memory where the OS allows it."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.enabled or nbytes < ALIGN:
            return np.empty(shape, dtype, order=order)
        size = -(-nbytes // ALIGN) * ALIGN
        if size > self.chunk:                       # a large array (the LM head): a mapping of its own
            raw = _mapping(size, self.page)
        else:
            if self.free is None or self.free.size < size:
                self.free = _mapping(self.chunk, self.page)
            raw = self.free
            if raw is not None:
                self.free = raw[size:]
        if raw is None:
            self.enabled = False
            return np.empty(shape, dtype, order=order)
        return raw[:nbytes].view(dtype).reshape(shape, order=order)


def huge_page_bytes() -> int | None:
    """How much of this process's memory the OS backs with 2 MB pages (Linux's AnonHugePages,
    in bytes), or None where it does not say (no /proc: macOS)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def thp_mode() -> str | None:
    """Linux's transparent huge page policy, the bracketed word of THP_ENABLED ("always", "madvise",
    "never"); None where the kernel does not say."""
    try:
        with open(THP_ENABLED) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def describe_pages() -> str | None:
    """For the kernels log line: how much of this process's memory is in huge pages, and why none
    where Linux has them turned off; None where the OS does not say (macOS)."""
    held = huge_page_bytes()
    if held is None:
        return None
    size = f"{huge_page_size() >> 20} MB"
    if thp_mode() == "never":
        return (f"memory in {size} pages: none (transparent huge pages are 'never' in {THP_ENABLED}: decode "
                "streams the weights ~7% slower; `echo madvise > ...` as root turns them on)")
    return f"memory in {size} pages: {held / 1e6:.0f} MB"
