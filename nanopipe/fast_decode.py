"""A decode step's blocks with fewer numpy calls: `model.block`'s arithmetic, bit for bit.

In a decode step every sequence brings ONE new row, so the arrays between the weight matmuls are
tiny ((T, C) with T = the sequences in the step) and a numpy call there costs its fixed overhead
(1-6 us), not its arithmetic. model.py's functions make ~50 such calls a block and a fresh array
for most of them; at 12 blocks that is ~1-2 ms of a ~25 ms token (docs/PERFORMANCE.md). This module
runs the very same float32 operations in the very same order as `model.block` (same ufuncs, same
operands, same reductions along the same axis), so its results are identical bit for bit
(tests/test_fast_decode.py checks it), with less around them:

    once per step     every array between the matmuls is made once (`Step`) and each block writes
                      into it (`out=`); each sequence's score buffer, its cache views for every
                      layer, the views of q, k, v and of the heads' output rows
    per block         LayerNorm with np.add.reduce (what .mean() runs, without its Python wrapper),
                      the residual added in place, softmax's max and sum as bare reductions, the
                      heads' outputs written straight into the rows c_proj reads (no transpose,
                      no reshape, no concatenate); attention is all heads at once (no loop per head)
    every call        its scalars are float32 numbers, not Python floats: numpy types a Python float
                      by its value on each call (1-5 us more) and then uses the very same float32

`model.blocks_forward` sends a step here when each of its sequences has exactly one new row; a
prompt (several rows of one sequence, the causal mask) takes `model.block`. Worked example, one
sequence with 5 positions cached, gpt2-small: x (1, 768) -> 12 blocks -> (1, 768), each block
reading q, k, v from one (1, 2304) buffer and attending over the 6 positions in one (12, 1, 6) one.
"""
from __future__ import annotations

import math

import numpy as np

from .kernels import gemv_per_row, kernels, product


class Step:
    """The arrays one decode step reuses in every block, for T sequences of one new row each.

    Widths come from the first block, so a member of a split stage (its share of the heads and of
    the MLP's hidden columns: model.shard_block) is served as well as a whole block:
    C = n_embd (x and c_proj's output), A = c_attn's width / 3 (H*D, or a member's h*D), F = c_fc's.
    """

    def __init__(self, x, blocks, *, n_head: int, segments, eps: float = 1e-5):
        T, C = x.shape
        p = blocks[0]
        A = p["attn"]["c_attn"]["w"].shape[1] // 3
        F = p["mlp"]["c_fc"]["w"].shape[1]
        D = A // n_head
        # the scalars as float32 numbers: a Python float costs a ufunc call ~1-5 us more (numpy
        # decides its type by value each time) and rounds to the very same float32 first
        self.C, self.eps, self.scale = np.float32(C), np.float32(eps), np.float32(1.0 / math.sqrt(D))
        def new(*shape):                            # like x (a subclass of ndarray stays one)
            return np.empty_like(x, np.float32, shape=shape)
        self.x = np.array(x, np.float32, subok=True)    # (T, C) the residual stream, updated in place
        self.h, self.sq, self.proj = new(3, T, C)   # (T, C) each: a LayerNorm's output, its squares, a c_proj's output
        self.mean, self.var = new(2, T, 1)          # (T, 1) each
        self.qkv = new(T, 3 * A)                    # (T, 3A) c_attn's output
        self.y = new(T, A)                          # (T, A) the heads' outputs, as c_proj reads them
        self.f, self.t = new(2, T, F)               # (T, F) each: c_fc's output (then GELU's), GELU's inner term
        qkv = self.qkv.reshape(T, 3, n_head, D)     # views, made once: row i's q, k, v (H, D)
        heads = self.y.reshape(T, n_head, 1, D)     # row i's heads' outputs (H, 1, D), inside y
        self.seqs = []
        for i, (cache, _) in enumerate(segments):
            pos, S = cache.length, cache.length + 1
            top, total = new(2, n_head, 1, 1)                       # (H, 1, 1) each: softmax's max and sum
            self.seqs.append({
                "max": top, "sum": total,
                "cache": cache, "pos": pos,
                "q": qkv[i, 0][:, None, :],                         # (H, 1, D)
                "k": qkv[i, 1], "v": qkv[i, 2],                     # (H, D) each, this row's
                "keys": cache.k[:, :, :S].transpose(0, 1, 3, 2),    # (L, H, D, S) all layers' keys
                "values": cache.v[:, :, :S],                        # (L, H, S, D)
                "att": new(n_head, 1, S),                           # (H, 1, S) the scores
                "out": heads[i]})                                   # (H, 1, D), rows of y

    def layer_norm(self, ln):
        """model.layer_norm(x, **ln) into self.h: the same operations in the same order."""
        x, h, sq, mean, var = self.x, self.h, self.sq, self.mean, self.var
        np.add.reduce(x, -1, None, mean, True)      # (T, 1) what x.mean() sums ...
        np.divide(mean, self.C, out=mean)           # ... and divides (float32: rounds as mean does)
        np.subtract(x, mean, out=h)                 # (T, C) centred
        np.square(h, out=sq)
        np.add.reduce(sq, -1, None, var, True)      # (T, 1)
        np.divide(var, self.C, out=var)
        np.add(var, self.eps, out=var)
        h *= ln["g"]
        h /= np.sqrt(var, out=var)
        h += ln["b"]
        return h                                    # (T, C)


def _linear(x, w, b, out):
    """model.linear(x, w, b) into `out`: the same kernel for the same row count, then the bias."""
    T = x.shape[0]
    if T == 1:
        product(x, w, out=out)                                      # (1, in) @ (in, out): a gemv
    elif T <= kernels.gemv_rows:
        out[:] = gemv_per_row(x, w)                                 # T x (1, in) @ (in, out)
    else:
        out[:] = product(x, w)                                      # (T, in) @ (in, out): one gemm
    out += b
    return out                                                      # (T, out)


def decode_blocks(x, blocks, *, n_head: int, segments, reduce=None):
    """`model.blocks_forward`'s loop over `blocks` for a step whose segments each have one new row:
    x (T, C) -> (T, C), identical bit for bit. The caller reserves each cache's row and advances
    its length afterwards, as for `block`.

    `reduce`, for a member of a split stage (`model.blocks_forward_member`, identical bit for bit
    to it): each c_proj's output is this member's partial, and `reduce(partial) -> the members'
    sum` is added to x instead (x += reduce(proj)). The partial is a buffer reused by the next
    c_proj: `reduce` must not keep it."""
    st = Step(x, blocks, n_head=n_head, segments=segments)
    x, y, proj, f, t = st.x, st.y, st.proj, st.f, st.t
    for layer, p in enumerate(blocks):
        attn, ffn = p["attn"], p["mlp"]
        # attention: x + c_proj(heads(c_attn(ln_1(x))))
        _linear(st.layer_norm(p["ln_1"]), **attn["c_attn"], out=st.qkv)             # (T, 3A)
        for s in st.seqs:
            cache, pos, att = s["cache"], s["pos"], s["att"]
            cache.k[layer, :, pos] = s["k"]                                         # (H, D) into the cache
            cache.v[layer, :, pos] = s["v"]
            np.matmul(s["q"], s["keys"][layer], out=att)                            # (H, 1, D) @ (H, D, S)
            att *= st.scale
            np.maximum.reduce(att, -1, None, s["max"], True)                        # (H, 1, 1) softmax's
            np.subtract(att, s["max"], out=att)
            np.exp(att, out=att)
            np.add.reduce(att, -1, None, s["sum"], True)
            att /= s["sum"]                                                         # (H, 1, S)
            np.matmul(att, s["values"][layer], out=s["out"])                        # (H, 1, S) @ (H, S, D)
        _linear(y, **attn["c_proj"], out=proj)                                      # (T, C)
        x += proj if reduce is None else reduce(proj)                               # a split stage: the sum
        # MLP: x + c_proj(gelu(c_fc(ln_2(x)))), GELU as model.gelu computes it, in place
        _linear(st.layer_norm(p["ln_2"]), **ffn["c_fc"], out=f)                     # (T, F)
        np.multiply(f, _GELU_A, out=t)
        t *= f
        t *= f
        t += f
        t *= _GELU_C
        np.tanh(t, out=t)
        t += _ONE
        f *= _HALF
        f *= t                                                                      # (T, F) gelu(f)
        _linear(f, **ffn["c_proj"], out=proj)                                       # (T, C)
        x += proj if reduce is None else reduce(proj)
    return x                                                                        # (T, C)


# model.gelu's constants, as the float32 numbers its Python floats round to
_GELU_A, _GELU_C = np.float32(0.044715), np.float32(math.sqrt(2.0 / math.pi))
_ONE, _HALF = np.float32(1.0), np.float32(0.5)
