"""The batcher in-process: grouping, order, backpressure, cancellation, deadlines, errors, and that it keeps
nothing of a finished request. A recording adapter stands in for a model; `test_batch_invariance.py` runs the
real pipeline."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from t2i.errors import InvalidInputError
from t2i.serve.adapters import BatchKey, ModelAdapter, Row
from t2i.serve.batcher import Batcher
from t2i.serve.errors import APIError


class RecordingAdapter(ModelAdapter):
    """Records each batch as [(prompt, seed)]; "images" are f"{prompt}/{seed}". Runs `steps` progress steps,
    each taking one permit of `gate` (when set) so a test can hold the worker inside a batch."""

    kind = "recording"

    def __init__(self, steps: int = 3, gate: threading.Semaphore | None = None, batches_requests: bool = True):
        super().__init__("m", None)
        self.steps, self.gate, self.batches, self.steps_run = steps, gate, [], 0
        self.in_batch = threading.Event()
        self.batches_requests = batches_requests

    def steps_of(self, key: BatchKey) -> int:
        return self.steps

    def run(self, key, rows, progress):
        self.batches.append([(r.prompt, r.seed) for r in rows])
        self.in_batch.set()
        for step in range(self.steps):
            if self.gate is not None:
                assert self.gate.acquire(timeout=10)
            if rows[0].prompt == "boom":
                raise RuntimeError("a bug")
            if rows[0].prompt == "bad":
                raise InvalidInputError("steps: not for this model")
            self.steps_run += 1
            progress(step + 1, self.steps)
        return [f"{r.prompt}/{r.seed}" for r in rows]


def key(**changes) -> BatchKey:
    return BatchKey(**{"model": "m", "task": "generate", "width": 16, "height": 16, "steps": 3,
                       "sampler": "ddim", "guidance": 5.0, **changes})


def rows(prompt: str, n: int, seed: int = 0) -> list[Row]:
    return [Row(prompt, "", seed + j) for j in range(n)]


def make(adapter, max_batch=4, max_queue=16, wait=0.0, metrics=None) -> Batcher:
    return Batcher({"m": adapter}, max_batch, max_queue, wait, metrics).start()


def submit(batcher, name, k, n, timeout=30.0, seed=0):
    job = batcher.make_job(name, k, rows(name, n, seed), timeout)
    batcher.submit(job)
    return job


def hold_worker(batcher, adapter):
    """Queue a job that keeps the worker inside its batch until adapter.gate is set."""
    job = submit(batcher, "first", key(), 1)
    assert adapter.in_batch.wait(10)
    return job


def test_compatible_rows_share_batches_in_arrival_order_up_to_max_batch():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(gate=gate)
    batcher = make(adapter, max_batch=4)
    hold_worker(batcher, adapter)
    a = submit(batcher, "a", key(), 2, seed=10)
    b = submit(batcher, "b", key(steps=5), 1)  # another step count: never batched with a, c, d
    c = submit(batcher, "c", key(), 3, seed=20)
    d = submit(batcher, "d", key(), 1, seed=30)
    gate.release(1000)
    assert a.future.result(10) == ["a/10", "a/11"]
    assert c.future.result(10) == ["c/20", "c/21", "c/22"]
    assert b.future.result(10) == ["b/0"] and d.future.result(10) == ["d/30"]
    batcher.stop()
    assert adapter.batches == [
        [("first", 0)],
        [("a", 10), ("a", 11), ("c", 20), ("c", 21)],  # c split: its third image waits for the next batch
        [("b", 0)],
        [("c", 22), ("d", 30)],
    ]


def test_adapter_that_cannot_batch_gets_one_request_per_batch():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(gate=gate, batches_requests=False)
    batcher = make(adapter, max_batch=2)
    hold_worker(batcher, adapter)
    a, b = submit(batcher, "a", key(), 3), submit(batcher, "b", key(), 1)
    gate.release(1000)
    assert a.future.result(10) == ["a/0", "a/1", "a/2"] and b.future.result(10) == ["b/0"]
    batcher.stop()
    assert adapter.batches[1:] == [[("a", 0), ("a", 1), ("a", 2)], [("b", 0)]]


def test_full_queue_answers_429_with_retry_after_and_draining_503():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(gate=gate)
    batcher = make(adapter, max_queue=2)
    hold_worker(batcher, adapter)
    submit(batcher, "a", key(), 1), submit(batcher, "b", key(), 1)
    with pytest.raises(APIError) as err:
        submit(batcher, "c", key(), 1)
    assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
    batcher.drain()
    gate.release(1000)
    with pytest.raises(APIError) as err:
        submit(batcher, "d", key(), 1)
    assert err.value.status == 503
    batcher.stop(10)  # the queued jobs still finish
    assert [b[0][0] for b in adapter.batches] == ["first", "a"] and len(adapter.batches[1]) == 2


def test_cancelled_queued_job_is_never_computed():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(gate=gate)
    batcher = make(adapter)
    hold_worker(batcher, adapter)
    a, b = submit(batcher, "a", key(), 2), submit(batcher, "b", key(), 1)
    batcher.cancel(a)
    gate.release(1000)
    assert b.future.result(10) == ["b/0"]
    batcher.stop()
    assert a.future.cancelled()
    assert all(prompt != "a" for batch in adapter.batches for prompt, _ in batch)


class CountingMetrics:
    def __init__(self):
        self.cancelled, self.sizes = [], []

    def batch(self, rows, seconds):
        self.sizes.append(rows)

    def cancelled_batch(self, rows):
        self.cancelled.append(rows)


def test_running_batch_stops_once_every_job_in_it_is_cancelled():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(steps=50, gate=gate)
    metrics = CountingMetrics()
    batcher = make(adapter, metrics=metrics)
    job = hold_worker(batcher, adapter)
    batcher.cancel(job)
    gate.release(1000)
    batcher.stop(10)
    assert adapter.steps_run == 1  # the first step ran, its callback saw nobody waiting and stopped the batch
    assert metrics.cancelled == [1] and metrics.sizes == []


def test_cancelled_job_sharing_a_batch_with_a_live_one_does_not_stop_it():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(gate=gate)
    batcher = make(adapter)
    hold_worker(batcher, adapter)
    a, b = submit(batcher, "a", key(), 1), submit(batcher, "b", key(), 1)
    gate.release(3)  # the first batch's steps
    deadline = time.monotonic() + 10
    while len(adapter.batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert adapter.batches[1] == [("a", 0), ("b", 0)]
    batcher.cancel(a)
    gate.release(3)
    assert b.future.result(10) == ["b/0"] and a.future.cancelled()
    batcher.stop()
    assert adapter.steps_run == 6


def test_job_past_its_deadline_in_the_queue_answers_504():
    gate = threading.Semaphore(0)
    adapter = RecordingAdapter(gate=gate)
    batcher = make(adapter)
    hold_worker(batcher, adapter)
    late = submit(batcher, "late", key(), 1, timeout=0.05)
    time.sleep(0.1)
    gate.release(1000)
    with pytest.raises(APIError) as err:
        late.future.result(10)
    assert err.value.status == 504
    batcher.stop()
    assert all(prompt != "late" for batch in adapter.batches for prompt, _ in batch)


def test_batch_errors_fail_that_batch_only():
    adapter = RecordingAdapter()
    batcher = make(adapter)
    boom, bad, fine = submit(batcher, "boom", key(), 1), submit(batcher, "bad", key(steps=4), 1), None
    with pytest.raises(APIError) as err:
        boom.future.result(10)
    assert err.value.status == 500
    with pytest.raises(APIError) as err:
        bad.future.result(10)
    assert err.value.status == 400 and "steps" in err.value.message
    fine = submit(batcher, "fine", key(), 1)
    assert fine.future.result(10) == ["fine/0"]
    batcher.stop()


def test_progress_events_reach_the_job_listener():
    adapter = RecordingAdapter(steps=3)
    batcher = make(adapter)
    job = batcher.make_job("p", key(), rows("p", 1), 30)
    events = []
    job.listener = events.append
    batcher.submit(job)
    job.future.result(10)
    batcher.stop()
    assert events == [{"type": "started", "steps": 3}] + [
        {"type": "progress", "step": s, "steps": 3} for s in (1, 2, 3)
    ]


def test_nothing_of_a_finished_job_stays_in_the_batcher():
    adapter = RecordingAdapter()
    batcher = make(adapter, wait=0.01)
    job = submit(batcher, "x", key(), 3)
    images = job.future.result(10)
    ref = weakref.ref(job)
    del job
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:  # the worker may still be leaving its batch
        gc.collect()
        time.sleep(0.01)
    assert images == ["x/0", "x/1", "x/2"]
    assert ref() is None and batcher.queue_depth == 0 and batcher.queued_rows == 0
    batcher.stop()
