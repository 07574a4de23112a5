"""`auto` against a real vLLM worker (issue 15): one worker of the default model serving under two more
names (vLLM's --served-model-name takes several), given to the gateway as two differently named workers
(`--worker smollm2-ru=URL --worker smollm2-en=URL`); a Russian and an English request to `auto` are
routed (X-Tokenport-Routed-Model) and metered as the model configured for their language, with their
text sizes."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from metering.db import make_engine
from metering.store_sql import UsageStore
from serving.proxy.language_routing import HEADER
from serving.settings import load_settings
from serving.workers.supervisor import worker_command
from tests.integration.conftest import BIN, MODEL, REPO, free_port, stop, wait_http

pytestmark = pytest.mark.integration
RU, EN = "smollm2-ru", "smollm2-en"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=REPO / "data")
    spec = settings.catalogue.get(MODEL)
    assert spec is not None
    port = free_port()
    cmd = worker_command(settings, spec, spec.workers[0].model_copy(update={"port": port}))
    at = cmd.index("--served-model-name") + 2
    cmd[at:at] = [RU, EN]
    log = tmp_path_factory.mktemp("worker-names") / "worker.log"
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


def test_auto_routes_russian_and_english(worker: str, tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(
        yaml.safe_dump(
            {
                "default_model": MODEL,
                "routes": [{"name": "auto"}],
                "models": [
                    {"name": MODEL},
                    {"name": RU, "languages": {"ru": 1, "kk": 1}},
                    {"name": EN, "languages": {"en": 1}},
                ],
            }
        )
    )
    (tmp_path / "tokenport.yaml").write_text(
        yaml.safe_dump({"mode": "local", "data_dir": str(tmp_path / "data"), "models_file": "models.yaml"})
    )
    env = {
        **os.environ,
        "TOKENPORT_CONFIG": str(tmp_path / "tokenport.yaml"),
        "TOKENPORT_GATEWAY__METRICS_PORT": "0",  # beside a running `make run` (its listener has 9464)
    }

    def cli(*args: str) -> dict[str, str]:
        out = subprocess.run(
            [str(BIN / "tokenport"), *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return dict(json.loads(out.stdout))

    cli("tenants", "create", "--id", "kz-route", "--name", "Route LLP", "--billing-country", "KZ")
    key = cli("keys", "create", "--tenant", "kz-route")["key"]
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as f:
        gw = subprocess.Popen(
            [
                str(BIN / "tokenport"),
                "gateway",
                "--port",
                str(port),
                "--worker",
                f"{MODEL}={worker}",
                "--worker",
                f"{RU}={worker}",
                "--worker",
                f"{EN}={worker}",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", 60, gw, log)
        for text, model in (
            ("Привет! Расскажи коротко о Ташкенте, пожалуйста.", RU),
            ("Hello! Tell me briefly about Tashkent, please.", EN),
        ):
            r = httpx.post(
                url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
                json={"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": text}]},
            )
            assert r.status_code == 200, r.text
            assert r.headers[HEADER] == model
            # vLLM names its answers by its first served name whatever alias was asked for: with one worker
            # under three names the body says MODEL; two real workers of different names say their own.
            assert r.json()["model"] == MODEL
            stored = UsageStore(make_engine(f"sqlite:///{tmp_path / 'data' / 'tokenport.db'}")).get(
                r.headers["x-request-id"]
            )
            assert stored is not None
            e = stored.event
            assert e.model == model and e.outcome.value == "ok" and not e.estimated
            assert e.prompt_chars == len(text) and e.prompt_bytes == len(text.encode())
            content = r.json()["choices"][0]["message"]["content"]
            assert e.completion_chars == len(content) and e.completion_bytes == len(content.encode())
    finally:
        stop(gw)
