"""The rest of the OpenAI surface against real vLLM workers, with the official `openai` client:
embeddings (vLLM's pooling runner, its own worker), the Responses API streaming and not, model
metadata, and pass-through fidelity (tool calls, response_format json_schema, logprobs, seed, n,
parallel_tool_calls come back through the gateway exactly as the worker gives them, streaming too)."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.responses import ResponseCompletedEvent, ResponseIncompleteEvent

from metering.db import make_engine
from metering.events import TokenType
from metering.store_sql import UsageStore
from serving.settings import load_settings
from serving.workers.supervisor import worker_command
from tests.integration.conftest import BIN, MODEL, REPO, free_port, start_gateway, stop, wait_http

pytestmark = pytest.mark.integration
EMBED = "smollm2-135m-embed"


@pytest.fixture(scope="module")
def embed_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM worker with the pooling runner, serving the default model's weights for embeddings."""
    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=REPO / "data")
    base = settings.catalogue.get(MODEL)
    assert base is not None
    spec = base.model_copy(
        update={"name": EMBED, "kind": "embedding", "weights_from": MODEL, "max_model_len": 512}
    )
    port = free_port()
    cmd = worker_command(settings, spec, base.workers[0].model_copy(update={"port": port}))
    assert cmd[-4:] == ["--runner", "pooling", "--convert", "embed"]
    log = tmp_path_factory.mktemp("embed-worker") / "worker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings.workers.env},
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 900, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@dataclass
class Surface:
    url: str
    data_dir: Path
    env: dict[str, str]
    worker_url: str
    api_key: str


@pytest.fixture(scope="module")
def surface(
    vllm_worker: str, embed_worker: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Surface]:
    """`tokenport gateway` over a catalogue naming both workers (the embed model as `kind: embedding`)."""
    d = tmp_path_factory.mktemp("surface")
    catalogue = {
        "default_model": MODEL,
        "models": [
            {
                "name": MODEL,
                "max_model_len": 2048,
                "languages": ["en"],
                "tool_call_parser": "hermes",
                "workers": [{"id": "chat-0", "base_url": vllm_worker}],
            },
            {
                "name": EMBED,
                "kind": "embedding",
                "max_model_len": 512,
                "workers": [{"id": "embed-0", "base_url": embed_worker}],
            },
        ],
    }
    (d / "models.yaml").write_text(yaml.safe_dump(catalogue), encoding="utf-8")
    (d / "tokenport.yaml").write_text(yaml.safe_dump({"models_file": "models.yaml"}), encoding="utf-8")
    env = {
        **os.environ,
        "TOKENPORT_DATA_DIR": str(d / "data"),
        "TOKENPORT_GATEWAY__METRICS_PORT": "0",  # beside a running `make run` (its listener has 9464)
        "TOKENPORT_CONFIG": str(d / "tokenport.yaml"),
        "TOKENPORT_LIMITS__PRICE_BOOK": str(REPO / "configs" / "billing" / "price_books.yaml"),
    }
    port = free_port()
    log = d / "gateway.log"

    def cli(*args: str) -> str:
        return subprocess.run(
            [str(BIN / "tokenport"), *args], env=env, capture_output=True, text=True, check=True, timeout=120
        ).stdout

    proc = start_gateway(port, env, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 60, proc, log)
        cli(
            "tenants",
            "create",
            "--id",
            "surface-co",
            "--name",
            "Surface Co",
            "--billing-country",
            "KZ",
            "--business",
            "--tax-id",
            "123456789013",
            "--currency",
            "USD",
        )
        key = yaml.safe_load(cli("keys", "create", "--tenant", "surface-co", "--json"))["key"]
        yield Surface(f"http://127.0.0.1:{port}", d / "data", env, vllm_worker, key)
    finally:
        stop(proc)


@pytest.fixture()
def client(surface: Surface) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=surface.url + "/v1", api_key=surface.api_key, max_retries=0, timeout=300)
    yield c
    c.close()


@pytest.fixture()
def direct(surface: Surface) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=surface.worker_url + "/v1", api_key="none", max_retries=0, timeout=300)
    yield c
    c.close()


def events(surface: Surface) -> UsageStore:
    return UsageStore(make_engine(f"sqlite:///{surface.data_dir / 'tokenport.db'}"))


def test_embeddings_float_base64_metered_as_embedding_input(surface: Surface, client: openai.OpenAI) -> None:
    got = client.embeddings.create(model=EMBED, input=["Hello world", "Salem alem"])
    assert len(got.data) == 2 and len(got.data[0].embedding) > 64 and got.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model=EMBED, input="Hello world", encoding_format="base64")
    # asked for base64, the SDK hands it over as sent: float32 little-endian, the same dimension
    assert len(base64.b64decode(str(b64.data[0].embedding))) == 4 * len(got.data[0].embedding)
    raw = client.embeddings.with_raw_response.create(model=EMBED, input="Hello world")
    ev = events(surface).get(raw.headers["x-request-id"])
    assert ev is not None and ev.event.endpoint == "embeddings"
    assert ev.event.tokens_by_type() == {TokenType.EMBEDDING_INPUT: raw.parse().usage.prompt_tokens}
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=EMBED, input="x", dimensions=8)
    assert refused.value.code == "dimensions_not_supported" and "matryoshka" not in str(refused.value).lower()
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="x")  # a chat model serves no embeddings


def test_responses_non_streamed_and_streamed(surface: Surface, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="Say hello in one word.", max_output_tokens=8
    )
    got = raw.parse()
    assert got.usage is not None and got.usage.input_tokens > 0 and 0 < got.usage.output_tokens <= 8
    ev = events(surface).get(raw.headers["x-request-id"])
    assert ev is not None and ev.event.endpoint == "responses" and not ev.event.estimated
    assert (ev.event.prompt_tokens, ev.event.completion_tokens) == (
        got.usage.input_tokens,
        got.usage.output_tokens,
    )
    stream = client.responses.create(model=MODEL, input="Count to five.", max_output_tokens=12, stream=True)
    seen = list(stream)
    assert seen[-1].type in ("response.completed", "response.incomplete")
    usage = seen[-1].response.usage
    assert usage is not None and usage.output_tokens > 0
    mine = [
        e
        for e in events(surface).iter_events(tenant_id="surface-co")
        if e.event.endpoint == "responses" and e.event.stream
    ]
    assert mine and mine[-1].event.completion_tokens == usage.output_tokens


def test_stored_responses_for_a_tenant_that_logs_content(surface: Surface, client: openai.OpenAI) -> None:
    """GET/DELETE /v1/responses/{id} with the official client: kept by the gateway (the worker is called
    with store false) for a tenant with content logging on, for that tenant only."""
    subprocess.run(
        [str(BIN / "tokenport"), "tenants", "set-limits", "surface-co", "--content-logging"],
        env=surface.env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    time.sleep(1.0)  # the gateway re-reads limit policies every gateway.key_cache_refresh_s (0.25 s)
    stream = client.responses.create(model=MODEL, input="Count to three.", max_output_tokens=8, stream=True)
    last = list(stream)[-1]
    assert isinstance(last, ResponseCompletedEvent | ResponseIncompleteEvent)
    deadline = time.monotonic() + 10
    while True:
        try:
            kept = client.responses.retrieve(last.response.id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert kept.id == last.response.id and kept.output_text == last.response.output_text
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)


def test_models_metadata(client: openai.OpenAI, surface: Surface) -> None:
    import httpx

    r = httpx.get(surface.url + "/v1/models", headers={"Authorization": f"Bearer {surface.api_key}"})
    cards = {m["id"]: m for m in r.json()["data"]}
    assert cards[MODEL]["context_length"] == 2048 and cards[MODEL]["languages"] == ["en"]
    assert cards[EMBED]["capabilities"] == ["embeddings", "batch"]
    assert cards[MODEL]["capabilities"] == ["chat", "completions", "responses", "batch", "tools"]
    assert cards[EMBED]["pricing"]["prices"] == {"embedding_input": "0.005"}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["name", "population"],
            "additionalProperties": False,
        },
    },
}
CASES: dict[str, dict[str, Any]] = {
    "tools": {
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "max_tokens": 100,  # the whole <tool_call>...</tool_call> (the worker runs the hermes parser)
    },
    "json_schema": {"response_format": SCHEMA, "max_tokens": 40},
    "logprobs": {"logprobs": True, "top_logprobs": 3, "max_tokens": 6},
    "seed_n": {"seed": 1234, "n": 2, "temperature": 1.0, "max_tokens": 8},
}


def _choices(resp: Any) -> list[dict[str, Any]]:
    return [c.model_dump(exclude_none=True) for c in resp.choices]


def _same(a: Any, b: Any) -> bool:
    """Equal, floats (logprobs) within 0.05: the second run may be served from the prefix cache."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 0.05
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("case", list(CASES))
def test_pass_through_fidelity_matches_the_worker(
    case: str, client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Almaty?"}],
        "temperature": 0.0,
        **CASES[case],
    }
    ours, theirs = client.chat.completions.create(**req), direct.chat.completions.create(**req)
    a, b = _choices(ours), _choices(theirs)
    for c in a + b:  # tool call ids are random per request
        for call in (c.get("message") or {}).get("tool_calls") or []:
            call.pop("id", None)
    assert _same(a, b), (a, b)
    if case == "tools":
        assert (
            ours.choices[0].message.tool_calls
            and ours.choices[0].message.tool_calls[0].function.name == "get_weather"
        )
    if case == "logprobs":
        assert (
            ours.choices[0].logprobs is not None
            and len(ours.choices[0].logprobs.content[0].top_logprobs) == 3
        )
    if case == "seed_n":
        assert len(ours.choices) == 2


def _streamed(c: openai.OpenAI, req: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for chunk in c.chat.completions.create(**req, stream=True):
        for ch in chunk.choices:
            acc = out.setdefault(
                ch.index, {"content": "", "args": "", "names": [], "logprobs": [], "finish": None}
            )
            acc["content"] += ch.delta.content or ""
            for call in ch.delta.tool_calls or []:
                acc["args"] += (call.function.arguments or "") if call.function else ""
                if call.function and call.function.name:
                    acc["names"].append(call.function.name)
            if ch.logprobs and ch.logprobs.content:
                acc["logprobs"] += [(t.token, len(t.top_logprobs)) for t in ch.logprobs.content]
            acc["finish"] = ch.finish_reason or acc["finish"]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_pass_through_fidelity(case: str, client: openai.OpenAI, direct: openai.OpenAI) -> None:
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Almaty?"}],
        "temperature": 0.0,
        **CASES[case],
    }
    ours, theirs = _streamed(client, req), _streamed(direct, req)
    assert ours == theirs and ours
