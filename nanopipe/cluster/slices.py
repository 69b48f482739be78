"""A node serves a worker its slice of the weights, over the cluster's own authenticated connection.

The model crosses the internet once, to the leader; a worker with no file and no internet
(`nanopipe join --leader HOST:PORT` on a bare Pi) gets exactly its blocks from it over the LAN:

    worker                                             leader (any node holding the blocks)
      dials with role "weights": CHALLENGE / HELLO / WELCOME, each side proving the token (net.py)
      SLICE_ASK  {"layers": [6, 12]}              ->
                                                  <-  SLICE_INFO {"filename": "model.safetensors",
                                                                  "size": 170126464, "sha256": "9f2c..."}
      SLICE_FROM {"offset": 52428800}             ->      (what its .part file already holds, else 0)
                                                  <-  SLICE_DATA {"offset": 52428800} + 262144 bytes
                                                  <-  SLICE_DATA {"offset": 52690944} + 262144 bytes
                                                      ... until "size"; then the worker hangs up
    (a node that holds no file with blocks 6..11 answers SLICE_ASK with ERROR {"code": "no_slice"};
     the leader's also lists the workers that are up, "peers": [{"rank": 2, "ip": ..., "port": ...}],
     and the worker asks each at its data port, where a worker answers role "weights" the same way
     from the files its blocks were loaded from: cluster/data_path.py)

Why the leader names peers rather than the blocks each holds: what it knows of a worker is the plan's
range, which during a re-plan is the new one (not what is on disk), and a worker's file may hold
more than it loaded (the whole model). Asking is cheap (a header read) and each node knows its files.

The bytes are a slice file in the usual layout, what `nanopipe pull --layers 6-11` writes: a
safetensors header listing only the stage's tensors, then their bytes, cut here from the node's own
file (only those tensors are read). "sha256" is the node's, over exactly those bytes; the worker
checks it before the file is renamed into place (nanopipe/tools/from_leader.py is that side).
Frames stay far below MAX_PAYLOAD_BYTES: the data goes CHUNK_BYTES at a time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading

from .. import gpt2_tensors as gt
from ..config import WEIGHTS_DIR, ConfigError, weights_file
from ..decoding import is_int
from ..partition import layers_text
from ..safetensors_io import SafetensorsError, header_prefix, read_header
from ..weights import WeightsError, check_metadata, slice_metadata
from .net import close_now, welcome
from .wire import ConnectionClosed, Msg, ProtocolError, WireError, encode_frame, recv_frame, send_frame

CHUNK_BYTES = 256 * 1024         # one SLICE_DATA frame's payload
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # the most a worker accepts in one SLICE_DATA (a header claiming more is refused)
SOURCE = "a node of the cluster"   # a served slice's nanopipe_source: the same bytes whichever node cut it


class Slice:
    """What one slice file is, cut from `path`: its prefix (header), its tensors' byte ranges in
    `path` in the order they follow the prefix, its size and its sha256."""

    def __init__(self, path: str, tensors: list, prefix: bytes, sha256: str):
        self.path, self.tensors, self.prefix, self.sha256 = path, tensors, prefix, sha256
        self.size = len(prefix) + sum(t.nbytes for t in tensors)

    def pieces(self, offset: int, chunk: int | None = None):
        """The slice file's bytes from `offset` on, at most `chunk` at a time, read from `path`:

            prefix (header)  |  tensor 0's bytes  |  tensor 1's bytes  | ...
            0 ........... len(prefix) ................................ size
        """
        chunk = chunk or CHUNK_BYTES
        if offset < len(self.prefix):
            yield self.prefix[offset:]
            offset = len(self.prefix)
        at = len(self.prefix)           # where the current tensor starts in the slice file
        with open(self.path, "rb") as f:
            for t in self.tensors:
                if offset < at + t.nbytes:
                    f.seek(t.begin + (offset - at))
                    left = at + t.nbytes - offset
                    while left:
                        piece = f.read(min(chunk, left))
                        if not piece:
                            raise OSError(f"{self.path} ends inside tensor {t.name} (it changed while "
                                          "it was being served)")
                        left -= len(piece)
                        offset += len(piece)
                        yield piece
                at += t.nbytes


_cut: dict = {}                 # (file identity, lo, hi) -> Slice: the sha256 is read once per file version
_cut_lock = threading.Lock()


def cut(path: str, lo: int, hi: int) -> Slice | None:
    """The slice of blocks lo..hi-1 that `path` can give (all its tensors there), or None.

    The sha256 costs one read of the slice: it is kept while the file's size and mtime stay the same.
    """
    try:
        st = os.stat(path)
        header = read_header(path)
        check_metadata(header, path)
    except (OSError, SafetensorsError, WeightsError):
        return None
    names = {gt.base_name(n) for n in header.tensors}
    if not set(range(lo, hi)) <= set(gt.block_indices(names)):
        return None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, lo, hi)
    with _cut_lock:
        if key in _cut:
            return _cut[key]
    tensors = sorted((t for t in header.tensors.values() if gt.stage_needs(t.name, lo, hi, rank0=False)),
                     key=lambda t: t.begin)
    prefix = header_prefix([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors],
                           slice_metadata(header, SOURCE, lo, hi))
    s = Slice(path, tensors, prefix, "")
    h = hashlib.sha256()
    for piece in s.pieces(0, 1 << 20):
        h.update(piece)
    s.sha256 = h.hexdigest()
    with _cut_lock:
        _cut[key] = s
    return s


def holding(own, filename: str | None, folder: str = WEIGHTS_DIR) -> list:
    """The files a node may cut slices from: the one(s) it runs on (`own`: a path or a list), the
    model's file in `folder`, and the slices of it there (weights/model.layers-4-7.safetensors), each once."""
    paths = [p for p in ([own] if isinstance(own, str) else list(own or ())) if p]
    try:
        full = weights_file(filename, folder) if filename else None
    except ConfigError:
        full = None
    if full:
        paths.append(full)
        root, ext = os.path.splitext(os.path.basename(full))
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        paths += [os.path.join(folder, n) for n in names if n.startswith(root + ".layers-") and n.endswith(ext)]
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen and os.path.isfile(p):
            seen.add(real)
            out.append(p)
    return out


def model_name(path: str) -> str:
    """The model's file name a slice file was cut from, as the asker names what it writes:
    "weights/model.layers-2-3.safetensors" -> "model.safetensors" (pull.slice_path's naming undone)."""
    return re.sub(r"\.layers-\d+-\d+(?=\.[^.]*$|$)", "", os.path.basename(path))


def _layers(meta) -> tuple:
    layers = meta.get("layers")
    if not (isinstance(layers, list) and len(layers) == 2 and all(is_int(v) for v in layers)
            and 0 <= layers[0] < layers[1]):
        raise ProtocolError(f"SLICE_ASK needs \"layers\": [lo, hi] with 0 <= lo < hi, got {str(layers)[:80]}")
    return tuple(layers)


def serve_slice(sock, peer: str, hello, own, source: dict | None, log, *, who: str = "the leader",
                peers=lambda: []) -> None:
    """Welcome a worker that dialed with role "weights" (`hello`: its HELLO, checked by net.accept)
    and answer its SLICE_ASK: the slice's name, size and sha256, then its bytes from the offset the
    worker asks for. `own`: the file (or files) this node runs on; `source`: the model's weights entry
    ({"filename": ...}), whose file and slices in weights/ serve too. `who`: this node, as the asker's
    messages name it; `peers()`: the nodes to ask instead when this one holds nothing for the range
    (the leader's workers that are up: [{"rank", "ip", "port"}]).
    Raises WireError / OSError when the worker sends nonsense or goes away (the caller logs it)."""
    welcome(sock, hello)
    ask = recv_frame(sock, f"worker at {peer}", max_payload=0)
    if ask.msg is not Msg.SLICE_ASK:
        raise ProtocolError(f"{peer}: expected SLICE_ASK on a weights connection, got {ask.msg.name}")
    lo, hi = _layers(ask.meta)
    filename = source.get("filename") if isinstance(source, dict) else None
    paths = holding(own, filename)
    s = next((s for s in map(lambda p: cut(p, lo, hi), paths) if s is not None), None)
    if s is None:
        log(f"A worker at {peer} asked for blocks {layers_text(lo, hi)}: no file here holds them "
            f"(looked in {', '.join(paths) or 'nothing'})")
        send_frame(sock, Msg.ERROR, {"code": "no_slice", "message": f"{who} holds no file with blocks "
                                     f"{layers_text(lo, hi)} (it looked in {', '.join(paths) or 'nothing'})",
                                     "peers": peers()})
        return
    name = filename or model_name(s.path)
    send_frame(sock, Msg.SLICE_INFO, {"filename": name, "layers": [lo, hi], "size": s.size, "sha256": s.sha256})
    start = recv_frame(sock, f"worker at {peer}", max_payload=0)
    offset = start.meta.get("offset")
    if start.msg is not Msg.SLICE_FROM or not (is_int(offset) and 0 <= offset <= s.size):
        raise ProtocolError(f"{peer}: expected SLICE_FROM {{\"offset\": 0..{s.size}}}, got {start.msg.name} "
                            f"{str(start.meta)[:80]}")
    log(f"Sending blocks {layers_text(lo, hi)} to the worker at {peer}: {s.size / 1e6:.1f} MB from {s.path}"
        + (f", resuming at byte {offset}" if offset else ""))
    try:
        for piece in s.pieces(offset):
            sock.sendall(encode_frame(Msg.SLICE_DATA, {"offset": offset}, piece))
            offset += len(piece)
    except (BrokenPipeError, ConnectionResetError) as e:
        log(f"The worker at {peer} hung up at byte {offset} of {s.size} ({e.strerror or e}); asked again, "
            "it resumes from what it has")
        return
    log(f"Sent blocks {layers_text(lo, hi)} to the worker at {peer}")


def serve_held(sock, peer: str, hello, stages, who: str, log) -> None:
    """A worker's data port answering role "weights": blocks cut from the files its `stages` (the one
    it runs, the next a re-plan gave it) were loaded from, as the leader serves them. Errors cost
    this connection only, and are logged."""
    own = [s.source for s in stages if s is not None and getattr(s, "source", None)]
    try:
        serve_slice(sock, peer, hello, own, None, log, who=who)
    except (WireError, OSError, ValueError) as e:
        if not isinstance(e, ConnectionClosed):
            log(f"Closed connection from {peer} (weights): {e}", logging.WARNING)
    finally:
        close_now(sock)
