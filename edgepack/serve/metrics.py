"""The counters behind /metrics, as JSON or in Prometheus' text format."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

LATENCY_WINDOW = 1024  # p50/p99 are over the last this-many finished requests


class Metrics:
    """Counters for /metrics. Written by the worker thread and the event loop, so locked."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = {"ok": 0, "cancelled": 0, "rejected": 0, "invalid": 0, "error": 0}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefix_reused_tokens = 0
        self.prefix_computed_tokens = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.first_token_latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def add_prefix(self, reused: int, computed: int) -> None:
        """A prompt's tokens: ``reused`` from a held KV cache, ``computed`` anew."""
        with self._lock:
            self.prefix_reused_tokens += reused
            self.prefix_computed_tokens += computed

    def finished(self, latency_seconds: float, first_token_seconds: float | None) -> None:
        with self._lock:
            self.requests["ok"] += 1
            self.latencies.append(latency_seconds)
            if first_token_seconds is not None:
                self.first_token_latencies.append(first_token_seconds)

    def p50_latency(self) -> float | None:
        with self._lock:
            return _percentile(self.latencies, 50)

    def snapshot(self, queue_depth: int, busy: bool, gauges: dict | None = None) -> dict:
        """``gauges``: the worker's (slots_in_use, slots, slots_prefilling: those whose prompt is
        being computed, held_caches, held_cache_bytes)."""
        with self._lock:
            return {
                "uptime_seconds": round(time.time() - self.started, 3),
                "requests": dict(self.requests, total=sum(self.requests.values())),
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "latency_seconds": _summary(self.latencies),
                "first_token_seconds": _summary(self.first_token_latencies),
                "prefix_reused_tokens": self.prefix_reused_tokens,
                "prefix_computed_tokens": self.prefix_computed_tokens,
                "queue_depth": queue_depth,
                "busy": busy,
                **(gauges or {}),
            }

    def prometheus(self, queue_depth: int, busy: bool, gauges: dict | None = None) -> str:
        s = self.snapshot(queue_depth, busy, gauges)
        lines = ["# TYPE edgepack_requests_total counter"]
        lines += [f'edgepack_requests_total{{outcome="{k}"}} {v}' for k, v in s["requests"].items() if k != "total"]
        lines += ["# TYPE edgepack_prompt_tokens_total counter", f"edgepack_prompt_tokens_total {s['prompt_tokens']}"]
        lines += ["# TYPE edgepack_generated_tokens_total counter",
                  f"edgepack_generated_tokens_total {s['generated_tokens']}"]
        for name in ("prefix_reused_tokens", "prefix_computed_tokens"):
            lines += [f"# TYPE edgepack_{name}_total counter", f"edgepack_{name}_total {s[name]}"]
        for name in ("latency_seconds", "first_token_seconds"):
            lines.append(f"# TYPE edgepack_request_{name} summary")
            for q in ("p50", "p99"):
                value = s[name][q]
                quantile = "0.5" if q == "p50" else "0.99"
                lines.append(f'edgepack_request_{name}{{quantile="{quantile}"}} {"NaN" if value is None else value}')
            lines.append(f"edgepack_request_{name}_count {s[name]['count']}")
        lines += ["# TYPE edgepack_queue_depth gauge", f"edgepack_queue_depth {queue_depth}"]
        lines += ["# TYPE edgepack_busy gauge", f"edgepack_busy {int(busy)}"]
        for name, value in (gauges or {}).items():
            lines += [f"# TYPE edgepack_{name} gauge", f"edgepack_{name} {value}"]
        return "\n".join(lines) + "\n"


def _percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _summary(values) -> dict:
    quantiles = {f"p{q}": _percentile(values, q) for q in (50, 99)}
    return {"count": len(values), **{k: None if v is None else round(v, 6) for k, v in quantiles.items()}}
