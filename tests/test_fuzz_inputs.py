"""Fuzzing what nanopipe reads from outside, besides the cluster port (tests/test_fuzz.py):

    web request bodies      -> an answer, or a 4xx naming what was wrong; never a 500 or 503,
                               and the app serves a normal request afterwards
    safetensors headers     -> a Header that holds together, or SafetensorsError; the loader and
                               `pull`'s verify then load it or say WeightsError / PullError
    YAML configs            -> a config, or ConfigError naming the file; never another exception

Every example is derived from a fixed seed (derandomize=True), so CI runs the same cases each time
(2,600 in all; `make fuzz` runs them with tests/test_fuzz.py). A failure prints the smallest
input hypothesis could shrink it to. The hand-written cases first: the ones found by reading.
"""
from __future__ import annotations

import functools
import json
import struct
import time
from pathlib import Path

import pytest
from helpers import DEFAULTS, FakeClient, FakeLeader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanopipe import config as nconfig
from nanopipe.cluster.wire import Msg, encode_frame
from nanopipe.safetensors_io import DTYPES, SafetensorsError, parse_header, read_header
from nanopipe.tools.pull import PullError, verify
from nanopipe.web.app import create_app
from nanopipe.weights import WeightsError, init_weights, load_stage

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
COUNTS: dict = {}          # cases run per surface, printed when the module ends (pytest -s shows it)


def counted(surface: str) -> None:
    COUNTS[surface] = COUNTS.get(surface, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def say_counts():
    t = time.monotonic()
    yield
    print(f"\nfuzz cases in {time.monotonic() - t:.1f} s: " + ", ".join(f"{k} {v}" for k, v in COUNTS.items()))


# ---------------------------------------------------------------------------------------------
# values: JSON of every kind, including what breaks naive code


surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc00" * 3])       # valid JSON escapes, not Unicode
text = st.text(max_size=12) | surrogates | st.sampled_from(["", " ", "\n\nUser:", "é", "\x00", "x" * 5000])
numbers = (st.integers(-3, 70) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, -1, 2**31, 2**63, 10**30, 1e-300, -1e-300, 1e300, 0.5, True, False]))
json_values = st.recursive(st.none() | st.booleans() | numbers | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=10)


def nested(depth: int, leaf="x") -> object:
    """[[[...leaf...]]], `depth` lists deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------------------------------------
# web request bodies


class WireFakeClient(FakeClient):
    """The fake leader's client, but a request is first encoded as the real LeaderClient sends it
    (a GENERATE frame: JSON in UTF-8), so a value the wire cannot carry fails here as it would live."""

    def _encode(self, prompt, params, fields):
        meta = {"request": "r1", "prompt_ids" if isinstance(prompt, list) else "prompt": prompt}
        meta.update(params.sent_fields() if params is not None else {})
        meta.update({k: v for k, v in fields.items() if v is not None and not callable(v)})
        encode_frame(Msg.GENERATE, meta)

    def generate(self, prompt=None, params=None, *args, **fields):
        self._encode(prompt, params, {k: v for k, v in fields.items() if k not in ("echo", "top_logprobs", "text")})
        return super().generate(prompt, params, *args, **fields)

    def generate_batch(self, prompts, params=None, *args, **fields):
        self._encode(prompts, params, {})
        return super().generate_batch(prompts, params, *args, **fields)


class WireFakeLeader(FakeLeader):
    def connect(self, addr, token, attempts=1):
        client = WireFakeClient(self, addr, token, attempts)
        self.connections.append(client)
        return client


@pytest.fixture(scope="module")
def web():
    leader = WireFakeLeader()
    app = create_app({"TESTING": False, "CLIENT_FACTORY": leader.connect, "LEADER": "10.0.0.1:65432",
                      "MODEL_NAME": "gpt2", "MODEL_DEFAULTS": DEFAULTS})
    return app.test_client()


def post(client, path: str, body) -> tuple:
    """POST a body (a value, sent as JSON, or raw bytes); (status, whole response text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    r = client.post(path, data=data, content_type="application/json")
    return r.status_code, r.get_data(as_text=True)


def assert_clean(status: int, text: str, what) -> None:
    """An answer or a 4xx with a message: never a 500/503, never an error inside a streamed 200."""
    assert status in (200, 400, 404, 413, 429), (status, text[:500], what)
    assert "internal error" not in text and "Traceback" not in text, (status, text[:500], what)
    if status != 200:
        assert json.loads(text)["error"], text


def assert_still_serves(client) -> None:
    status, text = post(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == "Hello world", text[:300]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path, body, says", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": "\ud800"}, "stop: holds a lone surrogate"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["ok", "a\udfff"]}, "stop: holds a lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages: holds a lone"),
    ("/chat", {"text": "hi\udc00"}, "text: holds a lone surrogate"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 32 levels"),
    ("/v1/completions", {"prompt": "x", "logit_bias": nested(40)}, "nested deeper than 32 levels"),
    ("/chat", {"text": "hi", "history": nested(500)}, "nested deeper than 32 levels"),
])
def test_bodies_the_app_once_failed_on_are_a_400(web, path, body, says):
    status, text = post(web, path, body)
    assert status == 400 and says in str(json.loads(text)["error"]), text[:500]
    assert_still_serves(web)


@pytest.mark.parametrize("body", [{"prompt": "x", "q" * 100_000: 1}, {"prompt": "x", "stream": "y" * 100_000},
                                  {"prompt": "x", "echo": [list(range(50))] * 30}])
def test_messages_about_long_values_are_cut(web, body):
    status, text = post(web, "/v1/completions", body)
    assert status == 400 and len(json.loads(text)["error"]["message"]) < 1000, text[:2000]


ROUTES = {"/v1/completions": ("prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
                              "logprobs", "echo", "logit_bias", "frequency_penalty", "presence_penalty",
                              "repetition_penalty", "best_of", "suffix", "user", "model", "stream_options"),
          "/v1/chat/completions": ("messages", "max_tokens", "temperature", "top_p", "stream", "stop", "seed",
                                   "logprobs", "top_logprobs", "logit_bias", "n", "model", "max_completion_tokens"),
          "/chat": ("text", "max_tokens", "temperature", "top_k", "top_p", "decoding_strategy", "seed", "stream",
                    "stop", "repetition_penalty", "logit_bias", "chat", "history", "conversation_id")}
GOOD = {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "text": "Hi", "max_tokens": 3}
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | text,
                                           "content": text | json_values}), max_size=3)


@st.composite
def web_request(draw):
    """A route and a body: mostly a valid request with 1-3 fields set to anything, sometimes raw bytes."""
    path = draw(st.sampled_from(sorted(ROUTES)))
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.binary(max_size=40) | st.sampled_from([b"[" * 3000, b'{"prompt": "\\ud800"}', b"{}", b"null"]))
        return path, raw
    fields = ROUTES[path]
    body = {k: v for k, v in GOOD.items() if k in fields}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(fields) | text)
        body[name] = draw(messages if name == "messages" else json_values)
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(0, 4))     # keep the answers short
    return path, body


@settings(max_examples=1000, **FUZZ)
@given(web_request())
def test_web_bodies(web, request_):
    counted("web bodies")
    path, body = request_
    assert_clean(*post(web, path, body), (path, body))


def test_web_still_serves_after_the_fuzz(web):
    assert_still_serves(web)


# ---------------------------------------------------------------------------------------------
# safetensors headers


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A 2-block GPT-2 of width 8, in the hub layout: its header is the seed the mutations start from."""
    path = str(tmp_path_factory.mktemp("st") / "tiny.safetensors")
    init_weights(path, n_layer=2, n_embd=8, n_head=2, n_ctx=8, n_vocab=16)
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def file_bytes(header, body: bytes) -> bytes:
    blob = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + body


entry_values = (json_values | st.sampled_from(list(DTYPES)) | st.lists(st.integers(-2, 70), max_size=4)
                | st.lists(st.integers(0, 3000), min_size=2, max_size=2) | st.sampled_from([[64.5], ["8"], [0.0, 8.0]]))
metadata_values = st.sampled_from(["1000000000", "2", "0", "-1", "abc", "12", "8", "16", "٣"]) | json_values


@st.composite
def mutated_header(draw, header):
    """The tiny file's header after 1-4 edits: a tensor field, a tensor, or a metadata value changed."""
    h = json.loads(json.dumps(header))
    names = sorted(k for k in h if k != "__metadata__")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "entry", "drop", "rename", "meta", "meta_whole"]))
        name = draw(st.sampled_from(names))
        if kind == "field" and isinstance(h.get(name), dict):
            h[name][draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(entry_values)
        elif kind == "entry":
            h[name] = draw(json_values)
        elif kind == "drop":
            h.pop(name, None)
        elif kind == "rename" and name in h:
            h[draw(st.sampled_from(["h.1000000000.ln_1.weight", "h.٣.ln_1.weight", "wte.weight", "h.-1.x"]) | text)] \
                = h.pop(name)
        elif kind == "meta":
            h.setdefault("__metadata__", {})
            if isinstance(h["__metadata__"], dict):
                key = draw(st.sampled_from(["n_layer", "n_head", "n_ctx", "n_vocab", "nanopipe_synthetic"]) | text)
                h["__metadata__"][key] = draw(metadata_values)
        elif kind == "meta_whole":
            h["__metadata__"] = draw(json_values)
    return h


def check_header(header, data_len: int) -> None:
    """What a parsed header promises: each tensor's bytes are its own and lie inside the file."""
    spans = sorted((t.begin, t.end) for t in header.tensors.values() if t.nbytes)
    for (_, e), (b, _) in zip(spans, spans[1:]):
        assert e <= b, spans
    for t in header.tensors.values():
        assert t.end <= data_len and isinstance(t.begin, int) and all(isinstance(s, int) for s in t.shape)
        assert all(isinstance(v, str) for v in header.metadata.values())


@settings(max_examples=600, **FUZZ)
@given(st.data())
def test_safetensors_headers(tiny_file, tmp_path_factory, data):
    counted("safetensors headers")
    header, body = tiny_file
    raw = file_bytes(data.draw(mutated_header(header)), body)
    path = str(tmp_path_factory.getbasetemp() / "fuzzed.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    try:
        check_header(parse_header(raw, "fuzzed", file_size=len(raw)), len(raw))
        read_header(path)
    except SafetensorsError:
        pass
    try:
        load_stage(path, 0, 1)
    except WeightsError:
        pass
    try:
        verify(path)
    except PullError:
        pass


@settings(max_examples=300, **FUZZ)
@given(st.binary(max_size=200) | st.builds(lambda n, tail: struct.pack("<Q", n) + tail,
                                           st.integers(0, 2**64 - 1) | st.integers(0, 200), st.binary(max_size=200)))
def test_safetensors_random_bytes(data):
    counted("safetensors headers")
    try:
        check_header(parse_header(data, "fuzzed", file_size=len(data)), len(data))
    except SafetensorsError:
        pass


# ---------------------------------------------------------------------------------------------
# YAML configs


SHIPPED = Path(__file__).resolve().parent.parent / "configs"


@functools.lru_cache(maxsize=1)
def shipped_configs() -> dict:
    return {name: (SHIPPED / name).read_text() for name in LOADERS}


LOADERS = {"cluster_config.yaml": nconfig.load_cluster_config, "model_config.yaml": nconfig.load_model_config,
           "model_weights.yaml": nconfig.load_weights_config}
yaml_scalars = st.sampled_from(["~", "null", "yes", "no", "1e400", ".nan", "-.inf", "0x1F", "2026-12-06", "'\\ud800'",
                                '"\\ud800"', "!!binary aGk=", "!!python/object:os.system {}", "*nope", "&a 1",
                                "[*a, *a]", "{a: 1, a: 2}", "? [1]\n  : 2", "-1", "65536", "0", "x" * 300]) \
    | st.builds(json.dumps, json_values.filter(lambda v: not isinstance(v, str) or v.isprintable()))


@st.composite
def mutated_yaml(draw):
    """A shipped config with 1-3 lines changed: a value replaced, a line dropped or added, or a line
    of random text; sometimes an alias bomb."""
    name = draw(st.sampled_from(sorted(LOADERS)))
    lines = shipped_configs()[name].splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["value", "value", "value", "drop", "add", "text", "bomb"]))
        if kind == "value" and ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + ": " + draw(yaml_scalars)
        elif kind == "drop":
            del lines[i]
        elif kind == "add":
            lines.insert(i, f"{draw(st.sampled_from(['port', 'host_ip', 'workers', 'gpt2', 'models', 'x']))}: "
                            f"{draw(yaml_scalars)}")
        elif kind == "text":
            lines[i] = draw(st.text(max_size=30))
        elif kind == "bomb":
            depth = draw(st.integers(2, 9))
            lines.insert(i, "b0: &b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]")
            lines[i + 1:i + 1] = [f"b{k}: &b{k} [{', '.join([f'*b{k - 1}'] * 9)}]" for k in range(1, depth)]
        if not lines:
            lines = [""]
    return name, "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzed-configs")
    for name, content in shipped_configs().items():
        (folder / name).write_text(content)
    return folder


@settings(max_examples=700, **FUZZ)
@given(mutated_yaml())
def test_yaml_configs(config_dir, case):
    counted("YAML configs")
    name, text_ = case
    (config_dir / name).write_bytes(text_.encode("utf-8", "surrogatepass"))
    t = time.monotonic()
    try:
        LOADERS[name](str(config_dir))
    except nconfig.ConfigError as e:
        assert str(config_dir / name) in str(e) and len(str(e)) < 2000, str(e)[:3000]
    finally:
        (config_dir / name).write_text(shipped_configs()[name])
    assert time.monotonic() - t < 10, "a config of a few KB must load (or be refused) at once"
