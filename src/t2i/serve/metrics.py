"""Prometheus metrics of one server (its own registry, so two apps in one process never mix their counts).

    t2i_serve_queue_requests / t2i_serve_queue_images     gauges: what waits to start
    t2i_serve_running_images                              gauge: rows in the batch being sampled
    t2i_serve_batch_images                                histogram: rows per sampler batch
    t2i_serve_batch_seconds                               histogram: time of one sampler batch
    t2i_serve_queue_seconds                               histogram: arrival -> first row started, per request
    t2i_serve_request_seconds{endpoint}                   histogram: arrival -> response, per image request
    t2i_serve_requests_total{endpoint,status}             counter
    t2i_serve_images_total{model}                         counter: images answered
    t2i_serve_errors_total{code}                          counter: error answers and dropped work by cause
    t2i_serve_cancelled_rows_total                        counter: rows of batches stopped mid-way (no one waited)
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, batcher: Any = None) -> None:
        disable_created_metrics()  # no `_created` series: they double the text and no dashboard reads them
        self.registry = registry = CollectorRegistry(auto_describe=True)
        prefix = "t2i_serve_"
        self.queue_requests = Gauge(prefix + "queue_requests", "Requests waiting to start", registry=registry)
        self.queue_images = Gauge(prefix + "queue_images", "Images waiting to start", registry=registry)
        self.running_images = Gauge(prefix + "running_images", "Images in the running batch", registry=registry)
        self.batch_images = Histogram(
            prefix + "batch_images", "Images per sampler batch", buckets=BATCH_BUCKETS, registry=registry
        )
        self.batch_seconds = Histogram(
            prefix + "batch_seconds", "Seconds per sampler batch", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.queue_seconds = Histogram(
            prefix + "queue_seconds", "Seconds from arrival to the first row started",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.request_seconds = Histogram(
            prefix + "request_seconds", "Seconds from arrival to response of image requests", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.requests = Counter(prefix + "requests", "HTTP requests answered", ["endpoint", "status"], registry=registry)
        self.images = Counter(prefix + "images", "Images answered", ["model"], registry=registry)
        self.errors = Counter(prefix + "errors", "Error answers and dropped work by cause", ["code"], registry=registry)
        self.cancelled_rows = Counter(
            prefix + "cancelled_rows", "Rows of batches stopped because nobody waited for them", registry=registry
        )
        if batcher is not None:
            self.queue_requests.set_function(lambda: batcher.queue_depth)
            self.queue_images.set_function(lambda: batcher.queued_rows)
            self.running_images.set_function(lambda: batcher.running_rows)

    # called by the batcher (sampling thread); prometheus_client metrics are thread-safe
    def batch(self, rows: int, seconds: float) -> None:
        self.batch_images.observe(rows)
        self.batch_seconds.observe(seconds)

    def cancelled_batch(self, rows: int) -> None:
        self.cancelled_rows.inc(rows)
        self.errors.labels(code="cancelled").inc()

    def error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
