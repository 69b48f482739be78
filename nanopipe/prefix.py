"""Prefix reuse: finished sessions leave their KV caches on every stage, for the next request.

A chat sends its whole conversation every turn. Turn 2's prompt starts with turn 1's prompt and
reply, whose keys and values every stage computed already. So when a session finishes, each stage
keeps its cache under the session's id, and a new request whose token ids start the same way
copies ("forks") the longest matching prefix and prefills only the rest:

    turn 1: prompt [A B C], reply [D E]      -> kept: "s1" holds positions of [A B C D]
    turn 2: prompt [A B C D E F G]           -> fork 4 positions of "s1", prefill [E F G]

At least one token is always recomputed, so the first new token's logits exist (a prompt equal to
a kept sequence reuses all but its last token). The key at position i depends only on tokens
0..i, so any prefix of a kept cache is valid, and reuse changes no math: only how the same rows
are batched (which moves float sums by rounding, never a greedy token in our tests).

Who decides. The leader owns the index (this class, inside the Scheduler): which ids are kept, in
least-recently-used order, bounded per stage by `prefix_cache_mb`. Workers only obey: an ACT row
group may say `"fork": {"from": id, "n": n}` (start this session from the first n positions of
kept cache `id`), and FREE drops kept caches the leader evicts. Both travel round the ring in
order on the same sockets, so a FREE never overtakes the fork that reads the cache it drops, and
a stage never holds a cache the leader thinks is gone, or the reverse. A ring rebuild drops every
cache on every worker; the index is cleared with it, and requests fall back to full prefill.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .model import KVCache

DEFAULT_FRACTION = 0.125     # prefix_cache_mb unset: this share of the node's usable memory at start


def default_prefix_cache_bytes() -> int:
    """The budget of kept caches when prefix_cache_mb is not set: 1/8 of what this node can allocate
    now (placement.usable_memory_bytes: MemAvailable or the cgroup's room), or 256 MB if unknown."""
    from .placement import usable_memory_bytes
    room = usable_memory_bytes()
    return int(room * DEFAULT_FRACTION) if room else 256 << 20


def fork_cache(cache: KVCache, n: int) -> KVCache:
    """A new cache holding a copy of the first n positions of `cache` (which is left as it was).

    Every stage forks the same way and then sees the same rows, so their capacities stay equal:
    the leader's copy tells how many bytes each stage's copy takes.
    """
    if not 0 < n <= cache.length:
        raise ValueError(f"cannot fork {n} positions of a cache holding {cache.length}")
    L, H, _, D = cache._shape
    new = KVCache(L, H, D, cache.n_ctx)
    new.reserve(n)
    new.k[:, :, :n] = cache.k[:, :, :n]
    new.v[:, :, :n] = cache.v[:, :, :n]
    new.length = n
    return new


def common_prefix(a, b) -> int:
    """How many leading tokens two id sequences share: common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


@dataclass
class Kept:
    id: str
    tokens: tuple           # the token ids whose keys/values the cache holds, one per position
    cache: KVCache          # rank 0's copy


class PrefixCache:
    """The leader's LRU index of kept caches, bounded per stage.

    `stages`: one (bytes_per_position, budget_bytes) per stage, rank 0 first. A kept cache of
    capacity P positions costs P * bytes_per_position on that stage (bytes_per_position = its
    layers * 2 (k and v) * n_embd * 4); the oldest are dropped until every stage is within budget.
    Worked example, gpt2-small (C=768) on 3 stages of 4 layers, budget 1 MB each: one position
    costs 4 * 2 * 768 * 4 = 24576 bytes, a cache grows in 128-position chunks (3 MB), so with a
    1 MB budget nothing is kept; with 8 MB two 128-position caches are.
    """

    def __init__(self, stages: list):
        self.stages = list(stages)
        self.kept: OrderedDict = OrderedDict()     # id -> Kept, least recently used first
        self.stats = {"hits": 0, "evictions": 0}

    def used_bytes(self) -> list:
        """Bytes of kept caches on each stage, rank 0 first."""
        positions = sum(k.cache.capacity for k in self.kept.values())
        return [positions * per for per, _ in self.stages]

    def match(self, ids) -> tuple:
        """(kept id, n): the kept cache sharing the longest prefix with `ids`, and how many of its
        positions to reuse (at most len(ids) - 1); (None, 0) if none shares a token. A tie goes to
        the most recently used."""
        best, n = None, 0
        for k in reversed(self.kept.values()):
            m = min(common_prefix(k.tokens, ids), len(ids) - 1)
            if m > n:
                best, n = k, m
        if best is None:
            return None, 0
        self.kept.move_to_end(best.id)
        self.stats["hits"] += 1
        return best.id, n

    def get(self, kept_id: str) -> KVCache:
        return self.kept[kept_id].cache

    def keep(self, sid: str, tokens, cache: KVCache, pinned=()) -> list:
        """Keep a finished session's cache; returns the ids every stage must now drop: caches whose
        tokens the new one covers, and the least recently used while any stage is over budget (the
        new one too, if it alone does not fit). `pinned`: ids a live session has yet to fork from
        (its ACT with the fork is not sent yet); they stay, even over budget, until the next keep."""
        tokens = tuple(tokens)
        drop = [k.id for k in self.kept.values()
                if k.id not in pinned and common_prefix(k.tokens, tokens) == len(k.tokens)]
        for kid in drop:
            del self.kept[kid]
        self.kept[sid] = Kept(sid, tokens, cache)
        for kid in [k for k in self.kept if k not in pinned]:     # least recently used first
            if not self._over():
                break
            del self.kept[kid]
            drop.append(kid)
            self.stats["evictions"] += 1
        return drop

    def _over(self) -> bool:
        return any(used > budget for used, (_, budget) in zip(self.used_bytes(), self.stages))

    def clear(self) -> int:
        """Forget every kept cache (the stages already dropped theirs: a ring rebuild)."""
        n = len(self.kept)
        self.kept.clear()
        return n
