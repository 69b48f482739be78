"""What a request may ask of the sampler: the fields, their ranges and defaults, the strategy names.

Every place that reads, sends or lists sampling settings imports them from here: the web routes
(/chat and the OpenAI routes), the leader's client protocol, `nanopipe generate`, and config.py
when it checks model_config.yaml's decoding_strategies. The arithmetic that picks a token lives in
decoding.py; this module holds no numpy, so config can import it on a node that only reads YAML.

    FIELDS                 the settings a request may send, besides the strategy:
                           max_tokens, temperature, top_k, top_p, seed, stop, frequency_penalty,
                           presence_penalty, repetition_penalty, logit_bias
    SamplingParams         those fields with their defaults; validate() holds their ranges
    STRATEGY_USES          strategy name -> the knobs it reads; decoding.register adds to it, so a
                           strategy registered there can be named in model_config.yaml at once
    SECTION_KEYS           model_config.yaml's keys in a strategy's section -> the field each sets
    DEFAULT_DECODING       the decoding settings of a model entry that leaves them out

    request_params(cfg, temperature=0.8, top_k=40)  -> SamplingParams("top_k", 0.8, top_k=40, ...)

(Named after the type it owns: "sampling" alone is already a strategy, decoding.sampling.)
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

from .logs import shown

MAX_STOPS = 4           # stop strings a client may send, as OpenAI allows (check_stop)
MAX_STOPS_TOTAL = 8     # with those an API route adds (the chat template's turn marker)
PENALTY_RANGE = 2.0     # frequency_penalty and presence_penalty lie in [-2, 2] (OpenAI)
# repetition_penalty lies in [1/100, 100]: a logit divided or multiplied by it stays a finite float32
# (1e-300 would turn a logit of 2 into inf, and the sampler could pick nothing)
REPETITION_RANGE = (0.01, 100.0)
BIAS_RANGE = 100.0      # a logit_bias value lies in [-100, 100] (OpenAI)


# The settings a request may send besides the strategy (whose name differs by API: `strategy` on the
# wire and the CLI, `decoding_strategy` in /chat, none in the OpenAI routes). The last five are the
# sampler's: every strategy honours them (decoding.penalize).
SAMPLER_FIELDS = ("stop", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias")
FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed") + SAMPLER_FIELDS


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


# The knobs a strategy may read, and the built-in strategies with the knobs each reads (decoding.py
# implements them). STRATEGY_USES is the registry of names: decoding.register adds to it.
TUNABLE = ("temperature", "top_k", "top_p")
BUILT_IN = {"greedy": (), "sampling": ("temperature",), "top_k": ("temperature", "top_k"),
            "top_p": ("temperature", "top_p")}
STRATEGY_USES: dict[str, tuple[str, ...]] = dict(BUILT_IN)


@dataclass(frozen=True)
class Range:
    """Where a knob's value may lie when its strategy reads it: lo (excluded with above=True) to hi."""

    lo: float
    above: bool = False
    hi: float | None = None

    def holds(self, x: float) -> bool:
        return math.isfinite(x) and (x > self.lo if self.above else x >= self.lo) and (self.hi is None or x <= self.hi)

    def __str__(self) -> str:
        """'a number in (0, 1]', 'a number > 0', 'a number >= 1': what an error says is allowed."""
        if self.hi is None:
            return f"a number {'>' if self.above else '>='} {self.lo:g}"
        return f"a number in {'(' if self.above else '['}{self.lo:g}, {self.hi:g}]"


# The knobs' ranges: SamplingParams.validate checks a request by them, config.py model_config.yaml's sections.
# (temperature 0 is allowed where a strategy does not read it: greedy with temperature 0 is still greedy.)
KNOB_RANGES = {"temperature": Range(0.0, above=True), "top_k": Range(1), "top_p": Range(0.0, above=True, hi=1.0)}

# model_config.yaml's keys in a strategy's section, and the SamplingParams field each sets
# (the guide writes `k` and `p`; `top_k` and `top_p` are accepted too).
SECTION_KEYS = {"temperature": "temperature", "k": "top_k", "top_k": "top_k", "p": "top_p", "top_p": "top_p"}


def section_keys(strategy: str) -> tuple:
    """The keys model_config.yaml may give in `strategy`'s section: those that set a knob it reads.

    section_keys("top_k") -> ("temperature", "k", "top_k");  section_keys("greedy") -> ()
    """
    uses = STRATEGY_USES[strategy]
    return tuple(key for key, field in SECTION_KEYS.items() if field in uses)


def unknown_strategy(value) -> DecodingError:
    """The error for a strategy no one registered, listing those that are."""
    return DecodingError(f"strategy: must be one of {', '.join(sorted(STRATEGY_USES))} (got {_show(value)})",
                         field="strategy")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `validate()` checks it; the strategies assume it was.

    Beyond the strategy's own knobs, every strategy honours (see decoding.penalize):
      stop                text that ends the reply, not included in it (up to 4 strings)
      frequency_penalty   subtracted from a token's logit once per time it was generated (OpenAI)
      presence_penalty    subtracted once from every token generated at least once (OpenAI)
      repetition_penalty  a token seen in prompt or reply: logit / p if positive, * p if negative
                          (CTRL; transformers' `repetition_penalty`); 1 = off, p in [0.01, 100]
      logit_bias          ((token id, bias), ...) added to those logits; -100 bans a token
    """

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 50             # transformers' default too, and the shipped model_config.yaml's k
    top_p: float = 1.0
    max_tokens: int = 50
    seed: int | None = None
    stop: tuple = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple = ()

    def validate(self, n_ctx: int | None = None, prompt_len: int = 0, n_vocab: int | None = None,
                 score_only: bool = False) -> SamplingParams:
        """Check every field; return a copy with numbers as plain Python int/float, `stop` as a
        tuple of strings and `logit_bias` as sorted (id, bias) pairs.

        With `n_ctx` (the model's context size), also check that the prompt plus the tokens to
        generate fit (check_fits): 1000 prompt tokens + max_tokens=50 > n_ctx=1024 is an error.
        With `n_vocab`, also that every logit_bias id is a token of the model.
        """
        if self.strategy not in STRATEGY_USES:
            raise unknown_strategy(self.strategy)
        uses = STRATEGY_USES[self.strategy]
        temperature = _real("temperature", self.temperature, "a number >= 0")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise DecodingError(f"temperature: must be a number >= 0 (got {_show(self.temperature)})",
                                field="temperature")
        if "temperature" in uses and not KNOB_RANGES["temperature"].holds(temperature):
            raise DecodingError(f"temperature: must be > 0 for strategy {self.strategy!r} "
                                f"(got {_show(self.temperature)}); use strategy 'greedy' for the argmax",
                                field="temperature")
        top_p = _real("top_p", self.top_p, str(KNOB_RANGES["top_p"]))
        if not KNOB_RANGES["top_p"].holds(top_p):
            raise DecodingError(f"top_p: must be {KNOB_RANGES['top_p']} (got {_show(self.top_p)})", field="top_p")
        top_k = _integer("top_k", self.top_k, minimum=int(KNOB_RANGES["top_k"].lo))
        max_tokens = _integer("max_tokens", self.max_tokens, minimum=1)
        seed = None if self.seed is None else _integer("seed", self.seed, minimum=0, what="an integer >= 0 or null")
        if n_ctx is not None:
            check_fits(_integer("prompt_len", prompt_len, minimum=0), max_tokens, n_ctx, score_only=score_only)
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
        out.update({f: getattr(self, f) for f in STRATEGY_USES.get(self.strategy, TUNABLE)})
        default = SamplingParams()
        for f in ("seed",) + SAMPLER_FIELDS:
            value = getattr(self, f)
            if value != getattr(default, f):
                out[f] = (list(value) if f == "stop" else {str(t): b for t, b in dict(value).items()}
                          if f == "logit_bias" else value)
        return out


def fits(prompt_len: int, max_tokens: int, n_ctx: int | None) -> bool:
    """The context rule: a prompt and the tokens to generate after it fit in n_ctx positions
    (None or 0: the context is not known, so anything fits). fits(1000, 24, 1024) -> True; fits(1000, 25, 1024)
    -> False. check_fits says what is wrong when it does not hold."""
    return not n_ctx or prompt_len + max_tokens <= n_ctx


def check_fits(prompt_len: int, max_tokens: int, n_ctx: int | None, field: str = "prompt",
               score_only: bool = False) -> None:
    """Do a prompt and its reply fit the model's context? The one place that says so: the web app
    asks before it sends a request, the leader and Engine (check_request) for whatever arrives.
    `field` names where the caller's API holds the prompt ("text", "messages", "prompt").

        prompt 1000 + max_tokens 50, n_ctx 1024 -> DecodingError "max_tokens too large: ...", field max_tokens
        prompt 1024, n_ctx 1024                 -> DecodingError "prompt: the prompt is 1024 tokens, ...", field prompt
        score_only (nothing generated)          -> the prompt alone may fill all n_ctx positions
    """
    if fits(prompt_len, 0 if score_only else max_tokens, n_ctx):
        return
    if score_only:
        raise DecodingError(f"{field}: the prompt's {prompt_len} tokens do not fit the context of n_ctx={n_ctx}; "
                            "score a shorter window", field=field)
    if not fits(prompt_len, 1, n_ctx):      # the prompt alone leaves no room: no max_tokens would do
        raise DecodingError(f"{field}: the prompt is {prompt_len} tokens, but the model's context is n_ctx={n_ctx} "
                            "tokens for prompt and reply together; shorten it", field=field)
    raise DecodingError(f"max_tokens too large: prompt length {prompt_len} + max_tokens {max_tokens} = "
                        f"{prompt_len + max_tokens} exceeds the context size n_ctx={n_ctx}; "
                        f"use max_tokens <= {n_ctx - prompt_len} or a shorter prompt", field="max_tokens")


def check_request(params: SamplingParams, prompt_ids, n_ctx: int | None = None, n_vocab: int | None = None,
                  score_only: bool = False) -> SamplingParams:
    """The one check a request passes before it runs; returns the checked params, which are what
    runs. The leader calls it on every GENERATE (whatever client sent it), Scheduler.check on a
    request made in-process; both with the model's n_ctx and n_vocab.

    The prompt: a non-empty list of token ids in 0..n_vocab-1; then every sampling field and that
    prompt and reply fit the context (SamplingParams.validate, check_fits).

        check_request(SamplingParams("greedy", max_tokens=5), [15496, 995], n_ctx=1024, n_vocab=50257) -> greedy, 5
        check_request(SamplingParams(), [], n_ctx=1024)                      -> DecodingError "prompt is empty ..."
    """
    if not isinstance(prompt_ids, (list, tuple)) or not all(is_int(t) for t in prompt_ids):
        raise DecodingError("prompt_ids: must be a list of token ids", field="prompt")
    if not prompt_ids:
        raise DecodingError("prompt is empty: give at least one token", field="prompt")
    if n_vocab is not None and not all(0 <= t < n_vocab for t in prompt_ids):
        raise DecodingError(f"prompt token ids must be in 0..{n_vocab - 1}", field="prompt")
    return params.validate(n_ctx=n_ctx, prompt_len=len(prompt_ids), n_vocab=n_vocab, score_only=score_only)


def _show(value, limit: int = 60) -> str:
    """A value as the caller wrote it: JSON where it can be (true, "5"), else repr; cut to `limit`
    characters, since a request may send anything of any size."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return shown(value, limit)          # reprlib: bounded in depth and length
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


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




# A model entry that leaves out its decoding settings gets these: the guide's (50 tokens, greedy,
# temperature 1.0, p 0.9), with k 50 as everywhere else in nanopipe (the guide's own file says 40).
TOP_P_DEFAULT = 0.9     # the top_p strategy's nucleus; the field's own default, 1, keeps every token
DEFAULT_DECODING = {"max_new_tokens": SamplingParams.max_tokens, "active_decoding_strategy": SamplingParams.strategy,
                    "decoding_strategies": {"greedy": {}, "sampling": {"temperature": SamplingParams.temperature},
                                            "top_p": {"temperature": SamplingParams.temperature, "p": TOP_P_DEFAULT},
                                            "top_k": {"temperature": SamplingParams.temperature,
                                                      "k": SamplingParams.top_k}}}


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
    return resolve_request(defaults, **sent).validate()


def resolve_request(defaults: dict | None = None, **sent) -> SamplingParams:
    """request_params without the validation: for a caller that validates once, later, with the
    prompt and the model in hand (the leader: check_request)."""
    strategy = infer_strategy(sent.get("strategy"), sent.get("temperature"), sent.get("top_k"), sent.get("top_p"))
    return _merge(defaults, **dict(sent, strategy=strategy))


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
    return _merge(defaults, **overrides).validate()


def _merge(defaults: dict | None = None, **overrides) -> SamplingParams:
    """make_params' precedence, not yet validated."""
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
        if key not in SECTION_KEYS:
            raise DecodingError(f"decoding_strategies.{strategy}: unknown key {key!r}; "
                                f"known: {sorted(SECTION_KEYS)}", field="decoding_strategies")
        values[SECTION_KEYS[key]] = value
    values.update(given)
    return SamplingParams(**values)
