"""The planner's figure for this server (edgepack/plan/serving.py), from a loaded model and
the serve options: what it predicts the process peaks at, and the slots this box's memory
allows when ``--parallel`` is not given."""

from __future__ import annotations

from edgepack.plan.serving import DEFAULT_MAX_PARALLEL, ServerMemory, ServingShape, fit_parallel, predict_server_memory
from edgepack.serve.prefix import MAX_HELD


def shape_of(lm) -> ServingShape:
    model = lm.model
    return ServingShape.from_architecture(lm.manifest.get("architecture", {}), getattr(model, "sliding", 0),
                                          getattr(model, "window", 0))


def _weights_bytes(lm) -> int:
    mapped = getattr(lm.model, "weight_bytes", None)  # the engine's arena, all resident
    return int(mapped if mapped is not None else lm.manifest.get("memory", {}).get("weight_bytes", 0))


def server_memory(lm, *, parallel: int, context: int, cache_bytes: int, max_body_bytes: int) -> ServerMemory | None:
    """The predicted peak by part; None for the torch backend (the planner's figure counts
    edgepack's C engine: its caches, its scratch, no torch)."""
    if lm.backend != "native":
        return None
    return predict_server_memory(shape_of(lm), weights_bytes=_weights_bytes(lm), parallel=parallel, context=context,
                                 cache_bytes=cache_bytes, max_body_bytes=max_body_bytes, max_held=MAX_HELD)


def memory_for_serving() -> int:
    """What this process may hold in all: what it holds now (the model is loaded) plus what it
    may still take (RAM, or its cgroup's limit)."""
    import psutil

    from edgepack.runtime.memory import budget

    return psutil.Process().memory_info().rss + budget().available_bytes


def default_parallel(lm, *, context: int, cache_bytes: int, max_body_bytes: int, budget_bytes: int | None = None) -> int:
    """DEFAULT_MAX_PARALLEL slots, fewer where the planner's peak for them (with its headroom)
    is more than ``budget_bytes`` (default: memory_for_serving()); 1 with the torch backend."""
    if lm.backend != "native":
        return 1
    total = memory_for_serving() if budget_bytes is None else budget_bytes
    return fit_parallel(total, shape_of(lm), most=DEFAULT_MAX_PARALLEL, weights_bytes=_weights_bytes(lm),
                        context=context, cache_bytes=cache_bytes, max_body_bytes=max_body_bytes, max_held=MAX_HELD)
