"""The safetensors file format, read and written with numpy and the standard library.

A worker on a Raspberry Pi needs nothing but numpy to read its slice, so nanopipe reads the format
itself (it is tiny) instead of importing a library for it. The file is:

    [8 bytes: N, little-endian u64][N bytes: JSON header][data: raw little-endian tensor bytes]

and the header maps each tensor name to its dtype, shape and [begin, end) byte offsets relative to
the start of the data section, plus an optional "__metadata__" dict of str -> str:

    {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]}, ...}

The tests check that files written here load with the official `safetensors` package and back.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from .logs import shown

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own cap

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
NUMPY_TO_DTYPE = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
                  np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16",
                  np.dtype("i1"): "I8", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, from the header: name, dtype, shape, byte range."""
    name: str
    dtype: str           # safetensors dtype string, e.g. "F32"
    shape: tuple
    begin: int           # absolute byte offset in the file
    end: int             # absolute byte offset in the file (exclusive)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: every tensor's TensorInfo, the metadata, where the data starts."""
    tensors: dict        # name -> TensorInfo
    metadata: dict       # the "__metadata__" dict (str -> str), {} if absent
    data_start: int      # 8 + header length
    file_size: int | None = None


def parse_header(prefix: bytes, source: str, file_size: int | None = None) -> Header:
    """Parse a header from the first bytes of a file (at least 8 + N of them).

    `source` names the file or URL in error messages. When `file_size` is given, every tensor's
    byte range is checked to lie inside the file.
    """
    if len(prefix) < 8:
        raise SafetensorsError(f"{source}: too short to be a safetensors file ({len(prefix)} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{source}: header claims {n} bytes (max {MAX_HEADER_BYTES}); "
                               "not a safetensors file, or a corrupted one")
    if len(prefix) < 8 + n:
        raise SafetensorsError(f"{source}: truncated header (need {8 + n} bytes, have {len(prefix)})")
    try:
        raw = json.loads(prefix[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:      # ValueError: also an integer of 5000 digits
        raise SafetensorsError(f"{source}: header is not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise SafetensorsError(f"{source}: header is not a safetensors header (JSON nested too deep)") from None
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{source}: header is not a JSON object")
    data_start = 8 + n
    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{source}: __metadata__ must map names to strings, got {shown(metadata)}")
    tensors = {}
    for name, info in raw.items():
        tensors[name] = _tensor_info(name, info, data_start, source, file_size)
    _check_overlaps(tensors.values(), source)
    return Header(tensors, dict(metadata), data_start, file_size)


def _is_count(x) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 64.5 or 64.0)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(name: str, info, data_start: int, source: str, file_size: int | None) -> TensorInfo:
    """One header entry checked the way the safetensors format defines it, as a TensorInfo.

        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]} -> TensorInfo(name, "F32", (2, 3), ...)
    """
    what = f"{source}: tensor {shown(name)}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsError(f"{what} has a malformed header entry (want dtype, shape, data_offsets), "
                               f"got {shown(info)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        said = dtype[:40] if isinstance(dtype, str) else shown(dtype)
        raise SafetensorsError(f"{what} has unsupported dtype {said} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise SafetensorsError(f"{what}: shape must be a list of whole numbers >= 0, got {shown(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise SafetensorsError(f"{what}: data_offsets must be two whole numbers >= 0, got {shown(offsets)}")
    shape, (b, e) = tuple(shape), offsets
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if not b <= e or e - b != want:
        raise SafetensorsError(f"{what} {dtype}{shown(list(shape))} needs {want} bytes "
                               f"but its offsets are [{b}, {e})")
    if file_size is not None and data_start + e > file_size:
        raise SafetensorsError(f"{what} ends at byte {data_start + e} but the file "
                               f"has {file_size} bytes (truncated download?)")
    return TensorInfo(name, dtype, shape, data_start + b, data_start + e)


def _check_overlaps(infos, source: str) -> None:
    """No two tensors may share bytes (each one's bytes are its own, as the format requires)."""
    last = None
    for t in sorted(infos, key=lambda t: (t.begin, t.end)):
        if last is not None and t.begin < last.end and t.nbytes:
            raise SafetensorsError(f"{source}: tensors {shown(last.name)} and {shown(t.name)} overlap "
                                   f"(bytes [{last.begin}, {last.end}) and [{t.begin}, {t.end}))")
        if last is None or t.end >= last.end:
            last = t


def read_header(path: str) -> Header:
    """Read and check the header of a local file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head8 = f.read(8)
        if len(head8) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head8)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header claims {n} bytes but the file has {size}; "
                                   "not a safetensors file, or a truncated one")
        return parse_header(head8 + f.read(n), path, file_size=size)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Convert raw tensor storage to float32 once, at load time (float16 matmul is 30-130x slower)."""
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def read_tensor(f, info: TensorInfo, empty=np.empty) -> np.ndarray:
    """Read one tensor from an open file straight into a fresh array: one copy, no mmap.

    Reading with readinto() keeps peak memory at the size of what we keep (page cache is not RSS),
    where mmap + copy would count both the mapped pages and the copy. `empty(shape, dtype)` makes
    the array (the loader's: pages.Arena.empty, memory in 2 MB pages).
    """
    out = empty(tuple(info.shape), DTYPES[info.dtype])
    _read_into(f, info.begin, out, info.name)
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    return out


def _read_into(f, offset: int, out: np.ndarray, name: str):
    """Fill the C-contiguous array `out` with the bytes of the file from `offset` on."""
    f.seek(offset)
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < out.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise SafetensorsError(f"{getattr(f, 'name', '?')}: file ends inside tensor {name!r}")
        got += n


def read_part(f, info: TensorInfo, rows: tuple | None = None, cols: list | None = None,
              chunk_bytes: int = 4 << 20, order: str = "C", empty=np.empty) -> np.ndarray:
    """Rows r0..r1-1 of a 1-D or 2-D tensor, and of each row only the column ranges `cols` side by
    side, read without ever holding the whole tensor. A 1-D tensor is one row. Worked example, a
    (4, 6) tensor holding 0..23:

        read_part(f, info, rows=(1, 3))               -> [[6..11], [12..17]]        (2, 6)
        read_part(f, info, cols=[(0, 1), (4, 6)])     -> [[0, 4, 5], [6, 10, 11], ...]  (4, 3)

    Whole rows are one byte range, read straight into the result. Column ranges are strided: the
    rows pass through a buffer of about `chunk_bytes` (the whole tensor is read from the file, only
    its part is kept), so memory holds the part plus the buffer. order="F" lays the result out
    column-major (as the loader keeps block matrices) on the way, with no second copy. The result
    is made by `empty(shape, dtype, order=order)`, as read_tensor's.
    """
    shape = tuple(info.shape)
    if len(shape) not in (1, 2):
        raise SafetensorsError(f"tensor {info.name!r} has shape {list(shape)}: "
                               "only 1-D and 2-D tensors are read in parts")
    n_rows, n_cols = (1, shape[0]) if len(shape) == 1 else shape
    r0, r1 = rows if rows is not None else (0, n_rows)
    cols = list(cols) if cols is not None else [(0, n_cols)]
    if not (0 <= r0 <= r1 <= n_rows and all(0 <= a <= b <= n_cols for a, b in cols)):
        raise SafetensorsError(f"tensor {info.name!r} has shape {list(shape)}: rows {r0}..{r1} and columns "
                               f"{cols} do not lie inside it")
    dtype = DTYPES[info.dtype]
    width = sum(b - a for a, b in cols)
    out = empty((r1 - r0, width), dtype, order=order)           # (rows, its columns)
    row_bytes = n_cols * dtype.itemsize
    if cols == [(0, n_cols)] and out.flags.c_contiguous:
        _read_into(f, info.begin + r0 * row_bytes, out, info.name)
    else:
        step = max(1, chunk_bytes // max(1, row_bytes))
        buf = np.empty((min(step, r1 - r0), n_cols), dtype)    # (step, n_cols): a few whole rows
        for r in range(r0, r1, step):
            k = min(step, r1 - r)
            _read_into(f, info.begin + r * row_bytes, buf[:k], info.name)
            o = 0
            for a, b in cols:
                out[r - r0:r - r0 + k, o:o + b - a] = buf[:k, a:b]
                o += b - a
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    return out.reshape(-1) if len(shape) == 1 else out


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> int:
    """Write `tensors` (name -> ndarray) to `path` in safetensors format; returns the file size.

    Tensors are laid out in the order given; the header is padded with spaces to a multiple of 8
    bytes, as the reference writer does, so the data section is aligned.
    """
    entries, arrays = [], []
    for name, arr in tensors.items():
        # .reshape: ascontiguousarray turns a 0-d array (a scalar tensor, shape []) into shape [1]
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(np.shape(arr))
        if arr.dtype not in NUMPY_TO_DTYPE:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {arr.dtype}, which safetensors "
                                   "cannot store")
        entries.append((name, NUMPY_TO_DTYPE[arr.dtype], arr.shape, arr.nbytes))
        arrays.append(arr)
    prefix = header_prefix(entries, metadata or None)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(prefix)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
    return len(prefix) + sum(arr.nbytes for arr in arrays)


def header_prefix(entries, metadata: dict | None = None) -> bytes:
    """The first bytes of a file holding `entries` ((name, dtype, shape, nbytes), in the order
    their bytes follow): the 8-byte length and the JSON header, padded with spaces to a multiple
    of 8 bytes as the reference writer does, so the data section is aligned. A slice file (`pull
    --layers`, or a slice a node serves a worker) is this prefix, then its tensors' bytes streamed in.

        header_prefix([("b", "F32", (2,), 8)])
            -> (56).to_bytes(8, "little") + b'{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  '
    """
    header, offset = {}, 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob
