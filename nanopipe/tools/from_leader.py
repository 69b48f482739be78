"""Get a stage's slice of the weights from the leader, over the cluster's own connection.

The worker's side of nanopipe/cluster/slices.py (the messages are drawn there). For blocks 6..11:

    SLICE_ASK {"layers": [6, 12]}  ->  SLICE_INFO {"filename": "model.safetensors", "size", "sha256"}
    the file is weights/model.layers-6-11.safetensors (config.weights_file, pull.slice_path)
    SLICE_FROM {"offset": what weights/model.layers-6-11.safetensors.part holds}  ->  SLICE_DATA ...

The part file is renamed into place only once the sha256 of its bytes is the one the leader
announced and it holds the blocks asked for. A cut connection resumes from the bytes on disk (the
leader's sha256 is kept beside the part, in `.part.sha256`, so a part begun for other bytes is
started again); a wrong checksum deletes the part, says so and fetches once more from byte 0.
A leader that breaks the protocol (a name with a path, more bytes than it announced, bytes out of
order) is refused at once and nothing is written outside weights/.
"""
from __future__ import annotations

import hashlib
import os
import string
import time

from ..cluster.net import dial
from ..cluster.slices import MAX_CHUNK_BYTES
from ..cluster.wire import ConnectionClosed, Msg, ProtocolError, TruncatedFrame, WireError, recv_frame, send_frame
from ..config import WEIGHTS_DIR, ConfigError, weights_file
from ..partition import layers_text
from .pull import Progress, PullError, check_space, disk_errors, mb, part_size, sha256_of, slice_ok, slice_path

ATTEMPTS = 4             # connections one fetch may use: a cut one is resumed up to 3 times
READ_TIMEOUT_S = 60.0    # a leader silent this long mid-transfer is given up on (and the transfer resumed)
INFO_TIMEOUT_S = 600.0   # its first answer may wait for one read of the slice (its sha256): 2 GB off an SD card


class NothingThere(PullError):
    """The node holds no file with the blocks asked for (its message says where it looked). `peers`:
    the nodes it names to ask instead (a leader's workers that are up), each (rank, ip, port)."""

    def __init__(self, message: str, peers: list = ()):
        super().__init__(message)
        self.peers = list(peers)


def named_peers(said) -> list:
    """The peers a no_slice answer names, as (rank, ip, port); entries that are not that are left out
    (a node's word is only a hint: each peer is asked, and checked, like the leader).

        [{"rank": 2, "ip": "10.0.0.3", "port": 5002}, {"rank": "x"}] -> [(2, "10.0.0.3", 5002)]
    """
    out = []
    for p in said if isinstance(said, list) else []:
        if not isinstance(p, dict):
            continue
        rank, ip, port = p.get("rank"), p.get("ip"), p.get("port")
        if (type(rank) is int and type(port) is int and 0 < port < 65536 and isinstance(ip, str)
                and 0 < len(ip) <= 255 and ip.isprintable()):
            out.append((rank, ip, port))
    return out[:64]


class _Cut(Exception):
    """The connection broke off mid-transfer: resume."""


class _Mismatch(Exception):
    """The assembled part's sha256 is not the leader's (the part is deleted)."""


def fetch_from_leader(host: str, port: int, lo: int, hi: int, *, token: str | None, tls=None,
                      folder: str = WEIGHTS_DIR, log=print, attempts: int = ATTEMPTS, progress: bool = True,
                      where: str | None = None, filename: str | None = None) -> str:
    """Blocks lo..hi-1 as a slice file in `folder`, fetched from the node at host:port; its path.

        fetch_from_leader("10.0.0.1", 65432, 6, 12, token=...)  ->  "weights/model.layers-6-11.safetensors"

    Raises NothingThere if the node holds no file with those blocks, PullError for anything else
    (unreachable, a lying node, a checksum wrong twice), with a message saying what to do.
    `progress`: a progress line on stderr, as `nanopipe pull` draws. `where`: the node in messages
    (a worker asked instead of the leader: "worker 1 at 10.0.0.2:5001"). `filename`: the model's file
    name to store the slice under (slice_path), instead of the one the node sends.
    """
    where = where or f"the leader at {host}:{port}"
    mismatches = 0
    for attempt in range(1, attempts + 1):
        try:
            path = _attempt(host, port, lo, hi, token=token, tls=tls, folder=folder, log=log, where=where,
                            progress=progress, filename=filename)
        except _Cut as e:
            if attempt == attempts:
                raise PullError(f"the transfer of blocks {layers_text(lo, hi)} from {where} kept breaking off "
                                f"({e}); what arrived is kept, run the same command again to resume") from None
            log(f"The transfer from {where} broke off ({e}); resuming")
            time.sleep(min(2.0, 0.2 * attempt))
            continue
        except _Mismatch as e:
            mismatches += 1
            if mismatches == 2 or attempt == attempts:
                raise PullError(f"{e}, twice: the file was deleted; check the leader's disk and the network, or "
                                "copy the slice to this machine") from None
            log(f"{e}: deleted it, fetching it again from byte 0")
            continue
        return path
    raise AssertionError("unreachable")


def _attempt(host, port, lo, hi, *, token, tls, folder, log, where, progress, filename=None) -> str:
    try:
        sock, _, _ = dial(host, port, role="weights", token=token, tls=tls, attempts=3,
                          who="leader" if where.startswith("the leader") else "node")
    except WireError as e:
        raise PullError(f"cannot fetch blocks {layers_text(lo, hi)} from {where}: {e}") from None
    except OSError as e:
        raise _Cut(str(e)) from None
    part = None
    try:
        sock.settimeout(INFO_TIMEOUT_S)
        send_frame(sock, Msg.SLICE_ASK, {"layers": [lo, hi]})
        info = recv_frame(sock, where, max_payload=0)
        sock.settimeout(READ_TIMEOUT_S)
        if info.msg is Msg.ERROR and info.meta.get("code") == "no_slice":
            raise NothingThere(str(info.meta.get("message") or f"{where} holds no file with blocks "
                                                            f"{layers_text(lo, hi)}")[:300],
                               named_peers(info.meta.get("peers")))
        if info.msg is not Msg.SLICE_INFO:
            raise ProtocolError(f"{where} answered SLICE_ASK with {info.msg.name} {str(info.meta)[:120]}")
        dest, size, sha = _checked_info(dict(info.meta, **({"filename": filename} if filename else {})), lo, hi,
                                        folder, where)
        if os.path.exists(dest) and sha256_of(dest) == sha:
            log(f"{dest} is already here, the very bytes {where} would send")
            return dest
        part = dest + ".part"
        with disk_errors(part, size):
            os.makedirs(folder, exist_ok=True)      # the name is checked: it lies in `folder`
            have = _resumable(part, sha, size)
            check_space(part, size - have)
        send_frame(sock, Msg.SLICE_FROM, {"offset": have})
        log(f"Fetching blocks {layers_text(lo, hi)} from {where}: {mb(size)} into {dest}"
            + (f", resuming at byte {have} ({mb(have)} already here)" if have else ""))
        started, pos = time.monotonic(), have
        digest = _sha256_of_first(part, have)     # the bytes already here, then each chunk as it is written
        bar = Progress(size, have, enabled=progress)
        try:
            with open(part, "ab") as f:
                while pos < size:
                    pos = _receive(sock, f, pos, size, where, part, digest)
                    bar.update(pos - bar.done)
        finally:
            bar.finish()
        took = time.monotonic() - started
        log(f"Received {pos - have} bytes from {where} in {took:.1f}s"
            + (f" ({(pos - have) / max(took, 1e-6) / 1e6:.0f} MB/s)" if pos > have else ""))
    except (ConnectionClosed, TruncatedFrame, OSError) as e:
        kept = f"; {part_size(part)} bytes kept in {part}" if part else ""
        raise _Cut(f"{e}{kept}") from None
    except ProtocolError as e:
        raise PullError(f"refusing what {where} sent: {e}; nothing was renamed into place") from None
    except WireError as e:
        raise PullError(f"fetching blocks {layers_text(lo, hi)} from {where}: {e}") from None
    finally:
        sock.close()
    got = digest.hexdigest()
    if got != sha:
        _forget(part)
        raise _Mismatch(f"{part}: its sha256 is {got}, not the {sha} {where} computed over the bytes it sent "
                        "(a byte changed on the way or on disk)")
    try:
        header = slice_ok(part, lo, hi, rank0=False)
    except PullError as e:
        _forget(part)
        raise PullError(f"refusing the slice {where} sent: {e}; deleted it") from None
    end = max((t.end for t in header.tensors.values()), default=header.data_start)
    if end != size:
        _forget(part)
        raise PullError(f"refusing the slice {where} sent: it announced {size} bytes but the file's own header "
                        f"says {end}; deleted it")
    os.replace(part, dest)
    _forget_mark(part)
    return dest


def _checked_info(meta: dict, lo: int, hi: int, folder: str, where: str) -> tuple:
    """(dest, size, sha256) from a SLICE_INFO, each checked; a lie is a ProtocolError."""
    try:
        full = weights_file(meta.get("filename"), folder, what=f"the weights file name {where} sent")
    except ConfigError as e:
        raise ProtocolError(str(e)) from None
    size, sha = meta.get("size"), meta.get("sha256")
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 8):
        raise ProtocolError(f"SLICE_INFO size {str(size)[:40]!r} is not a file size")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in string.hexdigits for c in sha)):
        raise ProtocolError(f"SLICE_INFO sha256 {str(sha)[:80]!r} is not 64 hex digits")
    return slice_path(full, lo, hi), size, sha.lower()


def _receive(sock, f, pos: int, size: int, where: str, part: str, digest) -> int:
    """One SLICE_DATA frame, checked (its offset is where we are, it ends by `size`), appended to f."""
    frame = recv_frame(sock, where, max_payload=MAX_CHUNK_BYTES)
    if frame.msg is Msg.ERROR:
        raise ProtocolError(f"{where} stopped sending: {str(frame.meta.get('message'))[:200]}")
    if frame.msg is not Msg.SLICE_DATA:
        raise ProtocolError(f"expected SLICE_DATA, got {frame.msg.name}")
    if frame.meta.get("offset") != pos or not frame.payload:
        raise ProtocolError(f"SLICE_DATA for byte {str(frame.meta.get('offset'))[:20]} with {len(frame.payload)} "
                            f"bytes, but the file continues at byte {pos}")
    if pos + len(frame.payload) > size:
        raise ProtocolError(f"more bytes than the {size} it announced (a frame ends at byte "
                            f"{pos + len(frame.payload)})")
    with disk_errors(part, size):
        f.write(frame.payload)
        f.flush()
    digest.update(frame.payload)
    return pos + len(frame.payload)


def _sha256_of_first(path: str, n: int, chunk: int = 1 << 20):
    """A running sha256 of the first n bytes of path (n = 0: of nothing yet)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0:
            block = f.read(min(chunk, n))
            if not block:
                break
            h.update(block)
            n -= len(block)
    return h


def _resumable(part: str, sha: str, size: int) -> int:
    """How many bytes of `part` belong to the slice whose sha256 is `sha` (0: start afresh)."""
    mark = part + ".sha256"
    try:
        with open(mark) as m:
            begun_for = m.read().strip()
    except OSError:
        begun_for = None
    have = part_size(part)
    if begun_for != sha or have > size:
        with open(part, "wb"):
            pass
        with open(mark, "w") as m:
            m.write(sha + "\n")
        return 0
    return have


def _forget(part: str):
    for p in (part, part + ".sha256"):
        try:
            os.remove(p)
        except OSError:
            pass


def _forget_mark(part: str):
    try:
        os.remove(part + ".sha256")
    except OSError:
        pass
