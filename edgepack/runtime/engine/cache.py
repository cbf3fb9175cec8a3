"""The engine's KV cache: keys and values in bfloat16, laid out as engine.h's kv_layer says."""

from __future__ import annotations

import mmap


class NativeCache:
    """Keys and values of every layer for ``max_tokens`` positions (bfloat16), a sliding-window
    layer's for its last ``window`` only (engine.h, kv_layer), and how many are filled. An
    anonymous map: pages are zero and unbacked until a position is written."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_tokens: int, sliding: int = 0, window: int = 0):
        positions = (layers - sliding) * max_tokens + sliding * min(window, max_tokens)
        half = positions * kv_heads * head_dim * 2
        from edgepack.runtime.engine._engine import address  # present: only the engine makes caches

        self.memory = mmap.mmap(-1, 2 * half)
        self.k = address(self.memory)
        self.v = self.k + half
        self.max_tokens = max_tokens
        self.length = 0
        self.geometry = (layers, kv_heads, head_dim)
        self.ring = min(window, max_tokens) if sliding and window < max_tokens else 0  # positions a ring holds

    def keep(self, length: int) -> int:
        """Cut the cache back to its first ``length`` positions where it still holds them, and
        return how many it keeps: once a sliding-window ring has wrapped, position p's slot
        holds a later position, so only the whole cache (or nothing) can be kept."""
        length = max(0, min(length, self.length))
        if self.ring and self.length > self.ring and length < self.length:
            length = 0
        self.length = length
        return length

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions: the next token goes at ``length`` (the rest
        is overwritten as it is reached; attention never reads past the current position)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} positions to {length}")
        if self.keep(length) != length:
            raise ValueError(f"a sliding-window cache that has wrapped cannot be cut back to {length} positions")

    def copy_prefix(self, source: "NativeCache", length: int) -> None:
        """This cache holds the first ``length`` positions of ``source`` (same model)."""
        if source.ring or self.ring:
            raise ValueError("sliding-window caches are rings: their prefixes are not copied")
        if source.geometry != self.geometry or not 0 <= length <= min(source.length, self.max_tokens):
            raise ValueError(f"cannot copy {length} positions between these KV caches")
        layers, kv_heads, head_dim = self.geometry
        row = length * head_dim * 2  # bytes of one (layer, head) row: bfloat16
        src, dst = memoryview(source.memory), memoryview(self.memory)
        for half in range(2):  # keys, then values
            for lh in range(layers * kv_heads):
                s = (half * layers * kv_heads + lh) * source.max_tokens * head_dim * 2
                d = (half * layers * kv_heads + lh) * self.max_tokens * head_dim * 2
                dst[d : d + row] = src[s : s + row]
        self.length = length
