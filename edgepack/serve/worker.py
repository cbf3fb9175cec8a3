"""The generation worker: one thread that owns the model and answers admitted requests
through each request's asyncio queue.

With edgepack's CPU engine it serves up to ``parallel`` requests at once by continuous
batching: between two decode steps, waiting requests take free slots (reusing held KV
caches, see prefix.py) and finished ones leave; each step advances every active request by
one token in a single call that reads the weights once (NativeLM.step_batch). A joining
prompt is computed ``prefill_chunk`` tokens at a time, one piece between two steps (chunked
prefill): a 2,000-token chat history costs ~15 s on a 2-core box, which would otherwise
freeze every running stream that long. Each request samples with its own settings and
random generator; greedy answers are bitwise those of serving it alone (a prompt pass in
consecutive pieces writes the keys and values a whole one does). The torch backend serves
one request at a time through EdgeModel.stream_steps.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgepack.serve.api import GenerationRequest
from edgepack.serve.metrics import Metrics
from edgepack.serve.prefix import PrefixStore

DEFAULT_MAX_QUEUE = 8
DEFAULT_CACHE_BYTES = 512 << 20  # held prompt caches: ~22k tokens of SmolLM2-135M, ~4k of a 1B model
# Prompt tokens computed between two decode steps. SmolLM2-135M at 8 bits, 2-core Zen 1: a
# piece of 16 costs ~0.13 s (~6 decode steps) at ~96% of the prompt pass's rate (8: ~80%), so
# a running stream keeps ~6 tokens/s, about reading speed, while a 1,900-token prompt's first
# token comes ~10% later than with pieces of 32, whose streams get half that
# (tests/bench/serve_chunked.py).
DEFAULT_PREFILL_CHUNK = 16


@dataclass
class Job:
    """One admitted request. The worker sends GenerationSteps, an exception, then None."""

    request: GenerationRequest
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """One thread that owns the model; requests wait in a queue of at most ``max_queue``
    for one of ``parallel`` slots."""

    def __init__(self, lm, metrics: Metrics, max_queue: int = DEFAULT_MAX_QUEUE, parallel: int = 1,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, context: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if prefill_chunk < 0 or prefill_chunk == 1:  # a one-token pass is a decode step: not exact
            raise ValueError(f"prefill_chunk must be 0 (whole prompts) or at least 2, not {prefill_chunk}")
        self.lm, self.metrics, self.max_queue = lm, metrics, max_queue
        self.prefill_chunk = prefill_chunk
        self.context = min(context or lm.max_positions, lm.max_positions)  # tokens a request may hold
        self.batched = lm.backend == "native"
        self.parallel = parallel if self.batched else 1
        # a sliding-window layer's cache is a ring: its prefixes cannot be cut back or copied,
        # so such models get no reuse budget
        self.cache_bytes = 0 if getattr(lm.model, "sliding", 0) or not self.batched else cache_bytes
        self.prefixes = PrefixStore(lm.model, self.cache_bytes, self.context) if self.batched else None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.active: list[_Slot] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._waiting

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def gauges(self) -> dict:
        """/metrics' view of the slots and the held prompt caches (read from another thread:
        each value is one read of a list or an int)."""
        held = list(self.prefixes.held) if self.prefixes else []
        per_token = self.prefixes.bytes_per_token if self.prefixes else 0
        active = list(self.active)
        prefilling = sum(1 for s in active if s.prefilling) if self.batched else 0
        return {"slots_in_use": len(active), "slots": self.parallel, "slots_prefilling": prefilling,
                "held_caches": len(held), "held_cache_bytes": sum(h.resident_tokens for h in held) * per_token}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgepack-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> bool:
        """Admit a job, or return False when the queue is full."""
        with self._lock:
            if self._waiting >= self.max_queue:
                return False
            self._waiting += 1
        self._jobs.put(job)
        return True

    def _take(self, block: bool) -> Job | None:
        """The next waiting job still wanted; None when there is none (or the server stops)."""
        while not self._stopping:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return None
            if job is None:
                self._stopping = True
                return None
            with self._lock:
                self._waiting -= 1
            if not job.cancelled.is_set():  # else its client left while it waited
                return job
        return None

    def _run(self) -> None:
        if not self.batched:
            while (job := self._take(block=True)) is not None:
                self.active = [_Slot(job, None, None, [])]
                try:
                    self._generate_alone(job)
                finally:
                    self.active = []
            return
        while not self._stopping:
            while len(self.active) < self.parallel and (job := self._take(block=False)) is not None:
                self._join(job)
            if self.active:
                self._prefill()
                if any(not s.prefilling for s in self.active):
                    self._step()
            elif self._jobs.empty() and self.prefixes.refresh():
                continue  # idle: make a finished reply reusable, a chunk at a time
            elif (job := self._take(block=True)) is not None:
                self._join(job)

    # one request at a time (the torch backend) ---------------------------------------------

    def _generate_alone(self, job: Job) -> None:
        req = job.request
        try:
            steps = self.lm.stream_steps(
                req.prompt,
                chat=req.chat,
                max_new_tokens=job.max_tokens,
                min_new_tokens=req.min_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop=req.stop,
            )
            for step in steps:
                self.metrics.add_tokens(prompt=step.prompt_tokens if step.generated_tokens == 1 else 0, generated=1)
                if job.cancelled.is_set() or not _send(job, step):
                    steps.close()
                    return
        except Exception as exc:  # handed to the request, which answers it; the worker lives on
            _send(job, exc)
        _send(job, None)

    # continuous batching (edgepack's CPU engine) -------------------------------------------

    def _join(self, job: Job) -> None:
        """Give the job a slot and a cache (with what a held one has of its prompt); its prompt
        is computed by _prefill."""
        from edgepack.runtime import StepWriter

        req = job.request
        try:
            plan = self.lm.plan_generation(req.prompt, chat=req.chat, max_new_tokens=job.max_tokens,
                                           min_new_tokens=req.min_tokens, temperature=req.temperature,
                                           top_p=req.top_p, seed=req.seed, stop=req.stop)
            writer = StepWriter(self.lm, plan)
            ids = plan.prompt_ids
            cache, reused = self.prefixes.take(ids, len(ids) + plan.max_new_tokens)
        except Exception as exc:  # handed to the request, which answers it; the worker lives on
            _send(job, exc)
            _send(job, None)
            return
        self.metrics.add_prefix(reused=reused, computed=0)
        rng = random.Random(plan.seed) if plan.seed is not None else None
        self.active.append(_Slot(job, plan, writer, [], cache, rng))

    def _prefill(self) -> None:
        """Compute the next piece of the first slot still prefilling; after its last piece,
        emit its first token. Requests cancelled meanwhile leave, their computed part held."""
        for s in [s for s in self.active if s.prefilling and s.job.cancelled.is_set()]:
            self._leave(s, keep=True)
        slot = next((s for s in self.active if s.prefilling), None)
        if slot is None:
            return
        ids, done = slot.plan.prompt_ids, slot.cache.length
        n = self._piece(len(ids), done)
        try:
            logits = self.lm.model.forward(ids[done : done + n], slot.cache)
        except Exception as exc:  # this request's alone: the others go on
            _send(slot.job, exc)
            _send(slot.job, None)
            self._leave(slot, keep=False)
            return
        self.metrics.add_prefix(reused=0, computed=n)
        if slot.cache.length == len(ids):
            self._emit(slot, logits)

    def _piece(self, prompt_tokens: int, done: int) -> int:
        """Tokens of the next piece: ``prefill_chunk``, or all that is left where that is at most
        one more (a last piece of one token would be a decode step, not exact), chunking is
        off, or the prompt reaches a longrope model's switch (its pieces would rotate with
        other factors than the whole prompt)."""
        left, chunk = prompt_tokens - done, self.prefill_chunk
        long_from = getattr(self.lm.model, "long_rope_from", 0)
        if not chunk or left <= chunk + 1 or (long_from and prompt_tokens > long_from):
            return left
        return chunk

    def _step(self) -> None:
        slots = [s for s in self.active if not s.prefilling]
        try:
            logits = self.lm.model.step_batch([s.generated[-1] for s in slots], [s.cache for s in slots])
        except Exception as exc:
            for s in slots:
                _send(s.job, exc)
                _send(s.job, None)
                self._leave(s, keep=False)
            return
        for s, lg in zip(slots, logits):
            self._emit(s, lg)

    def _emit(self, slot: _Slot, logits) -> None:
        """Sample the slot's next token, send its step; the slot leaves when it is done."""
        plan, model = slot.plan, self.lm.model
        if slot.writer.n < plan.min_new_tokens:
            for eos in self.lm.eos_token_ids:
                logits[eos] = float("-inf")
        token = model.sample(logits, plan.temperature, plan.top_p, plan.top_k, slot.rng)
        slot.generated.append(token)
        step = slot.writer.add(token)
        self.metrics.add_tokens(prompt=step.prompt_tokens if step.generated_tokens == 1 else 0, generated=1)
        if slot.job.cancelled.is_set() or not _send(slot.job, step):
            self._leave(slot, keep=True)
        elif step.finish_reason is not None:
            _send(slot.job, None)
            self._leave(slot, keep=True)

    def _leave(self, slot: _Slot, keep: bool) -> None:
        if slot in self.active:
            self.active.remove(slot)
        if keep:  # a prompt left mid-way: the part computed is held
            self.prefixes.give(slot.cache, slot.plan.prompt_ids[: slot.cache.length], slot.generated)


@dataclass(eq=False)
class _Slot:
    """A request being served: its settings, text so far, KV cache and generated tokens."""

    job: Job
    plan: Any  # runtime.GenerationPlan
    writer: Any  # runtime.StepWriter
    generated: list[int]
    cache: Any = None  # NativeCache
    rng: random.Random | None = None

    @property
    def prefilling(self) -> bool:  # its prompt is being computed: no token yet
        return not self.generated


def _send(job: Job, item: Any) -> bool:
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        return True
    except RuntimeError:  # the event loop is closed: the server is shutting down
        job.cancelled.set()
        return False
