"""One request's time on a worker: the in-flight counts it holds and the latency it reports.

The forwarder opens a Flight when a worker answered; whoever ends the request closes it, exactly
once: the forwarder itself for a whole (JSON) answer, the stream relay when its stream ends (it is
handed the Flight: nothing calls back up into the forwarder).
"""

from __future__ import annotations

import time
from typing import Any

from metering.metrics import Metrics
from serving.proxy.pool import Worker, WorkerPool


class Flight:
    __slots__ = (
        "done",
        "inflight",
        "metrics",
        "model_label",
        "pool",
        "route",
        "t0",
        "t_up",
        "upstream_s",
        "worker",
    )

    def __init__(
        self,
        worker: Worker,
        pool: WorkerPool,
        metrics: Metrics,
        model_label: str,
        route: str,
        inflight: Any,
        t0: float,
        t_up: float,
    ) -> None:
        self.worker = worker
        self.pool = pool
        self.metrics = metrics
        self.model_label = model_label
        self.route = route
        self.inflight = inflight  # the model's in-flight gauge child, already incremented
        self.t0 = t0  # the request's arrival
        self.t_up = t_up  # when the worker was called
        self.upstream_s = 0.0
        self.done = False

    def land(self) -> None:
        """The worker is done with the request: drop the in-flight counts, observe its latency."""
        if self.done:
            return
        self.done = True
        self.worker.inflight -= 1
        self.inflight.dec()
        self.upstream_s = time.perf_counter() - self.t_up
        self.metrics.child(self.metrics.upstream, self.model_label, self.worker.id).observe(self.upstream_s)

    def failed(self) -> None:
        """The worker broke the connection mid-answer (it died): out of the pool now, not at the next
        health check, so no new request is sent to it and /readyz tells."""
        self.pool.mark_failed(self.worker)

    def answered(self) -> None:
        """A whole answer is ready for the client: its duration and the gateway's own time."""
        total = time.perf_counter() - self.t0
        self.metrics.child(self.metrics.duration, self.model_label, "false").observe(total)
        self.metrics.child(self.metrics.overhead, self.route).observe(total - self.upstream_s)

    def streamed(self, relay_overhead: float) -> None:
        """A stream ended (any way): land, then its duration and the gateway's own time (before the
        worker was called, plus the relay's work on each chunk)."""
        if self.done:
            return
        self.land()
        self.metrics.child(self.metrics.duration, self.model_label, "true").observe(
            time.perf_counter() - self.t0
        )
        self.metrics.child(self.metrics.overhead, self.route).observe(self.t_up - self.t0 + relay_overhead)
