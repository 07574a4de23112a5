"""Issue 16's batch-vs-live figure: does live chat keep its latency while a batch runs?

Against one real vLLM worker of the default model (started here, or `--worker URL` of a running one,
e.g. `make run`'s http://127.0.0.1:8100), three gateways in turn, each on a fresh data dir:

1. `alone`      live requests only;
2. `batch`      the same live requests while a 50-line batch runs, with the gateway's default
                admission (batch lines yield to live traffic: `batches.concurrency: 1`,
                `batches.live_inflight_max: 0`);
3. `no-yield`   the same, with the admission opened (`concurrency: 8`, `live_inflight_max: 1000`):
                what the batch would cost live traffic without the priority rule.

Live traffic: `--live` streaming chat requests, one after another, through the official `openai`
client; time to first token and total time per request. Reported: p50/p95 of each and their ratio
to `alone`, the batch's lines done while the live requests ran, and its total time. Every figure is
measured in the one run that writes the results file.

    .venv/bin/python -m bench.batch_latency                  # starts its own worker (~1-2 min)
    .venv/bin/python -m bench.batch_latency --worker http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai

from bench.run import ROOT, VENV_BIN, Procs, free_port, wait_http

MODEL = "smollm2-135m-instruct"
PROMPT = "Write two sentences about the Silk Road, number {i}."


@dataclass
class Phase:
    name: str
    ttft: list[float]
    total: list[float]
    batch_done_during: int | None = None
    batch_lines: int | None = None
    batch_seconds: float | None = None
    batch_status: str | None = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_worker(procs: Procs) -> str:
    from serving.settings import load_settings
    from serving.workers.supervisor import worker_command

    settings = load_settings(ROOT / "configs" / "tokenport.yaml", data_dir=ROOT / "data")
    spec = settings.catalogue.get(MODEL)
    assert spec is not None
    port = free_port()
    cmd = worker_command(settings, spec, spec.workers[0].model_copy(update={"port": port}))
    p = procs.start("worker", cmd, cpus=None, env={**os.environ, **settings.workers.env})
    wait_http(f"http://127.0.0.1:{port}/health", p, procs, "worker", timeout=900)
    return f"http://127.0.0.1:{port}"


def start_gateway(procs: Procs, name: str, worker: str, extra_env: dict[str, str]) -> tuple[str, str]:
    data = Path(tempfile.mkdtemp(prefix=f"tokenport-bench-{name}-"))
    env = {
        **os.environ,
        "TOKENPORT_DATA_DIR": str(data),
        "TOKENPORT_LOG_LEVEL": "WARNING",
        "TOKENPORT_GATEWAY__METRICS_PORT": "0",  # its own metrics listener on a free port
        **extra_env,
    }
    tp = str(VENV_BIN / "tokenport")
    port = free_port()
    p = procs.start(
        f"gateway-{name}",
        [
            tp,
            "gateway",
            "--port",
            str(port),
            *(x for w in worker.split(",") for x in ("--worker", f"{MODEL}={w}")),
        ],
        cpus=None,
        env=env,
    )
    wait_http(
        f"http://127.0.0.1:{port}/healthz", p, procs, f"gateway-{name}", timeout=120
    )  # not readyz: the catalogue's embed worker is not started here
    run = {"check": True, "capture_output": True, "env": env, "text": True, "timeout": 120}
    subprocess.run(
        [
            tp,
            "tenants",
            "create",
            "--id",
            "bench",
            "--name",
            "Bench LLP",
            "--billing-country",
            "KZ",
            "--business",
        ],
        **run,  # type: ignore[call-overload]
    )
    out = subprocess.run([tp, "keys", "create", "--tenant", "bench", "--json"], **run)  # type: ignore[call-overload]
    return f"http://127.0.0.1:{port}/v1", json.loads(out.stdout)["key"]


def live_requests(client: openai.OpenAI, n: int, max_tokens: int) -> tuple[list[float], list[float]]:
    ttft: list[float] = []
    total: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        first: float | None = None
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT.format(i=i)}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
        total.append(time.perf_counter() - t0)
        ttft.append(first if first is not None else total[-1])
    return ttft, total


def batch_file(lines: int, max_tokens: int) -> bytes:
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": f"Summarise the history of Almaty in detail, part {i}."}
                ],
                "max_tokens": max_tokens,
            },
        }
        for i in range(lines)
    ]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def phase(procs: Procs, name: str, worker: str, env: dict[str, str], a: argparse.Namespace) -> Phase:
    url, key = start_gateway(procs, name, worker, env)
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
    try:
        live_requests(client, 2, a.max_tokens)  # warm the path (not counted)
        if name == "alone":
            return Phase(name, *live_requests(client, a.live, a.max_tokens))
        f = client.files.create(
            file=("bench.jsonl", batch_file(a.lines, a.batch_max_tokens)), purpose="batch"
        )
        t0 = time.monotonic()
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while (batch := client.batches.retrieve(batch.id)).status == "validating":
            time.sleep(0.2)
        while (counts := client.batches.retrieve(batch.id).request_counts) is None or counts.completed < 1:
            time.sleep(0.2)  # measure live traffic while lines are really running
        ttft, total = live_requests(client, a.live, a.max_tokens)
        done = client.batches.retrieve(batch.id).request_counts
        while (batch := client.batches.retrieve(batch.id)).status not in (
            "completed",
            "failed",
            "expired",
            "cancelled",
        ):
            time.sleep(0.5)
        counts = batch.request_counts
        return Phase(
            name,
            ttft,
            total,
            batch_done_during=(done.completed if done else 0) - 1,
            batch_lines=counts.completed if counts else None,
            batch_seconds=time.monotonic() - t0,
            batch_status=batch.status,
        )
    finally:
        client.close()


def report(phases: list[Phase], a: argparse.Namespace, worker: str) -> str:
    base = phases[0]
    b50, b95 = statistics.median(base.total), pct(base.total, 0.95)
    f50 = statistics.median(base.ttft)
    head = (
        "phase",
        "live TTFT p50 (s)",
        "ratio",
        "live total p50 (s)",
        "ratio",
        "live total p95 (s)",
        "ratio",
    )
    head += ("batch lines done during live", "batch total (s)")
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in phases:
        t50, t95, ttft = statistics.median(p.total), pct(p.total, 0.95), statistics.median(p.ttft)
        cells = [p.name, f"{ttft:.3f}", f"{ttft / f50:.2f}", f"{t50:.3f}", f"{t50 / b50:.2f}", f"{t95:.3f}"]
        cells += [f"{t95 / b95:.2f}", "" if p.batch_done_during is None else str(p.batch_done_during)]
        done = f"{p.batch_seconds:.1f} ({p.batch_lines} lines, {p.batch_status})" if p.batch_seconds else ""
        rows.append("| " + " | ".join([*cells, done]) + " |")
    return "\n".join(
        [
            f"# Batch vs live latency ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
            "",
            f"`python -m bench.batch_latency` on {platform.node()} ({os.cpu_count()} CPUs, "
            f"{platform.machine()}), worker {worker} ({MODEL}, vLLM CPU), Python {sys.version.split()[0]}.",
            f"Live: {a.live} streaming chat requests one after another, max_tokens {a.max_tokens}; batch: "
            f"{a.lines} chat lines, max_tokens {a.batch_max_tokens}. Ratios against `alone`, same run.",
            "",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help="a running vLLM worker of the default model (default: start one)")
    ap.add_argument("--live", type=int, default=20, help="live requests per phase")
    ap.add_argument("--lines", type=int, default=50, help="batch lines")
    ap.add_argument("--max-tokens", type=int, default=16, help="live requests' max_tokens")
    ap.add_argument("--batch-max-tokens", type=int, default=64, help="batch lines' max_tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="tokenport-bench-logs-"))
    procs = Procs(log_dir)
    try:
        worker = a.worker or start_worker(procs)
        opened = {"TOKENPORT_BATCHES__CONCURRENCY": "8", "TOKENPORT_BATCHES__LIVE_INFLIGHT_MAX": "1000"}
        phases = [
            phase(procs, "alone", worker, {}, a),
            phase(procs, "batch", worker, {}, a),
            phase(procs, "no-yield", worker, opened, a),
        ]
    finally:
        procs.stop_all()
    text = report(phases, a, worker)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{datetime.now(UTC):%Y-%m-%d}-batch-latency.md"
    out.write_text(text, encoding="utf-8")
    raw: dict[str, Any] = {p.name: p.__dict__ for p in phases}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
