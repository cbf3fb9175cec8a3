"""The generation worker: one thread that owns the model and answers admitted requests
through each request's asyncio queue."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgepack.serve.api import GenerationRequest
from edgepack.serve.metrics import Metrics

DEFAULT_MAX_QUEUE = 8


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
    """One thread that owns the model; requests wait in a queue of at most ``max_queue``."""

    def __init__(self, lm, metrics: Metrics, max_queue: int = DEFAULT_MAX_QUEUE):
        self.lm, self.metrics, self.max_queue = lm, metrics, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.busy = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._waiting

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

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
            if job.cancelled.is_set():  # its client left while it waited
                continue
            self.busy = True
            try:
                self._generate(job)
            finally:
                self.busy = False

    def _generate(self, job: Job) -> None:
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


def _send(job: Job, item: Any) -> bool:
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        return True
    except RuntimeError:  # the event loop is closed: the server is shutting down
        job.cancelled.set()
        return False
