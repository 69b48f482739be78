"""Decoding: choosing the next token from the model's logits.

The model gives one score (logit) per vocabulary entry; a decoding strategy turns those V scores
into one token id. With logits [2.0, 1.0, 0.0] for a 3-token vocabulary:

    greedy     always the argmax                                  -> 0
    sampling   draw from softmax(logits / temperature)            -> 0 (67%), 1 (24%), 2 (9%)
    top_k      keep the k highest, renormalize, draw; k=2         -> 0 (73%), 1 (27%)
    top_p      keep the fewest highest-probability tokens whose   -> p=0.9: 0 (73%), 1 (27%)
               probabilities add up to at least p, renormalize, draw

Temperature divides the logits first: below 1 it sharpens the distribution towards greedy, above
1 it flattens it towards uniform.

Strategies live in a registry, so adding one is a function plus a decorator:

    @register("min_p", uses=("temperature", "top_p"))
    def min_p(logits, rng, params):
        probs = softmax(logits, params.temperature)
        ids = np.flatnonzero(probs >= params.top_p * probs.max())
        return draw(ids, probs[ids], rng)

after which SamplingParams(strategy="min_p") validates and `sample` dispatches to it.
Everything random goes through one np.random.Generator, so a seed reproduces a generation exactly.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np


class DecodingError(ValueError):
    """An invalid decoding value; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `validate()` checks it; the strategies assume it was."""

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 50
    seed: int | None = None

    def validate(self, n_ctx: int | None = None, prompt_len: int = 0) -> SamplingParams:
        """Check every field; return a copy with numbers as plain Python int/float.

        With `n_ctx` (the model's context size), also check that the prompt plus the tokens to
        generate fit: 1000 prompt tokens + max_tokens=50 > n_ctx=1024 is an error.
        """
        if self.strategy not in STRATEGIES:
            raise DecodingError(f"strategy must be one of {', '.join(sorted(STRATEGIES))} "
                                f"(got {self.strategy!r})")
        uses = STRATEGY_USES[self.strategy]
        temperature = _real("temperature", self.temperature)
        if "temperature" in uses and not (math.isfinite(temperature) and temperature > 0):
            raise DecodingError(f"temperature must be > 0 for strategy {self.strategy!r} "
                                f"(got {self.temperature!r}); use strategy 'greedy' for the argmax")
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise DecodingError(f"top_p must be in (0, 1] (got {self.top_p!r})")
        top_k = _integer("top_k", self.top_k, minimum=1)
        max_tokens = _integer("max_tokens", self.max_tokens, minimum=1)
        seed = None if self.seed is None else _integer("seed", self.seed, minimum=0)
        if n_ctx is not None:
            prompt_len = _integer("prompt_len", prompt_len, minimum=0)
            if prompt_len + max_tokens > n_ctx:
                raise DecodingError(
                    f"max_tokens too large: prompt length {prompt_len} + max_tokens {max_tokens} = "
                    f"{prompt_len + max_tokens} exceeds the context size n_ctx={n_ctx}; "
                    f"use max_tokens <= {max(n_ctx - prompt_len, 0)} or a shorter prompt")
        return dataclasses.replace(self, temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_tokens=max_tokens, seed=seed)


def _real(field: str, value) -> float:
    # bool is an int subclass in Python; True as a temperature is a caller's bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DecodingError(f"{field} must be a number (got {value!r})")
    return float(value)


def _integer(field: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DecodingError(f"{field} must be an integer >= {minimum} (got {value!r})")
    if value < minimum:
        raise DecodingError(f"{field} must be >= {minimum} (got {value!r})")
    return int(value)


# ---------------------------------------------------------------------------------------------
# The registry

Strategy = Callable[[np.ndarray, np.random.Generator, SamplingParams], int]
STRATEGIES: dict[str, Strategy] = {}
STRATEGY_USES: dict[str, tuple[str, ...]] = {}    # name -> the SamplingParams fields it reads
_TUNABLE = ("temperature", "top_k", "top_p")


def register(name: str, *, uses: tuple[str, ...] = ("temperature",), replace: bool = False):
    """Decorator: make `fn(logits, rng, params) -> token id` available as strategy `name`.

    `uses` lists the fields of SamplingParams the strategy reads, so that validation demands
    temperature > 0 only where temperature matters.
    """
    unknown = set(uses) - set(_TUNABLE)
    if unknown:
        raise ValueError(f"register({name!r}): unknown fields in uses: {sorted(unknown)}; "
                         f"choose from {_TUNABLE}")
    if name in STRATEGIES and not replace:
        raise ValueError(f"decoding strategy {name!r} is already registered; pass replace=True")

    def decorator(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        STRATEGY_USES[name] = tuple(uses)
        return fn

    return decorator


def unregister(name: str) -> None:
    STRATEGIES.pop(name, None)
    STRATEGY_USES.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Probabilities


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) over the last axis, in float64, without overflow.

    [2.0, 1.0, 0.0] -> [-0.408, -1.408, -2.408]  (exp of these: 0.665, 0.245, 0.090)
    Reported as the logprob of each generated token, before temperature or truncation.
    """
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)          # largest is 0: exp cannot overflow
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) for one position's logits (V,): logprob of token t = logits[t] - logsumexp.

    [2.0, 1.0, 0.0] -> 2.408, so the logprob of token 0 is 2.0 - 2.408 = -0.408, as log_softmax says.
    One pass over V per generated token, instead of a whole float64 log_softmax: exp runs in the
    logits' own float32 (vectorized, several times faster than float64), the sum in float64.
    """
    x = np.asarray(logits)
    top = x.max()
    return float(top) + math.log(float(np.sum(np.exp(x - top), dtype=np.float64)))


def most_likely(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, most likely first, ties broken by the lower id.

    [0.1, 3.0, 2.0, 3.0], k=3 -> [1, 3, 2]. The same as a stable argsort of -logits cut to k, but
    without sorting all 50257 entries: only those at or above the k-th largest value are sorted.
    """
    x = np.asarray(logits)
    k = min(k, x.shape[-1])
    kth = np.partition(x, x.shape[-1] - k)[x.shape[-1] - k]   # the k-th largest value
    ids = np.flatnonzero(x >= kth)                             # (>= k,) in increasing id order
    return ids[np.argsort(-x[ids], kind="stable")][:k]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) as float64: (V,) -> (V,) summing to 1.

    [2.0, 1.0, 0.0], temperature 1 -> [0.665, 0.245, 0.090];  temperature 0.5 -> [0.867, 0.117, 0.016]
    """
    x = np.asarray(logits, dtype=np.float64) / temperature  # (V,)
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def draw(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """Pick one of `ids` with the given (not necessarily normalized) probabilities.

    One uniform number u in [0, total) is located in the running sum of the probabilities:
    probs [0.5, 0.3, 0.2] -> cumsum [0.5, 0.8, 1.0]; u=0.62 falls in the second slot -> ids[1].
    Exactly one rng.random() call per token keeps a seeded generation reproducible.
    """
    cum = np.cumsum(probs, dtype=np.float64)                 # (n,)
    u = rng.random() * cum[-1]
    # side="right" skips zero-probability entries: their slot in the running sum is empty.
    i = int(np.searchsorted(cum, u, side="right"))
    return int(ids[min(i, len(ids) - 1)])


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, in increasing id order: [0.1, 3.0, 2.0, -1.0], k=2 -> [1, 2]."""
    k = min(k, logits.shape[-1])
    ids = np.argpartition(logits, -k)[-k:]                   # (k,) in no particular order
    # argpartition's order is an implementation detail; sorting keeps seeded draws reproducible.
    return np.sort(ids)


# A running sum that "should" equal p can land an ulp below it (0.7 + 0.1 + 0.1 = 0.8999999999999999);
# without the tolerance, p=0.9 would then keep a fourth token it does not need.
_TOP_P_TOLERANCE = 1e-9


def top_p_ids(probs: np.ndarray, p: float) -> np.ndarray:
    """The nucleus: the fewest highest-probability ids whose probabilities add up to >= p.

    probs [0.5, 0.3, 0.15, 0.05]: p=0.75 -> [0, 1];  p=0.8 -> [0, 1];  p=0.81 -> [0, 1, 2]
    At least one id is always kept. Returned in decreasing probability (ties by lower id).
    """
    order = np.argsort(-probs, kind="stable")                # (V,) most likely first
    cum = np.cumsum(probs[order])                            # (V,)
    n_keep = int(np.searchsorted(cum, p - _TOP_P_TOLERANCE, side="left")) + 1
    return order[:min(n_keep, len(order))]


# ---------------------------------------------------------------------------------------------
# Built-in strategies


@register("greedy", uses=())
def greedy(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    return int(np.argmax(logits))


@register("sampling")
def sampling(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    probs = softmax(logits, params.temperature)              # (V,)
    return draw(np.arange(len(probs)), probs, rng)


@register("top_k", uses=("temperature", "top_k"))
def top_k(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    ids = top_k_ids(logits, params.top_k)                    # (k,)
    return draw(ids, softmax(logits[ids], params.temperature), rng)


@register("top_p", uses=("temperature", "top_p"))
def top_p(logits: np.ndarray, rng: np.random.Generator, params: SamplingParams) -> int:
    probs = softmax(logits, params.temperature)              # (V,)
    ids = top_p_ids(probs, params.top_p)                     # (n,) n >= 1
    return draw(ids, probs[ids], rng)


# ---------------------------------------------------------------------------------------------
# Entry points


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id for one position's logits (V,), by the strategy `params` names.

    `params` should come from `make_params` or `SamplingParams.validate()`; that is checked once
    per request, not here once per token.
    """
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise DecodingError(f"logits must have shape (V,) with V >= 1 (got shape {logits.shape})")
    top = logits.max()      # NaN if any is NaN, +inf if any is +inf, -inf if all are -inf
    if not np.isfinite(top):
        raise DecodingError(f"logits must be finite numbers, -inf allowed for masked tokens "
                            f"(largest is {top})")
    try:
        strategy = STRATEGIES[params.strategy]
    except KeyError:
        raise DecodingError(f"strategy must be one of {', '.join(sorted(STRATEGIES))} "
                            f"(got {params.strategy!r})") from None
    return int(strategy(logits, rng, params))


def make_rng(seed: int | None) -> np.random.Generator:
    """The one source of randomness for a generation: same seed, same logits -> same tokens."""
    return np.random.default_rng(seed)


# Keys a strategy's section in the model config may set, and the SamplingParams field each fills.
_SECTION_KEYS = {"temperature": "temperature", "k": "top_k", "top_k": "top_k",
                 "p": "top_p", "top_p": "top_p"}
_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def make_params(defaults: dict | None = None, **overrides) -> SamplingParams:
    """SamplingParams from a model config's decoding section plus per-request overrides.

    Precedence, lowest first: SamplingParams' own defaults; the config's top level
    (`active_decoding_strategy`, `max_new_tokens`); the chosen strategy's section; overrides.
    An override of None means "not given". With

        defaults = {"active_decoding_strategy": "top_p", "max_new_tokens": 50,
                    "decoding_strategies": {"top_p": {"temperature": 0.8, "p": 0.9},
                                            "top_k": {"temperature": 0.8, "k": 50}}}

    make_params(defaults)                          -> top_p,  temperature 0.8, top_p 0.9
    make_params(defaults, strategy="top_k")        -> top_k,  temperature 0.8, top_k 50
    make_params(defaults, temperature=1.2, seed=7) -> top_p,  temperature 1.2, top_p 0.9, seed 7

    The result is validated (without the context-size check, which needs the prompt).
    """
    unknown = set(overrides) - set(_FIELDS)
    if unknown:
        raise DecodingError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {list(_FIELDS)}")
    defaults = defaults or {}
    given = {k: v for k, v in overrides.items() if v is not None}

    values: dict = {}
    if defaults.get("active_decoding_strategy") is not None:
        values["strategy"] = defaults["active_decoding_strategy"]
    if defaults.get("max_new_tokens") is not None:
        values["max_tokens"] = defaults["max_new_tokens"]
    strategy = given.get("strategy", values.get("strategy", SamplingParams.strategy))
    section = (defaults.get("decoding_strategies") or {}).get(strategy) or {}
    if not isinstance(section, dict):
        raise DecodingError(f"decoding_strategies.{strategy} must be a mapping of settings "
                            f"(got {section!r})")
    for key, value in section.items():
        if key not in _SECTION_KEYS:
            raise DecodingError(f"decoding_strategies.{strategy}: unknown key {key!r}; "
                                f"known: {sorted(_SECTION_KEYS)}")
        values[_SECTION_KEYS[key]] = value
    values.update(given)
    return SamplingParams(**values).validate()
