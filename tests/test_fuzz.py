"""Fuzzing the wire: random and mutated frames, to the parser and to a live leader.

    decode_frame(any bytes)          -> a Frame, or ProtocolError / WireError; never anything else
    a live leader, any bytes         -> closes that one connection (or answers it); never dies,
                                        never stops answering everyone else

Every example is derived from a fixed seed (derandomize=True), so CI runs the same ~12,500 cases
each time (and a few hundred hostile shapes: non-ASCII proofs, JSON nested past the parser's
limit, lone surrogates). A failure prints the smallest frame hypothesis could shrink it to.
"""
from __future__ import annotations

import json
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanopipe.cluster.group import read_top
from nanopipe.cluster.leader_client import LeaderClient
from nanopipe.cluster.wire import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    Frame,
    Msg,
    WireError,
    act_sessions,
    auth_proof,
    decode_frame,
    encode_frame,
    frame_array,
    recv_frame,
    send_frame,
)
from nanopipe.decoding import SamplingParams
from nanopipe.tools.localcluster import LocalCluster

TOKEN = "fuzz secret"
PROMPT = [15496, 995, 11, 616]
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------------------------------
# what to send: JSON values, valid frames, and mutations of them

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)    # no lone surrogates: not UTF-8
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8)
metas = st.dictionaries(text | st.sampled_from(["dtype", "shape", "sessions", "epoch", "batch", "trace"]),
                        json_values, max_size=5)
valid_frames = st.builds(encode_frame, st.sampled_from(list(Msg)), metas, st.binary(max_size=64))
# real frames of every kind, as the nodes send them: the seeds the mutation fuzzers start from
SEED_FRAMES = [
    encode_frame(Msg.HELLO, {"role": "worker", "rank": 1, "version": PROTOCOL_VERSION, "proof": "ab" * 32,
                             "host": "node1"}),
    encode_frame(Msg.CHALLENGE, {"nonce": "cd" * 32, "version": PROTOCOL_VERSION}),
    encode_frame(Msg.WELCOME, {"rank": 1, "layers": [2, 3], "n_layer": 4, "n_embd": 4, "next": ["127.0.0.1", 9]}),
    encode_frame(Msg.REJECT, {"reason": "authentication failed"}),
    encode_frame(Msg.READY, {"rank": 1, "data_port": 9, "synthetic": False, "layers": [2, 3],
                             "prefix_cache_bytes": 1000}),
    encode_frame(Msg.RING_JOINED, {"rank": 1, "epoch": 7}),
    encode_frame(Msg.START_INFERENCE, {"epoch": 7}),
    encode_frame(Msg.PLAN, {"layers": [2, 3], "next": ["127.0.0.1", 9], "next_rank": 0, "prev_rank": 0}),
    encode_frame(Msg.CAPACITY, {"rank": 1, "capacity": {"name": "node1", "speed_gbps": 9.0, "memory_mb": 900}}),
    encode_frame(Msg.ACT, {"batch": 3, "epoch": 7, "sessions": [{"id": "s1", "pos": 0, "n": 2}], "trace": [],
                           "dtype": "float32", "shape": [2, 4]}, bytes(range(32))),
    encode_frame(Msg.FREE, {"sessions": ["s1", "s2"], "epoch": 7}),
    encode_frame(Msg.GENERATE, {"request": "r1", "prompt_ids": [15496, 995], "max_tokens": 5, "seed": 1}),
    encode_frame(Msg.TOKEN, {"request": "r1", "session": "s1", "token": 11, "logprob": -1.5, "text": ","}),
    encode_frame(Msg.DONE, {"request": "r1", "token_ids": [11, 12], "finish_reason": "length"}),
    encode_frame(Msg.ERROR, {"message": "no", "kind": "invalid"}),
    encode_frame(Msg.PING), encode_frame(Msg.PONG, {"t": 1.5}),
    encode_frame(Msg.STATS, {"rank": 2, "rss_mb": 40.1, "sessions": 0}),
    encode_frame(Msg.CANCEL, {"session": "s1"}), encode_frame(Msg.STATUS, {"text": "waiting for rank 2"}),
    encode_frame(Msg.STATE_REQUEST), encode_frame(Msg.STATE, {"model": "gpt2", "ready": True, "nodes": []}),
    encode_frame(Msg.GENERATE_BATCH, {"request": "r2", "max_tokens": 2, "batch": [{"request": "r2.0",
                                                                                  "prompt_ids": [15496]}]}),
    encode_frame(Msg.TOP, {"batch": 3, "epoch": 7, "trace": [], "nonfinite": [], "argmax": [11, 50256],
                           "dtype": "float64", "shape": [2, 2]}, struct.pack("<4d", -1.5, 2.0, -3.0, -2.5)),
]
array_frames = st.builds(                  # ACT frames whose meta is nearly right, for frame_array
    lambda dtype, shape, payload, sessions: encode_frame(Msg.ACT, {"dtype": dtype, "shape": shape,
                                                                   "sessions": sessions}, payload),
    st.sampled_from(["float32", "float16", "int64", "float64", "<f4"]) | json_values,
    st.lists(st.integers(-1, 4), max_size=3) | json_values,
    st.binary(max_size=96),
    st.lists(st.fixed_dictionaries({"id": text | json_values, "pos": st.integers(-1, 3) | json_values,
                                    "n": st.integers(-1, 3) | json_values}), max_size=3) | json_values)

# the header's fields: (offset, struct code); mutations set them to extreme values
FIELDS = [(0, "4s"), (4, "B"), (5, "B"), (6, "H"), (8, "I"), (12, "Q")]
EXTREMES = [0, 1, 2, 99, 255, 2**16 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


@st.composite
def mutated(draw, base):
    """A frame from `base` after 1-4 mutations: bit flips, overwritten or inserted or deleted bytes,
    truncation, or a header field set to an extreme value."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "field"]))
        if kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif not data:
            continue
        elif kind == "flip":
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 8))]
        elif len(data) >= HEADER.size:
            offset, code = draw(st.sampled_from(FIELDS))
            if code == "4s":
                value = draw(st.binary(min_size=4, max_size=4))
            else:
                bits = 8 * struct.calcsize(code)
                value = draw(st.sampled_from(EXTREMES) | st.integers(0, 2**bits - 1)) % 2**bits
            struct.pack_into("<" + code, data, offset, value)
    return bytes(data)


def parse_everything(data: bytes):
    """decode_frame, then the array and session checks a worker runs on an ACT."""
    frame = decode_frame(data)
    assert isinstance(frame, Frame) and isinstance(frame.msg, Msg) and isinstance(frame.meta, dict)
    if frame.msg is Msg.ACT:
        x = frame_array(frame, expect_cols=4)
        assert x.nbytes == len(frame.payload)
        act_sessions(frame)
    if frame.msg is Msg.TOP:                # rank 0's read of the split head's greedy reply
        top, token, lse = read_top(frame, "fuzz")
        assert len(top) == len(token) == len(lse) and token.dtype.kind == "i"


# ---------------------------------------------------------------------------------------------
# the parser: 10,000 cases


@settings(max_examples=3000, **FUZZ)
@given(st.binary(max_size=120) | st.builds(lambda tail: HEADER.pack(MAGIC, PROTOCOL_VERSION, 8, 0, len(tail), 0)
                                            + tail, st.binary(max_size=60)))
def test_decode_random_bytes(data):
    try:
        parse_everything(data)
    except WireError:
        pass


@settings(max_examples=5000, **FUZZ)
@given(mutated(st.sampled_from(SEED_FRAMES)))
def test_decode_mutated_frames(data):
    try:
        parse_everything(data)
    except WireError:
        pass


@settings(max_examples=2000, **FUZZ)
@given(array_frames | mutated(array_frames))
def test_decode_nearly_valid_activations(data):
    try:
        parse_everything(data)
    except WireError:
        pass


def test_valid_frames_round_trip():
    """The fuzzers' starting point decodes to what was encoded (so mutations start from real frames)."""
    f = decode_frame(encode_frame(Msg.GENERATE, {"prompt_ids": PROMPT, "max_tokens": 2}))
    assert f.msg is Msg.GENERATE and f.meta == {"prompt_ids": PROMPT, "max_tokens": 2} and f.payload == b""


# ---------------------------------------------------------------------------------------------
# a live leader: ~2,500 connections


@pytest.fixture(scope="module")
def leader(tiny_weights, tmp_path_factory):
    """2 nodes sharing the secret TOKEN, up once the ring is (LocalCluster dials with that secret)."""
    with LocalCluster(tiny_weights, nodes=2, workdir=str(tmp_path_factory.mktemp("fuzz")), ready_timeout=30,
                      cluster_extra={"auth_token": TOKEN}) as cl:
        yield cl


def addr_of(cl) -> tuple:
    return "127.0.0.1", cl.cluster["port"]


def open_client(cl) -> socket.socket:
    """A raw connection that has passed the handshake as a client."""
    sock = socket.create_connection(addr_of(cl), timeout=5)
    challenge = recv_frame(sock, "leader")
    send_frame(sock, Msg.HELLO, {"role": "client", "rank": None, "version": PROTOCOL_VERSION,
                                 "proof": auth_proof(TOKEN, challenge.meta["nonce"])})
    assert recv_frame(sock, "leader").msg is Msg.WELCOME
    return sock


def send_and_hang_up(sock, data: bytes):
    """Send, half-close, and read whatever comes back until the leader closes (it must, promptly)."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return                          # it hung up already
    sock.settimeout(5)
    try:
        while recv_frame(sock, "leader"):
            pass
    except (WireError, ConnectionResetError):
        pass
    except socket.timeout:
        raise AssertionError("the leader kept a connection open 5 s after the client hung up") from None


client_frames = st.sampled_from([
    encode_frame(Msg.GENERATE, {"request": "f", "prompt_ids": PROMPT, "max_tokens": 2, "strategy": "greedy"}),
    encode_frame(Msg.GENERATE, {"prompt": "Hi there", "max_tokens": 1, "strategy": "top_k", "temperature": 0.9,
                                "top_k": 5, "seed": 3}),
    encode_frame(Msg.STATE_REQUEST, {}),
    encode_frame(Msg.GENERATE_BATCH, {"request": "b", "max_tokens": 1, "strategy": "greedy",
                                      "batch": [{"request": "b.0", "prompt_ids": PROMPT}]}),
    encode_frame(Msg.PING, {"t": 1}),
    encode_frame(Msg.CANCEL, {"session": "s1"}),
])


@settings(max_examples=1500, **FUZZ)
@given(mutated(client_frames) | mutated(valid_frames))
def test_live_leader_after_handshake(leader, data):
    with open_client(leader) as sock:
        send_and_hang_up(sock, data)


@settings(max_examples=600, **FUZZ)
@given(st.data())
def test_live_leader_handshake(leader, data):
    """Mutations of the HELLO itself (its proof is real, for this connection's nonce)."""
    with socket.create_connection(addr_of(leader), timeout=5) as sock:
        nonce = recv_frame(sock, "leader").meta["nonce"]
        hello = encode_frame(Msg.HELLO, {"role": "client", "rank": None, "version": PROTOCOL_VERSION,
                                         "proof": auth_proof(TOKEN, nonce)})
        send_and_hang_up(sock, data.draw(mutated(st.just(hello)) | st.binary(max_size=40)))


# GENERATE metas with every field fuzzed; small numbers so a valid one finishes quickly
generate_metas = st.fixed_dictionaries({}, optional={
    "request": json_values,
    "prompt_ids": st.lists(st.integers(-3, 50260), max_size=5) | json_values,
    "prompt": text | json_values,
    "strategy": st.sampled_from(["greedy", "sampling", "top_k", "top_p", "beam", ""]) | json_values,
    "temperature": st.floats() | json_values,
    "top_k": st.integers(-2, 60000) | json_values,
    "top_p": st.floats() | json_values,
    "max_tokens": st.integers(-2, 3) | st.sampled_from([0, 10**30, 2.0, "2"]),
    "seed": st.integers(-2, 2**70) | json_values,
    "top_logprobs": st.integers(-2, 25) | json_values,
    "echo": json_values, "text": json_values, "trace": json_values,
})


@settings(max_examples=400, **FUZZ)
@given(generate_metas)
def test_live_leader_answers_every_well_formed_generate(leader, meta):
    """A GENERATE whose meta is any JSON object gets an answer (tokens then DONE, or one ERROR
    saying what is invalid) on a connection that stays open."""
    with open_client(leader) as sock:
        send_frame(sock, Msg.GENERATE, meta)
        while True:
            try:
                frame = recv_frame(sock, "leader")
            except (WireError, OSError) as e:
                raise AssertionError(f"the leader dropped the client over GENERATE {meta!r}: {e}") from None
            if frame.msg is Msg.ERROR:
                assert frame.meta.get("kind") == "invalid" and frame.meta.get("message"), frame.meta
                break
            if frame.msg is Msg.DONE:
                break
        send_frame(sock, Msg.PING, {"still": "here"})
        assert recv_frame(sock, "leader").msg is Msg.PONG


# ---------------------------------------------------------------------------------------------
# hostile shapes that once raised instead of answering: a non-ASCII proof (TypeError in
# hmac.compare_digest), JSON nested past the parser's recursion limit (RecursionError), a lone
# surrogate in a string (it could never be encoded back: the client's sender thread died)


def raw_frame(msg: Msg, meta: bytes) -> bytes:
    """A frame around meta bytes as given (encode_frame refuses what these tests must send)."""
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg), 0, len(meta), 0) + meta


def nested(depth: int, kind: str = "[") -> str:
    """JSON `depth` levels deep: [[[...]]] or {"a":{"a":...0}}."""
    return '{"a":' * depth + "0" + "}" * depth if kind == "{" else "[" * depth + "]" * depth


lone = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)          # a lone UTF-16 surrogate
surrogate_text = st.builds(lambda a, c, b: a + c + b, text, lone, text)
non_ascii = st.builds(lambda a, c, b: a + c + b, text,
                      st.characters(min_codepoint=0x80, blacklist_categories=("Cs",)), text)
deep = st.builds(nested, st.integers(2_000, 200_000), st.sampled_from(["[", "{"]))


def hostile_json(meta: dict, field: str, shape) -> bytes:
    """`meta` with `field` set to `shape`: a str (ASCII-escaped, so a lone surrogate stays one) or a
    ("deep", json text) pair spliced in as it is."""
    if isinstance(shape, tuple):
        body = json.dumps({k: v for k, v in meta.items() if k != field})
        return (body[:-1] + (", " if len(body) > 2 else "") + json.dumps(field) + ": " + shape[1] + "}").encode()
    return json.dumps({**meta, field: shape}).encode()            # ensure_ascii: "\ud800" escapes


shapes = non_ascii | surrogate_text | deep.map(lambda d: ("deep", d))


@settings(max_examples=150, **FUZZ)
@given(st.sampled_from(["proof", "role", "rank", "nonce", "version", "host"]), shapes)
def test_live_leader_hostile_hello(leader, field, shape):
    """Each ends in a REJECT or a close of this connection, at once."""
    with socket.create_connection(addr_of(leader), timeout=5) as sock:
        nonce = recv_frame(sock, "leader").meta["nonce"]
        hello = {"role": "client", "rank": None, "version": PROTOCOL_VERSION, "proof": auth_proof(TOKEN, nonce)}
        send_and_hang_up(sock, raw_frame(Msg.HELLO, hostile_json(hello, field, shape)))


@settings(max_examples=150, **FUZZ)
@given(st.sampled_from(["request", "prompt", "stop", "strategy", "seed", "logit_bias", "batch"]), shapes)
def test_live_leader_hostile_generate(leader, field, shape):
    """After the handshake: an ERROR for this request (or for the frame, then a close), never silence."""
    with open_client(leader) as sock:
        sock.sendall(raw_frame(Msg.GENERATE, hostile_json({"request": "h", "prompt_ids": PROMPT, "max_tokens": 1},
                                                          field, shape)))
        sock.settimeout(10)
        try:
            while (frame := recv_frame(sock, "leader")).msg not in (Msg.ERROR, Msg.DONE):
                pass
        except socket.timeout:
            raise AssertionError(f"no answer in 10 s to a GENERATE with a hostile {field!r}") from None
        assert frame.msg is Msg.DONE or frame.meta.get("message"), frame


def test_a_non_ascii_proof_is_a_failed_authentication(leader):
    with socket.create_connection(addr_of(leader), timeout=5) as sock:
        recv_frame(sock, "leader")
        send_frame(sock, Msg.HELLO, {"role": "client", "rank": None, "version": PROTOCOL_VERSION, "proof": "é" * 64})
        reply = recv_frame(sock, "leader")
    assert reply.msg is Msg.REJECT and "authentication failed" in reply.meta["reason"], reply


def test_a_hello_nested_too_deeply_closes_that_connection(leader):
    with socket.create_connection(addr_of(leader), timeout=5) as sock:
        recv_frame(sock, "leader")
        sock.sendall(raw_frame(Msg.HELLO, ('{"role": ' + nested(100_000) + "}").encode()))
        assert frames_until_closed(sock) == []
    with open(leader.log_path(0), errors="replace") as f:
        assert "nested too deeply" in f.read()


def test_a_lone_surrogate_request_id_is_an_error_for_that_client(leader):
    """It used to kill the client's sender thread: the client then waited forever."""
    with open_client(leader) as sock:
        sock.sendall(raw_frame(Msg.GENERATE, b'{"request": "\\ud800", "prompt_ids": [15496], "max_tokens": 1}'))
        got = frames_until_closed(sock)
    assert [f.msg for f in got] == [Msg.ERROR] and "lone UTF-16 surrogate" in got[0].meta["message"], got
    with LeaderClient.connect(leader.leader_addr, token=TOKEN) as c:
        assert c.generate(PROMPT, SamplingParams("greedy", max_tokens=2))["token_ids"]


def frames_until_closed(sock, timeout: float = 10) -> list:
    sock.settimeout(timeout)
    got = []
    try:
        while True:
            got.append(recv_frame(sock, "leader"))
    except (WireError, ConnectionResetError):
        return got
    except socket.timeout:
        raise AssertionError(f"the leader kept the connection open {timeout}s (sent {got})") from None


def test_leader_survived_the_fuzzing(leader, tiny_engine):
    """Runs after the live fuzzers (file order): the leader still serves, correctly, and logged no crash."""
    assert leader.procs[0].poll() is None, f"the leader died:\n{leader.logs()}"
    params = SamplingParams("greedy", max_tokens=20)
    with LeaderClient.connect(leader.leader_addr, token=TOKEN) as c:
        got = c.generate(PROMPT, params)
        st_ = c.status()
    assert got["token_ids"] == tiny_engine.generate(PROMPT, params)["token_ids"]
    assert st_["ready"] and st_["rejected_peers"] + st_["bad_frames"] > 500, st_
    with open(leader.log_path(0), errors="replace") as f:
        log = f.read()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert "Closed connection from" in log and "Rejected connection from" in log
