"""Fuzz the gateway's own OpenAPI schema with schemathesis (bounded): no 5xx, no crash, and the
ledger and the budget count every request that reached a worker exactly once.

The gateway and its fake worker run in a thread with their own event loop (schemathesis calls are
synchronous). Every operation of the schema is fuzzed with valid-looking and invalid data — the
OpenAI endpoints with a tenant key (the model is set to a served one most of the time, so requests
reach the worker), the admin API with the admin token, the ops routes without credentials.
Bounded: FUZZ_EXAMPLES per operation and mode, FUZZ_BUDGET_S in total.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Err, Ok

from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.limits_support import ADMIN, guarded_gateway

FUZZ_EXAMPLES = int(os.environ.get("TOKENPORT_FUZZ_EXAMPLES", "25"))
FUZZ_BUDGET_S = float(os.environ.get("TOKENPORT_FUZZ_BUDGET_S", "45"))


class Harness:
    """A gateway + fake worker in their own thread and event loop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.gw: Gateway | None = None
        self.fake: FakeWorker | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-gateway", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.fake = await FakeWorker().start()
        try:
            async with guarded_gateway(self.directory, [(MODEL, "f0", self.fake.url)]) as gw:
                self.gw = gw
                self.ready.set()
                await self.stop_event.wait()
        finally:
            await self.fake.stop()

    def call(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> Harness:
        self.thread.start()
        self.ready.wait(60)
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz")).start()
    try:
        yield h
    finally:
        h.stop()


def fuzz(op: Any, mode: GenerationMode, base_url: str, headers: dict[str, str], failures: list[str]) -> int:
    """Up to FUZZ_EXAMPLES generated calls of one operation; 5xx answers are added to `failures`."""
    calls = 0

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        if isinstance(case.body, dict) and "model" in case.body and calls % 4 != 0:
            case.body["model"] = MODEL  # most requests reach the worker
        resp = case.call(base_url=base_url, headers=headers, timeout=15)
        if resp.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} ({mode.value}) -> {resp.status_code}: {resp.text[:300]}"
            )

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (e.g. a GET without parameters)
        assert mode is GenerationMode.NEGATIVE
    return calls


T = TypeVar("T")
E = TypeVar("E", bound=Exception)


def _ok(result: Ok[T] | Err[E]) -> T:
    """The value of a schemathesis `Result`, or its error raised."""
    if isinstance(result, Err):
        raise result.err()
    return result.ok()


def test_fuzz_the_openapi_schema(harness: Harness) -> None:
    gw, fake = harness.gw, harness.fake
    assert gw is not None and fake is not None
    tenant, _key, api_key = gw.new_tenant()

    async def setup() -> None:
        r = await gw.http.patch(
            f"/admin/v1/tenants/{tenant.id}/limits",
            headers=ADMIN,
            json={"rpm": 100_000, "tpm": 100_000_000, "budget": {"unit": "tokens", "amount": 100_000_000}},
        )
        assert r.status_code == 200

    harness.call(setup())
    schema = schemathesis.openapi.from_dict(gw.app.openapi())
    operations = [_ok(r) for r in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    started = time.monotonic()
    failures: list[str] = []
    calls = 0

    def headers_for(path: str) -> dict[str, str]:
        if path.startswith("/admin"):
            return dict(ADMIN)
        if path.startswith("/v1"):
            return {"Authorization": f"Bearer {api_key}"}
        return {}

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() - started > FUZZ_BUDGET_S:
                break
            calls += fuzz(op, mode, gw.url, headers_for(op.path), failures)
    assert calls >= len(operations) * 2, calls
    assert len(fake.completion_requests()) >= 5, "too few fuzzed requests reached the worker"

    async def check() -> None:
        assert (await gw.http.get("/healthz")).status_code == 200  # still up
        seen = {
            next(v for k, v in r.headers.items() if k.lower() == "x-request-id")
            for r in fake.completion_requests()
        }
        for _ in range(100):  # events of streams still closing
            events = gw.events_for(tenant.id)
            if {e.event.request_id for e in events} >= seen:
                break
            await asyncio.sleep(0.05)
        ids = [e.event.request_id for e in gw.events_for(tenant.id)]
        assert len(ids) == len(set(ids))
        assert set(ids) == seen, "every request that reached the worker is in the ledger once, and only those"
        used = sum(e.event.prompt_tokens + e.event.completion_tokens for e in gw.events_for(tenant.id))
        for _ in range(100):
            b = (await gw.http.get(f"/admin/v1/tenants/{tenant.id}/budget", headers=ADMIN)).json()["budget"]
            if b["held"] == "0":
                break
            await asyncio.sleep(0.05)
        assert b["held"] == "0" and int(b["used"]) == used  # the budget counted each of them once

    harness.call(check())
    assert not failures, "\n".join(failures[:20])
