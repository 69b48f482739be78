"""A walk through nanopipe, one token at a time. Run it as a table of contents:

    pytest -v tests/test_walkthrough.py

Each test is one step of the lesson, in order, and checks real values; docs/WALKTHROUGH.md links
every step to the code that implements it. The model is a tiny synthetic GPT-2 (random weights, so
its text is gibberish): 6 layers, n_embd C = 16, H = 2 heads of D = 8 columns each, the real
50257-token vocabulary. It is small enough to compute one attention head by hand, here, in plain
numpy, and compare it with the model's own function.

Shapes, as everywhere in nanopipe: T rows (tokens) in this step, S positions attended to,
C = n_embd, H = n_head, D = C // H, V = vocabulary size.
"""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
from floats import assert_close, assert_same, max_diff

from nanopipe import model
from nanopipe.cluster.wire import (
    HEADER,
    Msg,
    array_meta,
    decode_frame,
    encode_frame,
    frame_array,
    recv_frame,
    send_array,
)
from nanopipe.decoding import SamplingParams, make_rng, sample, top_p_ids
from nanopipe.engine import Engine
from nanopipe.model import (
    KVCache,
    attention,
    attn_share,
    block,
    block_split,
    blocks_forward,
    embed,
    gelu,
    head,
    layer_norm,
    linear,
    mha,
    mlp,
    mlp_share,
    shard_block,
    share_of,
)
from nanopipe.partition import even
from nanopipe.weights import init_weights, load_stage

PROMPT = "Hello world, distributed computing!"
IDS = [15496, 995, 11, 9387, 14492, 0]
N_LAYER, C, H, N_CTX, V = 6, 16, 2, 64, 50257
D = C // H
T = len(IDS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("walkthrough") / "tiny.safetensors")
    init_weights(path, n_layer=N_LAYER, n_embd=C, n_head=H, n_ctx=N_CTX, n_vocab=V, seed=0)
    return path


@pytest.fixture(scope="module")
def stage(weights):
    """The whole model in one process: every block, plus wte, wpe, ln_f and the LM head."""
    return load_stage(weights)


@pytest.fixture(scope="module")
def tok():
    from nanopipe.tokenizer import get_tokenizer
    return get_tokenizer()


def new_cache(n_layers: int = N_LAYER) -> KVCache:
    return KVCache(n_layers, H, D, N_CTX)


def prompt_rows(stage) -> np.ndarray:
    return embed(np.array(IDS), np.arange(T), stage.wte, stage.wpe)                 # (T, C)


# ---------------------------------------------------------------------------------------------
# 1. from text to the first activations


def test_01_text_becomes_bpe_pieces_and_token_ids(tok):
    """GPT-2 never sees characters. The BPE tokenizer cuts text into pieces it knows (a leading
    space belongs to the word after it) and looks each piece up in a 50257-entry vocabulary:

        "Hello world, distributed computing!"
        -> "Hello"  " world"  ","  " distributed"  " computing"  "!"
        ->  15496     995      11      9387           14492        0

    Decoding is the reverse lookup, and gives back the exact text.
    """
    ids = tok.encode(PROMPT)
    assert ids == [15496, 995, 11, 9387, 14492, 0]
    assert tok.pieces(ids) == ["Hello", " world", ",", " distributed", " computing", "!"]
    assert tok.decode(ids) == PROMPT
    assert tok.n_vocab == V


def test_02_token_and_position_embeddings_make_the_first_activations(stage):
    """Row t of the activations is wte[id_t] + wpe[t]: the token's row of the token table
    wte (V, C) plus the position's row of the position table wpe (n_ctx, C).

        6 ids -> x of shape (T, C) = (6, 16), float32

    The same token at another position gives another row: order is part of the input.
    """
    assert stage.wte.shape == (V, C) and stage.wpe.shape == (N_CTX, C)
    x = prompt_rows(stage)                                                          # (T, C)
    assert x.shape == (T, C) and x.dtype == np.float32
    for t, i in enumerate(IDS):
        assert_same(x[t], stage.wte[i] + stage.wpe[t], f"row {t}: embed adds these very two rows")
    hello_at_3 = embed(np.array([15496]), np.array([3]), stage.wte, stage.wpe)      # (1, C)
    assert max_diff(hello_at_3[0], x[0]) > 1e-3, "'Hello' at position 3 has the row of position 0"


# ---------------------------------------------------------------------------------------------
# 2. inside one transformer block


def attend_by_hand(q, k, v):
    """One attention head with plain loops. q, k, v: (T, D) for positions 0..T-1.

    Query t scores every key s <= t by a dot product scaled by 1/sqrt(D), turns the scores into
    weights with a softmax, and returns the weighted sum of the values. Keys after t are never
    looked at (the causal mask), so their weight is exactly 0.
    """
    n, d = q.shape
    weights = np.zeros((n, n))                                                      # (T, S)
    out = np.zeros((n, d))                                                          # (T, D)
    for t in range(n):
        scores = [float(q[t] @ k[s]) / math.sqrt(d) for s in range(t + 1)]          # only s <= t
        e = [math.exp(sc - max(scores)) for sc in scores]
        for s in range(t + 1):
            weights[t, s] = e[s] / sum(e)
            out[t] += weights[t, s] * v[s]
    return out, weights


def qkv_of_block0(stage):
    """Block 0's queries, keys and values for the prompt: each (H, T, D)."""
    p = stage.blocks[0]
    x = layer_norm(prompt_rows(stage), **p["ln_1"])                                 # (T, C)
    qkv = x @ p["attn"]["c_attn"]["w"] + p["attn"]["c_attn"]["b"]                   # (T, 3C): q | k | v
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, H, D).transpose(1, 0, 2) for i in range(3))
    return x, q, k, v


def test_03_one_attention_head_by_hand_equals_model_attention(stage):
    """Head 0 of block 0, computed by `attend_by_hand` above, against model.attention.

    c_attn maps each row (C,) to 3C numbers: the query, key and value of every head side by side;
    head h owns columns h*D .. h*D+D-1 of each. To read the model's attention WEIGHTS, give it the
    identity matrix as values: weights @ I = weights. Row t must then
      - put exactly 0 on every future position s > t (the causal mask),
      - sum to 1 (a softmax), and
      - for t = 0, put all its weight, exactly 1.0, on the only position it may see: itself.
    """
    _, q, k, v = qkv_of_block0(stage)
    out_hand, w_hand = attend_by_hand(q[0], k[0], v[0])
    out = attention(q[:1], k[:1], v[:1], start=0)[0]                                # (T, D)
    assert_close(out, out_hand, "head 0 output, model vs by hand")

    eye = np.eye(T, dtype=np.float32)[None]                                         # (1, S, S)
    w = attention(q[:1], k[:1], eye, start=0)[0]                                    # (T, S): the weights
    assert_close(w, w_hand, "head 0 weights, model vs by hand")
    future = np.triu(np.ones((T, T), bool), k=1)                                    # s > t
    assert np.all(w[future] == 0.0), "a query looked at a later position"
    assert_close(w.sum(axis=1), np.ones(T), "each row of weights sums to 1")
    assert w[0, 0] == 1.0, "position 0 sees only itself: exp(0) / exp(0), times 1, is exactly 1"


def test_04_multi_head_attention_is_heads_side_by_side_then_a_projection(stage):
    """mha runs every head at once: each head attends with its own D columns, the H outputs (T, D)
    are laid side by side into (T, H*D) = (T, C), and c_proj mixes them. On the way it stores this
    step's keys and values in the KV cache, at the rows of their positions."""
    p = stage.blocks[0]["attn"]
    x, q, k, v = qkv_of_block0(stage)
    heads = [attend_by_hand(q[h], k[h], v[h])[0] for h in range(H)]                 # H x (T, D)
    want = np.concatenate(heads, axis=1) @ p["c_proj"]["w"] + p["c_proj"]["b"]      # (T, C)
    cache = new_cache()
    cache.reserve(T)
    got = mha(x, **p, n_head=H, layer=0, segments=[(cache, T)])                     # (T, C)
    assert got.shape == (T, C)
    assert_close(got, want, "mha, model vs by hand")
    # k, v here are x @ w by hand; the model computes (w.T @ x.T).T: another BLAS kernel on some CPUs
    assert_close(cache.k[0, :, :T], k, "cached keys, model vs by hand")
    assert_close(cache.v[0, :, :T], v, "cached values, model vs by hand")


def test_05_the_mlp_expands_to_4C_applies_gelu_and_projects_back(stage):
    """Each row alone: (C,) -> c_fc -> (4C,) = (64,) -> GELU -> c_proj -> (C,).

    GELU (tanh form) is 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))):
    gelu(0) = 0, gelu(1) = 0.8412, gelu(-1) = -0.1588 -- a smooth ReLU.
    """
    p = stage.blocks[0]["mlp"]
    x = layer_norm(prompt_rows(stage), **stage.blocks[0]["ln_2"])                   # (T, C)
    h = x @ p["c_fc"]["w"] + p["c_fc"]["b"]                                         # (T, 4C)
    g = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))   # (T, 4C)
    want = g @ p["c_proj"]["w"] + p["c_proj"]["b"]                                  # (T, C)
    assert h.shape == (T, 4 * C)
    assert_close(mlp(x, **p), want, "mlp, model vs by hand")
    assert_close(gelu(np.array([0.0, 1.0, -1.0])), [0.0, 0.8412, -0.1588], "gelu(0, 1, -1)", tol=1e-4)


def test_06_a_block_is_two_residual_lines(stage):
    """Pre-LayerNorm GPT-2 block: each sublayer reads a normalized copy and ADDS its answer:

        x = x + mha(layer_norm(x, ln_1))
        x = x + mlp(layer_norm(x, ln_2))

    layer_norm by hand: (x - mean) / sqrt(variance + 1e-5) * g + b, row by row. Every row comes out
    with mean 0 and variance var / (var + 1e-5) before g and b (synthetic weights: g = 1, b = 0):
    nearly 1 for real activations, but our random embeddings are tiny (variance ~4e-4), so the
    1e-5 that guards against dividing by zero shows: ~0.97.
    """
    p = stage.blocks[0]

    def ln(x, g, b):
        mean = x.mean(axis=-1, keepdims=True)                                       # (T, 1)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)                        # (T, 1)
        return (x - mean) / np.sqrt(var + 1e-5) * g + b                             # (T, C)

    x = prompt_rows(stage)
    normed = ln(x, **p["ln_1"])
    assert_close(normed.mean(axis=1), np.zeros(T), "rows after layer_norm have mean 0")
    var = x.var(axis=1)
    assert_close(normed.var(axis=1), var / (var + 1e-5), "rows after layer_norm: variance var / (var + eps)")
    assert np.all((0.9 < normed.var(axis=1)) & (normed.var(axis=1) < 1))

    cache = new_cache()
    cache.reserve(T)
    a = x + mha(ln(x, **p["ln_1"]), **p["attn"], n_head=H, layer=0, segments=[(cache, T)])
    want = a + mlp(ln(a, **p["ln_2"]), **p["mlp"])                                  # (T, C)
    fresh = new_cache()
    fresh.reserve(T)
    got = block(x, **p, n_head=H, layer=0, segments=[(fresh, T)])
    assert got.shape == x.shape == (T, C)
    assert_close(got, want, "block, model vs two residual lines")


def test_07_the_lm_head_turns_the_last_row_into_probabilities_over_50257_tokens(stage):
    """After the last block: the final LayerNorm ln_f, then the LM head, a (C, V) matrix that is
    wte transposed (GPT-2 ties the two). Only the last row is needed to predict the next token:

        x[-1:] (1, C) -> layer_norm -> @ wte.T -> logits (1, V) -> softmax -> probabilities

    The probabilities are all >= 0 and sum to 1; greedy decoding picks the largest.
    """
    x = blocks_forward(prompt_rows(stage), stage.blocks, n_head=H, segments=[(new_cache(), T)])   # (T, C)
    logits = head(x[-1:], stage.ln_f, stage.lm_head)                                # (1, V)
    assert logits.shape == (1, V)
    assert_close(logits, layer_norm(x[-1:], **stage.ln_f) @ stage.wte.T, "head vs layer_norm @ wte.T", tol=1e-4)
    probs = model.softmax(logits[0])                                                # (V,)
    assert probs.min() >= 0 and abs(float(probs.sum()) - 1) < 1e-5
    first = Engine(stage).generate(IDS, SamplingParams("greedy", max_tokens=1))["token_ids"]
    assert first == [int(np.argmax(logits[0]))]


# ---------------------------------------------------------------------------------------------
# 3. choosing the next token


def draws(strategy: str, logits, n: int = 2000, **kw) -> np.ndarray:
    params = SamplingParams(strategy, max_tokens=1, **kw).validate()
    rng = make_rng(0)
    return np.array([sample(logits, params, rng) for _ in range(n)])


def test_08_each_decoding_strategy_on_four_logits():
    """One fixed logits vector, small enough to do by hand:

        logits       [2.0,    1.0,    0.5,    -1.0 ]
        exp          [7.389,  2.718,  1.649,   0.368]   sum 12.124
        probs        [0.6095, 0.2242, 0.1360,  0.0303]
        running sum  [0.6095, 0.8337, 0.9697,  1.0   ]

      greedy      the argmax: always id 0.
      sampling    any id, in proportion to probs: id 0 about 61% of the time.
      top_k=2     keep the 2 largest, {0, 1}, renormalized: [0.731, 0.269]; 2 and 3 never come.
      top_p=0.8   keep the fewest most likely ids whose probabilities reach 0.8:
                  0.6095 < 0.8, 0.8337 >= 0.8 -> {0, 1}.
      top_p=0.9   0.8337 < 0.9, 0.9697 >= 0.9 -> {0, 1, 2}; id 3 never comes.
    """
    logits = np.array([2.0, 1.0, 0.5, -1.0])
    probs = np.exp(logits) / np.exp(logits).sum()
    assert_close(probs, [0.6095, 0.2242, 0.1360, 0.0303], "softmax of the four logits", tol=1e-4)

    assert set(draws("greedy", logits, n=50)) == {0}
    sampled = draws("sampling", logits)
    assert set(sampled) == {0, 1, 2, 3} and abs((sampled == 0).mean() - 0.6095) < 0.04
    top2 = draws("top_k", logits, top_k=2)
    assert set(top2) == {0, 1} and abs((top2 == 0).mean() - 0.7311) < 0.04
    assert top_p_ids(probs, 0.8).tolist() == [0, 1]
    assert set(draws("top_p", logits, top_p=0.8)) == {0, 1}
    assert top_p_ids(probs, 0.9).tolist() == [0, 1, 2]
    assert set(draws("top_p", logits, top_p=0.9)) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# 4. splitting the model over machines


def test_09_blocks_are_split_over_nodes_every_layer_exactly_once(weights, stage):
    """Rank r runs blocks[lo:hi]; the ranges are contiguous, in rank order, and cover every layer once:

        12 layers over 3 nodes: 4, 4, 4          -> [(0, 4), (4, 8), (8, 12)]
        12 layers over 5 nodes: 3, 3, 2, 2, 2    (the remainder goes to the first ranks)

    A stage is a slice of the model, not a second model: our 6 layers run as three stages of 2,
    one after the other, give the very same activations, bit for bit, as all 6 in one process.
    """
    assert even(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert [hi - lo for lo, hi in even(12, 5)] == [3, 3, 2, 2, 2]
    for n_nodes in range(1, 13):
        layers = [i for lo, hi in even(12, n_nodes) for i in range(lo, hi)]
        assert layers == list(range(12)), f"{n_nodes} nodes"

    x = prompt_rows(stage)
    whole = blocks_forward(x, stage.blocks, n_head=H, segments=[(new_cache(), T)])
    for lo, hi in even(N_LAYER, 3):                                                 # (0, 2), (2, 4), (4, 6)
        part = load_stage(weights, lo, hi, rank0=False)
        x = blocks_forward(x, part.blocks, n_head=H, segments=[(new_cache(hi - lo), T)])
    assert_same(x, whole, "3 stages of 2 blocks run the very calls of the 6 blocks, in the same order")


def test_09b_a_block_split_in_two_halves_by_heads_and_summed_is_the_block(stage):
    """The other way to split: not blocks over nodes but every block over two nodes (Megatron's
    tensor parallelism). Our block has H = 2 heads, so each half holds one head and half the MLP:

        half r   c_attn (C, 3C) -> its head's q, k, v columns (16, 3 * 8)   c_proj (C, C) -> its 8 rows (8, 16)
                 c_fc (C, 4C)   -> its 32 columns (16, 32)                  c_proj (4C, C) -> its 32 rows (32, 16)
                 both LayerNorms whole; each c_proj bias on half 0 only (half 1 holds zeros)

    c_proj is a matrix product, and a product splits over its inner dimension:
    [a0 a1] @ [[W0], [W1]] = a0 @ W0 + a1 @ W1. So each half's output (T, C) is a PARTIAL sum,
    and the two partials added are the block's: two sums per block, after attention and after the
    MLP, each a C-wide row per token across the two nodes. The sum adds in another order than
    one matmul does, so the halves equal the block within float tolerance, not bit for bit.
    """
    p = stage.blocks[0]
    halves = [shard_block(p, share_of(r, 2, H, C)) for r in range(2)]
    assert halves[1]["attn"]["c_attn"]["w"].shape == (C, 3 * D) and halves[1]["attn"]["c_proj"]["w"].shape == (D, C)
    assert halves[1]["mlp"]["c_fc"]["w"].shape == (C, 2 * C) and not halves[1]["mlp"]["c_proj"]["b"].any()

    def one_head_caches():                                                         # a KV cache of 1 head each
        caches = [KVCache(1, 1, D, N_CTX) for _ in halves]
        for c in caches:
            c.reserve(T)
        return caches

    x = prompt_rows(stage)                                                          # (T, C)
    c0, c1 = one_head_caches()
    a = x + (attn_share(x, halves[0], n_head=1, layer=0, segments=[(c0, T)])
             + attn_share(x, halves[1], n_head=1, layer=0, segments=[(c1, T)]))   # (T, C): sum 1
    by_hand = a + (mlp_share(a, halves[0]) + mlp_share(a, halves[1]))              # (T, C): sum 2

    whole = new_cache(1)
    whole.reserve(T)
    want = block(x, **p, n_head=H, layer=0, segments=[(whole, T)])                 # (T, C)
    print(f"two halves summed vs the block: largest difference {max_diff(by_hand, want):.2e}")
    assert_close(by_hand, want, "block as two halves summed, vs block")
    assert_close(c1.k[0, 0, :T], whole.k[0, 1, :T], "half 1 caches the keys of head 1 only")
    c0, c1 = one_head_caches()
    assert_same(block_split(x, halves, n_heads=[1, 1], layer=0, segments=[[(c0, T)], [(c1, T)]]), by_hand,
                "block_split runs these very calls: the two halves, summed in half order")


def test_10_one_activation_travels_as_a_frame_on_the_wire(stage):
    """Between nodes, activations travel as one frame: a 20-byte header, a compact JSON meta (which
    sessions, dtype, shape) and the raw float32 bytes. One decode row of our model:

        20 (header) + len(meta JSON) + 1 row * 16 floats * 4 bytes = 20 + len(meta) + 64

    Sent through a real socket pair and decoded, the array comes back identical, bit for bit.
    """
    row = blocks_forward(prompt_rows(stage), stage.blocks[:2], n_head=H, segments=[(new_cache(2), T)])[-1:]
    meta = array_meta(row, {"batch": 1, "epoch": 1, "sessions": [{"id": "s1", "pos": 5, "n": 1}], "trace": []})
    meta_json = json.dumps(meta, separators=(",", ":")).encode()
    data = encode_frame(Msg.ACT, meta, row)
    assert HEADER.size == 20 and data[:4] == b"NPIP"
    assert len(data) == 20 + len(meta_json) + 4 * C

    a, b = socket.socketpair()
    with a, b:
        send_array(a, Msg.ACT, meta, row)
        frame = recv_frame(b, "the socket pair")
    got = frame_array(frame, expect_cols=C)
    assert got.dtype == np.float32
    assert_same(got, row, "the row's bytes through a socket: a copy")
    assert_same(frame_array(decode_frame(data), expect_cols=C), row, "the row's bytes in a frame: a copy")


# ---------------------------------------------------------------------------------------------
# 5. generating many tokens: the KV cache


def test_11_the_kv_cache_grows_one_row_per_token(stage):
    """Attention needs the keys and values of every earlier position. Instead of recomputing them
    for each new token, each stage keeps them in a KV cache, (L, H, positions, D) for k and for v:

        prefill the 6-token prompt -> cache.length 6
        decode token 7, 8, 9       -> cache.length 7, 8, 9   (one new row per layer and head)

    What the cache holds is what recomputing the whole sequence at once would give.
    """
    cache = new_cache()
    blocks_forward(prompt_rows(stage), stage.blocks, n_head=H, segments=[(cache, T)])
    assert cache.length == T
    new_ids = [262, 318, 257]                                                       # " the", " is", " a"
    lengths = []
    for i, token in enumerate(new_ids):
        x = embed(np.array([token]), np.array([T + i]), stage.wte, stage.wpe)       # (1, C)
        y = blocks_forward(x, stage.blocks, n_head=H, segments=[(cache, 1)])        # (1, C)
        assert y.shape == (1, C)
        lengths.append(cache.length)
    assert lengths == [7, 8, 9]

    all_ids = IDS + new_ids
    again = new_cache()
    blocks_forward(embed(np.array(all_ids), np.arange(9), stage.wte, stage.wpe), stage.blocks, n_head=H,
                   segments=[(again, 9)])
    assert_close(cache.k[:, :, :9], again.k[:, :, :9], "cached keys vs recomputed keys")
    assert_close(cache.v[:, :, :9], again.v[:, :, :9], "cached values vs recomputed values")


def test_12_with_the_cache_each_decode_step_feeds_one_row_whatever_the_position(stage, monkeypatch):
    """Count the work instead of timing it. Every weight matmul costs in proportion to the ROWS fed
    through it (a block does 12*C^2 multiply-adds per row); attention scores cost T * S per head.

        decode at position p        rows fed   attention (T, S)   block matmul work per layer
        with the cache                   1      (1, p + 1)        12*C^2          -> flat
        recomputing everything       p + 1      (p+1, p+1)        12*C^2 * (p+1)  -> grows

    Only the attention over the cached positions grows, by one key per step, and it is tiny next
    to the matmuls (D = 8 multiply-adds per key, against 12*C^2 = 3072 per row). Both ways give
    the same logits.
    """
    seen = []                                                                       # (T, S) of each call
    fed = []                                                                        # (rows, in, out) of each linear

    def attention_spy(q, k, v, start):
        seen.append((q.shape[1], k.shape[1]))
        return attention(q, k, v, start)

    def linear_spy(x, w, b):                # every weight matmul of a block goes through model.linear
        fed.append((x.shape[0],) + w.shape)
        return linear(x, w, b)

    def lesson_blocks(x, blocks, *, n_head, segments):  # the lesson's block(), spied on: a decode step
        for layer, p in enumerate(blocks):              # otherwise runs fast_decode.py, which does the same
            x = model.block(x, **p, n_head=n_head, layer=layer, segments=segments)   # arithmetic bit for bit
        return x

    monkeypatch.setattr(model, "attention", attention_spy)
    monkeypatch.setattr(model, "linear", linear_spy)
    monkeypatch.setattr(model, "decode_blocks", lesson_blocks)
    per_row = N_LAYER * 12 * C * C          # multiply-adds of every block for one row: c_attn 3C^2, c_proj C^2,
    ids = list(IDS)                         # c_fc 4C^2, mlp c_proj 4C^2
    cache = new_cache()
    blocks_forward(prompt_rows(stage), stage.blocks, n_head=H, segments=[(cache, T)])
    for token in [262, 318, 257, 11]:                                               # at positions 6, 7, 8, 9
        pos = len(ids)
        ids.append(token)
        seen.clear()
        fed.clear()
        x = embed(np.array([token]), np.array([pos]), stage.wte, stage.wpe)         # (1, C): the new token
        cached = head(blocks_forward(x, stage.blocks, n_head=H, segments=[(cache, 1)]), stage.ln_f, stage.lm_head)
        assert len(fed) == 4 * N_LAYER, f"position {pos}: {len(fed)} calls to linear, not 4 per block"
        assert {rows for rows, _, _ in fed} == {1}, f"position {pos}, cached: rows fed to linear {fed}"
        assert sum(r * i * o for r, i, o in fed) == per_row, f"position {pos}: the cached step's work grew"
        assert set(seen) == {(1, pos + 1)}, f"position {pos}: attention (T, S) {set(seen)}"  # 1 query, p+1 keys

        seen.clear()
        fed.clear()
        full_x = embed(np.array(ids), np.arange(pos + 1), stage.wte, stage.wpe)     # (p + 1, C): everything
        full = head(blocks_forward(full_x, stage.blocks, n_head=H, segments=[(new_cache(), pos + 1)]),
                    stage.ln_f, stage.lm_head)
        assert {rows for rows, _, _ in fed} == {pos + 1}, f"position {pos}, recomputed: rows fed {fed}"
        assert sum(r * i * o for r, i, o in fed) == per_row * (pos + 1)
        assert set(seen) == {(pos + 1, pos + 1)}
        assert_close(cached[0], full[-1], f"logits at position {pos}, cached vs recomputed", tol=1e-4)


# ---------------------------------------------------------------------------------------------
# 6. the cluster


@pytest.fixture(scope="module")
def cluster(weights):
    """A real cluster of 3 processes on 127.0.0.1: `nanopipe serve --rank 0` and two `nanopipe join`."""
    from nanopipe.tools.localcluster import LocalCluster
    with LocalCluster(weights, nodes=3, ready_timeout=60) as cl:
        yield cl


def test_13_the_cluster_answers_token_for_token_what_one_process_answers(weights, stage, cluster):
    """The same prompt, greedy, on the 3-node cluster and in this process. The cluster runs the very
    same functions, only spread out: rank 0 embeds and runs blocks 0-1, rank 1 blocks 2-3, rank 2
    blocks 4-5, and rank 0 applies the head. So the tokens must be equal, one for one.

    With trace=True each token also tells its journey (what `nanopipe trace` prints): the first
    token's step carried the whole 6-row prompt round the ring, every later one a single row, and
    the frame grows a little at each hop because it carries the trace so far.
    """
    params = SamplingParams("greedy", max_tokens=6)
    alone = Engine(stage).generate(IDS, params)
    events = []
    with cluster.client() as c:
        spread = c.generate(IDS, params, trace=True, on_event=events.append)
    assert spread["token_ids"] == alone["token_ids"]
    assert_close(spread["logprobs"], alone["logprobs"], "logprobs, cluster vs one process")

    assert [e["token"] for e in events] == alone["token_ids"]
    for i, e in enumerate(events):
        rows = T if i == 0 else 1
        assert [h["rank"] for h in e["hops"]] == [0, 1, 2]
        assert [h["layers"] for h in e["hops"]] == [[0, 1], [2, 3], [4, 5]]        # [first, last], as "0-1" is written
        assert all(h["shape"] == [rows, C] for h in e["hops"])
        sizes = [h["bytes"] for h in e["hops"]]
        assert all(s > 20 + 4 * rows * C for s in sizes) and sizes == sorted(set(sizes))
        assert e["top"][0][0] == e["token"]                                         # greedy takes the top-1
        assert_close(e["top"][0][1], math.exp(e["logprob"]), "top-1 probability", tol=1e-5)


def test_14_nanopipe_trace_prints_each_tokens_journey(cluster):
    """`nanopipe trace PROMPT` shows, for every new token, each hop: node, rank, layers, the
    shape and bytes it sends, its compute time and the time in transit; then the top 5."""
    from click.testing import CliRunner

    from nanopipe.tools.cli import main
    args = ["trace", "Hello world", "--leader", cluster.leader_addr, "--config-dir", cluster.config_dir,
            "--max-tokens", "3"]
    out = CliRunner().invoke(main, args + ["--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["prompt_ids"] == [15496, 995] and report["prompt_pieces"] == ["Hello", " world"]
    assert [t["index"] for t in report["tokens"]] == [0, 1, 2]
    for t in report["tokens"]:
        assert [h["node"] for h in t["hops"]] == ["node0", "node1", "node2"]
        assert len(t["top"]) == 5 and t["top"][0]["id"] == t["id"]
        assert all(h["compute_ms"] >= 0 for h in t["hops"])

    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    # the same prompt a second time: every node kept the first run's KV cache (nanopipe/prefix.py),
    # so only the last prompt token is computed again (its logits give the first new token)
    assert "token 1:" in text.output and "prefill: the 1-row prompt (the 1 before it reused)" in text.output
    assert "prefix: 1 of 2 prompt tokens reused" in text.output
    assert "decode: 1 row goes round the ring" in text.output and "top-5:" in text.output


# ---------------------------------------------------------------------------------------------
# the map from this lesson to the code


def test_15_every_link_in_docs_walkthrough_lands_on_its_function():
    """docs/WALKTHROUGH.md links each step to the code, e.g. [`attention`](../nanopipe/model.py#L85).
    Each link must land on the line that defines that name, so a student goes from the test to the
    code in one click. When code moves, this test names the link to update and the line it moved to."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "WALKTHROUGH.md").read_text()
    links = re.findall(r"\[`([\w.]+)`\]\(\.\./(nanopipe/[\w/]+\.py)#L(\d+)\)", doc)
    assert len(links) >= 30, "docs/WALKTHROUGH.md lost its links to the code"
    stale = []
    for name, path, line in links:
        lines = (root / path).read_text().splitlines()
        last = name.split(".")[-1]
        defines = re.compile(rf"\s*(def|class) {last}\b|{last} = ")
        if not (int(line) <= len(lines) and defines.match(lines[int(line) - 1])):
            now = [i + 1 for i, text in enumerate(lines) if defines.match(text)]
            stale.append(f"{name} -> {path}#L{line}, but it is defined at line(s) {now}")
    assert not stale, ("update these links in docs/WALKTHROUGH.md (python tests/update_walkthrough_links.py):\n  "
                       + "\n  ".join(stale))
