"""The KV caches of recent conversations, kept so a prompt that starts as an earlier one
did (a chat resending its history, a shared system prompt) computes only what is new.

A held cache records the tokens whose keys and values it holds exactly as a prompt pass
computes them: a request reuses at most that many, so its answer is bitwise the answer
without reuse. Generated tokens are written by decode steps, whose sums run in another
order; the worker recomputes them as a prompt pass when it is idle (``refresh``) before
they count as held. Held caches are evicted least recently used first beyond
``budget_bytes``, counting each cache's positions ever written: a cache cut back keeps its
later pages resident, while pages past the last written position were never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Room a fresh cache gets beyond the request that makes it, so a chat's next turns extend
# it in place (positions past the filled ones cost no memory until written).
GROWTH_TOKENS = 2048
MAX_HELD = 64  # caches held at most, whatever their size: each is a memory map
REFRESH_CHUNK_TOKENS = 128  # a refresh yields to a waiting request this often (~0.1 s)


@dataclass
class Held:
    cache: object  # NativeCache
    tokens: list[int]  # held exactly (prompt-pass values)
    pending: list[int] = field(default_factory=list)  # generated after them, not yet recomputed
    written: int = 0  # positions ever written to the cache: its resident part

    @property
    def resident_tokens(self) -> int:
        return max(self.written, self.cache.length)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    """Caches of finished requests, most recently used last. Used by the worker thread only."""

    def __init__(self, model, budget_bytes: int, max_positions: int):
        self.model, self.budget_bytes, self.max_positions = model, budget_bytes, max_positions
        self.bytes_per_token = 2 * model.layers * model.kv_heads * model.head_dim * 2  # keys + values, bfloat16
        self.held: list[Held] = []
        self.reused_tokens = 0  # prompt tokens not computed, since start
        self._written: dict[int, int] = {}  # id of a cache taken over -> positions it had written

    @property
    def held_bytes(self) -> int:
        return sum(h.resident_tokens for h in self.held) * self.bytes_per_token

    def take(self, prompt: list[int], need_tokens: int) -> tuple[object, int]:
        """A cache for ``prompt`` (and ``need_tokens`` in all) and how many of its first
        tokens it already holds. At least two tokens are left to compute: a prompt pass of one
        token is a decode step, whose logits differ in the last bits."""
        best, match = None, 0
        for h in self.held:
            n = common_prefix(h.tokens, prompt)
            if n > match:
                best, match = h, n
        match = min(match, len(prompt) - 2)
        if best is None or match < 1 or self.budget_bytes <= 0:
            return self._new(need_tokens), 0
        if match == len(best.tokens) and best.cache.max_tokens >= need_tokens:
            self.held.remove(best)  # this conversation goes on: take its cache over
            cache = best.cache
            self._written[id(cache)] = best.resident_tokens
            cache.truncate(match)
        else:  # another conversation shares the start: copy it, keep that one's cache
            cache = self._new(need_tokens)
            cache.copy_prefix(best.cache, match)
            self.held.remove(best)
            self.held.append(best)  # used: most recent
        self.reused_tokens += match
        return cache, match

    def _new(self, need_tokens: int):
        return self.model.new_cache(min(self.max_positions, need_tokens + GROWTH_TOKENS))

    def give(self, cache, prompt: list[int], generated: list[int]) -> None:
        """Hold a finished request's cache: its prompt exactly, its generated tokens once refreshed."""
        written = max(cache.length, self._written.pop(id(cache), 0))
        if self.budget_bytes <= 0 or len(prompt) < 2:
            return
        cache.truncate(min(cache.length, len(prompt)))
        self.held.append(Held(cache, list(prompt), list(generated), written))
        self._evict()

    def _evict(self) -> None:
        while self.held and (len(self.held) > MAX_HELD or self.held_bytes > self.budget_bytes):
            self.held.pop(0)

    def refresh(self) -> bool:
        """Recompute one chunk of the newest held cache's generated tokens as a prompt pass;
        False when there is nothing left to do."""
        for h in reversed(self.held):
            if len(h.pending) < 2 or h.cache.length + len(h.pending) > h.cache.max_tokens:
                h.pending = []  # one token would be a decode step (not exact); no room: drop them
                continue
            n = len(h.pending) if len(h.pending) <= REFRESH_CHUNK_TOKENS + 1 else REFRESH_CHUNK_TOKENS
            self.model.forward(h.pending[:n], h.cache)
            h.tokens += h.pending[:n]
            h.pending = h.pending[n:]
            self._evict()
            return True
        return False
