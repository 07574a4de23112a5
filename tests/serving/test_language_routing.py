"""Language-aware routing (issue 15): a routed model name (`auto`) sends each request to the best served
model for its detected language, falls back when none fits, meters the model that served, and says so
in the response's `model` and in X-Tokenport-Routed-Model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from metering.events import Outcome
from serving.errors import ModelNotFound
from serving.proxy.language_routing import HEADER, LanguageRouter
from serving.proxy.pool import Worker, WorkerPool
from serving.settings import Catalogue
from tests.conftest import Gateway
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, stream_raw

RU, EN, BASE = "smollm2-ru", "smollm2-en", "smollm2-135m-instruct"
RUSSIAN = "Сколько стоит отправить один контейнер из Алматы в Тяньцзинь в этом месяце?"
ENGLISH = "How much does it cost to ship one container from Almaty to Tianjin this month?"
CHINESE = "这个月从阿拉木图运一个集装箱到天津要多少钱？"
CATALOGUE: dict[str, Any] = {
    "models": {RU: {"languages": {"ru": 1, "kk": 2}}, EN: {"languages": {"en": 1, "kk": 1}}},
    "routes": [{"name": "auto", "fallback": BASE}],
}


def _router(healthy: set[str], extra: dict[str, Any] | None = None) -> LanguageRouter:
    cat = Catalogue.model_validate(
        {
            "default_model": BASE,
            "models": [
                {"name": BASE},
                {"name": RU, "languages": {"ru": 1, "kk": 2}},
                {"name": EN, "languages": {"en": 1, "kk": 1}},
            ],
            "routes": [{"name": "auto", **(extra or {})}],
        }
    )
    workers = [
        Worker(id=f"w-{m}", model=m, url="http://x", region="r", healthy=m in healthy) for m in (BASE, RU, EN)
    ]
    return LanguageRouter.from_catalogue(cat, WorkerPool(workers))


def ALL(m: str) -> bool:
    return True


def test_the_best_ranked_healthy_model_for_the_language() -> None:
    r = _router({BASE, RU, EN})
    assert r.routes("auto") and not r.routes(BASE)
    assert r.choose("auto", "ru", ALL) == RU
    assert r.choose("auto", "en", ALL) == EN
    assert r.choose("auto", "kk", ALL) == EN  # rank 1 beats RU's rank 2
    assert r.choose("auto", "zh", ALL) == BASE  # nobody states zh: the fallback (default_model)
    assert r.choose("auto", None, ALL) == BASE
    assert r.choose("auto", "kk", lambda m: m != EN) == RU  # a tenant without EN gets the next rank
    body = {"model": "auto"}
    assert r.resolve(body, "ru", ALL) == RU and body == {"model": RU}


def test_falling_back_on_health_and_access() -> None:
    assert _router({BASE, EN}).choose("auto", "ru", ALL) == BASE  # RU's workers are down: the fallback
    assert _router({RU, EN}).choose("auto", "zh", ALL) == RU  # the fallback is down too: a healthy candidate
    assert _router(set()).choose("auto", "ru", ALL) == RU  # nothing healthy: the forwarder will answer 503
    assert _router({BASE, RU, EN}, {"models": [EN], "fallback": RU}).choose("auto", "zh", ALL) == RU
    with pytest.raises(ModelNotFound):
        _router({BASE, RU, EN}).choose("auto", "ru", lambda m: False)


def test_the_catalogue_is_checked() -> None:
    with pytest.raises(ValidationError, match="rank"):
        Catalogue.model_validate({"models": [{"name": RU, "languages": {"ru": 0}}]})
    with pytest.raises(ValidationError, match="differ from every model"):
        Catalogue.model_validate({"models": [{"name": RU}], "routes": [{"name": RU}]})
    with pytest.raises(ValidationError, match="not in models"):
        Catalogue.model_validate({"models": [{"name": RU}], "routes": [{"name": "auto", "fallback": "nope"}]})


async def test_auto_in_russian_and_in_english_through_the_gateway(
    gateway_factory: Callable[..., Any], fake_factory: Callable[..., Any]
) -> None:
    """Two differently named workers (here fakes) of the default model, and the default model itself."""
    ru, en, base = await fake_factory(), await fake_factory(), await fake_factory()
    gw: Gateway = await gateway_factory(
        [(BASE, "w-base", base.url), (RU, "w-ru", ru.url), (EN, "w-en", en.url)], catalogue_extra=CATALOGUE
    )
    _tenant, _key, api_key = gw.new_tenant()
    served: dict[str, tuple[str, FakeWorker]] = {RUSSIAN: (RU, ru), ENGLISH: (EN, en), CHINESE: (BASE, base)}
    for text, (model, fake) in served.items():
        body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
        r = await gw.http.post("/v1/chat/completions", json=body, headers=auth(api_key))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model and r.headers[HEADER] == model
        assert fake.completion_requests()[-1].body["model"] == model  # the worker was asked for its own name
        ev = (await gw.wait_event(r.headers["x-request-id"])).event
        assert (ev.model, ev.outcome) == (model, Outcome.OK)  # metered as the model that served
    out = await stream_raw(
        gw.http,
        api_key,
        {"model": "auto", "stream": True, "messages": [{"role": "user", "content": RUSSIAN}]},
    )
    assert out.done and out.headers[HEADER] == RU
    assert {e["model"] for e in out.events} == {RU}
    assert len(ru.completion_requests()) == 2 and len(en.completion_requests()) == 1
    # a model name that is not routed is served as it is, without the header
    r = await gw.http.post(
        "/v1/chat/completions",
        json={"model": EN, "messages": [{"role": "user", "content": RUSSIAN}]},
        headers=auth(api_key),
    )
    assert r.status_code == 200 and r.json()["model"] == EN and HEADER not in r.headers
    # a tenant that may use none of them gets 404 for `auto` as for any model it may not use
    _t, _k, limited = gw.new_tenant(allowed_models=["nothing-here"])
    r = await gw.http.post(
        "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": ENGLISH}]},
        headers=auth(limited),
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_gateway_workers_from_the_command_line_keep_the_routes() -> None:
    from pathlib import Path

    from serving.app import ExtraWorker
    from serving.cli.run import _with_cli_workers
    from serving.settings import load_settings

    settings = load_settings(Path(__file__).resolve().parents[2] / "configs" / "tokenport.yaml")
    assert [r.name for r in settings.catalogue.routes] == ["auto"]
    changed = _with_cli_workers(
        settings, [ExtraWorker(RU, "http://127.0.0.1:9"), ExtraWorker(EN, "http://x:9")]
    )
    assert [r.name for r in changed.catalogue.routes] == ["auto"]
    assert {RU, EN} <= {m.name for m in changed.catalogue.models}
