"""The request queue and the sampling thread: dynamic batching with backpressure.

Requests become `Job`s with one row per output image. One worker thread takes the oldest waiting row, adds the
rows of later jobs with the same `BatchKey` (model, task, size, steps, sampler, guidance, LoRAs, strength) in
arrival order up to `max_batch` rows, and runs them as one sampler batch. While it runs, new requests queue up
and join the next batch. A request with more images than fit is split over batches; each image still has its own
seed, so the split does not change it.

Backpressure and cleanup:
- the queue holds at most `max_queue` waiting jobs; `submit` past that raises a 429 `APIError` with a
  Retry-After estimate, and 503 once `drain()` was called (shutdown);
- a job past its deadline still in the queue is dropped and answered 504;
- `cancel(job)` (client gone, or deadline passed while running) drops the job's waiting rows; a running batch
  whose jobs are all cancelled stops at its next sampler step. Rows of a cancelled job that share a batch with
  live jobs finish with it and are discarded;
- a finished job is handed to its future and no reference to it stays here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from typing import Any

from t2i.errors import T2IError
from t2i.serve.adapters import BatchKey, ModelAdapter, Row
from t2i.serve.errors import APIError

log = logging.getLogger("t2i.serve")


class BatchCancelled(Exception):
    """Raised from the sampler callback to stop a batch nobody waits for any more."""


class Job:
    """One request in the queue: its rows, where they stand, timings and the future its handler awaits.

    `listener(event)`, when set, is called on the sampling thread with progress events
    (`{"type": "started"}`, `{"type": "progress", "step", "steps"}`).
    """

    def __init__(self, request_id: str, key: BatchKey, rows: list[Row], deadline: float, now: float) -> None:
        self.id, self.key, self.rows = request_id, key, rows
        self.images: list[Any] = [None] * len(rows)
        self.next_row = 0  # rows before this one were handed to a batch
        self.done_rows = 0
        self.created, self.deadline = now, deadline
        self.started: float | None = None
        self.run_seconds = 0.0
        self.step = self.steps = 0
        self.cancelled = False
        self.future: Future = Future()
        self.listener: Callable[[dict[str, Any]], None] | None = None

    def queue_seconds(self, now: float) -> float:
        return (self.started if self.started is not None else now) - self.created

    def notify(self, event: dict[str, Any]) -> None:
        """Pass `event` to the listener; a listener that fails (its event loop closed) is dropped, never the batch."""
        if self.listener is not None:
            try:
                self.listener(event)
            except RuntimeError:
                self.listener = None


def resolve(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    """Complete the job's future once; a future its handler already cancelled is left alone."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """Bounded queue + one sampling thread over `adapters` ({model id: adapter}).

    `metrics` (optional) is notified with `batch(size, seconds)` and `cancelled_batch(rows)`.
    """

    def __init__(
        self,
        adapters: Mapping[str, ModelAdapter],
        max_batch: int,
        max_queue: int,
        batch_wait_s: float = 0.0,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.adapters, self.max_batch, self.max_queue = adapters, int(max_batch), int(max_queue)
        self.batch_wait_s, self.metrics, self.clock = float(batch_wait_s), metrics, clock
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.accepting = True
        self.running_rows = 0
        self._batch_seconds = 1.0  # running mean of a batch's time, for Retry-After
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the request side (event loop)

    def make_job(self, request_id: str, key: BatchKey, rows: list[Row], timeout_s: float) -> Job:
        if not self.adapters[key.model].batches_requests:
            key = replace(key, solo=request_id)
        now = self.clock()
        return Job(request_id, key, rows, now + timeout_s, now)

    def submit(self, job: Job) -> int:
        """Queue `job`; returns how many jobs wait before it. 429 when the queue is full, 503 when draining."""
        with self._cond:
            if not self.accepting:
                raise APIError("the server is shutting down; retry on another instance", 503, code="shutting_down")
            if len(self._queue) >= self.max_queue:
                retry = self.retry_after()
                raise APIError(
                    f"the queue is full ({self.max_queue} requests wait); retry in {retry} s",
                    429,
                    code="queue_full",
                    headers={"Retry-After": str(retry)},
                )
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue) - 1

    def cancel(self, job: Job) -> None:
        """Nobody waits for `job` any more: drop its waiting rows; its running batch stops if no one else is in it."""
        with self._cond:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
        job.future.cancel()

    def retry_after(self) -> int:
        """Seconds until the queue likely has room: the waiting rows' batches at the mean batch time."""
        rows = sum(len(j.rows) - j.next_row for j in self._queue)
        return max(1, math.ceil(self._batch_seconds * (rows / self.max_batch + 1)))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_rows(self) -> int:
        return sum(len(j.rows) - j.next_row for j in list(self._queue))

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._loop, name="t2i-sampler", daemon=True)
        self._thread.start()
        return self

    def drain(self) -> None:
        """Refuse new jobs (503); queued and running ones still finish."""
        with self._cond:
            self.accepting = False

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the sampling thread."""
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the sampling thread

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(*batch)
            del batch  # while the worker waits for work, no finished job may stay referenced

    def _next_batch(self) -> tuple[BatchKey, list[tuple[Job, int]]] | None:
        """Wait for work; after `batch_wait_s` from the oldest job's arrival (or a full batch), take a batch."""
        with self._cond:
            while True:
                self._drop_expired()
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                wait = head.created + self.batch_wait_s - self.clock()
                if wait > 0 and not self._stopping and self._waiting_rows(head.key) < self._limit(head):
                    self._cond.wait(wait)
                    continue
                return head.key, self._take(head)

    def _limit(self, head: Job) -> int:
        """Rows in the batch that `head` starts: `max_batch`, or all of head's rows for adapters that keep a
        request's rows together (they run one request per batch)."""
        return self.max_batch if self.adapters[head.key.model].batches_requests else len(head.rows)

    def _waiting_rows(self, key: BatchKey) -> int:
        return sum(len(j.rows) - j.next_row for j in self._queue if j.key == key)

    def _drop_expired(self) -> None:
        now = self.clock()
        for job in [j for j in self._queue if now > j.deadline]:
            self._queue.remove(job)
            job.cancelled = True
            resolve(job, error=APIError("the request waited past its deadline", 504, code="deadline_exceeded"))

    def _take(self, head: Job) -> list[tuple[Job, int]]:
        """Up to the limit of rows with head's key, oldest first; jobs whose rows are all taken leave the queue."""
        limit, now, rows = self._limit(head), self.clock(), []
        for job in list(self._queue):
            if job.key != head.key:
                continue
            while job.next_row < len(job.rows) and len(rows) < limit:
                rows.append((job, job.next_row))
                job.next_row += 1
            if job.started is None:
                job.started = now
            if job.next_row == len(job.rows):
                self._queue.remove(job)
            if len(rows) >= limit:
                break
        return rows

    def _run(self, key: BatchKey, rows: list[tuple[Job, int]]) -> None:
        adapter = self.adapters[key.model]
        jobs = list({id(job): job for job, _ in rows}.values())
        steps = adapter.steps_of(key)
        for job in jobs:
            job.step, job.steps = 0, steps
            job.notify({"type": "started", "steps": steps})

        def progress(step: int, total: int) -> None:
            for job in jobs:
                job.step = step
                job.notify({"type": "progress", "step": step, "steps": total})
            if all(job.cancelled for job in jobs):
                raise BatchCancelled

        self.running_rows = len(rows)
        start = self.clock()
        try:
            images = adapter.run(key, [job.rows[i] for job, i in rows], progress)
        except BatchCancelled:
            if self.metrics is not None:
                self.metrics.cancelled_batch(len(rows))
            return
        except T2IError as err:
            self._fail(jobs, APIError(str(err), 400, code="invalid_value"))
            return
        except Exception as err:  # noqa: BLE001 - a bug: answer 500 for this batch, keep serving the others
            log.error("batch of %d rows on %s failed:\n%s", len(rows), key.model, traceback.format_exc())
            self._fail(jobs, APIError(f"internal error while sampling ({type(err).__name__})", 500, code="internal_error"))
            return
        finally:
            self.running_rows = 0
        elapsed = self.clock() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        if self.metrics is not None:
            self.metrics.batch(len(rows), elapsed)
        for (job, i), image in zip(rows, images, strict=True):
            job.images[i] = image
            job.done_rows += 1
        for job in jobs:
            job.run_seconds += elapsed
            if job.done_rows == len(job.rows):
                resolve(job, result=job.images)

    def _fail(self, jobs: list[Job], error: APIError) -> None:
        with self._cond:
            for job in jobs:
                job.cancelled = True
                if job in self._queue:
                    self._queue.remove(job)
        for job in jobs:
            resolve(job, error=error)
