"""Metering under faults with fake workers: a retry before the client's first byte bills only the
attempt that answered; fail-closed ledger gives 503; missing usage is counted with the tokenizer."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from metering.events import Outcome
from metering.tokencount import TokenCounter
from serving.pipeline import Pipeline
from tests.conftest import MODEL, GatewayFactory
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body, stream_raw
from tests.serving.limits_support import set_limits

REPO = Path(__file__).resolve().parents[2]
PREPARED = REPO / "data" / "models" / MODEL


async def test_worker_dying_before_the_first_event_is_retried_elsewhere(
    gateway_factory: GatewayFactory, fake_factory: Any
) -> None:
    dying: FakeWorker = await fake_factory()
    good: FakeWorker = await fake_factory()
    gw = await gateway_factory([(MODEL, "a-dying", dying.url), (MODEL, "b-good", good.url)])
    _t, _k, api_key = gw.new_tenant()
    dying.behave(die_after=0)  # accepts the request, then the connection drops before any event
    good.behave(tokens=4, prompt_tokens=12)
    await asyncio.sleep(0.3)
    out = await stream_raw(gw.http, api_key, chat_body(stream=True))
    assert out.status == 200 and out.done
    rid = out.request_id
    assert len(dying.completion_requests()) == 1 and len(good.completion_requests()) == 1
    ev = (await gw.wait_event(rid)).event
    assert ev.outcome is Outcome.OK and ev.worker_id == "b-good" and ev.serving_region == "region-b-good"
    assert (ev.prompt_tokens, ev.completion_tokens) == (12, 4)
    assert len(gw.events_for(ev.tenant_id)) == 1


async def test_fail_closed_ledger_refuses_with_503(
    gateway_factory: GatewayFactory, fake_factory: Any
) -> None:
    w: FakeWorker = await fake_factory()
    gw = await gateway_factory([(MODEL, "w", w.url)])
    _t, _k, api_key = gw.new_tenant()
    ledger = _forwarder(gw.app).recorder.ledger
    ledger.fail_closed = True
    store = ledger.store
    real = store.append_batch
    down = {"on": True}

    def flaky(events: Any) -> Any:
        if down["on"]:
            from sqlalchemy.exc import OperationalError

            raise OperationalError("INSERT", {}, Exception("connection refused"))
        return real(events)

    store.append_batch = flaky
    store.ping = lambda: flaky([])
    # the commit fails: a non-streamed answer is withheld (503), a stream ends without [DONE]
    r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(api_key))
    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
    # known down: refused before any worker runs it
    before = len(w.completion_requests())
    s = await stream_raw(gw.http, api_key, chat_body(stream=True))
    assert s.status == 503 and s.events[0]["error"]["code"] == "ledger_unavailable"
    assert len(w.completion_requests()) == before
    down["on"] = False
    ledger._last_probe = 0.0
    s = await stream_raw(gw.http, api_key, chat_body(stream=True))
    assert s.status == 200 and s.done
    assert (await gw.wait_event(s.request_id)).event.outcome is Outcome.OK


async def test_fail_closed_503s_use_none_of_the_rate_limit(
    gateway_factory: GatewayFactory, fake_factory: Any
) -> None:
    w: FakeWorker = await fake_factory()
    gw = await gateway_factory([(MODEL, "w", w.url)])
    t, _k, api_key = gw.new_tenant()
    await set_limits(gw, t.id, rpm=2)
    ledger = _forwarder(gw.app).recorder.ledger
    ledger.fail_closed, ledger.available = True, False  # known down
    ledger.store.ping = lambda: (_ for _ in ()).throw(OperationalError("SELECT 1", {}, Exception("down")))
    for _ in range(5):
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(api_key))
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
        ledger._last_probe = 0.0  # probe again each time
    ledger.available = True  # back: the tenant still has its whole minute
    codes = [
        (await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(api_key))).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]


async def test_stream_whose_commit_fails_gets_an_error_event_not_done(
    gateway_factory: GatewayFactory, fake_factory: Any
) -> None:
    w: FakeWorker = await fake_factory()
    gw = await gateway_factory([(MODEL, "w", w.url)])
    _t, _k, api_key = gw.new_tenant()
    ledger = _forwarder(gw.app).recorder.ledger
    ledger.fail_closed = True

    def broken(events: Any) -> Any:
        from sqlalchemy.exc import OperationalError

        raise OperationalError("INSERT", {}, Exception("gone"))

    ledger.store.append_batch = broken
    s = await stream_raw(gw.http, api_key, chat_body(stream=True))
    assert s.status == 200 and not s.done
    assert s.events[-1]["error"]["code"] == "ledger_unavailable"


@pytest.mark.skipif(not (PREPARED / "tokenizer.json").is_file(), reason="the default model is not prepared")
async def test_missing_usage_is_counted_with_the_models_tokenizer(
    gateway_factory: GatewayFactory, fake_factory: Any, tmp_path: Path
) -> None:
    w: FakeWorker = await fake_factory()
    gw = await gateway_factory([(MODEL, "w", w.url)])
    models = gw.settings.models_dir / MODEL
    models.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(PREPARED / f, models / f)
    _t, _k, api_key = gw.new_tenant()
    w.behave(omit_usage=True, tokens=4)
    counter = TokenCounter.from_models_dir(gw.settings.models_dir, [MODEL])
    body = chat_body("Привет! Как дела?")
    expected_prompt = counter.prompt_tokens(MODEL, "chat.completions", body)
    s = await stream_raw(gw.http, api_key, {**body, "stream": True})
    ev = (await gw.wait_event(s.request_id)).event
    assert ev.estimated and ev.prompt_tokens == expected_prompt > 5
    # " w0 w1 w2 w3" then finish_reason "stop": the text's tokens plus the end-of-sequence token
    assert ev.completion_tokens == counter.tokenizer(MODEL).count(" w0 w1 w2 w3") + 1  # type: ignore[union-attr]
    r = await gw.http.post("/v1/chat/completions", json=body, headers=auth(api_key))
    ev2 = (await gw.wait_event(r.headers["x-request-id"])).event
    assert ev2.estimated and (ev2.prompt_tokens, ev2.completion_tokens) == (
        ev.prompt_tokens,
        ev.completion_tokens,
    )


def _forwarder(app: Any) -> Any:
    """The gateway's Forwarder, as create_app handed it to the completion pipeline."""
    for m in app.user_middleware:
        if m.cls is Pipeline:
            return m.kwargs["forwarder"]
    raise AssertionError("no forwarder found")
