"""A non-streamed request cut off while the worker generates (the server's shutdown deadline
cancels it) still ends in one usage event: `client_cancelled`, its prompt counted, marked estimated."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from metering.events import Outcome
from metering.metrics import Metrics
from metering.recorder import RequestMeter
from serving.proxy.forward import Forwarder
from serving.proxy.pool import Worker, WorkerPool

MODEL = "m"


class StubLedger:
    async def admit(self) -> None:
        return None


class StubRecorder:
    def __init__(self) -> None:
        self.ledger = StubLedger()
        self.recorded: list[tuple[RequestMeter, Outcome]] = []

    def record_nowait(self, meter: RequestMeter, outcome: Outcome) -> None:
        meter.recorded = True
        self.recorded.append((meter, outcome))

    async def record(self, meter: RequestMeter, outcome: Outcome) -> None:
        self.record_nowait(meter, outcome)


async def test_cancelled_while_the_worker_generates_is_metered() -> None:
    got_request = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        await reader.read()  # until the gateway hangs up
        writer.close()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    worker = Worker(id="w1", model=MODEL, url=f"http://127.0.0.1:{port}", region="local", healthy=True)
    recorder: Any = StubRecorder()
    forwarder = Forwarder(WorkerPool([worker]), recorder, Metrics({MODEL}), timeout_s=60)
    meter = RequestMeter(
        request_id="req_1",
        tenant_id="t",
        key_id="k",
        model=MODEL,
        endpoint="chat.completions",
        origin_country="KZ",
        origin_source="header",
        stream=False,
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 20}]}
    task = asyncio.create_task(forwarder.forward(meter, body, {}, 0.0))
    try:
        await asyncio.wait_for(got_request.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert [(m.request_id, o) for m, o in recorder.recorded] == [("req_1", Outcome.CLIENT_CANCELLED)]
        assert meter.estimated and meter.prompt_tokens > 20 and meter.completion_tokens == 0
        assert meter.worker_id == "w1" and worker.inflight == 0
    finally:
        await forwarder.close()
        server.close()
        await server.wait_closed()
