"""GPT-2 as small numpy functions, split into embed -> blocks[lo:hi] -> head.

A pipeline stage is literally a slice of `blocks`; single-process generation runs the very same
functions with lo=0, hi=n_layer. Parameter names follow GPT-2's own (wte, wpe, ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f), so calls read like the paper's diagram:

    x = embed(ids, positions, wte, wpe)                        # (T, C)
    for p in blocks[lo:hi]:
        x = block(x, **p, n_head=n_head, ...)                  # (T, C)
    logits = head(x, ln_f, lm_head)                            # (T, V)

`gpt2()` at the end is exactly those three lines; everything that runs the model calls it or its
three parts (the scheduler cuts it between the blocks and the head to let the ring run in between).

Shape notation used across nanopipe: T rows (tokens) in this step, S positions attended to
(cached + new), C = n_embd, H = n_head, D = C // H (head size), V = vocabulary size, L = layers.
A batched step's T rows are its sequences' new rows one after another; one sequence's share is n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fast_decode import decode_blocks
from .kernels import choose_untimed, gemv_per_row, head_in_slices, kernels, product


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2's hyperparameters, read from a weights file: gpt2-small is the defaults (L=12, C=768, H=12)."""
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_ctx: int = 1024
    n_vocab: int = 50257

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class ContextOverflow(ValueError):
    """A sequence would go past the model's context window (n_ctx)."""


# ---------------------------------------------------------------------------------------------
# the building blocks


_GELU_C = math.sqrt(2.0 / math.pi)  # a Python float, so float32 arrays stay float32


def gelu(x):
    """GPT-2's GELU, the tanh approximation: gelu(0) = 0, gelu(1) ~ 0.8412, gelu(-1) ~ -0.1588."""
    if not isinstance(x, np.ndarray) or x.ndim == 0:            # a number (the docstring's examples)
        return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x)))
    # the same formula computed in place in that very order (the same float32 results, bit for
    # bit), so a (T, 4C) prompt chunk makes 2 temporaries, not 8
    t = 0.044715 * x
    t *= x
    t *= x
    t += x
    t *= _GELU_C
    np.tanh(t, out=t)
    t += 1.0
    y = 0.5 * x
    y *= t
    return y                                                    # x's shape, e.g. (T, 4C)


def softmax(x, axis=-1):
    """softmax([1, 2, 3]) = [0.090, 0.245, 0.665]; subtracting the max keeps exp() from overflowing."""
    e = x - x.max(axis=axis, keepdims=True)                     # x's shape, e.g. (H, T, S)
    np.exp(e, out=e)                                            # in place: the same values, one array
    e /= e.sum(axis=axis, keepdims=True)
    return e                                                    # x's shape, each row summing to 1


def layer_norm(x, g, b, eps: float = 1e-5):
    """Normalize each row to mean 0 and variance 1, then scale by g and shift by b."""
    mean = x.mean(axis=-1, keepdims=True)                       # (T, 1)
    d = x - mean                                                # (T, C), each row centred
    var = np.square(d).mean(axis=-1, keepdims=True)             # (T, 1)
    var += eps
    # g * d / sqrt(var + eps) + b, computed in place in that very order (the same float32 results,
    # bit for bit): one (T, C) array instead of five
    d *= g
    d /= np.sqrt(var, out=var)
    d += b
    return d                                                    # (T, C)


def linear(x, w, b):
    """x @ w + b, with w (in, out) as GPT-2's Conv1D stores it.

    The loader keeps w in the memory order this process found faster at start (row-major, or
    column-major: w.T a row-major (out, in) matrix; `kernels.choose_layout`), and `kernels.product`
    hands it to BLAS as the row-major matrix its memory holds: x @ w, or (w.T @ x.T).T. Either way
    BLAS streams it once for all T rows. A few rows (2 .. `kernels.gemv_rows`, chosen at start for
    this machine: nanopipe/kernels.py) go through one matrix-vector product each instead of one
    matrix product; each such row is then computed by the very call a lone row makes, bit for bit.
    """
    T = x.shape[0]
    if 1 < T <= kernels.gemv_rows:
        return gemv_per_row(x, w) + b                           # T x (1, in) @ (in, out) -> (T, out)
    return product(x, w) + b                                    # (T, in) @ (in, out) -> (T, out)


def embed(ids, positions, wte, wpe):
    """Token embedding plus learned position embedding: row t is wte[ids[t]] + wpe[positions[t]]."""
    return wte[ids] + wpe[positions]                            # (T, C)


def head(x, ln_f, lm_head):
    """Final LayerNorm, then the LM head: lm_head is wte itself (tied weights), shape (V, C), no
    second copy (154 MB for gpt2), kept as stored (row-major) or column-major (the bytes of a (C, V)
    row-major matrix), whichever this process found faster at start (`kernels.choose_layout`);
    `kernels.product` hands it to BLAS as the row-major matrix it is. For one row this is a gemv
    that streams the matrix once.

    A few rows (2 .. `kernels.head_rows`, chosen at start like `linear`'s) go through wte in
    cache-sized slices (`kernels.head_in_slices`): wte is read from memory once, not once per row.
    """
    h = layer_norm(x, **ln_f)                                   # (T, C)
    T = h.shape[0]
    if T > 1 and kernels.head_how is None:
        choose_untimed()                                        # nobody chose at start: pinned or one gemm
    if 1 < T <= kernels.head_rows:
        return head_in_slices(h, lm_head)                       # (T, C) -> (T, V)
    return product(h, lm_head.T)                                # (T, C) @ (C, V) -> (T, V)


def mlp(x, c_fc, c_proj):
    """Position-wise feed-forward: expand to 4C, GELU, project back to C."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)            # (T, C) -> (T, 4C) -> (T, C)


def attention(q, k, v, start: int):
    """Causal scaled dot-product attention for one sequence, all heads at once.

    q: (H, T, D) queries for positions start .. start+T-1
    k, v: (H, S, D) keys and values for positions 0 .. S-1, where S = start + T
    Query t may look at keys 0 .. start+t and never at a later position (the causal mask).
    """
    T, S = q.shape[1], k.shape[1]
    att = q @ k.transpose(0, 2, 1)                              # (H, T, S)
    att *= 1.0 / math.sqrt(q.shape[-1])                         # scaled in place
    if T > 1:  # a single new row may see everything cached: no mask needed
        future = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # (T, S)
        att[:, future] = np.float32(-1e10)                      # (H, T, S), the future masked out
    return softmax(att) @ v                                     # (H, T, S) @ (H, S, D) -> (H, T, D)


# ---------------------------------------------------------------------------------------------
# the KV cache


class KVCache:
    """Keys and values of ONE sequence for the layers of ONE stage.

    k and v are (L, H, capacity, D); `length` positions are filled. Capacity grows in chunks
    (never by re-concatenating the whole cache every token) and never past n_ctx.
    Worked example: after a 5-token prompt, length == 5; each generated token adds one row.
    """

    CHUNK = 128

    def __init__(self, n_layers: int, n_head: int, head_dim: int, n_ctx: int):
        self.n_ctx = n_ctx
        self.length = 0
        self._shape = (n_layers, n_head, 0, head_dim)
        self.k = np.empty(self._shape, np.float32)
        self.v = np.empty(self._shape, np.float32)

    @classmethod
    def for_model(cls, config: GPTConfig, n_layers: int) -> "KVCache":
        """An empty cache for one sequence through n_layers blocks of a model shaped `config`."""
        return cls(n_layers, config.n_head, config.head_dim, config.n_ctx)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n_new: int) -> int:
        """Make room for n_new more positions; returns the start position of those rows."""
        need = self.length + n_new
        if need > self.n_ctx:
            raise ContextOverflow(f"sequence of {need} tokens exceeds the context window n_ctx={self.n_ctx} "
                                  f"({self.length} already in the cache, {n_new} new); "
                                  "use a shorter prompt or fewer max_tokens")
        if need > self.capacity:
            cap = min(self.n_ctx, max(need, 2 * self.capacity, self.CHUNK))
            cap = min(self.n_ctx, -(-cap // self.CHUNK) * self.CHUNK)
            L, H, _, D = self._shape
            for name in ("k", "v"):
                grown = np.empty((L, H, cap, D), np.float32)
                grown[:, :, :self.length] = getattr(self, name)[:, :, :self.length]
                setattr(self, name, grown)
        return self.length


# ---------------------------------------------------------------------------------------------
# the transformer block, over a batch of sequences


def mha(x, c_attn, c_proj, *, n_head: int, layer: int, segments):
    """Multi-head causal self-attention over the rows of several sequences at once.

    x holds the new rows of every sequence in `segments` (a list of (KVCache, n_rows), in row order),
    so the big matmuls (c_attn, c_proj) run once for all of them, while each sequence attends only
    to its own cache. Each sequence's new keys/values are written into its cache at `layer`.

    The heads are c_attn's: its 3C columns are q, k and v of H heads of D columns. A member of a
    split stage runs this very function on its part (`shard_block`): n_head = its h heads, c_attn
    (C, 3hD), c_proj (hD, C); "C" in the comments below then means hD, except in x and the result.
    """
    C = c_attn["w"].shape[1] // 3                               # H*D: n_embd, or a member's share of it
    D = C // n_head
    qkv = linear(x, **c_attn)                                   # (T, 3C)
    ys, row = [], 0
    for cache, n in segments:                                   # this sequence's n rows; S = end
        start, end = cache.length, cache.length + n
        q, k, v = qkv[row:row + n].reshape(n, 3, n_head, D).transpose(1, 2, 0, 3)  # (n, 3C) -> 3 x (H, n, D)
        cache.k[layer, :, start:end] = k                        # (H, n, D) into (H, capacity, D)
        cache.v[layer, :, start:end] = v                        # (H, n, D) into (H, capacity, D)
        y = attention(q, cache.k[layer, :, :end], cache.v[layer, :, :end], start)  # (H, n, D)
        ys.append(y.transpose(1, 0, 2).reshape(n, C))           # (H, n, D) -> (n, H, D) -> (n, C)
        row += n
    out = ys[0] if len(ys) == 1 else np.concatenate(ys)         # (T, C)
    return linear(out, **c_proj)                                # (T, C)


def block(x, ln_1, attn, ln_2, mlp, *, n_head: int, layer: int, segments):
    """One transformer block: two residual lines, attention then MLP (pre-LayerNorm)."""
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head, layer=layer, segments=segments)   # (T, C)
    x = x + _mlp(layer_norm(x, **ln_2), **mlp)                  # (T, C)
    return x                                                    # (T, C)


_mlp = mlp  # `block` takes a parameter named mlp (GPT-2's name); keep the function reachable


def blocks_forward(x, blocks, *, n_head: int, segments):
    """Run a stage's blocks over the new rows of each sequence, then advance each cache.

    segments: list of (KVCache, n_rows); the caches must belong to this stage (len(blocks) layers).
    """
    if not kernels.chosen:
        choose_untimed()                        # nobody chose at start: the pinned value or one gemm
    for cache, n in segments:
        cache.reserve(n)
    if blocks and all(n == 1 for _, n in segments):  # a decode step: the same arithmetic as block's,
        x = decode_blocks(x, blocks, n_head=n_head, segments=segments)   # with fewer calls (fast_decode.py)
    else:
        for layer, p in enumerate(blocks):
            x = block(x, **p, n_head=n_head, layer=layer, segments=segments)   # (T, C)
    for cache, n in segments:
        cache.length += n
    return x                                                    # (T, C)


def gpt2(ids, positions, wte, wpe, blocks, ln_f, lm_head, *, n_head: int, segments, rows=None):
    """The forward pass (picoGPT's `gpt2()`): token ids -> embed -> blocks -> head -> logits.

    positions: the position of each id (a sequence continues at its cache's length); segments as
    for `blocks_forward`. `rows`, when given, picks which rows get logits (the head is (C, V), so
    a prefill usually wants only its last row). Worked example, a 3-token prompt and a fresh cache:

        gpt2(ids=[464, 3290, 318], positions=[0, 1, 2], ..., segments=[(cache, 3)])  -> (3, V)

    The scheduler runs the same three parts with the ring of workers between `blocks_forward` and
    `head`: rank 0 holds embed and blocks[0:hi0], the workers blocks[hi0:], rank 0 the head again.
    """
    x = embed(ids, positions, wte, wpe)                         # (T, C)
    x = blocks_forward(x, blocks, n_head=n_head, segments=segments)   # (T, C)
    return head(x if rows is None else x[rows], ln_f, lm_head)  # (T, V), or (len(rows), V)


# ---------------------------------------------------------------------------------------------
# one block over several members: the Megatron split (tensor parallelism)
#
# A pipeline stage runs whole blocks one after another; a split stage's m members run every block
# together, each on a share of it. Attention splits by heads (a head never needs another head's
# numbers until c_proj mixes them), the MLP by its 4C hidden columns (GELU works column by column).
# c_proj then makes each member's output a PARTIAL sum: the block's projection is the sum of the
# members' partials, so a block needs 2 sums across members (an all-reduce), one after each c_proj:
#
#     x = x + all_reduce([attn_share(x, member r's part) for each member r])    # (T, C)
#     x = x + all_reduce([mlp_share(x, member r's part) for each member r])     # (T, C)
#
# Shapes of a member's part: h of the H heads (h*D columns of q, k and v), f of the 4C hidden columns.


class SplitError(ValueError):
    """A block cannot be split as asked (more members than heads, a member that does not exist)."""


def split_evenly(n: int, m: int) -> list:
    """n things over m members, as evenly as possible, the remainder to the first members, one each
    (the rule partition.even follows for layers over nodes):

        split_evenly(12, 5) -> [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    """
    q, r = divmod(n, m)
    bounds = [i * q + min(i, r) for i in range(m + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class Share:
    """The part of every block that member `member` of `members` holds: heads h0..h1-1 and hidden
    columns f0..f1-1 of the MLP. Worked example, gpt2-small (C=768, H=12, D=64) over 5 members:

        share_of(0, 5, 12, 768)  -> heads (0, 3), hidden (0, 615)      3 heads, 615 of 3072 columns
        share_of(4, 5, 12, 768)  -> heads (10, 12), hidden (2458, 3072)  2 heads, 614 columns
    """
    member: int
    members: int
    heads: tuple            # (h0, h1): its heads
    hidden: tuple           # (f0, f1): its columns of the MLP's (T, 4C) hidden layer
    n_embd: int             # C
    head_dim: int           # D

    @property
    def n_head(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def attn_rows(self) -> tuple:
        """Its rows of attn.c_proj (C, C): the D rows of each of its heads, (h0*D, h1*D)."""
        return self.heads[0] * self.head_dim, self.heads[1] * self.head_dim

    @property
    def qkv_columns(self) -> list:
        """Its columns of attn.c_attn (C, 3C): its heads' columns of q, of k and of v. Member 1 of 2
        with C=16, H=2, D=8: [(8, 16), (24, 32), (40, 48)]."""
        h0, h1 = self.attn_rows
        return [(i * self.n_embd + h0, i * self.n_embd + h1) for i in range(3)]

    @property
    def adds_bias(self) -> bool:
        """Member 0 adds each c_proj's bias; the others hold zeros (see `shard_block`)."""
        return self.member == 0


def share_of(member: int, members: int, n_head: int, n_embd: int) -> Share:
    """What `member` of `members` holds of a block with n_head heads and n_embd columns (see Share)."""
    if not 0 <= member < members:
        raise SplitError(f"member {member} of {members} does not exist: members are 0..{members - 1}")
    if members > n_head:
        raise SplitError(f"{members} members but only {n_head} heads: every member needs at least one "
                         f"head, so split a block over at most {n_head} members")
    return Share(member, members, split_evenly(n_head, members)[member],
                 split_evenly(4 * n_embd, members)[member], n_embd, n_embd // n_head)


def shard_block(p, share: Share) -> dict:
    """A member's part of one block's parameters `p` (as `block` takes them), shaped the same way:

        ln_1, ln_2        the same arrays: every member normalizes the whole row
        attn.c_attn       w[:, its q, k, v columns] (C, 3 h*D), b likewise
        attn.c_proj       w[its h*D rows] (h*D, C)
        mlp.c_fc          w[:, f0:f1] (C, f), b[f0:f1]
        mlp.c_proj        w[f0:f1] (f, C)
        c_proj biases     member 0 holds them, the others zeros

    gpt2-small (C=768, H=12) over 2 members: each holds h=6 heads and f=1536 columns, c_attn
    (768, 1152), attn.c_proj (384, 768), c_fc (768, 1536), mlp.c_proj (1536, 768): half a block.
    Why the bias on member 0 rather than after the sum: a member's part is then `mha` and `mlp`
    themselves, unchanged, the all-reduce is a plain sum with nothing after it, and one member
    (m = 1) is `block` call for call. Adding zeros changes nothing, exactly.
    The matrices keep the memory order of p's (the loader's: see `linear`); weights.load_stage(share=...)
    reads the same arrays straight from the file.
    """
    qkv = np.concatenate([np.arange(a, b) for a, b in share.qkv_columns])       # (3 h*D,) column indices
    (a0, a1), (f0, f1) = share.attn_rows, share.hidden

    def bias(b):
        return b if share.adds_bias else np.zeros_like(b)                       # (C,)

    def kept(part, w):                                                          # in w's memory order
        return np.asfortranarray(part) if np.isfortran(w) else np.ascontiguousarray(part)

    attn, ffn = p["attn"], p["mlp"]
    return {
        "ln_1": p["ln_1"],
        "attn": {"c_attn": {"w": kept(attn["c_attn"]["w"][:, qkv], attn["c_attn"]["w"]),  # (C, 3 h*D)
                            "b": attn["c_attn"]["b"][qkv]},                       # (3 h*D,)
                 "c_proj": {"w": kept(attn["c_proj"]["w"][a0:a1], attn["c_proj"]["w"]),   # (h*D, C)
                            "b": bias(attn["c_proj"]["b"])}},                     # (C,)
        "ln_2": p["ln_2"],
        "mlp": {"c_fc": {"w": kept(ffn["c_fc"]["w"][:, f0:f1], ffn["c_fc"]["w"]),      # (C, f)
                         "b": ffn["c_fc"]["b"][f0:f1].copy()},                    # (f,)
                "c_proj": {"w": kept(ffn["c_proj"]["w"][f0:f1], ffn["c_proj"]["w"]),     # (f, C)
                           "b": bias(ffn["c_proj"]["b"])}},                       # (C,)
    }


def attn_share(x, p, *, n_head: int, layer: int, segments):
    """A member's partial of `block`'s first residual line: attention with its n_head heads only,
    through its rows of c_proj. `p` from `shard_block`; segments' caches hold its heads only,
    KVCache(L, n_head, D, n_ctx). The members' partials sum to the block's attention output."""
    return mha(layer_norm(x, **p["ln_1"]), **p["attn"], n_head=n_head, layer=layer, segments=segments)  # (T, C)


def mlp_share(x, p):
    """A member's partial of `block`'s second residual line: its f hidden columns, (T, C) -> (T, f) ->
    (T, C). The members' partials sum to the block's MLP output."""
    return _mlp(layer_norm(x, **p["ln_2"]), **p["mlp"])        # (T, C)


def all_reduce(partials):
    """The sum of the members' partial outputs, in member order: what every member gets back.

    all_reduce([[[1., 2.]], [[10., 20.]]]) -> [[11., 22.]]. Every member must receive this very sum
    (the same additions in the same order), so that their residual streams x stay equal, bit for
    bit, block after block. This one runs in one process: the reference a wire exchange must equal.
    """
    total = np.array(partials[0], np.float32)                   # (T, C), a copy
    for p in partials[1:]:
        total += p                                              # (T, C)
    return total                                                # (T, C)


def block_split(x, parts, *, n_heads, layer: int, segments):
    """`block` computed as m members, here in one process: parts[r], n_heads[r] and segments[r] are
    member r's parameters (`shard_block`), head count and (KVCache, n_rows) list. 2 sums per block.
    Within float tolerance of `block` (the sums add in another order); m = 1 is `block` bit for bit.
    """
    x = x + all_reduce([attn_share(x, p, n_head=h, layer=layer, segments=s)
                        for p, h, s in zip(parts, n_heads, segments)])          # (T, C), sum 1
    x = x + all_reduce([mlp_share(x, p) for p in parts])                        # (T, C), sum 2
    return x                                                                    # (T, C)


def blocks_forward_split(x, parts, *, n_heads, segments):
    """`blocks_forward` for a split stage: parts[r] is member r's list of blocks (one per layer),
    segments[r] its (KVCache, n_rows) list; each member's caches advance as blocks_forward's do."""
    if not kernels.chosen:
        choose_untimed()
    for member in segments:
        for cache, n in member:
            cache.reserve(n)
    for layer in range(len(parts[0])):
        x = block_split(x, [p[layer] for p in parts], n_heads=n_heads, layer=layer, segments=segments)  # (T, C)
    for member in segments:
        for cache, n in member:
            cache.length += n
    return x                                                                    # (T, C)


def blocks_forward_member(x, blocks, *, n_head: int, segments, reduce):
    """One member's side of `blocks_forward_split`, for members in separate processes: its part of
    every block (`shard_block`), its own caches, and `reduce(partial) -> sum` doing the all-reduce
    with the other members (nanopipe/cluster/group.py sums over the wire, in member order):

        x = x + reduce(attn_share(x, p, ...))       # (T, C), sum 1
        x = x + reduce(mlp_share(x, p))             # (T, C), sum 2

    With reduce = lambda p: all_reduce([p, other members' partials ...]) this is block_split's
    arithmetic exactly; every member gets the same sums, so their x stay equal bit for bit."""
    if not kernels.chosen:
        choose_untimed()
    for cache, n in segments:
        cache.reserve(n)
    if blocks and all(n == 1 for _, n in segments):     # a decode step: the same arithmetic, fewer calls
        x = decode_blocks(x, blocks, n_head=n_head, segments=segments, reduce=reduce)     # (fast_decode.py)
    else:
        for layer, p in enumerate(blocks):
            x = x + reduce(attn_share(x, p, n_head=n_head, layer=layer, segments=segments))   # (T, C)
            x = x + reduce(mlp_share(x, p))                                                    # (T, C)
    for cache, n in segments:
        cache.length += n
    return x                                                                    # (T, C)


# ---------------------------------------------------------------------------------------------
# the LM head over several members: split by vocabulary
#
# A split stage that ends the ring may also run the head. Every member holds the whole row after
# the last all-reduce, so each can compute the logits of its share of the vocabulary, rows v0..v1-1
# of wte (tied: wte is the head), with no sum across members; the shares side by side are the logits:
#
#     logits = concatenate([head(x, ln_f, wte[v0:v1]) for each member's (v0, v1)], axis=1)   # (T, V)
#
# Each logit is one row of wte times the same normalized row, so a share's logits are the whole
# head's logits for those columns (up to how BLAS blocks the product: compare within a tolerance).


def vocab_share(member: int, members: int, n_vocab: int) -> tuple:
    """The rows of wte (the columns of the logits) member `member` of `members` holds, contiguous,
    the remainder to the first members (split_evenly):

        vocab_share(0, 2, 50257) -> (0, 25129)      vocab_share(1, 2, 50257) -> (25129, 50257)
    """
    if not 0 <= member < members:
        raise SplitError(f"member {member} of {members} does not exist: members are 0..{members - 1}")
    return split_evenly(n_vocab, members)[member]


def head_share(x, ln_f, lm_head_rows):
    """A member's part of `head`: the logits of its rows of the vocabulary. lm_head_rows (v1-v0, C),
    rows v0..v1-1 of wte. (T, C) -> (T, v1-v0)."""
    return head(x, ln_f, lm_head_rows)                          # (T, v1-v0)


def gather_logits(shares):
    """The members' logit shares side by side, in member (vocabulary) order: [(T, V0), (T, V1), ...]
    -> (T, V). gather_logits([[[1., 2.]], [[3.]]]) -> [[1., 2., 3.]]."""
    return np.concatenate(shares, axis=1)                       # (T, V)


# Greedy decoding needs no whole row of logits: the token is the argmax, its logprob the max minus
# the row's logsumexp, and both combine across shares of the vocabulary. Each member reduces its
# share's rows to (max, argmax, logsumexp); the shares' tops, in vocabulary order, give the row's:
#
#     max = max of the maxima        argmax = the argmax of the first share holding that max
#     logsumexp = logaddexp over the shares' logsumexps
#
# The first share holding the max has the lowest such index (shares are contiguous, in order, and
# each share's argmax is its lowest), so the token is np.argmax's over the whole row, ties included.


def share_top(logits, v0: int = 0):
    """Each row of a share of the logits (its columns are tokens v0..) reduced to its max, the
    token holding it (the lowest on ties, as np.argmax) and its logsumexp: (R, v) -> (R,) float64,
    (R,) int64, (R,) float64. A row holding any NaN or inf gets a NaN logsumexp (not a token to take).

        share_top([[1., 3., 3.]], v0=10) -> max [3.], argmax [11], logsumexp [3 + log(e^-2 + 1 + 1)] = [3.759]
    """
    x = np.asarray(logits)                                              # (R, v)
    idx = np.argmax(x, axis=1)                                          # (R,)
    top = x[np.arange(len(x)), idx]                                     # (R,) as decoding.logsumexp: exp in
    with np.errstate(invalid="ignore", over="ignore"):                  # the logits' dtype, the sum in float64
        s = np.sum(np.exp(x - top[:, None]), axis=1, dtype=np.float64)  # (R,)
        lse = top.astype(np.float64) + np.log(s)                        # (R,)
    lse[~np.isfinite(x).all(axis=1)] = np.nan
    return top.astype(np.float64), idx.astype(np.int64) + v0, lse


def combine_tops(tops):
    """The members' share_top results, in member (vocabulary) order -> the whole row's (max,
    argmax, logsumexp), each (R,):

        combine_tops([([3.], [1], [3.5]), ([3.], [7], [3.2])]) -> max [3.], argmax [1] (the lower),
        logsumexp [logaddexp(3.5, 3.2)] = [4.054]
    """
    maxes = np.array([t[0] for t in tops], np.float64)                  # (m, R)
    first = np.argmax(maxes, axis=0)                                    # (R,) the first share with the max
    rows = np.arange(maxes.shape[1])
    idx = np.array([t[1] for t in tops], np.int64)[first, rows]          # (R,)
    lse = np.logaddexp.reduce(np.array([t[2] for t in tops], np.float64), axis=0)   # (R,)
    return maxes[first, rows], idx, lse
