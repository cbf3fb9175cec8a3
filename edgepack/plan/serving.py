"""What ``edgepack serve`` costs in memory: the server's peak RSS at ``--parallel N``, by part,
and the most slots a memory budget holds. Pure: numbers in, numbers out (no torch, nothing
read from the box).

    from edgepack.plan.serving import ServingShape, predict_server_memory
    shape = ServingShape.from_architecture(manifest["architecture"])
    memory = predict_server_memory(shape, weights_bytes=lm.model.weight_bytes, parallel=4, context=8192,
                                   cache_bytes=512 << 20, max_body_bytes=8 << 20)
    memory.peak_bytes, memory.parts

The server (edgepack/serve) on edgepack's C engine holds:
- the weights, as the engine maps them (anonymous memory, all resident);
- one KV cache per slot, resident up to the positions written: at most the context each;
- the KV caches kept for prefix reuse, at most their budget (``--cache-bytes``);
- the engine's scratch: a prompt pass's activations, a batched step's, the logits;
- two tokenizers (the worker's, and the copy that counts prompt tokens off the event loop);
- request bodies: at most ``bodies_at_once`` being read (each also joined into one buffer),
  and one being parsed into Python objects at a time;
- the interpreter with FastAPI, uvicorn and the runtime (SERVER_BASELINE_BYTES, measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgepack.plan.model import ModelDescription
from edgepack.plan.sizing import (
    HEADROOM_FRACTION, HEADROOM_MIN_BYTES, NATIVE, NATIVE_THREADS, TOKENIZER_BYTES_PER_TOKEN, kv_cache_bytes,
)
from edgepack.runtime.constants import PROMPT_CHUNK, PROMPT_ROWS

MIB = 1 << 20
# The server process before any weight, tokenizer or cache: the interpreter, edgepack's
# runtime and C module, psutil, FastAPI, Starlette, pydantic, uvicorn and h11, its threads'
# stacks. Measured by tests/bench/serve_memory.py --overhead on 2026-12-07 (x86-64 Linux,
# Python 3.11, fastapi 0.165, uvicorn 0.55, pydantic 2.14): RSS of `edgepack serve` on the
# test suite's tiny bundle, idle after one request (57.8 MiB), minus that bundle's weights,
# tokenizers, caches and engine scratch (0.8 MiB).
SERVER_BASELINE_BYTES = 57 * MIB
SERVER_BASELINE_SOURCE = "measured by tests/bench/serve_memory.py --overhead, x86-64 Linux, Python 3.11, 2026-12-07"
# Python objects json.loads and the request parser make of a body, per byte of it: a chat
# of 230k one-character messages (7.8 MB) became 8.7x its size in dicts and strings, and
# 5.7x more in the parsed request (measured with psutil's RSS); a plain prompt 2x.
PARSE_BYTES_PER_BODY_BYTE = 15
# Bodies read at once (serve/guard.py's RequestGuard answers 503 beyond them); Starlette
# holds a body's chunks and their join at once: two copies.
BODIES_AT_ONCE = 4
BODY_COPIES = 2
PAGE_BYTES = 4096  # a KV cache's rows are separate runs of pages: each row's last page is partly used
DEFAULT_MAX_PARALLEL = 4  # slots `serve` takes by default where memory allows


@dataclass(frozen=True)
class ServingShape:
    """The model numbers the server's memory depends on (from the manifest's architecture)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    sliding_layers: int = 0
    sliding_window: int = 0

    @classmethod
    def from_architecture(cls, arch: dict, sliding_layers: int = 0, sliding_window: int = 0) -> ServingShape:
        heads = int(arch["num_attention_heads"])
        hidden = int(arch["hidden_size"])
        return cls(
            layers=int(arch["num_hidden_layers"]), hidden=hidden, intermediate=int(arch["intermediate_size"]),
            heads=heads, kv_heads=int(arch.get("num_key_value_heads") or heads),
            head_dim=int(arch.get("head_dim") or hidden // heads), vocab=int(arch["vocab_size"]),
            max_positions=int(arch.get("max_position_embeddings") or 2048),
            sliding_layers=sliding_layers, sliding_window=sliding_window,
        )

    def description(self) -> ModelDescription:
        """The planner's model description, as far as its KV cache formula reads it."""
        return ModelDescription(
            name="", model_type="", blocks=(), num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim, hidden_size=self.hidden,
            intermediate_size=self.intermediate, vocab_size=self.vocab, max_position_embeddings=self.max_positions,
            tie_word_embeddings=False, engine=True, sliding_layers=self.sliding_layers,
            sliding_window=self.sliding_window,
        )


@dataclass(frozen=True)
class ServerMemory:
    parallel: int
    context: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def serving_bytes(self) -> int:
        """Everything but request bodies: what N streams at the context hold."""
        return sum(v for k, v in self.parts.items() if k not in ("request_bodies", "body_parsing"))

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict:
        return {"parallel": self.parallel, "context": self.context, "peak_bytes": self.peak_bytes,
                "serving_bytes": self.serving_bytes, "parts": dict(self.parts), "baseline_source": SERVER_BASELINE_SOURCE}


def slot_kv_bytes(shape: ServingShape, context: int) -> int:
    """One slot's KV cache filled to ``context`` positions (sizing.kv_cache_bytes, the C
    engine's layout), plus the partly used last page of each (layer, head) row."""
    rows = 2 * shape.layers * shape.kv_heads
    return kv_cache_bytes(shape.description(), NATIVE, shape.layers, context, 1) + rows * PAGE_BYTES


def engine_scratch_bytes(shape: ServingShape, parallel: int, context: int) -> int:
    """The C engine's working memory: a prompt pass (prompt.c's prompt_scratch, PROMPT_CHUNK
    tokens, NATIVE_THREADS threads), a batched step (batch.c: each sequence's vectors, each
    thread's scores), the attention scores of a step, and each slot's float32 logits."""
    qn, kn = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    widest = max(shape.hidden, shape.intermediate, qn)
    per_token = 2 * shape.hidden + qn + 2 * kn + qn + 3 * shape.intermediate
    prompt = PROMPT_CHUNK * per_token + NATIVE_THREADS * (PROMPT_ROWS * widest + context) + widest * (PROMPT_CHUNK + 16)
    per_sequence = 2 * shape.hidden + qn + 2 * kn + qn + 3 * shape.intermediate + 2 * widest + 2 * shape.head_dim
    batch = parallel * per_sequence + NATIVE_THREADS * context
    scores = shape.heads * context
    logits = (parallel + 1) * shape.vocab
    return 4 * (prompt + batch + scores + logits)


def predict_server_memory(shape: ServingShape, *, weights_bytes: int, parallel: int, context: int | None = None,
                          cache_bytes: int = 0, max_body_bytes: int = 0, bodies_at_once: int = BODIES_AT_ONCE,
                          max_held: int | None = None) -> ServerMemory:
    """The server's peak RSS by part, ``parallel`` slots at ``context`` tokens each (default:
    the model's). ``cache_bytes``: the prefix-reuse budget; ``max_held``: caches held at most
    (a held cache holds at most the context). ``max_body_bytes``: the request body cap."""
    if parallel < 1 or weights_bytes < 0 or cache_bytes < 0 or max_body_bytes < 0:
        raise ValueError(f"parallel must be at least 1 and sizes at least 0: {parallel, weights_bytes, cache_bytes}")
    context = min(context or shape.max_positions, shape.max_positions)
    slot = slot_kv_bytes(shape, context)
    held = cache_bytes if max_held is None else min(cache_bytes, max_held * slot)
    parts = {
        "baseline": SERVER_BASELINE_BYTES,
        "tokenizers": 2 * TOKENIZER_BYTES_PER_TOKEN * shape.vocab,
        "weights": weights_bytes,
        "kv_caches": parallel * slot,
        "prefix_caches": held,
        "engine_scratch": engine_scratch_bytes(shape, parallel, context),
        "request_bodies": bodies_at_once * BODY_COPIES * max_body_bytes,
        "body_parsing": PARSE_BYTES_PER_BODY_BYTE * max_body_bytes,
    }
    return ServerMemory(parallel, context, parts)


def headroom_bytes(peak_bytes: int) -> int:
    """Kept free beyond the prediction, as the planner keeps on every device."""
    return max(HEADROOM_MIN_BYTES, math.ceil(HEADROOM_FRACTION * peak_bytes))


def fit_parallel(budget_bytes: int, shape: ServingShape, *, most: int = DEFAULT_MAX_PARALLEL, **kwargs) -> int:
    """The most slots (1 to ``most``) whose predicted peak, with headroom, fits ``budget_bytes``
    (what the process may hold in all); 1 when not even one does (the server still runs,
    its caches are simply never all full at once). ``kwargs``: predict_server_memory's."""
    for n in range(most, 1, -1):
        peak = predict_server_memory(shape, parallel=n, **kwargs).peak_bytes
        if peak + headroom_bytes(peak) <= budget_bytes:
            return n
    return 1
