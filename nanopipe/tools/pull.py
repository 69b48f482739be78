"""Download model weights: the whole file, or just the byte ranges one pipeline stage needs.

A safetensors file is a JSON header followed by raw tensor bytes, and the header says where each
tensor lives. So a worker that runs blocks 16..31 of gpt2-xl does not need the whole 6.4 GB file:
it reads the header with two small HTTP Range requests, picks its tensors, and fetches only their
byte ranges (about a third of the file):

    GET Range: bytes=0-7            -> 8 bytes: N, the header length (little-endian u64)
    GET Range: bytes=8-(8+N-1)      -> the JSON header: name -> dtype, shape, data_offsets
    GET Range: bytes=b-e            -> one request per run of adjacent tensors the stage keeps

Everything is downloaded into `dest + ".part"` and renamed to `dest` only once it is complete and
verified, so a loader never meets a half-written file. An interrupted download resumes where the
`.part` file ends (`Range: bytes=N-`); a server that ignores Range makes us start again from zero.

Only the standard library is used (urllib), so a worker needs nothing beyond numpy to fetch its part.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request

from .. import gpt2_tensors as gt
from ..config import WEIGHTS_DIR, ConfigError, weights_file
from ..partition import layers_text
from ..safetensors_io import MAX_HEADER_BYTES, Header, SafetensorsError, header_prefix, parse_header, read_header
from ..weights import WeightsError, check_metadata, is_synthetic, slice_metadata, synthetic_note

USER_AGENT = "nanopipe-pull/0.1"
RESUMES = 3           # how many dropped connections one pull() rides out before giving up
REDRAW_SECONDS = 0.25  # progress line redraws at most ~4 times a second


class PullError(RuntimeError):
    """A download failed; the message names the URL or path and says what to do next."""


def _what_to_do(dest: str) -> str:
    """The way out when a download fails. For a slice file, the init-weights command writes that slice.

        _what_to_do("weights/gpt2.layers-8-11.safetensors") -> "... `nanopipe init-weights
            weights/gpt2.layers-8-11.safetensors --layers 8-11` for synthetic (random) weights"
    """
    layers = layers_in_name(dest)
    flag = f" --layers {layers_text(*layers)}" if layers is not None else ""
    return (f"copy the file to {dest} from a machine that has it, or run "
            f"`nanopipe init-weights {dest}{flag}` for synthetic (random) weights")


# ---------------------------------------------------------------------------------------------
# naming: layer ranges and slice files


def parse_layers(text: str) -> tuple:
    """Inclusive block range as typed on the command line -> half-open (lo, hi), like h[lo:hi].

        "4-7" -> (4, 8)      blocks 4, 5, 6 and 7
        "5"   -> (5, 6)      block 5 alone
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        raise PullError(f"--layers {text!r}: expected a block range like '4-7' (inclusive) "
                        "or one block like '5'")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if last < first:
        raise PullError(f"--layers {text!r}: the range is backwards; write the lower block first, "
                        f"e.g. '{last}-{first}'")
    return first, last + 1


def slice_path(dest: str, lo: int, hi: int) -> str:
    """Where the slice of blocks lo..hi-1 of `dest` is stored: named inclusively, like --layers.

        slice_path("weights/model.safetensors", 4, 8) -> "weights/model.layers-4-7.safetensors"
    """
    root, ext = os.path.splitext(dest)
    return f"{root}.layers-{layers_text(lo, hi)}{ext or '.safetensors'}"


def layers_in_name(path: str) -> tuple | None:
    """The blocks a slice file's name promises, read inclusively as slice_path writes them:
    "weights/gpt2.layers-8-11.safetensors" -> (8, 12); a name without ".layers-A-B" -> None."""
    m = re.search(r"\.layers-(\d+)-(\d+)(\.[^.]*)?$", os.path.basename(path))
    if not m or int(m.group(2)) < int(m.group(1)):
        return None
    return int(m.group(1)), int(m.group(2)) + 1


def legacy_slice_path(dest: str, lo: int, hi: int) -> str:
    """The half-open name older versions gave the same slice: "weights/model.layers-4-8.safetensors".

    Read, never written. The same name means blocks 4..8 in today's convention, so a file found
    under it is used only if its own tensors hold the blocks asked for (see `slice_ok`).
    """
    root, ext = os.path.splitext(dest)
    return f"{root}.layers-{lo}-{hi}{ext or '.safetensors'}"


# ---------------------------------------------------------------------------------------------
# which tensors a stage needs


_base = gt.base_name


def wanted(name: str, lo: int, hi: int, rank0: bool) -> bool:
    """Does the stage running blocks lo..hi-1 (plus embeddings and head when rank0) need `name`?

    The causal-mask buffers `h.N.attn.bias` ([1, 1, n_ctx, n_ctx] float32, 4 MiB each in gpt2-xl)
    are skipped: the model builds its mask itself. Both 'h.0.ln_1.weight' and the
    'transformer.h.0.ln_1.weight' of save_pretrained files are understood.
    """
    return gt.stage_needs(name, lo, hi, rank0)


def _n_layer(names) -> int:
    idx = gt.block_indices(names)
    return idx[-1] + 1 if idx else 0


def select_tensors(header: Header, lo: int, hi: int, rank0: bool, source: str = "the file") -> list:
    """The TensorInfos the stage needs, in file order; a clear error if the file lacks those blocks."""
    n_layer = _n_layer(header.tensors)
    if not 0 <= lo < hi <= n_layer:
        raise PullError(f"{source}: blocks {lo}..{hi - 1} asked for, but the file holds {n_layer} blocks "
                        f"(0..{n_layer - 1}); pick --layers inside that range")
    infos = [t for t in header.tensors.values() if wanted(t.name, lo, hi, rank0)]
    return sorted(infos, key=lambda t: t.begin)


def merge_ranges(infos) -> list:
    """Byte ranges [begin, end) of tensors, with touching neighbours merged into one request.

        [(100, 200), (200, 260), (300, 400)] -> [(100, 260), (300, 400)]
    """
    runs = []
    for t in sorted(infos, key=lambda t: t.begin):
        if runs and runs[-1][1] == t.begin:
            runs[-1][1] = t.end
        else:
            runs.append([t.begin, t.end])
    return [tuple(r) for r in runs]


def total_and_slice_bytes(header: Header, lo: int, hi: int, rank0: bool) -> tuple:
    """(bytes of the whole file, tensor bytes the stage downloads) for a header already read.

    The slice file adds its own small JSON header (a few KB) on top of the tensor bytes.
    """
    total = header.file_size or max((t.end for t in header.tensors.values()), default=header.data_start)
    return total, sum(t.nbytes for t in select_tensors(header, lo, hi, rank0))


def gpt2_tensor_shapes(n_layer: int, n_embd: int, n_vocab: int, n_ctx: int) -> dict:
    """name -> shape of the official hub file (with its [1, 1, n_ctx, n_ctx] mask buffers)."""
    return gt.hub_shapes(n_layer, n_embd, n_vocab, n_ctx)


def slice_bytes_for(n_layer: int, n_embd: int, n_vocab: int, n_ctx: int, lo: int, hi: int, rank0: bool,
                    itemsize: int = 4) -> tuple:
    """(tensor bytes of the official float32 file, tensor bytes a stage downloads), from shapes alone.

    A hand-checkable case, n_layer = n_embd = n_vocab = n_ctx = 1: a block holds 26 floats
    (ln_1 2, mask 1, c_attn 3+3, attn.c_proj 1+1, ln_2 2, c_fc 4+4, mlp.c_proj 4+1) and the rest
    4 (wte 1, wpe 1, ln_f 2), so the file has 30 floats = 120 bytes and a worker running block 0
    fetches 25 floats (no mask) = 100 bytes.
    """
    shapes = gpt2_tensor_shapes(n_layer, n_embd, n_vocab, n_ctx)
    size = {name: itemsize * gt.numel(shape) for name, shape in shapes.items()}
    if not 0 <= lo < hi <= n_layer:
        raise PullError(f"blocks {lo}..{hi - 1} asked for, but the model has {n_layer} blocks")
    return sum(size.values()), sum(b for name, b in size.items() if wanted(name, lo, hi, rank0))


# ---------------------------------------------------------------------------------------------
# verifying a file


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str, sha256: str | None = None, expected_size: int | None = None) -> Header:
    """Check a downloaded file; return its header or raise PullError saying what is wrong.

    The header must parse and every tensor's bytes must lie inside the file (this catches a
    truncated download even without a checksum); the size must match what the server announced;
    the sha256 must match when one is given (it covers the whole file, so only full downloads have one).
    """
    try:
        header = read_header(path)
        check_metadata(header, path)
    except (SafetensorsError, OSError) as e:
        raise PullError(f"{path}: not a valid safetensors file ({e})") from None
    except WeightsError as e:
        raise PullError(str(e)) from None
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise PullError(f"{path}: has {size} bytes but the server announced {expected_size} "
                        "(incomplete download)")
    if sha256:
        got = sha256_of(path)
        if got.lower() != sha256.strip().lower():
            raise PullError(f"{path}: sha256 is {got}, expected {sha256} (corrupted download, or the "
                            "sha256 in the config belongs to another file)")
    return header


# ---------------------------------------------------------------------------------------------
# progress line


def mb(n) -> str:
    return f"{n / 1e6:.1f} MB"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line on `out`, redrawn with \\r at most ~4 times a second, then a final newline:

        12.6 MB / 548.1 MB   2%  8.3 MB/s  ETA 1:04
    The rate counts only bytes fetched in this run, not those resumed from a .part file.
    """

    def __init__(self, total: int | None, done: int = 0, out=None, enabled: bool = True):
        self.total, self.done, self.enabled = total, done, enabled
        self.out = sys.stderr if out is None else out
        self.start_done, self.t0 = done, time.monotonic()
        self.last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last_draw >= REDRAW_SECONDS:
            self.last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.t0, 1e-6)
        rate = (self.done - self.start_done) / elapsed                  # bytes/s
        text = mb(self.done)
        if self.total:
            left = max(self.total - self.done, 0)
            eta = _clock(left / rate) if rate > 0 else "?"
            text += f" / {mb(self.total)}  {100 * self.done // self.total:3d}%"
        else:
            eta = "?"
        return f"{text}  {rate / 1e6:.1f} MB/s  ETA {eta}"

    def _draw(self, now: float) -> None:
        self.out.write("\r" + self.line(now).ljust(60))
        self.out.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.out.write("\n")
            self.out.flush()


# ---------------------------------------------------------------------------------------------
# HTTP


class _Dropped(Exception):
    """The connection ended before the announced number of bytes arrived."""


class _KeepLinkedEtag(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib's own handler, and keeps the `X-Linked-Etag` a hop carried.

    The hub answers a file stored in LFS with a redirect to its CDN whose `X-Linked-Etag` is the
    file's sha256; the CDN's own answer may not repeat it, so it is read off the redirect.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        origin = getattr(req, "origin", req)
        if headers.get("X-Linked-Etag"):
            origin.linked_etag = headers["X-Linked-Etag"]
        if new is not None:
            new.origin = origin
        return new


_OPENER = urllib.request.build_opener(_KeepLinkedEtag)


def published_sha256(resp) -> str | None:
    """The sha256 the server publishes for the file, if it does: the hub's `X-Linked-Etag`
    ('"9f3c...64 hex digits"', quotes and all), on the answer or on a redirect before it."""
    value = resp.headers.get("X-Linked-Etag") or getattr(resp, "linked_etag", None) or ""
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def validator(resp) -> str | None:
    """What identifies this version of the file for `If-Range`: a strong ETag, else Last-Modified."""
    etag = (resp.headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):       # If-Range takes strong validators only
        return etag
    return (resp.headers.get("Last-Modified") or "").strip() or None


def _open(url: str, start: int = 0, end: int | None = None, *, timeout: float, dest: str,
          if_range: str | None = None):
    """GET url, with `Range: bytes=start-(end-1)` unless start == 0 and end is None, and with
    `If-Range: if_range` (the server sends the whole file, 200, if it changed since) when given.

    Returns the response; network failures and HTTP errors other than 416 become PullErrors.
    """
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if if_range:
            headers["If-Range"] = if_range
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = _OPENER.open(req, timeout=timeout)
        resp.linked_etag = getattr(req, "linked_etag", None)
        return resp
    except urllib.error.HTTPError as e:
        if e.code == 416:
            raise
        e.close()
        hint = " (check the url for this model in the config)" if e.code == 404 else ""
        raise PullError(f"{url}: HTTP {e.code} {e.reason}{hint}; {_what_to_do(dest)}") from None
    except ValueError as e:   # 'unknown url type', an empty url
        raise PullError(f"{url!r} is not a usable url ({e}); fix the url for this model in the config, or "
                        f"{_what_to_do(dest)}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PullError(f"cannot reach {url} ({reason}); if this machine has no network, "
                        f"{_what_to_do(dest)}") from None


def _content_range(resp) -> tuple:
    """'bytes 100-199/1000' -> (100, 1000); total is None for '/*'."""
    m = re.fullmatch(r"bytes\s+(\d+)-\d+/(\d+|\*)", (resp.headers.get("Content-Range") or "").strip())
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _length(resp):
    n = resp.headers.get("Content-Length")
    return int(n) if n is not None and n.isdigit() else None


def _copy(resp, f, n: int | None, bar: Progress, chunk: int) -> None:
    """Stream the body into f chunk by chunk; raise _Dropped if it stops short of n bytes."""
    got = 0
    while n is None or got < n:
        try:
            buf = resp.read(chunk if n is None else min(chunk, n - got))
        except (http.client.HTTPException, OSError) as e:   # reset, timeout, IncompleteRead
            raise _Dropped(f"{type(e).__name__}: {e}") from None
        if not buf:
            break
        f.write(buf)  # an OSError here is the disk, not the network: let it through
        got += len(buf)
        bar.update(len(buf))
    if n is not None and got < n:
        raise _Dropped(f"connection closed after {got} of {n} bytes")


def check_space(path: str, need: int | None) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if need and free < need:
        raise PullError(f"not enough disk space for {path}: it needs {mb(need)} more, {folder} has "
                        f"{mb(free)} free; free some space or use another weights directory")


def _disk_full(path: str, need: int | None) -> PullError:
    folder = os.path.dirname(os.path.abspath(path))
    need_text = f"it needs {mb(need)} in total" if need else "the file needs more space"
    return PullError(f"disk full while writing {path}: {need_text}, {folder} has "
                     f"{mb(shutil.disk_usage(folder).free)} free; free some space and run the same "
                     f"command again to resume, or use another weights directory")


def part_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


# ---------------------------------------------------------------------------------------------
# the whole file


def _seen_path(part: str) -> str:
    return part + ".seen"


def _read_seen(part: str) -> dict:
    """What the server said about the file when `part` was begun: {"if_range": ETag or
    Last-Modified, "sha256": its published checksum}, kept beside the part file ({} if unknown)."""
    try:
        with open(_seen_path(part)) as f:
            seen = json.load(f)
        return {k: v for k, v in seen.items() if k in ("if_range", "sha256") and isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_seen(part: str, resp) -> None:
    seen = {"if_range": validator(resp), "sha256": published_sha256(resp)}
    with open(_seen_path(part), "w") as f:
        json.dump({k: v for k, v in seen.items() if v}, f)


def _forget_seen(part: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(_seen_path(part))


def _open_resumed(url: str, part: str, *, timeout: float, out, dest: str):
    """Open a GET that continues `part`. Returns (response or None if part is already whole,
    offset the body starts at, total file size or None).

    The resume carries `If-Range` with the ETag (or Last-Modified) the first answer gave, so a file
    that changed on the server in between comes whole from byte 0 (200) instead of its second half
    being glued to the old first half.
    """
    have = part_size(part)
    seen = _read_seen(part) if have else {}
    try:
        resp = _open(url, have, timeout=timeout, dest=dest, if_range=seen.get("if_range"))
    except urllib.error.HTTPError as e:   # 416: nothing left past `have`
        e.close()
        total = _content_range_total(e.headers.get("Content-Range"))
        if total == have:
            return None, have, total
        out.write(f"{part}: {have} bytes do not fit {url} ({total} bytes); starting again from zero\n")
        os.remove(part)
        resp = _open(url, 0, timeout=timeout, dest=dest)
    if resp.status == 206:
        start, total = _content_range(resp)
        if start != have:
            resp.close()
            raise PullError(f"{url}: asked to resume at byte {have} but the server answered from byte "
                            f"{start}; delete {part} and run again")
        if not seen:
            _write_seen(part, resp)
        return resp, have, total
    if have and seen.get("if_range"):
        out.write(f"{url}: the file changed on the server since {part} was begun (it was "
                  f"{seen['if_range'][:80]}, now {(validator(resp) or 'unknown')[:80]}); "
                  f"restarting from zero, discarding {have} bytes\n")
    elif have:
        out.write(f"{url}: the server does not support resuming (no HTTP Range); "
                  f"restarting from zero, discarding {have} bytes of {part}\n")
    _write_seen(part, resp)
    return resp, 0, _length(resp)


def _content_range_total(value) -> int | None:
    m = re.search(r"/(\d+)\s*$", value or "")
    return int(m.group(1)) if m else None


def _resuming(url: str, part: str, attempt, out) -> None:
    """Call attempt() until it finishes, riding out up to RESUMES dropped connections; each call
    continues from wherever `part` ends."""
    for drops in range(RESUMES + 1):
        try:
            return attempt()
        except _Dropped as e:
            if drops == RESUMES:
                raise PullError(f"{url}: the connection kept dropping ({e}); {part_size(part)} bytes are kept in "
                                f"{part}, run the same command again to resume") from None
            out.write(f"{url}: {e}; resuming at byte {part_size(part)}\n")


@contextlib.contextmanager
def disk_errors(part: str, need: int | None):
    """Writing `part`: a full disk says how much is needed and where; other errors name the file."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(part, need) from None
        raise PullError(f"cannot write {part} ({e}); check the weights directory") from None


def _fetch_whole(url: str, part: str, *, timeout: float, chunk: int, progress: bool, out, dest: str):
    """Download url into part, resuming what is there; return the total size (None if unknown)."""
    total = None

    def attempt():
        nonlocal total
        resp, start, total = _open_resumed(url, part, timeout=timeout, out=out, dest=dest)
        if resp is None:
            return
        with resp:
            check_space(part, total - start if total else None)
            bar = Progress(total, start, out, progress)
            try:
                with disk_errors(part, total), open(part, "ab" if start else "wb") as f:
                    _copy(resp, f, total - start if total is not None else _length(resp), bar, chunk)
            finally:
                bar.finish()

    _resuming(url, part, attempt, out)
    return total


def _fetch_verified(fetch, check, url, dest, part, out, advice: str) -> str:
    """fetch() into `part`, check(part); on a bad file delete it and fetch once more. Only a file
    that passed the check is renamed to `dest`, so a loader never sees a partial or corrupt one."""
    for attempt in (1, 2):
        fetch()
        try:
            check(part)
            break
        except PullError as e:
            aside = dest + ".corrupt"        # one kept for a look, replaced by the next: no disk filling up
            os.replace(part, aside)
            _forget_seen(part)
            if attempt == 2:
                raise PullError(f"{url}: the download failed verification twice ({e}); moved it to {aside}; "
                                f"{advice}") from None
            out.write(f"{e}; moved it to {aside}, downloading again\n")
    os.replace(part, dest)
    _forget_seen(part)
    return dest


def _pull_whole(url, dest, part, *, sha256, timeout, chunk, progress, out) -> str:
    got = {}

    def fetch():
        got["total"] = _fetch_whole(url, part, timeout=timeout, chunk=chunk, progress=progress, out=out, dest=dest)
        got["published"] = _read_seen(part).get("sha256")

    def check(path):
        verify(path, sha256, got["total"])
        published = got["published"]
        actual = sha256_of(path) if published and not sha256 else published
        if actual != published:
            raise PullError(f"{path}: sha256 is {actual}, but the server publishes {published} "
                            "for this file (X-Linked-Etag): the download is damaged, or the file changed "
                            "on the server while it was being fetched")

    return _fetch_verified(fetch, check, url, dest, part, out,
                           f"check the url and sha256 for this model in the config, or {_what_to_do(dest)}")


# ---------------------------------------------------------------------------------------------
# a slice: header by Range, then only the stage's tensors


def _get_range(url: str, start: int, end: int, *, timeout: float, dest: str, seen: dict | None = None) -> tuple:
    """Bytes [start, end) of url and the file's total size; insists on a 206 answer. `seen`, when
    given, gets the answer's validator (ETag or Last-Modified) under "if_range"."""
    resp = _open(url, start, end, timeout=timeout, dest=dest)
    with resp:
        if seen is not None:
            seen["if_range"] = validator(resp)
        if resp.status != 206:
            raise PullError(f"{url}: the server does not support HTTP Range requests, so a slice cannot be "
                            "fetched; download the full file instead (`nanopipe pull NAME` without --layers)")
        got_start, total = _content_range(resp)
        try:
            data = resp.read(end - start)
        except (http.client.HTTPException, OSError) as e:
            raise PullError(f"{url}: connection dropped while reading bytes {start}-{end - 1} ({e}); "
                            "run again") from None
    if got_start != start or len(data) != end - start:
        raise PullError(f"{url}: asked for bytes {start}-{end - 1}, got {len(data)} bytes from "
                        f"{got_start}; run again")
    return data, total


def remote_header(url: str, *, timeout: float = 30, dest: str = os.path.join(WEIGHTS_DIR, ""),
                  seen: dict | None = None) -> Header:
    """Read a remote file's safetensors header with two small Range requests (`seen`: see _get_range)."""
    head8, total = _get_range(url, 0, 8, timeout=timeout, dest=dest, seen=seen)
    (n,) = struct.unpack("<Q", head8)
    if n > MAX_HEADER_BYTES:     # asked for before the size is known ('/*'): read no more than the format allows
        raise PullError(f"{url}: header claims {n} bytes (a safetensors header has at most {MAX_HEADER_BYTES}); "
                        "not a safetensors file; check the url for this model in the config")
    if total is not None and 8 + n > total:
        raise PullError(f"{url}: header claims {n} bytes but the file has {total}; not a safetensors file")
    try:
        blob, _ = _get_range(url, 8, 8 + n, timeout=timeout, dest=dest)
        header = parse_header(head8 + blob, url, file_size=total)
        check_metadata(header, url)
        return header
    except (SafetensorsError, WeightsError) as e:
        raise PullError(f"{e}; check the url for this model in the config") from None


def _slice_metadata(header: Header, url: str, lo: int, hi: int, version: str | None = None) -> dict:
    """The source's metadata, plus what a loader cannot read off a slice's own tensor shapes, and
    the version of the source (its ETag) the bytes come from: a part file begun from another
    version has another header, so it is started again rather than continued."""
    return slice_metadata(header, url, lo, hi, version)


def _header_bytes(infos, metadata: dict) -> bytes:
    """The slice file's prefix (8-byte length + JSON), with tensors in the order given so their
    bytes can be streamed in after it."""
    return header_prefix([(t.name, t.dtype, t.shape, t.nbytes) for t in infos], metadata)


def _fetch_slice(url, part, prefix: bytes, runs, *, timeout, chunk, progress, out, dest, if_range=None) -> None:
    """Write prefix + the bytes of each run into part, resuming a part that has the same prefix."""
    need = len(prefix) + sum(e - b for b, e in runs)

    def attempt():
        with disk_errors(part, need):
            have = part_size(part)
            if have < len(prefix) or have > need or _read_prefix(part, len(prefix)) != prefix:
                with open(part, "wb") as f:
                    f.write(prefix)
                have = len(prefix)
            check_space(part, need - have)
            skip = have - len(prefix)   # data bytes already in part
            bar = Progress(need, have, out, progress)
            try:
                with open(part, "ab") as f:
                    for b, e in runs:
                        if skip >= e - b:
                            skip -= e - b
                            continue
                        _fetch_run(url, b + skip, e, f, bar, timeout=timeout, chunk=chunk, dest=dest,
                                   if_range=if_range)
                        skip = 0
            finally:
                bar.finish()

    _resuming(url, part, attempt, out)


def _read_prefix(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _fetch_run(url, b, e, f, bar, *, timeout, chunk, dest, if_range=None) -> None:
    resp = _open(url, b, e, timeout=timeout, dest=dest, if_range=if_range)
    with resp:
        start, _ = _content_range(resp)
        if resp.status == 200 and if_range:
            raise PullError(f"{url}: the file changed on the server while its blocks were being fetched (it was "
                            f"{if_range[:80]}, now {(validator(resp) or 'unknown')[:80]}); run the same command "
                            "again to fetch the new version")
        if resp.status != 206 or start != b:
            sent = "the whole file" if resp.status == 200 else f"HTTP {resp.status} from byte {start}"
            raise PullError(f"{url}: asked for bytes {b}-{e - 1} but the server sent {sent}; "
                            "download the full file instead (`nanopipe pull NAME` without --layers)")
        _copy(resp, f, e - b, bar, chunk)


def _pull_slice(url, dest, part, lo, hi, rank0, *, timeout, chunk, progress, out) -> str:
    seen = {}
    header = remote_header(url, timeout=timeout, dest=dest, seen=seen)
    infos = select_tensors(header, lo, hi, rank0, source=url)
    prefix = _header_bytes(infos, _slice_metadata(header, url, lo, hi, seen.get("if_range")))
    runs = merge_ranges(infos)
    size = len(prefix) + sum(t.nbytes for t in infos)
    if progress:
        total, _ = total_and_slice_bytes(header, lo, hi, rank0)
        extra = " + embeddings/head" if rank0 else ""
        out.write(f"{url}: blocks {lo}..{hi - 1}{extra}: {len(infos)} tensors, "
                  f"{mb(size)} of {mb(total)} in {len(runs)} range requests\n")
    def fetch():
        _fetch_slice(url, part, prefix, runs, timeout=timeout, chunk=chunk, progress=progress, out=out, dest=dest,
                     if_range=seen.get("if_range"))

    def check(path):
        if set(verify(path, expected_size=size).tensors) != {t.name for t in infos}:
            raise PullError(f"{path}: holds the wrong tensors")

    return _fetch_verified(fetch, check, url, dest, part, out, _what_to_do(dest))


def slice_ok(path: str, lo: int, hi: int, rank0: bool) -> Header:
    """`path`'s header, or PullError unless it holds blocks lo..hi-1 (and embeddings if rank0).

    What counts is the tensors in the file, not its name or tag: a file holding more blocks serves too.
    """
    header = verify(path)
    names = {_base(n) for n in header.tensors}
    present = set(gt.block_indices(names))
    missing = [f"h.{i}" for i in range(lo, hi) if i not in present]
    if rank0 and "wte.weight" not in names:
        missing.append("wte.weight")
    if missing:
        raise PullError(f"{path}: lacks {', '.join(missing)}")
    return header


# ---------------------------------------------------------------------------------------------
# the entry points


def pull(url: str, dest: str, *, sha256: str | None = None, layers: tuple | None = None, rank0: bool = True,
         progress: bool = True, out=None, timeout: float = 30, chunk: int = 1 << 20) -> str:
    """Download `url` to `dest` (or, with layers=(lo, hi), only what that stage needs); return dest.

    `dest` is the file written: for a slice, pass `slice_path(full_dest, lo, hi)`. A `dest` that
    already verifies is returned at once without touching the network; one that does not is fetched
    again. The bytes go to `dest + ".part"` first and are renamed only when complete and verified.
    `sha256` checks full downloads only (it is the hash of the whole file, not of a slice).
    A synthetic `dest` (from `nanopipe init-weights`) counts as absent: it is replaced, and kept
    until the real file is complete. A damaged `dest` is never deleted: it is moved aside to
    `dest + ".corrupt"` (the path is said) before the download starts.
    Progress and notes go to `out` (sys.stderr as it is at call time, so test runners capture it).
    """
    out = sys.stderr if out is None else out
    replacing = False
    if os.path.exists(dest):
        try:
            if layers is None:
                header = verify(dest, None if _synthetic(dest) else sha256)
            else:
                header = slice_ok(dest, *layers, rank0)
            if not is_synthetic(header) or _served_as_is(url, header, layers, timeout):
                return dest
            replacing = True
            out.write(f"{dest} holds synthetic (random) weights from `nanopipe init-weights`; replacing it "
                      f"with the real ones from {url or 'the config'} (it stays until they are complete)\n")
        except PullError as e:
            aside = _move_aside(dest)
            out.write(f"{e}; moved it to {aside} and downloading again\n")
    try:
        return _download(url, dest, sha256=sha256, layers=layers, rank0=rank0, progress=progress, out=out,
                         timeout=timeout, chunk=chunk)
    except PullError as e:
        if replacing:
            raise PullError(f"{e}. {dest} still holds the synthetic weights") from None
        raise


def _served_as_is(url: str, header: Header, layers, timeout: float) -> bool:
    """Is this synthetic file what `url` itself serves (a test server, a synthetic model)? Then it is
    not replaced. A slice remembers its url; for a full file the remote header says (two small reads)."""
    if header.metadata.get("nanopipe_source") == url:
        return True
    if layers is not None or not url:
        return False
    try:
        return is_synthetic(remote_header(url, timeout=timeout))
    except PullError:
        return False        # unreachable or no Range: the download says what is wrong


def _synthetic(path: str) -> bool:
    try:
        return is_synthetic(read_header(path))
    except (OSError, SafetensorsError):
        return False


def _move_aside(path: str) -> str:
    """Rename a damaged file to path + ".corrupt" (".corrupt.1", ... if taken); return the new name."""
    aside, n = path + ".corrupt", 0
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.corrupt.{n}"
    os.replace(path, aside)
    return aside


def _download(url, dest, *, sha256, layers, rank0, progress, out, timeout, chunk) -> str:
    folder = os.path.dirname(dest)
    if folder:
        os.makedirs(folder, exist_ok=True)
    part = dest + ".part"
    if progress:
        out.write(f"Downloading {url} -> {dest}\n")
    opts = dict(timeout=timeout, chunk=chunk, progress=progress, out=out)
    if layers is None:
        return _pull_whole(url, dest, part, sha256=sha256, **opts)
    lo, hi = layers
    return _pull_slice(url, dest, part, lo, hi, rank0, **opts)


def ensure_weights(name: str, weights_cfg_entry: dict, weights_dir: str = WEIGHTS_DIR,
                   layers: tuple | None = None, rank0: bool = True, log=print, **pull_options) -> str:
    """Make sure the weights a node needs are on disk, pulling what is missing; return their path.

    Rank 0 without `layers` gets the full file. With layers=(lo, hi) a full file already on disk is
    used as is (a loader reads its stage out of it); otherwise only the slice is fetched, into
    `slice_path(full, lo, hi)`. `weights_cfg_entry` is the model's config entry:
    {"url": ..., "filename": ..., "sha256": optional}. `pull_options` go to pull() (progress, out, timeout).

        ensure_weights("gpt2", {"url": "https://.../model.safetensors", "filename": "model.safetensors"})
        # prints:
        Checking for model weights (gpt2)...
        Model weights ready at: weights/model.safetensors
    """
    log(f"Checking for model weights ({name})...")
    entry = dict(weights_cfg_entry or {})
    try:       # the name may come from a leader (`join --leader`): a plain file name in weights_dir, or nothing
        full = weights_file(entry.get("filename") or f"{name}.safetensors", weights_dir)
    except ConfigError as e:
        raise PullError(str(e)) from None
    url, sha256 = entry.get("url"), entry.get("sha256")
    path = _synthetic_here(full, layers, rank0)   # a node runs synthetic weights it finds; `pull` replaces them
    if path is None and layers is not None:
        path = _older_slice(full, layers, rank0, log)
    if path is None and layers is not None and os.path.exists(full):   # a full file serves any stage
        try:
            verify(full, sha256)
            path = full
        except PullError as e:
            log(f"{e}; fetching only blocks {layers[0]}..{layers[1] - 1} instead")
    if path is None:
        target = full if layers is None else slice_path(full, *layers)
        if not url and not os.path.exists(target):
            raise PullError(f"no weights at {target} and no url for '{name}' in the config; "
                            f"{_what_to_do(target)}")
        path = pull(url or "", target, sha256=sha256 if layers is None else None, layers=layers, rank0=rank0,
                    **pull_options)
    log(f"Model weights ready at: {path}{synthetic_note(_synthetic(path))}")
    return path


def _synthetic_here(full: str, layers, rank0: bool) -> str | None:
    """A synthetic file on disk that serves this node (the full file, or its slice), else None."""
    for path in [full] + ([slice_path(full, *layers)] if layers is not None else []):
        if os.path.exists(path) and _synthetic(path):
            try:
                if path == full:
                    verify(path)
                    if layers is not None:
                        slice_ok(path, *layers, False)
                else:
                    slice_ok(path, *layers, rank0)
                return path
            except PullError:
                pass        # damaged: pull() moves it aside and fetches the real file
    return None


def _older_slice(full: str, layers: tuple, rank0: bool, log) -> str | None:
    """A slice saved under the half-open name of older versions, if it holds this stage's blocks."""
    old = legacy_slice_path(full, *layers)
    if old == slice_path(full, *layers) or not os.path.exists(old) or os.path.exists(slice_path(full, *layers)):
        return None
    try:
        slice_ok(old, *layers, rank0)
    except PullError as e:
        log(f"{old} does not serve blocks {layers_text(*layers)} ({e}); leaving it alone")
        return None
    log(f"Using {old}: it holds blocks {layers_text(*layers)} (the half-open name of older versions; "
        f"today's name is {slice_path(full, *layers)})")
    return old
