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
import json
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

EOT = 50256     # GPT-2's <|endoftext|>: the one special token, and the end of a reply

MAX_STOPS = 4           # stop strings a client may send, as OpenAI allows (check_stop)
MAX_STOPS_TOTAL = 8     # with those an API route adds (the chat template's turn marker)
PENALTY_RANGE = 2.0     # frequency_penalty and presence_penalty lie in [-2, 2] (OpenAI)
# repetition_penalty lies in [1/100, 100]: a logit divided or multiplied by it stays a finite float32
# (1e-300 would turn a logit of 2 into inf, and the sampler could pick nothing)
REPETITION_RANGE = (0.01, 100.0)
BIAS_RANGE = 100.0      # a logit_bias value lies in [-100, 100] (OpenAI)


class DecodingError(ValueError):
    """An invalid decoding value. `field` names the request field it is about (None: no one field),
    so an API can point at it; the message names the field, the value and what is allowed.

        DecodingError("top_k: must be an integer >= 1 (got 0)", field="top_k")
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


def is_int(value) -> bool:
    """An integer that is not a bool: 3 and np.int64(3) yes; 3.0, True and "3" no.

    (bool is an int subclass in Python, and JSON's true is not a number.)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a bool: 3, 0.5 yes; True, "0.5" no."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `validate()` checks it; the strategies assume it was.

    Beyond the strategy's own knobs, every strategy honours (see `penalize`):
      stop                text that ends the reply, not included in it (up to 4 strings)
      frequency_penalty   subtracted from a token's logit once per time it was generated (OpenAI)
      presence_penalty    subtracted once from every token generated at least once (OpenAI)
      repetition_penalty  a token seen in prompt or reply: logit / p if positive, * p if negative
                          (CTRL; transformers' `repetition_penalty`); 1 = off, p in [0.01, 100]
      logit_bias          ((token id, bias), ...) added to those logits; -100 bans a token
    """

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 50
    seed: int | None = None
    stop: tuple = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple = ()

    def validate(self, n_ctx: int | None = None, prompt_len: int = 0, n_vocab: int | None = None) -> SamplingParams:
        """Check every field; return a copy with numbers as plain Python int/float, `stop` as a
        tuple of strings and `logit_bias` as sorted (id, bias) pairs.

        With `n_ctx` (the model's context size), also check that the prompt plus the tokens to
        generate fit: 1000 prompt tokens + max_tokens=50 > n_ctx=1024 is an error. With
        `n_vocab`, also that every logit_bias id is a token of the model.
        """
        if self.strategy not in STRATEGIES:
            raise DecodingError(f"strategy: must be one of {', '.join(sorted(STRATEGIES))} "
                                f"(got {_show(self.strategy)})", field="strategy")
        uses = STRATEGY_USES[self.strategy]
        temperature = _real("temperature", self.temperature, "a number >= 0")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise DecodingError(f"temperature: must be a number >= 0 (got {_show(self.temperature)})",
                                field="temperature")
        if "temperature" in uses and temperature == 0:
            raise DecodingError(f"temperature: must be > 0 for strategy {self.strategy!r} "
                                f"(got {_show(self.temperature)}); use strategy 'greedy' for the argmax",
                                field="temperature")
        top_p = _real("top_p", self.top_p, "a number in (0, 1]")
        if not 0 < top_p <= 1:
            raise DecodingError(f"top_p: must be a number in (0, 1] (got {_show(self.top_p)})", field="top_p")
        top_k = _integer("top_k", self.top_k, minimum=1)
        max_tokens = _integer("max_tokens", self.max_tokens, minimum=1)
        seed = None if self.seed is None else _integer("seed", self.seed, minimum=0, what="an integer >= 0 or null")
        if n_ctx is not None:
            prompt_len = _integer("prompt_len", prompt_len, minimum=0)
            if prompt_len + max_tokens > n_ctx:
                raise DecodingError(
                    f"max_tokens too large: prompt length {prompt_len} + max_tokens {max_tokens} = "
                    f"{prompt_len + max_tokens} exceeds the context size n_ctx={n_ctx}; "
                    f"use max_tokens <= {max(n_ctx - prompt_len, 0)} or a shorter prompt", field="max_tokens")
        penalties = {name: _ranged(name, getattr(self, name), -PENALTY_RANGE, PENALTY_RANGE)
                     for name in ("frequency_penalty", "presence_penalty")}
        lo, hi = REPETITION_RANGE
        what = f"a number in [{lo:g}, {hi:g}] (1: none, 1.2 is common)"
        repetition = _real("repetition_penalty", self.repetition_penalty, what)
        if not lo <= repetition <= hi:
            raise DecodingError(f"repetition_penalty: must be {what} (got {_show(self.repetition_penalty)})",
                                field="repetition_penalty")
        return dataclasses.replace(self, temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_tokens=max_tokens, seed=seed, stop=check_stop(self.stop, MAX_STOPS_TOTAL),
                                   repetition_penalty=repetition, logit_bias=_bias(self.logit_bias, n_vocab),
                                   **penalties)

    def sent_fields(self) -> dict:
        """The fields a request needs to carry to mean exactly these params: the strategy's own
        knobs (see STRATEGY_USES), max_tokens, seed and any stop, penalty or bias that is set.

        SamplingParams("top_k", temperature=0.8, top_k=40, max_tokens=30).sent_fields() ->
        {"strategy": "top_k", "max_tokens": 30, "temperature": 0.8, "top_k": 40}
        """
        out = {"strategy": self.strategy, "max_tokens": self.max_tokens}
        out.update({f: getattr(self, f) for f in STRATEGY_USES.get(self.strategy, _TUNABLE)})
        default = SamplingParams()
        for f in ("seed", "stop", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            if getattr(self, f) != getattr(default, f):
                out[f] = list(self.stop) if f == "stop" else getattr(self, f)
        if self.logit_bias:
            out["logit_bias"] = {str(t): b for t, b in dict(self.logit_bias).items()}
        return out


def _show(value) -> str:
    """A value as the caller wrote it: JSON where it can be (true, "5"), else repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _real(field: str, value, what: str = "a number") -> float:
    # bool is an int subclass in Python; True as a temperature is a caller's bug, not 1.0.
    if not is_number(value):
        raise DecodingError(f"{field}: must be {what} (got {_show(value)})", field=field)
    return float(value)


def _ranged(field: str, value, lo: float, hi: float) -> float:
    what = f"a number in [{lo:g}, {hi:g}]"
    x = _real(field, value, what)
    if not lo <= x <= hi:
        raise DecodingError(f"{field}: must be {what} (got {_show(value)})", field=field)
    return x


def _integer(field: str, value, minimum: int, what: str | None = None) -> int:
    what = what or f"an integer >= {minimum}"
    if not is_int(value) or value < minimum:
        raise DecodingError(f"{field}: must be {what} (got {_show(value)})", field=field)
    return int(value)


def check_stop(value, limit: int = MAX_STOPS) -> tuple:
    r"""A request's `stop` as a tuple of strings.

    None, "" or [] -> ();  "\n" -> ("\n",);  ["\n", "User:"] -> ("\n", "User:");  5 strings -> error
    """
    if value is None or value == "":
        return ()
    stops = (value,) if isinstance(value, str) else value
    if (not isinstance(stops, (list, tuple)) or len(stops) > limit
            or not all(isinstance(s, str) and s for s in stops)):
        raise DecodingError(f"stop: must be a string or a list of up to {limit} non-empty strings "
                            f"(got {_show(value)})", field="stop")
    return tuple(stops)


def _bias(value, n_vocab: int | None) -> tuple:
    """{"50256": -100} or [[50256, -100]] -> ((50256, -100.0),): token ids as JSON object keys
    are strings, so digit strings are accepted as ids."""
    if value is None:
        return ()
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = list(value)
    else:
        raise DecodingError(f"logit_bias: must map token ids to numbers in [-{BIAS_RANGE:g}, {BIAS_RANGE:g}], "
                            f'e.g. {{"50256": -100}} (got {_show(value)})', field="logit_bias")
    out = {}
    for key, bias in pairs:
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        if not is_int(token) or token < 0 or (n_vocab is not None and token >= n_vocab):
            limit = f"0..{n_vocab - 1}" if n_vocab is not None else ">= 0"
            raise DecodingError(f"logit_bias: {_show(key)} is not a token id ({limit})", field="logit_bias")
        out[int(token)] = _ranged("logit_bias", bias, -BIAS_RANGE, BIAS_RANGE)
    return tuple(sorted(out.items()))


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


def top_probs(logprobs: np.ndarray, k: int = 5) -> list:
    """The k likeliest ids as [[id, probability], ...], likeliest first.

    log_softmax([0.0, 2.0, 1.0]) = [-2.408, -0.408, -1.408] (probabilities 0.090, 0.665, 0.245), k=2
    -> [[1, 0.665241], [2, 0.244728]]     (6 significant digits: a random model's 2.7e-05 stays readable)
    """
    k = min(k, logprobs.shape[-1])
    ids = np.argpartition(-logprobs, k - 1)[:k]                             # (k,) in no particular order
    ids = ids[np.lexsort((ids, -logprobs[ids]))]                            # likeliest first, ties by id
    return [[int(i), round_sig(np.exp(logprobs[i]))] for i in ids]


def round_sig(p) -> float:
    """p rounded to 6 significant digits, as a float: 0.00002712345 -> 2.71235e-05."""
    return float(f"{float(p):.6g}")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) as float64: (V,) -> (V,) summing to 1.

    [2.0, 1.0, 0.0], temperature 1 -> [0.665, 0.245, 0.090];  temperature 0.5 -> [0.867, 0.117, 0.016]
    """
    x = np.asarray(logits, dtype=np.float64)                 # (V,)
    # shift before dividing: (x - max) / T is <= 0 and finite for every T > 0, where x / T alone
    # overflows to inf for a tiny T (1e-300), and inf - inf would make every probability NaN
    with np.errstate(over="ignore"):                        # a tiny T: far-off logits go to -inf, exp 0
        e = np.exp((x - np.max(x)) / temperature)
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
# Penalties and bias: applied to the logits before any strategy picks a token


def penalize(logits: np.ndarray, params: SamplingParams, prompt_ids=(), output_ids=()) -> np.ndarray:
    """The logits a strategy sees for one position (V,), after logit_bias and the penalties.

    In this order (vLLM's; transformers applies sequence_bias before repetition_penalty too):
      1. logit_bias:          logits[t] += bias[t]
      2. repetition_penalty:  for t in prompt or reply: logits[t] / p if logits[t] > 0 else logits[t] * p
      3. frequency/presence:  logits[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty,
                              count[t] = how often t was generated so far (the prompt does not count)

    logits [2.0, 1.0, -1.0], prompt [0], reply [2, 2]:
      repetition_penalty 2       -> [1.0, 1.0, -2.0]     (token 1 was never seen)
      frequency_penalty 0.5      -> [2.0, 1.0, -2.0]     (token 2: twice, -1.0)
      presence_penalty 0.5       -> [2.0, 1.0, -1.5]
      logit_bias ((1, 5),)       -> [2.0, 6.0, -1.0]
    Returns `logits` itself when nothing is set (no copy on the common path).
    """
    p = params
    if not (p.logit_bias or p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty):
        return logits
    x = np.array(logits, dtype=np.float32)                                      # (V,) a copy
    for token, bias in p.logit_bias:
        x[token] += bias
    if p.repetition_penalty != 1:
        seen = np.unique(np.concatenate([np.asarray(prompt_ids, np.int64), np.asarray(output_ids, np.int64)]))
        s = x[seen]                                                             # (n,)
        x[seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and len(output_ids):
        ids, counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
        x[ids] -= (counts * p.frequency_penalty + p.presence_penalty).astype(np.float32)
    return x


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
        raise DecodingError(f"strategy: must be one of {', '.join(sorted(STRATEGIES))} "
                            f"(got {_show(params.strategy)})", field="strategy") from None
    return int(strategy(logits, rng, params))


def make_rng(seed: int | None) -> np.random.Generator:
    """The one source of randomness for a generation: same seed, same logits -> same tokens."""
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# A request's fields -> SamplingParams


def infer_strategy(strategy: str | None = None, temperature=None, top_k=None, top_p=None) -> str | None:
    """The strategy a request runs with, from the fields it sent (None: not sent). No field the
    caller sends is silently ignored: a knob the strategy would not use is a DecodingError naming it.

    With no strategy, the fields choose one (the same rule for /chat, the OpenAI routes, the
    leader's clients and `nanopipe generate`):
        (temperature 0, ...)             -> greedy     (the limit of every strategy as T -> 0)
        top_k given                      -> top_k
        top_p < 1                        -> top_p
        temperature only                 -> sampling
        nothing                          -> None: the model's configured default strategy
    top_k together with top_p < 1 is refused: each strategy uses one of them.
    top_p = 1 keeps every token, so it goes with any strategy (OpenAI's clients send it).

    infer_strategy(None, temperature=0.8, top_k=40) -> "top_k"
    infer_strategy("greedy", top_k=40)              -> DecodingError, field "top_k"
    """
    truncating_p = top_p is not None and is_number(top_p) and top_p < 1
    if strategy is None:
        if temperature is None and top_k is None and not truncating_p:
            return None
        if temperature is not None and is_number(temperature) and temperature == 0:
            return "greedy"
        if top_k is not None and truncating_p:
            raise DecodingError(f"top_p: top_k={top_k!r} and top_p={top_p!r} were both given, but a strategy "
                                f"uses one of them: send top_k (strategy top_k) or top_p < 1 (strategy top_p)",
                                field="top_p")
        if top_k is not None:
            return "top_k"
        return "top_p" if truncating_p else "sampling"
    uses = STRATEGY_USES.get(strategy)
    if uses is None:
        return strategy                     # validate() names the unknown strategy
    sent = {"temperature": temperature is not None and not (strategy == "greedy" and temperature == 0),
            "top_k": top_k is not None, "top_p": truncating_p}
    for name, given in sent.items():
        if given and name not in uses:
            value = {"temperature": temperature, "top_k": top_k, "top_p": top_p}[name]
            raise DecodingError(f"{name}: strategy {strategy!r} does not use {name} (got {value!r}); "
                                f"it uses {', '.join(uses) or 'none of temperature, top_k, top_p'}. Leave {name} "
                                f"out, or leave out the strategy to let the fields choose one", field=name)
    return strategy


def request_params(defaults: dict | None = None, **sent) -> SamplingParams:
    """SamplingParams for a request that sent `sent` (None: not sent), on top of the model config's
    `defaults`: the strategy comes from `infer_strategy`, then `make_params` fills in the rest.

    With the guide's config (active_decoding_strategy greedy):
        request_params(cfg, temperature=0.8, top_k=40, max_tokens=30) -> top_k, T=0.8, k=40, 30 tokens
        request_params(cfg)                                           -> greedy (the default)
    """
    strategy = infer_strategy(sent.get("strategy"), sent.get("temperature"), sent.get("top_k"), sent.get("top_p"))
    return make_params(defaults, **dict(sent, strategy=strategy))


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
        raise DecodingError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {list(_FIELDS)}",
                            field=sorted(unknown)[0])
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
                            f"(got {section!r})", field="decoding_strategies")
    for key, value in section.items():
        if key not in _SECTION_KEYS:
            raise DecodingError(f"decoding_strategies.{strategy}: unknown key {key!r}; "
                                f"known: {sorted(_SECTION_KEYS)}", field="decoding_strategies")
        values[_SECTION_KEYS[key]] = value
    values.update(given)
    return SamplingParams(**values).validate()
