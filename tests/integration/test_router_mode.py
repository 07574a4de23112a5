"""Router mode: the engines sit behind a router and Tokenport is only the metering and billing front
door. nginx stands in for the router (a vLLM production-stack router or an llm-d/Envoy InferencePool)
between a `tokenport gateway` process and the session's real vLLM worker; the workers file names one
worker for the model, the router (`router: true`, `health_path`). Usage stays exact: every event
equals the usage the client got, and the ledger's totals equal the engine's own token counters over
the run. The gateway asks the router only for health, never for /metrics: no load scrape (routing is
`prefix_affinity`, which scrapes an engine's /metrics with every health check) and no reconciliation
against a router (`metering.reconcile_interval_s: 1`). The session header is passed on to the
router."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from metering.db import make_engine
from metering.events import UsageEvent
from metering.store_sql import UsageStore
from tests.integration.conftest import (
    BIN,
    MODEL,
    REPO,
    TRUSTED_LOOPBACK,
    free_port,
    start_gateway,
    stop,
    wait_http,
)
from tests.integration.test_end_to_end import worker_counts

pytestmark = pytest.mark.integration

NGINX = "/usr/sbin/nginx"
CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format routed '$remote_addr "$request" $status "$http_x_session_id"';
    access_log {prefix}/access.log routed;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream engines {{ server {engine}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engines;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;        # SSE chunk by chunk, as a router does
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def router(vllm_worker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"{NGINX} is needed (apt-get install nginx)")
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(CONF.format(prefix=prefix, engine=vllm_worker.removeprefix("http://"), port=port))
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 30, proc)
        yield url, prefix / "access.log"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def front_door(
    router: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, str]]:
    """`tokenport gateway` whose workers file names the router as the model's one worker."""
    router_url, _log = router
    d = tmp_path_factory.mktemp("router-mode")
    models = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())
    [spec] = [m for m in models["models"] if m["name"] == MODEL]
    spec["workers"] = []  # served: a workers file serves every catalogue model
    (d / "models.yaml").write_text(yaml.safe_dump({"default_model": MODEL, "models": [spec]}))
    (d / "workers.yaml").write_text(
        yaml.safe_dump(
            {
                "workers": [
                    {
                        "model": MODEL,
                        "base_url": router_url,
                        "id": "router",
                        "router": True,
                        "health_path": "/health",
                        "region": "eu-1",
                    }
                ]
            }
        )
    )
    (d / "tokenport.yaml").write_text(
        yaml.safe_dump(
            {
                "data_dir": str(d / "data"),
                "models_file": "models.yaml",
                # an engine's /metrics would be scraped with each health check for its load
                "gateway": {"routing": "prefix_affinity"},
                "metering": {"reconcile_interval_s": 1},  # would scrape /metrics each second if it could
                "workers": {"health_interval_s": 0.5, "file": "workers.yaml", "refresh_s": 0.5},
            }
        )
    )
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENPORT_CONFIG": str(d / "tokenport.yaml"),
        "TOKENPORT_GATEWAY__METRICS_PORT": str(metrics_port),
        "TOKENPORT_GATEWAY__TRUSTED_PROXIES": TRUSTED_LOOPBACK,
    }
    log = d / "gateway.log"
    proc = start_gateway(port, env, log)
    cli = [str(BIN / "tokenport")]
    try:
        # readyz: every model with workers has a healthy one (here the router, after its check)
        wait_http(f"http://127.0.0.1:{port}/readyz", 60, proc, log)
        subprocess.run(
            [*cli, "tenants", "create", "--id", "rt", "--name", "Router Co", "--billing-country", "DE"],
            env=env,
            check=True,
            capture_output=True,
        )
        out = subprocess.run(
            [*cli, "keys", "create", "--tenant", "rt", "--json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        key = json.loads(out.stdout)["key"]
        assert isinstance(key, str)
        yield f"http://127.0.0.1:{port}", d / "data" / "tokenport.db", key
    finally:
        stop(proc)


MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three rivers in Europe."}]


def test_usage_through_a_router_is_exact(
    vllm_worker: str, router: tuple[str, Path], front_door: tuple[str, Path, str]
) -> None:
    url, db, key = front_door
    _router_url, access_log = router
    before = worker_counts(vllm_worker)
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    answers: dict[str, tuple[int, int]] = {}
    try:
        done = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, extra_headers={"X-Session-Id": "conv-1"}
        )
        assert done.usage is not None and done._request_id is not None
        answers[done._request_id] = (done.usage.prompt_tokens, done.usage.completion_tokens)
        with client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            chunks = list(stream)
            rid = stream.response.headers["x-request-id"]
        usage = chunks[-1].usage
        assert usage is not None and sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 0
        answers[rid] = (usage.prompt_tokens, usage.completion_tokens)
        text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
        assert text.usage is not None and text._request_id is not None
        answers[text._request_id] = (text.usage.prompt_tokens, text.usage.completion_tokens)
    finally:
        client.close()

    engine = make_engine(f"sqlite:///{db}")
    store = UsageStore(engine)
    events: dict[str, UsageEvent] = {}
    try:
        for rid in answers:
            deadline = time.monotonic() + 10
            while (stored := store.get(rid)) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert stored is not None, rid
            events[rid] = stored.event
    finally:
        engine.dispose()
    for rid, (prompt, completion) in answers.items():
        e = events[rid]
        assert (e.prompt_tokens, e.completion_tokens) == (prompt, completion), rid
        assert (e.outcome.value, e.estimated, e.worker_id, e.serving_region) == (
            "ok",
            False,
            "router",
            "eu-1",
        )

    # the engine's own counters over the run equal the ledger's totals
    want = (sum(p for p, _ in answers.values()), sum(c for _, c in answers.values()))
    deadline = time.monotonic() + 10
    while True:
        after = worker_counts(vllm_worker)
        got = (after[0] - before[0], after[1] - before[1])
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == want, f"the engine counted {got}, the ledger has {want}"

    # the router was asked for health, never for /metrics (load scrape, reconciliation)
    time.sleep(1.5)  # a reconciliation interval and a few health checks
    # (and the session header reached it, for its own session routing)
    lines = [line.split('"') for line in access_log.read_text().splitlines() if '"' in line]
    paths = [parts[1].split(" ")[1] for parts in lines]
    assert "/health" in paths and "/v1/chat/completions" in paths and "/v1/completions" in paths
    assert "/metrics" not in paths
    sessions = [parts[3] for parts in lines if parts[1].split(" ")[1] == "/v1/chat/completions"]
    assert sessions == ["conv-1", "-"]  # the first chat request had one, the stream did not
    assert httpx.get(url + "/readyz", timeout=5).status_code == 200
