"""Several generations in one leader message, run as one scheduler batch: /v1/completions with a list
of prompts, or n choices of one (web/openai.py).

    gen = start_batch([[15496], [15496]], [7, 8], params, "completions", "prompt")
    for event in gen.events():      # ("token", i, 995, " world"), ..., ("done", [result_0, result_1])
        ...
"""
from __future__ import annotations

import time

from flask import g

from ..decoding import EOT
from ..sampling_params import SamplingParams
from .connection import connect
from .generation import Generation, check_fits_all, usage_counts
from .state import Generations, state


class BatchGeneration(Generation):
    """Several generations on one leader connection, run as one batch (LeaderClient.generate_batch):
    one per prompt and choice of a /v1/completions request. Its events:

        ("status", "waiting for rank 2 to join")
        ("token", i, 995, " world")            generation i sampled a token (id None: held-back text)
        ("done", [result_0, result_1, ...])    every generation's result, in order
     or ("error", ClientError)

    The rest (metrics, hanging up when the reader leaves) is Generation's.
    """

    def __init__(self, client, prompts: list, seeds: list, params: SamplingParams, metrics, t0: float,
                 echo: bool = False, top_logprobs: int = 0, score_only: bool = False,
                 registry: Generations | None = None):
        super().__init__(client, prompts, params, metrics, t0, echo=echo, top_logprobs=top_logprobs,
                         registry=registry)
        self.seeds, self.score_only = seeds, score_only
        self.texts: list = [[] for _ in prompts]        # generation i's pieces
        self.counts: list = [0] * len(prompts)          # generation i's sampled tokens
        self._t_last: list = [None] * len(prompts)

    def text_of(self, i: int) -> str:
        return "".join(self.texts[i])

    def _call(self) -> tuple:
        results = self.client.generate_batch(self.prompt, self.params, seeds=self.seeds, on_token=self._on_token,
                                             on_status=lambda text: self._q.put(("status", text)),
                                             echo=self.echo, top_logprobs=self.top_logprobs,
                                             score_only=True if self.score_only else None)
        return results, results

    def _on_token(self, i, token_id, text):
        if token_id is not None:
            now = time.perf_counter()
            last = self._t_last[i]
            self.metrics.observe_token(now - (last if last is not None else self.t0), first=last is None)
            self._t_last[i] = now
            self.counts[i] += 1
            self.n_tokens += 1
            if token_id == EOT:
                text = ""
        self.texts[i].append(text or "")
        self._q.put(("token", i, token_id, text or ""))


def start_batch(prompts: list, seeds: list, params: SamplingParams, route: str, field: str, echo: bool = False,
                top_logprobs: int = 0, score_only: bool = False) -> BatchGeneration:
    """start_generation for several prompts at once (each already repeated n times)."""
    client = connect()
    try:
        check_fits_all(params, prompts, field, score_only=score_only)   # scoring: all n_ctx positions may be prompt
    except Exception:               # a 400, or a prompt that could not be made: hang up first
        client.close()
        raise
    state().metrics.count_request(route)
    return BatchGeneration(client, prompts, seeds, params, state().metrics, g.t0, echo=echo,
                           top_logprobs=top_logprobs, score_only=score_only, registry=state().generations)


def batch_usage(prompts: list, gen: BatchGeneration, results: list) -> dict:
    """Usage of a batch: each prompt's tokens once (however many choices it has), every choice's
    tokens; cached_tokens likewise counts each prompt once: the tokens all of its choices reused."""
    prompt = sum(len(p) for p in prompts)
    n = len(results) // max(1, len(prompts))
    cached = sum(min(int(r.get("cached_tokens") or 0) for r in results[i * n:(i + 1) * n])
                 for i in range(len(prompts))) if n else 0
    return usage_counts(prompt, gen.n_tokens, cached)
