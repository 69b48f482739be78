"""How many numpy calls one decode token costs (counted, not timed).

Between the big matmuls of a decode step sit many small numpy calls (LayerNorm, attention, GELU,
bias and residual adds); at one row each costs microseconds of fixed overhead, so their number is
part of the time per token. This counts them for one decode step (one new row, a filled cache) of a
model with gpt2-small's 12 blocks and 12 heads; the count does not depend on the width, so a narrow
model (C = 96) counts what gpt2-small's step calls.

A "numpy call" is one that nanopipe's own code starts: a ufunc run by an operator or by name
(`x + b`, `np.tanh(t, out=t)`, `@`), a numpy function (`np.concatenate`, `np.empty`) or an array
method (`x.mean()`, `.reshape()`); what numpy does inside a method is not counted again, so the count
reads the same across numpy versions. Slicing and assignment into slices are not counted.

Run it to see the breakdown: `.venv/bin/python tests/test_decode_calls.py`.
"""
from __future__ import annotations

import collections
import os
import sys

import numpy as np

from nanopipe import model
from nanopipe.model import KVCache, blocks_forward, embed, head

NUMPY_DIR = os.path.dirname(np.__file__)
NANOPIPE_DIR = os.path.dirname(model.__file__)
L, H = 12, 12                   # gpt2-small's blocks and heads
CALLS_PER_TOKEN_AT_MOST = 625   # 617 counted now: 611 before fast_decode.py, 708 before LayerNorm and q, k, v were cut
FRESH_ARRAYS_AT_MOST = 10       # ufunc results in new arrays: 4 now (embed, the head's LayerNorm), 232 before


def _ours(frame) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(NANOPIPE_DIR)


class _Counter:
    def __init__(self):
        self.calls = collections.Counter()
        self.fresh = 0              # ufunc calls whose result is a new array (no out=): the temporaries
        self.on = False

    def profile(self, frame, event, arg):
        """sys.setprofile hook: numpy functions and array methods called from nanopipe's code."""
        if not self.on:
            return
        if event == "c_call" and _ours(frame):
            owner = getattr(arg, "__self__", None)
            if (getattr(arg, "__module__", None) or "").startswith("numpy") or isinstance(owner, np.ndarray):
                self.calls[f"call {getattr(arg, '__qualname__', arg)}"] += 1
        elif (event == "call" and frame.f_code.co_filename.startswith(NUMPY_DIR)
              and not frame.f_code.co_name.startswith("_") and _ours(frame.f_back)):
            self.calls[f"call {frame.f_code.co_name}"] += 1        # a numpy function written in Python


COUNTER = _Counter()


class Counted(np.ndarray):
    """An array that counts the ufuncs and array functions nanopipe's code runs on it (operators
    included, which no profiler sees); every result is Counted again, so the whole step is seen."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if COUNTER.on and _ours(sys._getframe(1)):
            COUNTER.calls[f"ufunc {ufunc.__name__}" + ("" if method == "__call__" else f".{method}")] += 1
            COUNTER.fresh += out is None
        inputs = tuple(i.view(np.ndarray) if isinstance(i, Counted) else i for i in inputs)
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Counted) else o for o in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(Counted) if isinstance(result, np.ndarray) else result

    def __array_function__(self, func, types, args, kwargs):
        if COUNTER.on and _ours(sys._getframe(1)):
            COUNTER.calls[f"function {func.__name__}"] += 1
        return super().__array_function__(func, types, args, kwargs)


def decode_step_calls(n_layer: int = L, n_head: int = H, n_embd: int = 96, prompt: int = 16):
    """The numpy calls of one decode step after a `prompt`-token prefill: (Counter, logits)."""
    rng = np.random.default_rng(0)
    C = n_embd

    def w(*shape):                                              # column-major, as the loader keeps them
        return np.asfortranarray(rng.standard_normal(shape).astype(np.float32) * 0.02).view(Counted)

    def ln():
        return {"g": np.ones(C, np.float32).view(Counted), "b": np.zeros(C, np.float32).view(Counted)}
    blocks = [{"ln_1": ln(),
               "attn": {"c_attn": {"w": w(C, 3 * C), "b": w(3 * C)}, "c_proj": {"w": w(C, C), "b": w(C)}},
               "ln_2": ln(),
               "mlp": {"c_fc": {"w": w(C, 4 * C), "b": w(4 * C)}, "c_proj": {"w": w(4 * C, C), "b": w(C)}}}
              for _ in range(n_layer)]
    wte, wpe, ln_f = w(500, C), w(64, C), ln()
    cache = KVCache(n_layer, n_head, C // n_head, 64)
    blocks_forward(embed(np.arange(prompt) % 50, np.arange(prompt), wte, wpe), blocks, n_head=n_head,
                   segments=[(cache, prompt)])                 # the prompt, not counted
    COUNTER.calls.clear()
    COUNTER.fresh = 0
    sys.setprofile(COUNTER.profile)
    COUNTER.on = True
    try:
        x = embed(np.array([7]), np.array([prompt]), wte, wpe)                          # (1, C)
        x = blocks_forward(x, blocks, n_head=n_head, segments=[(cache, 1)])             # (1, C)
        logits = head(x, ln_f, wte)                                                     # (1, V)
    finally:
        COUNTER.on = False
        sys.setprofile(None)
    calls = collections.Counter(COUNTER.calls)
    calls.fresh = COUNTER.fresh
    return calls, np.asarray(logits)


def test_a_decode_token_makes_at_most_so_many_numpy_calls():
    calls, logits = decode_step_calls()
    total = sum(calls.values())
    shown = ", ".join(f"{k} {v}" for k, v in calls.most_common())
    assert logits.shape == (1, 500) and np.isfinite(logits).all()
    # the counter sees operators: 4 weight products and 2 attention products a block, and the head
    assert calls["ufunc matmul"] == 6 * L + 1, shown
    assert total <= CALLS_PER_TOKEN_AT_MOST, f"{total} numpy calls per decode token ({shown})"
    assert calls.fresh <= FRESH_ARRAYS_AT_MOST, f"{calls.fresh} ufunc results in new arrays per decode token"


def test_the_count_grows_with_blocks_not_with_heads():
    """Nothing runs once per head: a step of 12 heads makes as many calls as a step of 1 head;
    each block adds the same number."""
    twelve, _ = decode_step_calls(n_layer=2, n_head=12)
    one, _ = decode_step_calls(n_layer=2, n_head=1)
    three_blocks, _ = decode_step_calls(n_layer=3, n_head=12)
    assert sum(twelve.values()) == sum(one.values()), (twelve, one)
    per_block = sum(three_blocks.values()) - sum(twelve.values())
    assert 0 < per_block <= (CALLS_PER_TOKEN_AT_MOST - 10) // L, per_block


if __name__ == "__main__":
    counted, _ = decode_step_calls()
    print(f"{sum(counted.values())} numpy calls per decode token (gpt2-small's {L} blocks and {H} heads), "
          f"{counted.fresh} of them making a new array")
    for name, n in counted.most_common():
        print(f"{n:5d}  {name}")
