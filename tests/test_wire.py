"""The frame format: round trips through real sockets, and every kind of bad frame."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanopipe.cluster.wire as wire
from nanopipe.cluster.wire import (
    HEADER,
    MAX_META_BYTES,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    ConnectionClosed,
    Frame,
    Msg,
    ProtocolError,
    TruncatedFrame,
    WireError,
    act_sessions,
    auth_proof,
    decode_frame,
    encode_frame,
    frame_array,
    make_nonce,
    proof_ok,
    recv_exact,
    recv_frame,
    send_array,
    send_frame,
)

PEER = "worker 2 (10.0.0.3:65434)"


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def raw_header(magic=b"NPIP", version=PROTOCOL_VERSION, msg=int(Msg.PING), flags=0, meta_len=2,
               payload_len=0) -> bytes:
    return struct.pack("<4sBBHIQ", magic, version, msg, flags, meta_len, payload_len)


def send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send from another thread so a big frame cannot fill the socket buffer and deadlock."""
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    return t


# --- the header -------------------------------------------------------------------------------

def test_header_is_20_bytes_little_endian():
    assert HEADER.size == 20
    data = encode_frame(Msg.ACT, {}, b"\x01\x02\x03")
    assert data[:4] == b"NPIP"
    assert data[4] == PROTOCOL_VERSION
    assert data[5] == 6                                   # ACT
    assert data[6:8] == b"\x00\x00"                       # flags
    assert data[8:12] == (2).to_bytes(4, "little")        # b"{}"
    assert data[12:20] == (3).to_bytes(8, "little")
    assert data[20:] == b"{}\x01\x02\x03"


def test_act_frame_for_one_gpt2_small_token_is_20_plus_meta_plus_3072():
    meta = {"sessions": [{"id": "s1", "pos": 7, "n": 1}], "dtype": "float32", "shape": [1, 768]}
    x = np.random.default_rng(0).standard_normal((1, 768)).astype(np.float32)
    data = encode_frame(Msg.ACT, meta, x)
    meta_len = len(json.dumps(meta, separators=(",", ":")).encode())
    assert meta_len == 74      # the number docs/PROTOCOL.md quotes
    assert len(data) == 20 + meta_len + 3072 == 3166


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("msg", list(Msg))
def test_every_msg_round_trips_through_a_socket(pair, msg):
    a, b = pair
    meta = {"type": msg.name, "text": "héllo ✓", "n": [1, 2.5, None, True]}
    payload = bytes(range(256)) * 3 if msg == Msg.ACT else b""
    send_frame(a, msg, meta, payload)
    frame = recv_frame(b, peer=PEER)
    assert frame == Frame(msg, meta, payload)
    assert decode_frame(encode_frame(msg, meta, payload)) == frame


def test_empty_meta_and_payload(pair):
    a, b = pair
    send_frame(a, Msg.PING)
    assert recv_frame(b) == Frame(Msg.PING, {}, b"")


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(1, 768), (5, 3), (0, 768), (2, 3, 4), (7,), ()])
def test_arrays_round_trip_exactly(pair, dtype, shape):
    a, b = pair
    rng = np.random.default_rng(1)
    x = np.asarray(rng.standard_normal(shape) * 1000).astype(dtype)
    t = send_in_thread(a, encode_frame(Msg.ACT, {"dtype": dtype, "shape": list(shape)}, x))
    frame = recv_frame(b, peer=PEER)
    t.join()
    y = frame_array(frame, peer=PEER)
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    assert np.array_equal(x, y)


def test_send_array_adds_dtype_and_shape(pair):
    a, b = pair
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    send_array(a, Msg.ACT, {"sessions": [{"id": "s", "pos": 0, "n": 3}]}, x)
    frame = recv_frame(b)
    assert frame.meta == {"sessions": [{"id": "s", "pos": 0, "n": 3}], "dtype": "float32",
                          "shape": [3, 4]}
    assert np.array_equal(frame_array(frame, expect_cols=4), x)


def test_big_endian_and_strided_arrays_are_sent_as_little_endian_contiguous():
    x = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]     # big-endian, not contiguous
    data = encode_frame(Msg.ACT, {"dtype": "float32", "shape": [4, 3]}, x)
    assert data[-48:] == np.ascontiguousarray(x, dtype="<f4").tobytes()
    assert np.array_equal(frame_array(decode_frame(data)), x)


def test_several_frames_back_to_back_then_clean_close(pair):
    a, b = pair
    for i in range(3):
        send_array(a, Msg.ACT, {"i": i}, np.full((2, 8), i, dtype=np.float32))
    a.close()
    for i in range(3):
        f = recv_frame(b)
        assert f.meta["i"] == i and frame_array(f)[0, 0] == i
    with pytest.raises(ConnectionClosed, match="closed the connection"):
        recv_frame(b, peer=PEER)


def test_send_array_rejects_unsupported_dtype(pair):
    with pytest.raises(WireError, match="complex128"):
        send_array(pair[0], Msg.ACT, {}, np.zeros(3, dtype=complex))


def test_encode_rejects_oversize_meta_and_non_dict_meta():
    with pytest.raises(WireError, match="over the"):
        encode_frame(Msg.DONE, {"x": "a" * MAX_META_BYTES})
    with pytest.raises(TypeError, match="must be a dict"):
        encode_frame(Msg.DONE, ["not", "a", "dict"])


# --- one sendall per frame ----------------------------------------------------------------------

class RecordingSocket:
    """Records each sendall's bytes; a bare send() fails the test (a frame must go out whole)."""

    def __init__(self):
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))

    def send(self, data):
        raise AssertionError("use sendall")


def test_a_frame_goes_out_in_one_sendall():
    sock = RecordingSocket()
    x = np.ones((4, 768), dtype=np.float32)
    send_array(sock, Msg.ACT, {"sessions": [{"id": "a", "pos": 0, "n": 4}]}, x)
    send_frame(sock, Msg.FREE, {"sessions": ["a"]})
    assert len(sock.sent) == 2
    assert decode_frame(sock.sent[0]).payload == x.tobytes()
    assert decode_frame(sock.sent[1]).meta == {"sessions": ["a"]}


# --- truncation and close -----------------------------------------------------------------------

class ChunkSocket:
    """Hands out `data` a few bytes per recv_into, then b"" (closed), like a slow real peer."""

    def __init__(self, data: bytes, chunk: int = 7):
        self.data, self.chunk, self.pos = data, chunk, 0

    def recv_into(self, view, n):
        k = min(n, self.chunk, len(self.data) - self.pos)
        view[:k] = self.data[self.pos:self.pos + k]
        self.pos += k
        return k


def test_recv_exact_loops_over_short_reads():
    data = bytes(range(100))
    assert recv_exact(ChunkSocket(data, chunk=3), 100) == data


def test_recv_frame_over_short_reads():
    data = encode_frame(Msg.ACT, {"dtype": "int32", "shape": [9]}, np.arange(9, dtype=np.int32))
    frame = recv_frame(ChunkSocket(data, chunk=5))
    assert frame_array(frame).tolist() == list(range(9))


FULL = encode_frame(Msg.ACT, {"dtype": "float32", "shape": [1, 768]}, np.zeros((1, 768), np.float32))
META_LEN = len(FULL) - 20 - 3072


@pytest.mark.parametrize("cut, part", [
    (1, "header"), (19, "header"), (20 + 3, "meta"), (20 + META_LEN + 1, "payload"),
    (len(FULL) - 1, "payload"),
])
def test_close_mid_frame_is_a_truncated_frame(pair, cut, part):
    a, b = pair
    a.sendall(FULL[:cut])
    a.close()
    message = f"truncated frame from {re.escape(PEER)}.*in the {part}"
    with pytest.raises(ProtocolError, match=message) as e:
        recv_frame(b, peer=PEER)
    assert isinstance(e.value, TruncatedFrame)
    assert "got" in str(e.value) and " of " in str(e.value)


def test_clean_close_between_frames_is_connection_closed(pair):
    a, b = pair
    a.close()
    with pytest.raises(ConnectionClosed, match=re.escape(PEER)):
        recv_frame(b, peer=PEER)


def test_connection_closed_is_not_a_protocol_error():
    assert not issubclass(ConnectionClosed, ProtocolError)
    assert issubclass(TruncatedFrame, ProtocolError) and issubclass(ProtocolError, WireError)


def test_decode_frame_truncated_and_trailing_bytes():
    with pytest.raises(TruncatedFrame, match="got 10 of 20 header bytes"):
        decode_frame(FULL[:10])
    with pytest.raises(TruncatedFrame, match=f"got {len(FULL) - 1} of {len(FULL)} bytes"):
        decode_frame(FULL[:-1])
    with pytest.raises(ProtocolError, match="2 bytes after the end"):
        decode_frame(FULL + b"xx")


# --- bad frames ---------------------------------------------------------------------------------

BAD_FRAMES = {
    "magic": (raw_header(magic=b"HTTP") + b"{}", "bad magic b'HTTP'"),
    "version": (raw_header(version=1) + b"{}", "protocol version 1, this node speaks 2"),
    "type 0": (raw_header(msg=0) + b"{}", "unknown message type 0"),
    "type 99": (raw_header(msg=99) + b"{}", "unknown message type 99"),
    "flags": (raw_header(flags=1) + b"{}", "flags are reserved"),
    "meta too big": (raw_header(meta_len=MAX_META_BYTES + 1), "bytes of meta, over the"),
    "4 GB payload": (raw_header(msg=int(Msg.ACT), payload_len=4 << 30) + b"{}",
                     "ACT frame claims a 4294967296-byte payload, over the"),
    "u64 max payload": (raw_header(payload_len=2**64 - 1) + b"{}", "payload, over the"),
    "bad json": (raw_header(meta_len=5) + b"{oops", "meta is not valid UTF-8 JSON"),
    "bad utf-8": (raw_header(meta_len=2) + b"\xff\xfe", "meta is not valid UTF-8 JSON"),
    "empty meta": (raw_header(meta_len=0), "meta is not valid UTF-8 JSON"),
    "list meta": (raw_header(meta_len=2) + b"[]", "must be a JSON object, got list"),
    "string meta": (raw_header(meta_len=4) + b'"hi"', "must be a JSON object, got str"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_raise_protocol_error_naming_the_peer(pair, name):
    data, message = BAD_FRAMES[name]
    a, b = pair
    a.sendall(data)
    with pytest.raises(ProtocolError, match=message) as e:
        recv_frame(b, peer=PEER)
    assert PEER in str(e.value)
    with pytest.raises(ProtocolError, match=message):
        decode_frame(data, peer=PEER)


def test_oversize_header_is_rejected_before_reading_or_allocating(monkeypatch):
    """A 4 GB claim must fail on the header alone: recv_exact is asked for nothing bigger."""
    asked = []
    real = wire.recv_exact

    def spy(sock, n, *args, **kw):
        asked.append(n)
        return real(sock, n, *args, **kw)

    monkeypatch.setattr(wire, "recv_exact", spy)
    sock = ChunkSocket(raw_header(payload_len=4 << 30) + b"{}", chunk=64)
    with pytest.raises(ProtocolError, match="over the"):
        wire.recv_frame(sock, peer=PEER)
    assert asked == [20]


def test_max_payload_is_configurable_per_call(pair):
    a, b = pair
    send_frame(a, Msg.ACT, {}, b"x" * 100)
    with pytest.raises(ProtocolError, match="100-byte payload, over the 99-byte limit"):
        recv_frame(b, max_payload=99)
    assert MAX_PAYLOAD_BYTES == 256 * 1024 * 1024
    assert decode_frame(encode_frame(Msg.ACT, {}, b"x" * 100), max_payload=100).payload == b"x" * 100


# --- array meta ----------------------------------------------------------------------------------

def act(meta: dict, payload: bytes) -> Frame:
    return Frame(Msg.ACT, meta, payload)


BAD_ARRAYS = {
    "no dtype": (act({"shape": [1]}, b"\0" * 4), "dtype None"),
    "complex64": (act({"dtype": "complex64", "shape": [1]}, b"\0" * 8), "dtype 'complex64'; allowed"),
    "object": (act({"dtype": "object", "shape": [1]}, b"\0" * 8), "dtype 'object'"),
    "no shape": (act({"dtype": "float32"}, b""), "shape None"),
    "negative dim": (act({"dtype": "float32", "shape": [-1, 4]}, b""), "non-negative ints"),
    "float dim": (act({"dtype": "float32", "shape": [1.0]}, b"\0" * 4), "non-negative ints"),
    "bool dim": (act({"dtype": "float32", "shape": [True]}, b"\0" * 4), "non-negative ints"),
    "too few bytes": (act({"dtype": "float32", "shape": [1, 768]}, b"\0" * 3071),
                      r"float32 \[1, 768\] \(3072 bytes\) but carries 3071"),
    "too many bytes": (act({"dtype": "float16", "shape": [2]}, b"\0" * 8),
                       r"\(4 bytes\) but carries 8"),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_bad_array_meta_raises_protocol_error(name):
    frame, message = BAD_ARRAYS[name]
    with pytest.raises(ProtocolError, match=message) as e:
        frame_array(frame, peer=PEER)
    assert PEER in str(e.value)


def test_wrong_row_width_names_peer_and_n_embd():
    frame = decode_frame(encode_frame(Msg.ACT, {"dtype": "float32", "shape": [1, 1024]},
                                      np.zeros((1, 1024), np.float32)))
    with pytest.raises(ProtocolError, match=r"width 1024 but this model has n_embd=768") as e:
        frame_array(frame, expect_cols=768, peer=PEER)
    assert PEER in str(e.value)
    assert frame_array(frame, expect_cols=1024).shape == (1, 1024)


def test_frame_array_is_a_zero_copy_read_only_view():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = decode_frame(encode_frame(Msg.ACT, {"dtype": "float32", "shape": [2, 3]}, x))
    y = frame_array(frame)
    assert not y.flags.writeable
    assert np.array_equal(y + 1, x + 1)


# --- ACT sessions --------------------------------------------------------------------------------

def test_act_sessions_hand_checked_batch():
    sessions = [{"id": "a", "pos": 0, "n": 5}, {"id": "b", "pos": 9, "n": 1}]
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    frame = decode_frame(encode_frame(Msg.ACT, {"sessions": sessions, "dtype": "float32",
                                                "shape": [6, 4]}, x))
    assert act_sessions(frame) == sessions
    rows = frame_array(frame)
    assert np.array_equal(rows[5], x[5])     # session b's single row is last


@pytest.mark.parametrize("sessions, message", [
    (None, "non-empty \"sessions\" list"),
    ([], "non-empty \"sessions\" list"),
    ([{"id": 1, "pos": 0, "n": 2}], "bad session entry"),
    ([{"id": "a", "pos": -1, "n": 2}], "bad session entry"),
    ([{"id": "a", "pos": 0, "n": 0}, {"id": "b", "pos": 0, "n": 2}], "bad session entry"),
    ([{"id": "a", "pos": 0, "n": 1}, {"id": "a", "pos": 1, "n": 1}], "lists a session twice"),
    ([{"id": "a", "pos": 0, "n": 3}], r"sessions hold 3 rows but the array has shape \[2, 4\]"),
])
def test_act_sessions_rejects_bad_lists(sessions, message):
    frame = act({"sessions": sessions, "dtype": "float32", "shape": [2, 4]}, b"\0" * 32)
    with pytest.raises(ProtocolError, match=message) as e:
        act_sessions(frame, peer=PEER)
    assert PEER in str(e.value)


# --- fuzz: garbage never escapes as anything but a WireError -------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_raise_wire_error_or_decode(data):
    try:
        frame = decode_frame(data)
    except WireError:
        return
    assert isinstance(frame.meta, dict) and isinstance(frame.msg, Msg)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(FULL) - 1), st.integers(0, 255))
def test_one_corrupted_byte_raises_wire_error_or_decodes(index, value):
    data = bytearray(FULL)
    data[index] = value
    try:
        frame = decode_frame(bytes(data))
        frame_array(frame, peer=PEER)
    except WireError:
        pass


# --- handshake proof ------------------------------------------------------------------------------

def test_auth_proof_is_hmac_sha256_of_the_nonce_bytes():
    nonce = "00" * 31 + "01"
    expected = hmac.new(b"s3cret", bytes(31) + b"\x01", hashlib.sha256).hexdigest()
    assert auth_proof("s3cret", nonce) == expected
    assert proof_ok("s3cret", nonce, expected)
    assert not proof_ok("s3cret", nonce, auth_proof("wrong", nonce))
    assert not proof_ok("s3cret", make_nonce(), expected)     # a replayed proof fails
    assert not proof_ok("s3cret", nonce, None)
    assert not proof_ok("s3cret", nonce, 12345)


def test_no_token_means_no_proof():
    nonce = make_nonce()
    assert len(nonce) == 64 and bytes.fromhex(nonce)
    assert auth_proof(None, nonce) is None and auth_proof("", nonce) is None
    assert proof_ok(None, nonce, None)


def test_non_hex_nonce_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not 64 hex digits"):
        auth_proof("s3cret", "zz")


def test_numbers_quoted_in_protocol_doc():
    """docs/PROTOCOL.md quotes frame sizes; recompute them so the doc cannot drift."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    one = {"sessions": [{"id": "s1", "pos": 7, "n": 1}], "dtype": "float32", "shape": [1, 768]}
    two = {"sessions": [{"id": "a", "pos": 0, "n": 5}, {"id": "b", "pos": 9, "n": 1}],
           "dtype": "float32", "shape": [6, 768]}
    for meta, rows in ((one, 1), (two, 6)):
        frame = encode_frame(Msg.ACT, meta, np.zeros((rows, 768), np.float32))
        meta_len = len(frame) - 20 - rows * 3072
        assert f"20 + {meta_len} + {rows * 3072} = {len(frame)}" in doc
    assert json.dumps(one, separators=(",", ":")) in doc
    header = " ".join(f"{b:02x}" for b in encode_frame(Msg.ACT, one, b"\0" * 3072)[:20])
    assert header.replace(" ", "") in doc.replace(" ", "")
    assert f"is {len(encode_frame(Msg.FREE, {'sessions': ['s1']}))} bytes" in doc


def _raw(meta: bytes) -> bytes:
    return HEADER.pack(b"NPIP", PROTOCOL_VERSION, int(Msg.GENERATE), 0, len(meta), 0) + meta


@pytest.mark.parametrize("meta, message", [
    (b'{"request": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"a": ["x", {"b": "\\udfff!"}]}', "lone UTF-16 surrogate"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_meta_that_is_not_text_or_too_deep_is_a_protocol_error(meta, message):
    """Both used to escape as other exceptions: RecursionError from the parser; a lone surrogate
    parsed fine and then broke whoever tried to send it on (UnicodeEncodeError)."""
    with pytest.raises(ProtocolError, match=message):
        decode_frame(_raw(meta))


def test_a_surrogate_pair_escape_is_text():
    assert decode_frame(_raw(b'{"t": "\\ud83d\\ude00 \\\\ud800"}')).meta == {"t": "\U0001F600 \\ud800"}


def test_a_meta_that_cannot_be_encoded_is_a_wire_error():
    with pytest.raises(WireError, match="cannot be sent as UTF-8 JSON"):
        encode_frame(Msg.TOKEN, {"text": "\ud800"})


# --- one meaning per message type ------------------------------------------------------------------

def _through(built: tuple) -> Frame:
    """A builder's (Msg, meta) encoded and decoded again, as a receiver gets it."""
    return decode_frame(encode_frame(*built), peer=PEER)


PLACE = {"layers": [2, 4], "next": ["10.0.0.3", 65433], "next_rank": 2, "prev_rank": 0}
LEFT_OUT = {"layers": [4, 4], "excluded": "pi1: too slow to help", "prev_rank": None}
BUILT = {       # every control builder, with what its reader returns (None: the meta itself)
    "state_request": (wire.state_request(), Msg.STATE_REQUEST, None, {}),
    "state": (wire.state({"model": "gpt2", "ready": True, "nodes": []}), Msg.STATE, None,
              {"model": "gpt2", "ready": True, "nodes": []}),
    "status_text": (wire.status_text("r1", "s1", "waiting for rank 2"), Msg.STATUS, wire.read_status_text,
                    "waiting for rank 2"),
    "generate_batch": (wire.generate_batch({"request": "r", "max_tokens": 2}, [{"request": "r.0", "prompt_ids": [1]}]),
                       Msg.GENERATE_BATCH, None,
                       {"request": "r", "max_tokens": 2, "batch": [{"request": "r.0", "prompt_ids": [1]}]}),
    "plan": (wire.plan(PLACE), Msg.PLAN, wire.read_plan, PLACE),
    "plan, left out": (wire.plan(LEFT_OUT), Msg.PLAN, wire.read_plan, LEFT_OUT),
    "start_inference": (wire.start_inference(7), Msg.START_INFERENCE, wire.read_epoch, 7),
    "ring_joined": (wire.ring_joined(1, 7), Msg.RING_JOINED, wire.read_epoch, 7),
    "ready": (wire.ready(1, 65433, False, [2, 4], 1 << 20), Msg.READY, wire.read_ready,
              {"synthetic": False, "prefix_cache_bytes": 1 << 20, "lm_head_missing": None}),
    "ready, no head share": (wire.ready(2, 65434, False, [2, 4], 0, lm_head_missing="no wte"), Msg.READY,
                                   wire.read_ready,
                                   {"synthetic": False, "prefix_cache_bytes": 0, "lm_head_missing": "no wte"}),
    "capacity": (wire.capacity(1, {"name": "pi1", "speed_gbps": 2.5}), Msg.CAPACITY, wire.read_capacity,
                 {"name": "pi1", "speed_gbps": 2.5}),
    "start_inference, layers": (wire.start_inference(7, [2, 4]), Msg.START_INFERENCE, wire.read_ring_layers, [2, 4]),
    "leave": (wire.leave(2), Msg.LEAVE, wire.read_leave, 2),
    "left": (wire.left(2, "rank 2 (pi1) drained: ring 0 -> 1 -> 0"), Msg.LEFT, None,
             {"rank": 2, "message": "rank 2 (pi1) drained: ring 0 -> 1 -> 0"}),
    "drained": (wire.drained("drained by `nanopipe leave`"), Msg.DRAINED, None,
                {"reason": "drained by `nanopipe leave`"}),
}


@pytest.mark.parametrize("name", list(BUILT))
def test_each_control_message_reads_back_what_its_builder_wrote(name):
    built, msg, read, want = BUILT[name]
    frame = _through(built)
    assert frame.msg is msg
    assert (frame.meta if read is None else read(frame)) == want


def test_no_two_builders_share_a_message_type():
    """One meaning per type: each builder makes its own type (plan's two forms are one meaning, a place;
    so are ready's, a loaded slice)."""
    types = {name: built[0] for name, (built, *_) in BUILT.items()
             if name not in ("plan, left out", "start_inference, layers", "ready, no head share")}
    assert len(set(types.values())) == len(types), types


@pytest.mark.parametrize("meta, message", [
    ({"layers": "2-4", "next": ["h", 1]}, "PLAN has layers '2-4'; expected [lo, hi]"),
    ({"layers": [2, 4.5], "next": ["h", 1]}, "PLAN has layers"),
    ({"layers": [2, 4]}, "PLAN has next None; expected [host, port]"),
    ({"layers": [2, 4], "next": [1, "h"]}, "PLAN has next"),
])
def test_a_bad_plan_is_a_protocol_error_naming_the_field(meta, message):
    with pytest.raises(ProtocolError, match=re.escape(message)):
        wire.read_plan(_through((Msg.PLAN, meta)), peer="leader")


@pytest.mark.parametrize("epoch", ["7", None, 7.5, True])
def test_an_epoch_must_be_an_int(epoch):
    with pytest.raises(ProtocolError, match="START_INFERENCE has epoch"):
        wire.read_epoch(_through((Msg.START_INFERENCE, {"epoch": epoch})), peer="leader")


def test_ring_layers_are_optional_but_checked():
    assert wire.read_ring_layers(_through(wire.start_inference(7))) is None
    with pytest.raises(ProtocolError, match="START_INFERENCE has layers '2-4'"):
        wire.read_ring_layers(_through((Msg.START_INFERENCE, {"epoch": 7, "layers": "2-4"})), peer="leader")


def test_a_ready_value_of_the_wrong_kind_counts_as_not_said():
    frame = _through((Msg.READY, {"rank": 1, "synthetic": "yes", "prefix_cache_bytes": -5}))
    assert wire.read_ready(frame) == {"synthetic": None, "prefix_cache_bytes": None, "lm_head_missing": None}
    assert wire.read_status_text(_through((Msg.STATUS, {"text": ["x"]}))) == ""


def _dispatches(tree) -> list:
    """Every if/elif chain's tests of `X.msg is Msg.NAME`, as [(line, [NAME, ...])]."""
    import ast

    def names(test) -> list:
        found = []
        for node in ast.walk(test):
            if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "msg"
                    and len(node.comparators) == 1 and isinstance(node.comparators[0], ast.Attribute)
                    and isinstance(node.comparators[0].value, ast.Name) and node.comparators[0].value.id == "Msg"):
                found.append(node.comparators[0].attr)
        return found

    chains, inner = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and id(node) not in inner:
            tested, branch = [], node
            while isinstance(branch, ast.If):
                tested += names(branch.test)
                if len(branch.orelse) == 1 and isinstance(branch.orelse[0], ast.If):
                    inner.add(id(branch.orelse[0]))
                    branch = branch.orelse[0]
                else:
                    break
            chains.append((node.lineno, tested))
    return chains


def test_no_receiver_tells_two_meanings_of_one_type_apart_by_its_meta():
    """A dispatch (an if/elif chain over frame.msg) tests each type once: were a type tested twice,
    the branches would be telling meanings apart by meta keys ("nodes" in meta, "epoch" in meta)."""
    import ast
    root = Path(__file__).resolve().parent.parent / "nanopipe"
    twice = []
    for path in sorted(root.rglob("*.py")):
        for line, tested in _dispatches(ast.parse(path.read_text())):
            twice += [f"{path.relative_to(root.parent)}:{line} tests {n} twice" for n in set(tested)
                      if tested.count(n) > 1]
    assert not twice, "\n".join(twice)


def test_the_dispatch_check_catches_sniffing():
    """The check above can fail: the leader's old dispatch of READY (loaded, or joined a ring)."""
    import ast
    old = ("if frame.msg is Msg.READY and frame.meta.get('epoch') is not None:\n    pass\n"
           "elif frame.msg is Msg.READY:\n    pass\nelif frame.msg is Msg.STATS:\n    pass\n")
    assert _dispatches(ast.parse(old)) == [(1, ["READY", "READY", "STATS"])]
