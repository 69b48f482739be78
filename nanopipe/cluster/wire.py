"""The wire: how nanopipe nodes talk over plain TCP, one length-prefixed frame at a time.

TCP delivers a stream of bytes, not messages, so every message is framed. A frame is

    [20-byte header][meta: UTF-8 JSON object][payload: raw bytes]

and the header says how long the other two parts are:

    offset  size  field            type       value
    0       4     magic            4s         b"NPIP"
    4       1     version          u8         PROTOCOL_VERSION (2)
    5       1     message type     u8         a Msg, e.g. 6 = ACT
    6       2     flags            u16        0 (reserved)
    8       4     meta length      u32        bytes of JSON that follow the header
    12      8     payload length   u64        bytes of payload that follow the meta

all little-endian. For an ACT frame the payload is the activations, `ndarray.tobytes()` in
little-endian order, and the meta carries their dtype and shape. Worked example, one decode step of
gpt2-small (n_embd 768) for one session:

    meta    = {"sessions": [{"id": "s1", "pos": 7, "n": 1}], "dtype": "float32", "shape": [1, 768]}
    payload = 1 * 768 * 4 = 3072 bytes
    frame   = 20 + 74 (compact meta JSON) + 3072 = 3166 bytes, sent with one sendall

Nothing here unpickles: a peer can only make us parse JSON and copy bytes, and every length is
checked against a cap before anything is allocated. docs/PROTOCOL.md lists every message type.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import re
import secrets
import socket
import string
import struct
from dataclasses import dataclass

import numpy as np

from ..decoding import is_int
from ..logs import shown

# 2: each meaning its own message type (STATE, PLAN, START_INFERENCE, RING_JOINED, CAPACITY,
# GENERATE_BATCH took over meanings that STATUS, STATS, READY and GENERATE had carried in 1, told
# apart by their meta keys): a version-1 node would misread them, so the handshake refuses it
PROTOCOL_VERSION = 2
MAGIC = b"NPIP"
HEADER = struct.Struct("<4sBBHIQ")  # magic, version, msg type, flags, meta length, payload length
MAX_META_BYTES = 1024 * 1024              # 1 MiB: meta is small JSON (ids, sampling params, stats)
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024     # 256 MiB: a 1024-token gpt2-xl prefill is 6.5 MB

# dtype names allowed in an array frame's meta -> the little-endian numpy dtype they mean
DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float64": np.dtype("<f8"),         # TOP's maxima and logsumexps (a logprob is their difference)
}


class Msg(enum.IntEnum):
    """Message types, one meaning each; docs/PROTOCOL.md gives each one's direction, meta keys and
    payload. The control messages have a builder and a reader below ("one meaning each")."""
    HELLO = 1       # peer -> leader: role, rank, version, auth proof
    CHALLENGE = 2   # leader -> peer: nonce for HMAC auth
    WELCOME = 3     # leader -> peer: accepted (+ layer range, model info, next hop for a worker)
    REJECT = 4      # leader -> peer: reason
    READY = 5       # worker -> leader: slice loaded, data port listening
    ACT = 6         # activations of one or more sessions, round the ring
    FREE = 7        # free these sessions' KV caches at every stage
    GENERATE = 8    # client -> leader: one prompt + sampling params
    TOKEN = 9       # leader -> client: one token id + text piece
    DONE = 10       # leader -> client: stats
    ERROR = 11      # either way: message
    PING = 12
    PONG = 13
    STATS = 14      # worker -> leader: the heartbeat (rss, compute times)
    CANCEL = 15     # client -> leader
    STATUS = 16     # leader -> client: a request's status text, e.g. waiting for a rank to rejoin
    STATE_REQUEST = 17      # client -> leader: what is the cluster's state?
    STATE = 18              # leader -> client: the cluster's state (nodes, counters, placement)
    PLAN = 19               # leader -> worker: its place, once the leader has planned
    START_INFERENCE = 20    # leader -> worker: join the ring of `epoch` (dial the next hop)
    RING_JOINED = 21        # worker -> leader: it has dialed its next hop for the ring of `epoch`
    CAPACITY = 22           # worker -> leader: what the node measured of itself
    GENERATE_BATCH = 23     # client -> leader: several prompts to run as one batch
    SLICE_ASK = 24          # worker -> node holding the weights: which blocks (cluster/slices.py)
    SLICE_INFO = 25         # node -> worker: the slice file's name, size and sha256
    SLICE_FROM = 26         # worker -> node: send from this byte on (what its .part file already holds)
    SLICE_DATA = 27         # node -> worker: the slice file's bytes from "offset" on, one chunk per frame
    LEAVE = 28              # client -> leader: drain worker `rank` (`nanopipe leave`)
    LEFT = 29               # leader -> client: that worker is drained, the ring runs without it
    DRAINED = 30            # leader -> worker: the ring runs without you now; stop
    PARTIAL = 31            # member <-> member of a split stage: its partial sum of a block's c_proj
    LOGITS = 32             # the ring's last split stage -> rank 0 (and member -> member 0): logits rows
    TOP = 33                # the same, for greedy rows: each reduced to its max, argmax and logsumexp


class WireError(Exception):
    """Something went wrong on a connection; the message names the peer."""


class ProtocolError(WireError):
    """The peer sent bytes that are not a valid frame. Close this connection (only this one)."""


class TruncatedFrame(ProtocolError):
    """The peer closed the connection in the middle of a frame."""


class ConnectionClosed(WireError):
    """The peer closed the connection cleanly, between two frames."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its message type, its JSON meta, and the raw payload bytes after it
    (an ACT's (T, C) float32 rows; `frame_array` views them as an array without a copy)."""
    msg: Msg
    meta: dict
    payload: bytes


# ---------------------------------------------------------------------------------------------
# sending

def encode_frame(msg: Msg, meta: dict | None = None, payload: bytes | np.ndarray = b"") -> bytes:
    """Header + JSON meta + payload as one bytes object, ready for a single sendall.

    >>> len(encode_frame(Msg.PING))   # 20-byte header + b"{}"
    22

    An ndarray payload is sent as its little-endian, C-contiguous bytes; use `send_array` to also
    record its dtype and shape in the meta.
    """
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"{Msg(msg).name} meta must be a dict, got {type(meta).__name__}")
    try:
        meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError, ValueError) as e:   # a lone surrogate; nesting too deep
        raise WireError(f"{Msg(msg).name} meta cannot be sent as UTF-8 JSON: {type(e).__name__}: {e}") from None
    if len(meta_bytes) > MAX_META_BYTES:
        raise WireError(f"{Msg(msg).name} meta is {len(meta_bytes)} bytes, over the "
                        f"{MAX_META_BYTES}-byte limit; send bulk data as the payload")
    if isinstance(payload, np.ndarray):
        payload = _array_bytes(payload)
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg), 0, len(meta_bytes), len(payload))
    return b"".join((header, meta_bytes, payload))


def _array_bytes(array: np.ndarray) -> bytes:
    little = array.dtype.newbyteorder("<")   # '<' for multi-byte dtypes, no-op for 1-byte ones
    return np.ascontiguousarray(array, dtype=little).tobytes()


def array_meta(array: np.ndarray, meta: dict | None = None) -> dict:
    """`meta` plus the "dtype" and "shape" keys that `frame_array` rebuilds the array from."""
    name = array.dtype.name   # byte order is not part of the name: '>f4' is "float32" too
    if name not in DTYPES:
        raise WireError(f"cannot send a {array.dtype} array; allowed dtypes: {', '.join(DTYPES)}")
    return {**(meta or {}), "dtype": name, "shape": list(array.shape)}


def send_frame(sock: socket.socket, msg: Msg, meta: dict | None = None,
               payload: bytes | np.ndarray = b"") -> None:
    sock.sendall(encode_frame(msg, meta, payload))


def send_array(sock: socket.socket, msg: Msg, meta: dict | None, array: np.ndarray) -> None:
    """Send `array` as the payload, with its dtype and shape added to the meta."""
    send_frame(sock, msg, array_meta(array, meta), array)


# ---------------------------------------------------------------------------------------------
# receiving

def recv_exact(sock: socket.socket, n: int, peer: str = "peer", at_boundary: bool = False,
               part: str = "frame") -> bytes:
    """Read exactly n bytes; `sock.recv` may return fewer than asked, so loop.

    If the peer closes before anything arrived and `at_boundary` is true (we were between frames),
    that is a clean close: ConnectionClosed. A close after some bytes is a TruncatedFrame.
    Socket errors (timeouts, resets) propagate as OSError; after one the stream is out of step, so
    close the connection.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0 and at_boundary:
                raise ConnectionClosed(f"{peer} closed the connection")
            raise TruncatedFrame(f"truncated frame from {peer}: connection closed in the {part}, "
                                 f"got {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, peer: str = "peer",
               max_payload: int = MAX_PAYLOAD_BYTES) -> Frame:
    """Read one frame. The header is checked before the meta or payload is allocated, so a peer
    that claims a 4 GB payload gets a ProtocolError, not a 4 GB bytearray."""
    header = recv_exact(sock, HEADER.size, peer, at_boundary=True, part="header")
    msg, meta_len, payload_len = _parse_header(header, peer, max_payload)
    meta = _parse_meta(recv_exact(sock, meta_len, peer, part="meta"), msg, peer)
    payload = recv_exact(sock, payload_len, peer, part="payload")
    return Frame(msg, meta, payload)


def decode_frame(data: bytes, peer: str = "buffer", max_payload: int = MAX_PAYLOAD_BYTES) -> Frame:
    """Parse one complete frame held in `data`, with the same checks as `recv_frame`."""
    if len(data) < HEADER.size:
        raise TruncatedFrame(f"truncated frame from {peer}: got {len(data)} of {HEADER.size} "
                             "header bytes")
    msg, meta_len, payload_len = _parse_header(data[:HEADER.size], peer, max_payload)
    total = HEADER.size + meta_len + payload_len
    if len(data) < total:
        raise TruncatedFrame(f"truncated frame from {peer}: got {len(data)} of {total} bytes")
    if len(data) > total:
        raise ProtocolError(f"{peer}: {len(data) - total} bytes after the end of a {total}-byte "
                            f"{msg.name} frame")
    meta = _parse_meta(data[HEADER.size:HEADER.size + meta_len], msg, peer)
    return Frame(msg, meta, bytes(data[HEADER.size + meta_len:]))


def _parse_header(header: bytes, peer: str, max_payload: int) -> tuple[Msg, int, int]:
    """Check a 20-byte header; returns (msg, meta length, payload length)."""
    magic, version, msg_type, flags, meta_len, payload_len = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"{peer}: bad magic {magic!r} (expected {MAGIC!r}); the peer is not a "
                            "nanopipe node, or the stream is out of step")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks protocol version {version}, this node speaks "
                            f"{PROTOCOL_VERSION}; run the same nanopipe version on every node")
    try:
        msg = Msg(msg_type)
    except ValueError:
        raise ProtocolError(f"{peer}: unknown message type {msg_type}") from None
    if flags != 0:
        raise ProtocolError(f"{peer}: {msg.name} frame has flags {flags:#06x}; flags are reserved "
                            f"and must be 0 in protocol version {PROTOCOL_VERSION}")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"{peer}: {msg.name} frame claims {meta_len} bytes of meta, over the "
                            f"{MAX_META_BYTES}-byte limit")
    if payload_len > max_payload:
        raise ProtocolError(f"{peer}: {msg.name} frame claims a {payload_len}-byte payload, over "
                            f"the {max_payload}-byte limit (raise max_payload if it is genuine)")
    return msg, meta_len, payload_len


# a JSON escape of a UTF-16 surrogate (\ud800 to \udfff): only then can a lone one hide in the meta
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_meta(raw: bytes, msg: Msg, peer: str) -> dict:
    """The meta's JSON object. Refused: bytes that are not UTF-8 JSON, nesting deeper than the
    parser's recursion limit, and strings with a lone surrogate (`"\\ud800"` is valid JSON but not
    text: it could never be sent on, so a request id like that would break its answer)."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{peer}: {msg.name} frame meta is not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise ProtocolError(f"{peer}: {msg.name} frame meta is nested too deeply to parse") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{peer}: {msg.name} frame meta must be a JSON object, "
                            f"got {type(meta).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{peer}: {msg.name} frame meta holds a lone UTF-16 surrogate "
                                "(a \\ud800-\\udfff escape not in a pair), which is not text") from None
        except RecursionError:
            raise ProtocolError(f"{peer}: {msg.name} frame meta is nested too deeply to parse") from None
    return meta


# ---------------------------------------------------------------------------------------------
# the handshake's proofs: each side shows it knows the cluster token without sending it
#
#   listener --CHALLENGE {nonce: A}-->  dialer           A, B: 32 fresh random bytes, as 64 hex digits
#   listener <--HELLO {proof: HMAC(token, A), nonce: B}--  dialer          (auth_proof)
#   listener --WELCOME {proof: HMAC(token, "nanopipe-acceptor" + A + B)}-->  dialer   (acceptor_proof)
#
# The two messages differ in length (32 bytes, 17 + 64 bytes) and a dialer signs only a 32-byte
# nonce, so one side's proof can never be passed off as the other's.

NONCE_BYTES = 32
ACCEPTOR_TAG = b"nanopipe-acceptor"


def make_nonce() -> str:
    """A fresh nonce (CHALLENGE's, or the dialer's in HELLO): 32 random bytes as 64 hex characters."""
    return secrets.token_hex(NONCE_BYTES)


def is_nonce(x) -> bool:
    """Exactly 64 hex digits, as make_nonce makes."""
    return isinstance(x, str) and len(x) == 2 * NONCE_BYTES and all(c in string.hexdigits for c in x)


def _hmac(token: str, message: bytes) -> str:
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def _nonce_bytes(nonce, what: str) -> bytes:
    if not is_nonce(nonce):
        raise ProtocolError(f"{what} nonce {str(nonce)[:80]!r} is not {2 * NONCE_BYTES} hex digits")
    return bytes.fromhex(nonce)


def auth_proof(token: str | None, nonce: str) -> str | None:
    """HELLO's "proof": HMAC-SHA256 keyed by the token over the CHALLENGE nonce's bytes, as hex.

    None when the cluster runs without a token. A new nonce per connection means a proof
    overheard on the network cannot be replayed.
    """
    if not token:
        return None
    return _hmac(token, _nonce_bytes(nonce, "CHALLENGE"))


def acceptor_proof(token: str | None, nonce: str, hello_nonce: str) -> str | None:
    """WELCOME's "proof": the listening side's answer to the dialer's own nonce, HMAC-SHA256 keyed by
    the token over b"nanopipe-acceptor" + CHALLENGE nonce + HELLO nonce. None without a token."""
    if not token:
        return None
    return _hmac(token, ACCEPTOR_TAG + _nonce_bytes(nonce, "CHALLENGE") + _nonce_bytes(hello_nonce, "HELLO"))


def _same(proof, expected: str) -> bool:
    # compare_digest raises TypeError on a non-ASCII str: such a proof is simply wrong
    return isinstance(proof, str) and proof.isascii() and hmac.compare_digest(proof, expected)


def proof_ok(token: str | None, nonce: str, proof) -> bool:
    """Does HELLO's proof match? Always true when the cluster has no token."""
    if not token:
        return True
    return _same(proof, auth_proof(token, nonce))


def acceptor_proof_ok(token: str | None, nonce: str, hello_nonce: str, proof) -> bool:
    """Does WELCOME's proof match? Always true when this side has no token (nothing to check with)."""
    if not token:
        return True
    return _same(proof, acceptor_proof(token, nonce, hello_nonce))


# ---------------------------------------------------------------------------------------------
# arrays and sessions in a frame

def frame_array(frame: Frame, expect_cols: int | None = None, peer: str = "peer") -> np.ndarray:
    """Rebuild the array a peer sent with `send_array`, without copying the payload.

    The array is a read-only view of `frame.payload`; numpy ops like `x + y` make new arrays,
    so only in-place writes (`x += y`) need a `.copy()` first.

    >>> f = decode_frame(encode_frame(Msg.ACT, {"dtype": "float32", "shape": [2, 3]},
    ...                               np.arange(6, dtype=np.float32)))
    >>> frame_array(f, expect_cols=3)
    array([[0., 1., 2.],
           [3., 4., 5.]], dtype=float32)
    """
    what = f"{peer}: {frame.msg.name} frame"
    name = frame.meta.get("dtype")
    if not isinstance(name, str) or name not in DTYPES:     # a list here must not raise TypeError
        raise ProtocolError(f"{what} has dtype {name!r}; allowed: {', '.join(DTYPES)}")
    shape = frame.meta.get("shape")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ProtocolError(f"{what} has shape {shape!r}; expected a list of non-negative ints")
    dtype = DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(frame.payload):
        raise ProtocolError(f"{what} says {name} {shape} ({expected} bytes) but carries "
                            f"{len(frame.payload)} payload bytes")
    if expect_cols is not None and (not shape or shape[-1] != expect_cols):
        raise ProtocolError(f"{what} has rows of width {shape[-1] if shape else None} but this "
                            f"model has n_embd={expect_cols}; do all nodes run the same model?")
    return np.frombuffer(frame.payload, dtype=dtype).reshape(shape)


def act_sessions(frame: Frame, peer: str = "peer") -> list[dict]:
    """Check an ACT frame's "sessions" list against its rows; returns the list.

    The rows of the payload are the rows of each listed session concatenated in order:

        sessions [{"id": "a", "pos": 0, "n": 5}, {"id": "b", "pos": 9, "n": 1}], shape [6, 768]
        -> rows 0-4 are session a's prompt (positions 0-4), row 5 is session b's next token (pos 9)
    """
    what = f"{peer}: {frame.msg.name} frame"
    sessions = frame.meta.get("sessions")
    if not isinstance(sessions, list) or not sessions:
        raise ProtocolError(f"{what} needs a non-empty \"sessions\" list, got {sessions!r}")
    for s in sessions:
        if not (isinstance(s, dict) and isinstance(s.get("id"), str) and _is_count(s.get("pos"))
                and _is_count(s.get("n")) and s["n"] > 0):
            raise ProtocolError(f"{what} has a bad session entry {s!r}; expected "
                                "{\"id\": str, \"pos\": int >= 0, \"n\": int >= 1}")
    ids = [s["id"] for s in sessions]
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{what} lists a session twice: {ids}")
    shape = frame.meta.get("shape")
    rows = shape[0] if isinstance(shape, list) and shape else None
    if sum(s["n"] for s in sessions) != rows:
        raise ProtocolError(f"{what}: sessions hold {sum(s['n'] for s in sessions)} rows "
                            f"but the array has shape {shape!r}")
    return sessions


def _is_count(x) -> bool:
    return is_int(x) and x >= 0


# ---------------------------------------------------------------------------------------------
# the control messages, one meaning each: a builder gives (Msg, meta) to send,
#
#     send_frame(sock, *start_inference(epoch))
#
# and a reader checks a received frame of that type and returns what it says, or raises
# ProtocolError naming the peer and what is wrong (the receiver closes that connection).

def _need(frame: Frame, peer: str, key: str, ok, expected: str):
    v = frame.meta.get(key)
    if not ok(v):
        raise ProtocolError(f"{peer}: {frame.msg.name} has {key} {shown(v)}; expected {expected}")
    return v


def state_request() -> tuple:
    """client -> leader: ask for the cluster's state (answered by STATE)."""
    return Msg.STATE_REQUEST, {}


def state(status: dict) -> tuple:
    """leader -> client: the cluster's state, Leader.status() (every node, counters, placement)."""
    return Msg.STATE, status


def status_text(request, session: str, text: str) -> tuple:
    """leader -> client: how a request is doing, e.g. "waiting for rank 2 to join (at most 60s)"."""
    return Msg.STATUS, {"request": request, "session": session, "text": text}


def read_status_text(frame: Frame) -> str:
    """A STATUS's text ("" if it carries none a person could read)."""
    text = frame.meta.get("text")
    return text if isinstance(text, str) else ""


def generate_batch(shared: dict, items: list) -> tuple:
    """client -> leader: several generations run as one batch; `items` [{"request", "prompt_ids",
    optional "seed"}, ...], `shared`: the fields every item has (sampling, echo, text, ...)."""
    return Msg.GENERATE_BATCH, {**shared, "batch": items}


def plan(place: dict) -> tuple:
    """leader -> worker: its place once planned: {"layers", "next", "next_rank", "prev_rank"}, or
    {"layers": [h, h], "excluded": why, "prev_rank": None} for a worker the plan leaves out."""
    return Msg.PLAN, dict(place)


def read_plan(frame: Frame, peer: str = "leader") -> dict:
    """A PLAN's place, checked: layers [lo, hi]; unless excluded, next [host, port]."""
    _need(frame, peer, "layers", lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v),
          "[lo, hi]: two ints")
    if not frame.meta.get("excluded") and frame.meta.get("prev_rank", 0) is not None:   # a later member: no next
        _need(frame, peer, "next", lambda v: isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
              and is_int(v[1]), "[host, port]")
    return dict(frame.meta)


def start_inference(epoch: int, layers: list | None = None) -> tuple:
    """leader -> worker: the guide's start_inference command: join the ring of `epoch` by dialing
    your next hop (for a new ring, after a rebuild too), running `layers` [lo, hi] (the slice that
    ring is built for: after a re-plan, the new one); answered by RING_JOINED."""
    return Msg.START_INFERENCE, {"epoch": epoch, **({"layers": list(layers)} if layers is not None else {})}


def read_ring_layers(frame: Frame, peer: str = "leader") -> list | None:
    """START_INFERENCE's `layers` [lo, hi], or None when it names none (any slice held will do)."""
    if frame.meta.get("layers") is None:
        return None
    return _need(frame, peer, "layers", lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v),
                 "[lo, hi]: two ints")


def ring_joined(rank: int, epoch: int) -> tuple:
    """worker -> leader: it has dialed its next hop for the ring of `epoch`."""
    return Msg.RING_JOINED, {"rank": rank, "epoch": epoch}


def read_epoch(frame: Frame, peer: str = "peer") -> int:
    """START_INFERENCE's or RING_JOINED's ring epoch."""
    return _need(frame, peer, "epoch", is_int, "an int")


def ready(rank: int, data_port: int, synthetic: bool, layers: list, prefix_cache_bytes: int,
          lm_head_missing: str | None = None) -> tuple:
    """worker -> leader: its slice (`layers`) is loaded and its data port listens; `synthetic`: the
    weights are random; `prefix_cache_bytes`: its budget for kept caches; `lm_head_missing`: why it
    holds no share of the LM head although its place says its split stage runs the head (then rank
    0 runs it: the leader asks the stage for no logits)."""
    meta = {"rank": rank, "data_port": data_port, "synthetic": synthetic, "layers": list(layers),
            "prefix_cache_bytes": prefix_cache_bytes}
    if lm_head_missing is not None:
        meta["lm_head_missing"] = lm_head_missing
    return Msg.READY, meta


MISSING_WHY_CHARS = 500     # the longest reason a READY's lm_head_missing is shown with


def read_ready(frame: Frame) -> dict:
    """What a READY says that the leader uses: {"synthetic": True/False/None, "prefix_cache_bytes":
    int >= 0 or None, "lm_head_missing": why (text) or None}; a value of the wrong kind counts as
    not said, except a reason that is not text: the share is missing all the same, the reason unknown."""
    synthetic = frame.meta.get("synthetic")
    budget = frame.meta.get("prefix_cache_bytes")
    missing = frame.meta.get("lm_head_missing")
    if missing is not None:
        missing = (missing[:MISSING_WHY_CHARS] if isinstance(missing, str) and missing and missing.isprintable()
                   else "it gave no readable reason")
    return {"synthetic": synthetic if isinstance(synthetic, bool) else None,
            "prefix_cache_bytes": budget if is_int(budget) and budget >= 0 else None,
            "lm_head_missing": missing}


def capacity(rank: int, figures: dict) -> tuple:
    """worker -> leader: what the node measured (placement.Capacity.as_dict), once, after WELCOME."""
    return Msg.CAPACITY, {"rank": rank, "capacity": figures}


def read_capacity(frame: Frame):
    """A CAPACITY's figures, as sent: placement.Capacity.from_dict checks each (a bad one counts as unknown)."""
    return frame.meta.get("capacity")


def leave(rank: int) -> tuple:
    """client -> leader: drain worker `rank` (`nanopipe leave`, POST /cluster/leave); answered by
    LEFT once the ring runs without it, or by ERROR (kind "invalid") saying why it cannot leave."""
    return Msg.LEAVE, {"rank": rank}


def read_leave(frame: Frame):
    """LEAVE's rank, as sent (the leader checks it is a worker of its cluster, and says so if not)."""
    return frame.meta.get("rank")


def left(rank: int, message: str) -> tuple:
    """leader -> client: `rank` is drained; `message` says what the ring is now."""
    return Msg.LEFT, {"rank": rank, "message": message}


def drained(reason: str) -> tuple:
    """leader -> worker: the ring runs without you now (you were drained): stop."""
    return Msg.DRAINED, {"reason": reason}
