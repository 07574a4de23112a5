"""Issue 14's routing figure: prefix-affinity vs least-loaded routing over two real vLLM CPU workers.

Starts two vLLM workers of the default model (or uses `--workers URL,URL`) and, for each policy, a
fresh gateway in front of both (`gateway.routing`), then runs the same multi-turn chat workload:
`--conversations` conversations, each a long system prompt of its own plus growing turns, interleaved
(turn 1 of every conversation, then turn 2, ...), streamed one at a time through the official `openai`
client. Reported per policy, from vLLM's own counters summed over both workers: prefix-cache hits /
queried tokens (`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`), and time to first
token p50/p95. The workers are restarted between policies so neither starts with a warm cache.

    .venv/bin/python -m bench.prefix_affinity            # about 6-8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import openai

from bench.batch_latency import MODEL, start_gateway
from bench.run import ROOT, Procs, free_port, wait_http

SYSTEM = (
    "You are the support assistant of {company}, a trading company in {city}. You answer questions about "
    "orders, invoices, deliveries and contracts politely and briefly. Company facts: founded in {year}; "
    "{staff} employees; offices in {city} and Tianjin; payment terms 30 days; currency {ccy}. "
)
CITIES = ("Almaty", "Tashkent", "Riyadh", "Dubai", "Istanbul", "Astana", "Bishkek", "Dushanbe")
TURNS = ("Where is my order?", "Can you resend the invoice?", "What are the payment terms?", "Thank you.")
_COUNTER = re.compile(r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\} ([0-9.eE+-]+)$", re.MULTILINE)


def counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"hits": 0.0, "queries": 0.0}
    for kind, value in _COUNTER.findall(text):
        out[kind] += float(value)
    return out


def start_workers(procs: Procs, n: int) -> list[str]:
    from serving.settings import load_settings
    from serving.workers.supervisor import worker_command

    settings = load_settings(ROOT / "configs" / "tokenport.yaml", data_dir=ROOT / "data")
    spec = settings.catalogue.get(MODEL)
    assert spec is not None
    urls, started = [], []
    for i in range(n):
        port = free_port()
        cmd = worker_command(settings, spec, spec.workers[0].model_copy(update={"port": port}))
        started.append(
            (
                f"worker-{i}",
                procs.start(f"worker-{i}", cmd, cpus=None, env={**os.environ, **settings.workers.env}),
                port,
            )
        )
    for name, p, port in started:
        wait_http(f"http://127.0.0.1:{port}/health", p, procs, name, timeout=900)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def system_message(c: int) -> dict[str, str]:
    """Conversation c's system prompt: its own company, long enough for a shared cached prefix."""
    company = SYSTEM.format(
        company=f"Trade-{c} LLP", city=CITIES[c % len(CITIES)], year=1990 + c, staff=40 + c, ccy="USD"
    )
    return {"role": "system", "content": company * 3}


def workload(client: openai.OpenAI, conversations: int) -> list[float]:
    history = {c: [system_message(c)] for c in range(conversations)}
    ttft: list[float] = []
    for turn in TURNS:
        for c in range(conversations):
            history[c].append({"role": "user", "content": turn})
            t0 = time.perf_counter()
            first, text = None, ""
            for chunk in client.chat.completions.create(
                model=MODEL,
                messages=history[c],
                max_tokens=12,
                temperature=0.0,
                stream=True,  # type: ignore[arg-type]
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - t0
                    text += chunk.choices[0].delta.content
            ttft.append(first or time.perf_counter() - t0)
            history[c].append({"role": "assistant", "content": text})
    return ttft


def run_policy(policy: str, a: argparse.Namespace, log_dir: Path) -> dict[str, object]:
    procs = Procs(log_dir)
    try:
        urls = start_workers(procs, 2)
        before = [counters(u) for u in urls]
        env = {"TOKENPORT_GATEWAY__ROUTING": policy}
        # the gateway is given both workers under the one model name
        url, key = start_gateway(procs, policy, ",".join(urls), env)
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        ttft = workload(client, a.conversations)
        after = [counters(u) for u in urls]
        hits = sum(x["hits"] - y["hits"] for x, y in zip(after, before, strict=True))
        queries = sum(x["queries"] - y["queries"] for x, y in zip(after, before, strict=True))
        per_worker = [round(x["queries"] - y["queries"]) for x, y in zip(after, before, strict=True)]
        return {
            "policy": policy,
            "requests": len(ttft),
            "hit_rate": hits / queries if queries else 0.0,
            "hits": hits,
            "queries": queries,
            "queried_per_worker": per_worker,
            "ttft_p50": statistics.median(ttft),
            "ttft_p95": sorted(ttft)[round(0.95 * (len(ttft) - 1))],
        }
    finally:
        procs.stop_all()


def run_failover(a: argparse.Namespace, log_dir: Path) -> dict[str, object]:
    """Prefix affinity over two workers, the conversations in parallel; one worker SIGKILLed when the
    second turn starts. Who saw an error, and were those exactly requests that were on the killed
    worker (from the gateway's ledger: worker_id and times)?"""
    import signal
    import threading

    from metering.db import make_engine
    from metering.store_sql import UsageStore

    procs = Procs(log_dir)
    data = Path(tempfile.mkdtemp(prefix="tokenport-bench-failover-"))
    try:
        urls = start_workers(procs, 2)
        victim = next(p for _pid, (name, p) in procs.running.items() if name == "worker-1")
        env = {"TOKENPORT_GATEWAY__ROUTING": "prefix_affinity", "TOKENPORT_DATA_DIR": str(data)}
        url, key = start_gateway(procs, "failover", ",".join(urls), env)
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        results: list[tuple[int, int, bool, str]] = []  # conversation, turn, ok, error
        second_turn = threading.Event()

        def conversation(c: int) -> None:
            history: list[dict[str, str]] = [system_message(c)]
            for t, turn in enumerate(TURNS):
                if t == 1:
                    second_turn.set()
                history.append({"role": "user", "content": turn})
                try:
                    text = "".join(
                        ch.choices[0].delta.content or ""
                        for ch in client.chat.completions.create(
                            model=MODEL,
                            messages=history,
                            max_tokens=24,
                            temperature=0.0,
                            stream=True,  # type: ignore[arg-type]
                        )
                        if ch.choices
                    )
                    results.append((c, t, True, ""))
                except openai.APIError as exc:
                    results.append((c, t, False, type(exc).__name__))
                    text = ""
                history.append({"role": "assistant", "content": text})

        threads = [threading.Thread(target=conversation, args=(c,)) for c in range(a.conversations)]
        for th in threads:
            th.start()
        second_turn.wait(600)
        time.sleep(0.3)  # requests of the second turn in flight on both workers
        killed_at = datetime.now(UTC)
        os.killpg(victim.pid, signal.SIGKILL)
        for th in threads:
            th.join(900)
        time.sleep(1.0)
        events = list(UsageStore(make_engine(f"sqlite:///{data / 'tokenport.db'}")).iter_events())
        on_victim = [
            e.event
            for e in events
            if e.event.worker_id
            and e.event.worker_id.endswith("1")
            and e.event.started_at <= killed_at <= (e.event.finished_at or killed_at)
        ]
        failed = [r for r in results if not r[2]]
        after = [e.event for e in events if e.event.started_at > killed_at]
        return {
            "requests": len(results),
            "client_errors": len(failed),
            "in_flight_on_killed_worker": len(on_victim),
            "requests_after_the_kill": len(after),
            "after_the_kill_on_the_survivor": sum(
                1 for e in after if e.worker_id and e.worker_id.endswith("0")
            ),
            "events": len(events),
        }
    finally:
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="tokenport-bench-affinity-"))
    rows = [run_policy(p, a, log_dir) for p in ("least_loaded", "prefix_affinity")]
    base = rows[0]
    lines = [
        f"# Prefix-affinity vs least-loaded routing ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python -m bench.prefix_affinity` on {platform.node()} ({os.cpu_count()} CPUs): two vLLM CPU "
        f"workers of {MODEL} (fresh for each policy), {a.conversations} conversations x {len(TURNS)} "
        "turns, interleaved, streamed one at a time. Hit rate = vLLM's prefix-cache hits / queried tokens "
        "over both workers.",
        "",
        "| policy | requests | prefix-cache hit rate | queried tokens per worker | TTFT p50 (s) | ratio "
        "| TTFT p95 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        hit, p50, p95 = (float(str(r[k])) for k in ("hit_rate", "ttft_p50", "ttft_p95"))
        ratio = p50 / float(str(base["ttft_p50"]))
        lines.append(
            f"| {r['policy']} | {r['requests']} | {hit:.1%} | {r['queried_per_worker']} | {p50:.3f} "
            f"| {ratio:.2f} | {p95:.3f} |"
        )
    fo = run_failover(a, log_dir)
    rows.append({"policy": "failover", **fo})
    lines += [
        "",
        f"**Failover** (prefix affinity, the {a.conversations} conversations in parallel, worker 1 killed "
        "with SIGKILL as the second turn starts): "
        f"{fo['requests']} requests, {fo['client_errors']} client errors, "
        f"{fo['in_flight_on_killed_worker']} requests were in flight on the killed worker (from the "
        f"gateway's ledger), {fo['after_the_kill_on_the_survivor']} of {fo['requests_after_the_kill']} "
        "requests after the kill served by the surviving worker.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{datetime.now(UTC):%Y-%m-%d}-prefix-affinity.md"
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
