"""HF transformers on the same weights, timed exactly as nanopipe.tools.bench times nanopipe.

Dev-only (needs torch + transformers, installed by `make parity`); `make bench` passes `bench_hf`
to nanopipe's benchmark as its reference, so nanopipe itself never imports torch.
"""
from __future__ import annotations

import os
import time

from nanopipe.tools.bench import bench_prompt, blas_threads, decode_rate
from nanopipe.weights import load_stage


def bench_hf(weights: str, prompt_len: int = 32, n_tokens: int = 64, threads: int | None = None,
             repeats: int = 5) -> dict | None:
    """HF transformers' GPT2LMHeadModel.generate (greedy, use_cache=True) on the same weights and
    prompt with the same number of threads; None when torch or transformers is not installed.

    Timed exactly as `bench_single` times nanopipe: each token's arrival (here through a streamer),
    the shortest time to first token, the median gap between tokens.
    """
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        return None
    import transformers

    threads = threads or blas_threads()
    torch.set_num_threads(threads)
    stage = load_stage(weights)
    c = stage.config
    model = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, n_positions=c.n_ctx,
                                       vocab_size=c.n_vocab)).eval()
    state = {"transformer.wte.weight": stage.wte, "transformer.wpe.weight": stage.wpe,
             "transformer.ln_f.weight": stage.ln_f["g"], "transformer.ln_f.bias": stage.ln_f["b"]}
    for i, p in enumerate(stage.blocks):
        pre = f"transformer.h.{i}."
        for part in ("ln_1", "ln_2"):
            state[f"{pre}{part}.weight"], state[f"{pre}{part}.bias"] = p[part]["g"], p[part]["b"]
        for group, names in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            for n in names:   # Conv1D stores (in, out), as nanopipe does: no transpose
                state[f"{pre}{group}.{n}.weight"] = p[group][n]["w"]
                state[f"{pre}{group}.{n}.bias"] = p[group][n]["b"]
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if unexpected or any(not (k == "lm_head.weight" or k.endswith(("attn.bias", "attn.masked_bias"))) for k in missing):
        raise RuntimeError(f"transformers' GPT-2 did not take the weights: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del stage

    x = torch.tensor([bench_prompt(prompt_len)])

    class Clock(BaseStreamer):
        """generate() hands a streamer the prompt, then each new token as it is chosen."""
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(n):
        clock = Clock()
        t_start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=c.n_vocab - 1, streamer=clock)
        return {"token_times": clock.times[1:], "t_start": t_start, "token_ids": out[0, prompt_len:].tolist()}

    run(2)                                                              # warm-up
    runs = [run(n_tokens) for _ in range(repeats)]
    ttft = min(r["token_times"][0] - r["t_start"] for r in runs)
    median, best_mean = decode_rate(runs)
    return {"name": f"transformers {transformers.__version__} (torch {torch.__version__})",
            "prompt_len": prompt_len, "tokens": n_tokens, "prefill_ms": round(ttft * 1000, 2),
            "prefill_tokens_per_s": round(prompt_len / ttft, 1), "decode_tokens_per_s": round(median, 2),
            "decode_tokens_per_s_best_run": round(best_mean, 2), "ms_per_token": round(1000 / median, 2),
            "threads": threads, "token_ids": runs[-1]["token_ids"]}


if __name__ == "__main__":
    # `make bench`: every benchmark, with HF transformers and llama.cpp as the single-process references.
    # `python tests/parity/hf_bench.py OUT_DIR [PART ...]` runs only the parts named (single, cluster,
    # sweep, positions, links, placement, conversation, tp, llama, pages, orders).
    import sys

    from llama_bench import bench_llama, compare_decode  # this folder (run as a script)

    from nanopipe.tools.bench import ensure_weights, write_csv
    from nanopipe.tools.bench_cluster import run_all
    out = sys.argv[1] if len(sys.argv) > 1 else "artifacts/bench"
    every = {"single", "llama", "pages", "orders", "cluster", "sweep", "positions", "links", "placement",
             "conversation", "tp"}
    parts = set(sys.argv[2:]) or every
    unknown = parts - every
    if unknown:
        sys.exit(f"unknown part(s) {sorted(unknown)}")
    def one_process(title: str, code: str, threads: str = "1"):
        """A comparison inside one child process with `threads` BLAS threads (1 thread pinned to cpu 1
        with NANOPIPE_BENCH_PIN=1), its lines printed as they come."""
        import subprocess
        print(f"== {title}, one process, {threads} BLAS thread(s) ==")
        pin = ["taskset", "-c", "1"] if os.environ.get("NANOPIPE_BENCH_PIN") == "1" and threads == "1" else []
        subprocess.run(pin + [sys.executable, "-c", code], check=True,
                       env=dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads))

    if "pages" in parts:
        # the weights in huge pages (the loader's pages.Arena) against numpy's own allocation, decode steps
        # interleaved in one process with 1 BLAS thread
        one_process("the weights in huge pages vs numpy's own allocation",
                    "from nanopipe.tools.bench import compare_pages; compare_pages()")
        parts.discard("pages")
        if not parts:
            sys.exit(0)
    if "orders" in parts:
        # the weights' memory orders, each block matrix in one order and each in its own measured one,
        # decode steps interleaved in one process, at 1 and at 2 BLAS threads
        for threads in ("1", "2"):
            one_process("the weights' memory orders", "from nanopipe.tools.bench import compare_orders; "
                        "compare_orders()", threads)
        parts.discard("orders")
        if not parts:
            sys.exit(0)
    if "llama" in parts:
        # single-stream decode against llama.cpp's own llama-bench (float32, tg128), 1 and 2 threads,
        # four rounds, interleaved (llama.cpp's own rate moves by 10-40% between rounds minutes apart on
        # this machine class: the median ratio says more than any one round); NANOPIPE_BENCH_PIN=1 pins
        # 1 thread to cpu 1 and 2 threads to cpus 0,1
        print("== nanopipe vs llama.cpp float32 (llama-bench), single-stream decode ==")
        pin = {1: "1", 2: "0,1"} if os.environ.get("NANOPIPE_BENCH_PIN") == "1" else None
        cmp = compare_decode(ensure_weights(), rounds=4, cpus=pin)
        if cmp is not None:
            os.makedirs(out, exist_ok=True)
            write_csv(cmp["rows"], os.path.join(out, "llama_cpp_decode.csv"))
        parts.discard("llama")
        if not parts:
            sys.exit(0)
    run_all(nodes=3 if "cluster" in parts else 1, single="single" in parts, sweep="sweep" in parts,
            positions="positions" in parts, links="links" in parts, placement_bench="placement" in parts,
            conversation="conversation" in parts, tp="tp" in parts, out_dir=out, reference=bench_hf,
            llama=bench_llama)
