"""Issue 14, measured here: three gateway replicas on one real PostgreSQL and one real Redis, under failures.

    python -m bench.fleet [--scenarios steady,kill,redis,postgres] [--clients 64] [--tag T] [--out DIR]
    python -m bench.fleet upstream --port P      (the counting fake worker the bench starts itself)

What it starts, all on loopback, in a run directory under bench/.run/ (git-ignored), all killed on exit:
- PostgreSQL from Debian (tests/pg.py: initdb + pg_ctl in a temporary directory, fsync on);
- redis-server on a free port, without persistence (`--save '' --appendonly no`), so a restart of
  Redis is a restart with empty state: every budget is seeded again from the ledger;
- a counting fake vLLM worker (this module's `upstream`): bench/fake.py's 20-chunk stream with
  continuous usage (31 prompt + 20 completion tokens), one chunk every 50 ms, recording every
  request id it served (the gateway's `X-Request-Id`) and whether its stream reached the end;
- `tokenport db upgrade`, then per scenario one tenant (USD, a small money budget (none in
  `redis-rate`), RPM and TPM limits, max_tokens 24, request timeout 30 s) and one API key, with the CLI;
- 3 replicas of `tokenport gateway --port P --worker MODEL=URL` (each its own data dir, so its own
  metering spool; `limits.backend: redis`, metrics listener on port 0).

64 concurrent streaming clients (httpx, one event loop) take the replicas in turn, like a load
balancer; a replica that refused a connection is skipped for 2 s. They honour `retry-after-ms` on a
429 (at most 2 s), wait 0.5 s after a 503 and 1 s after `insufficient_quota`.

Scenarios: `steady` (load only), `kill` (kill -9 of one replica's process group at 15 s, restarted at
25 s), `redis` (Redis stopped at 15 s for 10 s), `postgres` (PostgreSQL stopped at 15 s for 30 s), and,
not run by default, `postgres-closed` (the same with every replica restarted with
`metering.fail_closed: true`, as the Helm chart sets it) and `redis-rate` (the `redis` outage for a
tenant without a budget, so `limits.on_backend_error_rate: open` admits while Redis is away, each
replica its share of the limits; RPM 120 instead of 1,200: the 64 clients complete about 50 streams a
second here, so in 10 s they could not reach even one limit of 1,200 and the outage could not tell one
limit from three; one limit of 120 plus 10 s of refill is 140, three would be 420, both within reach).
After each: the load stops, the bench waits until every spool is replayed and the ledger is quiet,
then compares three independent counts (what clients received, what the fake worker served, what
the ledger holds), the budget's use (`tokenport tenants limits --json`) with its limit, the requests
and tokens admitted with what the RPM and TPM buckets allow (over the run, and for a scenario with a
failure per phase: before it, during it, after it, and from its start to the end, each against one
bucket plus the refill over that phase), and runs `tokenport usage verify`.
Results: bench/results/<date>-fleet.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import fake
from bench.run import ANALYSIS_MARK, RESULTS, ROOT, RUNS, VENV_BIN, Procs, free_port, log, wait_http

MODEL = fake.MODEL
REPLICAS = 3
CHUNK_INTERVAL_S = 0.05
MAX_TOKENS = 24
PROMPT = "Hello! What is the capital of Kazakhstan?"
RPM = 1200
TPM = 60_000


# --------------------------------------------------------------------------- the counting fake worker


def upstream_app(interval: float) -> Any:
    """bench/fake.py's stream, dripped; GET /stats returns (and with ?reset=1 clears) what was served."""
    from aiohttp import web

    served: dict[str, dict[str, Any]] = {}

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="")

    async def stats(request: web.Request) -> web.Response:
        body = json.dumps(served)
        if request.query.get("reset"):
            served.clear()
        return web.Response(text=body, content_type="application/json")

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        rid = request.headers.get("X-Request-Id") or f"anon-{len(served)}"
        rec = served.setdefault(rid, {"t": time.time(), "attempts": 0, "complete": False})
        rec["attempts"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await resp.write(fake.sse_role_chunk(rid).encode())
            for i in range(fake.CONTENT_CHUNKS):
                await asyncio.sleep(interval)
                await resp.write(
                    fake.sse_content_chunk(i, last=i == fake.CONTENT_CHUNKS - 1, request_id=rid).encode()
                )
            await resp.write(fake.sse_tail(fake.CONTENT_CHUNKS, rid).encode())
            await resp.write_eof()
            rec["complete"] = True
        except (ConnectionResetError, ConnectionError):
            rec["cut"] = True
        except asyncio.CancelledError:
            rec["cut"] = True
            raise
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", completions)
    return app


def run_upstream(port: int, interval: float) -> None:
    from aiohttp import web

    web.run_app(upstream_app(interval), host="127.0.0.1", port=port, print=None, access_log=None)


# --------------------------------------------------------------------------- services


class Redis:
    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = self.procs.start("redis", argv, cpus=None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True, check=False
            )
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start:\n" + self.procs.tail("redis"))

    def budget_state(self, tenant: str) -> dict[str, str]:
        """The gateways' own budget counter (millionths of the currency): used, reserved (held)."""

        def cli(*args: str) -> str:
            argv = ["redis-cli", "-p", str(self.port), *args]
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

        keys = [k for k in cli("--scan", "--pattern", f"tp:{{{tenant}}}:bg:*").split() if k.count(":") == 5]
        if not keys:
            return {}
        fields = cli("HGETALL", keys[0]).split()
        return dict(zip(fields[::2], fields[1::2], strict=False))

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


@dataclass
class Gateway:
    index: int
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None


class Fleet:
    def __init__(self, run_dir: Path, clients: int) -> None:
        from tests import pg

        self.run_dir = run_dir
        self.clients = clients
        self.procs = Procs(run_dir)
        self.pg = pg.PgServer(fsync=True)
        self.redis = Redis(self.procs)
        self.upstream_port = free_port()
        self.gateways = [Gateway(i, free_port(), run_dir / f"gw{i}") for i in range(REPLICAS)]
        self.gateway_env: dict[str, str] = {}  # settings of a scenario (the gateways are restarted)

    def env(self, gw: Gateway | None = None) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            {
                "PYTHONPATH": str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else ""),
                "TOKENPORT_DATABASE_URL": self.pg.url,
                "TOKENPORT_LIMITS__BACKEND": "redis",
                "TOKENPORT_LIMITS__REDIS_URL": self.redis.url,
                "TOKENPORT_GATEWAY__METRICS_PORT": "0",
                "TOKENPORT_LOG_LEVEL": "WARNING",
                "TOKENPORT_DATA_DIR": str(gw.data_dir if gw else self.run_dir / "cli"),
            }
        )
        if gw is not None:
            e.update(self.gateway_env)
        return e

    def tp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "tokenport"), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=ROOT,
            timeout=300,
            check=check,
        )

    def start(self) -> None:
        log("starting PostgreSQL (fsync on), Redis, the counting fake worker")
        self.pg.start()
        self.redis.start()
        up = self.procs.start(
            "upstream",
            [str(VENV_BIN / "python"), "-m", "bench.fleet", "upstream", "--port", str(self.upstream_port)],
            cpus=None,
            env=self.env(),
        )
        wait_http(f"http://127.0.0.1:{self.upstream_port}/health", up, self.procs, "upstream", timeout=30)
        self.tp("db", "upgrade")

    def start_gateway(self, gw: Gateway) -> None:
        gw.data_dir.mkdir(parents=True, exist_ok=True)
        gw.proc = self.procs.start(
            f"gw{gw.index}",
            [
                str(VENV_BIN / "tokenport"),
                "gateway",
                "--port",
                str(gw.port),
                "--worker",
                f"{MODEL}=http://127.0.0.1:{self.upstream_port}",
            ],
            cpus=None,
            env=self.env(gw),
        )
        wait_http(f"http://127.0.0.1:{gw.port}/healthz", gw.proc, self.procs, f"gw{gw.index}", timeout=90)

    def restart_gateways(self, env: dict[str, str]) -> None:
        """Stop every replica (SIGTERM: drain), start them again with these extra settings."""
        self.gateway_env = env
        for gw in self.gateways:
            if gw.proc is not None:
                self.procs.stop(gw.proc)
            self.start_gateway(gw)

    def kill9(self, gw: Gateway) -> None:
        assert gw.proc is not None
        os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
        self.procs.running.pop(gw.proc.pid, None)
        gw.proc = None

    def tenant(self, tid: str, budget_usd: str | None, rpm: int = RPM, tpm: int = TPM) -> str:
        self.tp(
            "tenants",
            "create",
            "--id",
            tid,
            "--name",
            f"Fleet {tid}",
            "--billing-country",
            "KZ",
            "--business",
            "--currency",
            "USD",
            "--json",
        )
        self.tp(
            "tenants",
            "set-limits",
            tid,
            "--rpm",
            str(rpm),
            "--tpm",
            str(tpm),
            *(["--budget", budget_usd, "--budget-unit", "money"] if budget_usd else []),
            "--max-tokens",
            str(MAX_TOKENS),
            "--timeout",
            "30",
        )
        out = self.tp("keys", "create", "--tenant", tid, "--name", "fleet", "--json")
        return str(json.loads(out.stdout)["key"])

    def close(self) -> None:
        self.procs.stop_all()
        self.pg.close()


# --------------------------------------------------------------------------- clients


@dataclass
class Reply:
    t: float  # when sent (time.time())
    replica: int
    status: str  # "200", "429", "503", ... or "conn:<Exception>"
    code: str  # error code of a refusal, "done" for a complete stream, "cut" / "sse_error:<code>"
    rid: str | None


async def _read_reply(resp: Any) -> tuple[str, float]:
    """(code, seconds to wait): "done" for a stream that reached `data: [DONE]`, "cut" for one that did
    not, "sse_error:<code>" for a stream ended by an error event, else the refusal's error code."""
    if resp.status_code != 200:
        raw = await resp.aread()
        try:
            err = json.loads(raw)["error"]
            code = str(err.get("code") or err["type"])
        except (ValueError, KeyError, TypeError):
            code = "?"
        if resp.status_code != 429:
            return code, 0.5
        if code == "insufficient_quota":
            return code, 1.0
        ms = resp.headers.get("retry-after-ms")
        return code, min(2.0, int(ms) / 1000 if ms else 1.0)
    code = "cut"
    async for line in resp.aiter_lines():
        if line == "data: [DONE]":
            code = "done"
        elif line.startswith("data: {") and '"error"' in line[:40]:
            try:
                err = json.loads(line[6:])["error"]
                code = "sse_error:" + str(err.get("code") or err.get("type"))
            except (ValueError, KeyError, TypeError):
                code = "sse_error:?"
    return code, 0.0


async def drive(
    ports: list[int], key: str, clients: int, seconds: float, events: list[tuple[float, Callable[[], Any]]]
) -> tuple[list[Reply], list[dict[str, Any]]]:
    """`clients` streaming clients for `seconds`; `events` = (at second, action) run in a thread meanwhile."""
    import httpx

    replies: list[Reply] = []
    marks: list[dict[str, Any]] = []
    t0 = time.time()
    stop = t0 + seconds
    down_until = [0.0] * len(ports)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": MAX_TOKENS,
    }
    headers = {"Authorization": f"Bearer {key}"}
    turn = [0]

    def pick() -> int:
        now = time.time()
        for _ in range(len(ports)):
            turn[0] = (turn[0] + 1) % len(ports)
            if down_until[turn[0]] <= now:
                return turn[0]
        return turn[0]

    async def one(http: httpx.AsyncClient) -> None:
        while time.time() < stop:
            r = pick()
            sent = time.time()
            wait = 0.0
            rid: str | None = None
            try:
                async with http.stream(
                    "POST", f"http://127.0.0.1:{ports[r]}/v1/chat/completions", json=body, headers=headers
                ) as resp:
                    rid = resp.headers.get("x-request-id")
                    code, wait = await _read_reply(resp)
                    replies.append(Reply(sent, r, str(resp.status_code), code, rid))
            except httpx.HTTPError as exc:
                replies.append(Reply(sent, r, "conn", type(exc).__name__, rid))
                down_until[r] = time.time() + 2.0
                wait = 0.1
            if wait:
                await asyncio.sleep(wait)

    async def injector() -> None:
        for at, action in events:
            delay = t0 + at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.time()
            name = getattr(action, "__name__", "action")
            log(f"  t={t - t0:.1f}s {name}")
            await asyncio.to_thread(action)
            marks.append({"at_s": round(t - t0, 1), "done_s": round(time.time() - t0, 1), "what": name})

    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    timeout = httpx.Timeout(60.0, connect=2.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(clients)), injector())
    return replies, marks


# --------------------------------------------------------------------------- checks


def _max_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] < t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def _max_sum_in_window(points: list[tuple[float, int]], width: float) -> int:
    points = sorted(points)
    best = j = 0
    total = 0
    for t, v in points:
        total += v
        while points[j][0] < t - width:
            total -= points[j][1]
            j += 1
        best = max(best, total)
    return best


@dataclass
class ScenarioResult:
    name: str
    what: str
    seconds: float
    budget_usd: str | None  # None: no budget
    marks: list[dict[str, Any]]
    requests_sent: int
    completed: int  # streams that ended with [DONE]
    client_replies: dict[str, int]  # "status code" -> count
    by_phase: dict[str, dict[str, int]]
    upstream_served: int
    upstream_complete: int
    upstream_cut: int
    upstream_retried: int  # request ids the worker saw more than once
    ledger_events: int
    ledger_outcomes: dict[str, int]
    lost_completed: int  # clients got [DONE] but no event
    billed_not_delivered: int  # an event, but its client did not get [DONE] (stream cut after the commit)
    served_without_event: int  # the worker saw it, no event (request cut with its gateway)
    events_without_upstream: int  # an event for a request the worker never saw
    doubled: int  # request ids stored more than once
    ledger_tokens: int
    upstream_tokens_complete: int
    budget: dict[str, Any]
    overrun_usd: str
    rpm: dict[str, Any]
    tpm: dict[str, Any]
    verify: dict[str, Any]
    notable_logs: dict[str, int] = field(default_factory=dict)
    rate_phases: list[dict[str, Any]] = field(default_factory=list)  # admitted per phase vs its bound


def _phase(t: float, t0: float, marks: list[dict[str, Any]]) -> str:
    if not marks:
        return "all"
    rel = t - t0
    if rel < marks[0]["at_s"]:
        return "before"
    if len(marks) > 1 and rel < marks[-1]["done_s"]:
        return "during"
    if len(marks) == 1 and rel < marks[0]["done_s"] + 5:
        return "during"
    return "after"


LOG_PATTERNS = {
    "used > its hold": r"used \d+ > its hold",
    "limits backend failed": r"limits backend failed",
    "could not settle": r"could not settle",
    "ledger database error": r"ledger database error",
    "replayed spooled events": r"replayed \d+ spooled usage events",
    "Traceback": r"Traceback",
}


def _log_counts(run_dir: Path, since: dict[str, int]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for i in range(REPLICAS):
        path = run_dir / f"gw{i}.log"
        if not path.exists():
            continue
        text = path.read_text(errors="replace")[since.get(path.name, 0) :]
        for name, pat in LOG_PATTERNS.items():
            counts[name] += len(re.findall(pat, text))
    return {k: v for k, v in counts.items() if v}


def _log_sizes(run_dir: Path) -> dict[str, int]:
    return {p.name: len(p.read_text(errors="replace")) for p in run_dir.glob("gw*.log")}


def _upstream_stats(port: int) -> dict[str, dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats?reset=1", timeout=30) as r:
        data: dict[str, dict[str, Any]] = json.loads(r.read())
    return data


def _spooled(fleet: Fleet) -> int:
    """Bytes still in any replica's spool."""
    total = 0
    for gw in fleet.gateways:
        for p in (gw.data_dir / "spool").glob("*"):
            if p.is_file() and not p.name.endswith(".lock"):
                total += p.stat().st_size
    return total


def settle_ledger(fleet: Fleet, tenant: str, timeout: float = 90.0) -> None:
    """Wait until no spool holds events and the tenant's ledger count is still for 3 s."""
    from metering.db import make_engine
    from metering.store_sql import UsageStore

    engine = make_engine(fleet.pg.url)
    store = UsageStore(engine)
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            n = sum(int(str(r["requests"])) for r in store.summary([], tenant_id=tenant))
            if n != last:
                last, still_since = n, time.monotonic()
            elif time.monotonic() - still_since >= 3.0 and _spooled(fleet) == 0:
                return
            time.sleep(0.5)
        log(f"  the ledger did not settle in {timeout:.0f}s (spool bytes {_spooled(fleet)})")
    finally:
        engine.dispose()


def rate_phases(
    arrivals: dict[str, float],
    tok_points: list[tuple[float, int]],
    replica_of: dict[str, int],
    t0: float,
    seconds: float,
    marks: list[dict[str, Any]],
    rpm: int,
    tpm: int,
) -> list[dict[str, Any]]:
    """For a scenario with a failure (two marks: it starts, it ends): the requests admitted (the worker's
    arrivals, by request id) and the tokens billed (the ledger's started_at) before it, during it, after
    it, and from its start to the end, each against what one RPM / TPM bucket plus the refill over that
    phase's length allows. The last span is the one a bucket re-seeded from the ledger (Redis back empty)
    answers for: whatever was admitted during the failure is in the ledger's last minute, so a seeded
    bucket adds no second limit after it; a full bucket would."""
    if len(marks) != 2:
        return []
    fail, back = float(marks[0]["at_s"]), float(marks[-1]["done_s"])
    rel = {rid: t - t0 for rid, t in arrivals.items()}
    end = max([seconds, *rel.values()])
    out: list[dict[str, Any]] = []
    for phase, lo, hi in (
        ("before", 0.0, fail),
        ("during", fail, back),
        ("after", back, end),
        ("during + after", fail, end),
    ):
        length = hi - lo
        top = float("inf") if hi == end else hi  # the last phases take everything to the end
        ids = [rid for rid, t in rel.items() if lo <= t < top]
        tokens = sum(v for t, v in tok_points if lo <= t - t0 < top)
        row: dict[str, Any] = {
            "phase": phase,
            "from_s": round(lo, 1),
            "to_s": round(hi, 1),
            "admitted": len(ids),
            "rpm_bound": round(rpm * (1 + length / 60)),
            "tokens": tokens,
            "tpm_bound": round(tpm * (1 + length / 60)),
            "by_replica": dict(sorted(Counter(replica_of.get(rid, -1) for rid in ids).items())),
        }
        row["holds"] = row["admitted"] <= row["rpm_bound"] and row["tokens"] <= row["tpm_bound"]
        out.append(row)
    return out


def check(
    fleet: Fleet,
    name: str,
    what: str,
    tenant: str,
    budget_usd: str | None,
    seconds: float,
    t0: float,
    replies: list[Reply],
    marks: list[dict[str, Any]],
    log_since: dict[str, int],
    rpm_limit: int = RPM,
    tpm_limit: int = TPM,
) -> ScenarioResult:
    from metering.db import make_engine
    from metering.store_sql import UsageStore

    settle_ledger(fleet, tenant)
    served = _upstream_stats(fleet.upstream_port)
    engine = make_engine(fleet.pg.url)
    try:
        stored = list(UsageStore(engine).iter_events(tenant_id=tenant))
    finally:
        engine.dispose()
    rids = Counter(s.event.request_id for s in stored)
    ledger_ids = set(rids)
    completed_ids = {r.rid for r in replies if r.code == "done" and r.rid}
    complete_up = {rid for rid, v in served.items() if v.get("complete")}

    phases: dict[str, Counter[str]] = {}
    for r in replies:
        phases.setdefault(_phase(r.t, t0, marks), Counter())[f"{r.status} {r.code}"] += 1

    limits = json.loads(fleet.tp("tenants", "limits", tenant, "--json").stdout)
    budget = dict(limits.get("budget_use") or {})
    budget["gateway_counter"] = fleet.redis.budget_state(tenant)
    used = float(budget.get("used", 0))
    limit = float(budget.get("limit", budget_usd or "inf"))
    verify_run = fleet.tp("usage", "verify", "--json", check=False)
    try:
        verify = json.loads(verify_run.stdout)
    except ValueError:
        verify = {"ok": False, "output": verify_run.stdout[-500:] + verify_run.stderr[-500:]}
    verify["exit_code"] = verify_run.returncode

    # RPM: requests the worker was sent for this tenant; TPM: the tokens the ledger billed.
    starts = [float(v["t"]) for v in served.values()]
    run_s = (max(starts) - min(starts)) if starts else 0.0
    tok_points = [
        (s.event.started_at.timestamp(), s.event.prompt_tokens + s.event.completion_tokens) for s in stored
    ]
    total_tokens = sum(v for _t, v in tok_points)
    rpm = {
        "limit": rpm_limit,
        "admitted": len(served),
        "first_to_last_s": round(run_s, 1),
        "bound": round(rpm_limit * (1 + run_s / 60)),
        "max_in_any_60s": _max_in_window(starts, 60.0),
        "bound_any_60s": 2 * rpm_limit,
    }
    rpm["holds"] = rpm["admitted"] <= rpm["bound"] and rpm["max_in_any_60s"] <= rpm["bound_any_60s"]
    tpm = {
        "limit": tpm_limit,
        "billed_tokens": total_tokens,
        "bound": round(tpm_limit * (1 + run_s / 60)),
        "max_in_any_60s": _max_sum_in_window(tok_points, 60.0),
        "bound_any_60s": 2 * tpm_limit,
    }
    tpm["holds"] = tpm["billed_tokens"] <= tpm["bound"] and tpm["max_in_any_60s"] <= tpm["bound_any_60s"]

    return ScenarioResult(
        name=name,
        what=what,
        seconds=seconds,
        budget_usd=budget_usd,
        marks=marks,
        requests_sent=len(replies),
        completed=len(completed_ids),
        client_replies=dict(Counter(f"{r.status} {r.code}" for r in replies).most_common()),
        by_phase={k: dict(v.most_common()) for k, v in phases.items()},
        upstream_served=len(served),
        upstream_complete=len(complete_up),
        upstream_cut=sum(1 for v in served.values() if v.get("cut")),
        upstream_retried=sum(1 for v in served.values() if v["attempts"] > 1),
        ledger_events=len(stored),
        ledger_outcomes=dict(Counter(s.event.outcome.value for s in stored)),
        lost_completed=len(completed_ids - ledger_ids),
        billed_not_delivered=len(ledger_ids - completed_ids),
        served_without_event=len(set(served) - ledger_ids),
        events_without_upstream=len(ledger_ids - set(served)),
        doubled=sum(1 for n in rids.values() if n > 1),
        ledger_tokens=total_tokens,
        upstream_tokens_complete=len(complete_up) * (fake.PROMPT_TOKENS + fake.CONTENT_CHUNKS),
        budget=budget,
        overrun_usd=f"{max(0.0, used - limit):.6f}" if budget_usd else "n/a",
        rpm=rpm,
        tpm=tpm,
        verify={k: verify.get(k) for k in ("ok", "events", "head_seq", "first_break", "exit_code", "output")},
        notable_logs=_log_counts(fleet.run_dir, log_since),
        rate_phases=rate_phases(
            {rid: float(v["t"]) for rid, v in served.items()},
            tok_points,
            {r.rid: r.replica for r in replies if r.rid},
            t0,
            seconds,
            marks,
            rpm_limit,
            tpm_limit,
        ),
    )


# --------------------------------------------------------------------------- scenarios

SCENARIOS: dict[str, tuple[str, float, str | None]] = {
    # name: (what, seconds, budget in USD or None)
    "steady": ("steady load, the small budget runs out", 60.0, "0.004"),
    "kill": ("kill -9 of replica 0 at 15 s, restarted at 25 s", 60.0, "0.0045"),
    "redis": ("Redis stopped at 15 s for 10 s (no persistence: restarts empty)", 60.0, "0.0045"),
    "postgres": ("PostgreSQL stopped at 15 s for 30 s", 75.0, "0.0055"),
    "postgres-closed": (
        "PostgreSQL stopped at 15 s for 30 s, gateways with `metering.fail_closed: true` (the Helm chart's)",
        75.0,
        "0.0055",
    ),
    "redis-rate": (
        "Redis stopped at 15 s for 10 s (restarts empty), a tenant without a budget and RPM 120: "
        "rate limits only, admitted fail-open by each replica's share while Redis is away",
        60.0,
        None,
    ),
}

# name: (RPM, TPM) when not the bench's RPM and TPM (see the module's docstring for redis-rate's 120)
SCENARIO_RATES: dict[str, tuple[int, int]] = {"redis-rate": (120, TPM)}


SCENARIO_ENV: dict[str, dict[str, str]] = {"postgres-closed": {"TOKENPORT_METERING__FAIL_CLOSED": "true"}}


def events_for(name: str, fleet: Fleet, scale: float) -> list[tuple[float, Callable[[], Any]]]:
    gw0 = fleet.gateways[0]

    def kill_9_replica_0() -> None:
        fleet.kill9(gw0)

    def restart_replica_0() -> None:
        fleet.start_gateway(gw0)

    def stop_redis() -> None:
        fleet.redis.stop()

    def start_redis() -> None:
        fleet.redis.start()

    def stop_postgres() -> None:
        fleet.pg.stop("fast")

    def start_postgres() -> None:
        fleet.pg.start()

    plan: dict[str, list[tuple[float, Callable[[], Any]]]] = {
        "kill": [(15.0, kill_9_replica_0), (25.0, restart_replica_0)],
        "redis": [(15.0, stop_redis), (25.0, start_redis)],
        "redis-rate": [(15.0, stop_redis), (25.0, start_redis)],
        "postgres": [(15.0, stop_postgres), (45.0, start_postgres)],
        "postgres-closed": [(15.0, stop_postgres), (45.0, start_postgres)],
    }
    return [(at * scale, action) for at, action in plan.get(name, [])]


def run_scenario(fleet: Fleet, name: str, scale: float = 1.0) -> ScenarioResult:
    what, seconds, budget_usd = SCENARIOS[name]
    seconds *= scale
    tenant = f"fleet-{name}"
    env = SCENARIO_ENV.get(name, {})
    if env != fleet.gateway_env:
        log(f"restarting the gateways with {env}")
        fleet.restart_gateways(env)
    rpm, tpm = SCENARIO_RATES.get(name, (RPM, TPM))
    key = fleet.tenant(tenant, budget_usd, rpm, tpm)
    time.sleep(1.0)  # limits reach every replica within key_cache_refresh_s
    log(f"scenario {name}: {what} ({seconds:.0f} s, {fleet.clients} clients)")
    _upstream_stats(fleet.upstream_port)  # reset
    log_since = _log_sizes(fleet.run_dir)
    t0 = time.time()
    replies, marks = asyncio.run(
        drive([g.port for g in fleet.gateways], key, fleet.clients, seconds, events_for(name, fleet, scale))
    )
    res = check(fleet, name, what, tenant, budget_usd, seconds, t0, replies, marks, log_since, rpm, tpm)
    log(
        f"  sent {res.requests_sent}, completed {res.completed}, worker served {res.upstream_served}, "
        f"ledger {res.ledger_events}, lost {res.lost_completed}, doubled {res.doubled}, "
        f"overrun {res.overrun_usd}, verify {res.verify.get('ok')}"
    )
    for ph in res.rate_phases:
        log(
            f"  {ph['phase']} ({ph['from_s']}-{ph['to_s']} s): {ph['admitted']} admitted "
            f"(bound {ph['rpm_bound']}, by replica {ph['by_replica']}), {ph['tokens']} tokens "
            f"(bound {ph['tpm_bound']})"
        )
    return res


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)

    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    from tests import pg

    bindir = pg.pg_bin_dir()
    return {
        "cpu_model": m.group(1).strip() if m else "?",
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": first_line([str(bindir / "postgres"), "--version"]) if bindir else "?",
        "redis": first_line(["redis-server", "--version"]),
        "git": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def keep_analysis(path: Path, text: str) -> str:
    """`text`, then the hand-written analysis below ANALYSIS_MARK in the file it replaces (if any)."""
    if path.exists() and ANALYSIS_MARK in (old := path.read_text()):
        return text.rstrip("\n") + "\n\n" + ANALYSIS_MARK + old.split(ANALYSIS_MARK, 1)[1]
    return text


def _fmt_replies(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items())


def write(results: list[ScenarioResult], meta: dict[str, Any], out: Path, stamp: str, tag: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stamp}-fleet{'-' + tag if tag else ''}"
    base.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "scenarios": [asdict(r) for r in results]}, indent=2, default=str) + "\n"
    )
    m = meta["machine"]
    lines = [
        "# A fleet of 3 gateway replicas on PostgreSQL + Redis, under failures (issue 14)",
        "",
        f"{meta['when']}, `python -m bench.fleet`, one run. Machine: {m['cpu_model']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}, {m['postgresql']}, "
        f"{m['redis'].split(' sha=')[0]}, git {m['git']}. Everything on this one machine (no pinning): "
        "PostgreSQL (fsync on), Redis (no persistence), the fake worker, 3 gateways, the clients.",
        "",
        f"Load: {meta['clients']} concurrent streaming clients spread over the 3 replicas; each request is a "
        f"stream of {fake.CONTENT_CHUNKS} chunks, {CHUNK_INTERVAL_S * 1000:.0f} ms apart, "
        f"{fake.PROMPT_TOKENS} prompt + {fake.CONTENT_CHUNKS} completion tokens, max_tokens {MAX_TOKENS}. "
        f"Per scenario a fresh tenant: RPM {RPM} (unless below), TPM {TPM:,}, a money budget in USD "
        "(below; `redis-rate`: none), request timeout 30 s. Gateways with the defaults: "
        "`limits.on_backend_error_budget: closed`, "
        "`on_backend_error_rate: open`, `metering.fail_closed: false` (spool).",
        "",
        "## Summary",
        "",
        "| scenario | sent | completed ([DONE]) | worker served | ledger events | lost | doubled "
        "| budget used / limit (USD) | overrun | RPM holds | TPM holds | chain verifies |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for r in results:
        b = r.budget
        lines.append(
            f"| {r.name} | {r.requests_sent} | {r.completed} | {r.upstream_served} | {r.ledger_events} | "
            f"{r.lost_completed} | {r.doubled} | "
            + (f"{b.get('used', '?')} / {b.get('limit', r.budget_usd)}" if r.budget_usd else "no budget")
            + f" "
            f"| {r.overrun_usd} | {'yes' if r.rpm['holds'] else 'NO'} "
            f"({r.rpm['admitted']} admitted, max {r.rpm['max_in_any_60s']} in 60 s) | "
            f"{'yes' if r.tpm['holds'] else 'NO'} (max {r.tpm['max_in_any_60s']:,} in 60 s) | "
            f"{'yes' if r.verify.get('ok') else 'NO'} ({r.verify.get('events')} events) |"
        )
    lines += [
        "",
        "lost = requests whose client received the whole stream (`data: [DONE]`) with no event in the "
        "ledger; doubled = request ids stored more than once. Worker served = request ids the fake worker "
        "received (the gateway's `X-Request-Id`).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r.name}: {r.what}",
            "",
            f"{r.seconds:.0f} s of load; "
            + (f"budget {r.budget_usd} USD" if r.budget_usd else "no budget")
            + f", RPM {r.rpm['limit']}, TPM {r.tpm['limit']:,}. Events: "
            + (
                ", ".join(f"{m_['what']} at {m_['at_s']} s (done at {m_['done_s']} s)" for m_ in r.marks)
                or "none"
            )
            + ".",
            "",
            "| | |",
            "| --- | --- |",
            f"| client replies (status, code) | {_fmt_replies(r.client_replies)} |",
        ]
        for ph in ("before", "during", "after", "all"):
            if ph in r.by_phase:
                lines.append(f"| sent {ph} the failure | {_fmt_replies(r.by_phase[ph])} |")
        lines += [
            f"| fake worker | {r.upstream_served} request ids served, {r.upstream_complete} streams sent to "
            f"the end, {r.upstream_cut} cut (its client went away), {r.upstream_retried} seen twice |",
            f"| ledger | {r.ledger_events} events: {_fmt_replies(r.ledger_outcomes)}; "
            f"{r.ledger_tokens:,} tokens (streams sent to the end x 51 = {r.upstream_tokens_complete:,}) |",
            f"| lost / doubled | {r.lost_completed} / {r.doubled}; served by the worker without an event: "
            f"{r.served_without_event}; events the worker never saw: {r.events_without_upstream}; "
            f"events whose client did not receive `[DONE]`: {r.billed_not_delivered} |",
            f"| budget | {json.dumps(r.budget)}; overrun {r.overrun_usd} USD |",
            f"| RPM {r.rpm['limit']} | {r.rpm['admitted']} admitted over {r.rpm['first_to_last_s']} s "
            f"(bound RPM x (1 + T/60) = {r.rpm['bound']}), max {r.rpm['max_in_any_60s']} in any 60 s "
            f"(bound 2 x RPM = {r.rpm['bound_any_60s']}) |",
            f"| TPM {r.tpm['limit']:,} | {r.tpm['billed_tokens']:,} tokens billed "
            f"(bound {r.tpm['bound']:,}), max {r.tpm['max_in_any_60s']:,} in any 60 s "
            f"(bound {r.tpm['bound_any_60s']:,}) |",
            f"| `tokenport usage verify` | {json.dumps(r.verify)} |",
            f"| gateway log lines | {_fmt_replies(r.notable_logs) or 'none of note'} |",
            "",
        ]
        if r.rate_phases:
            lines += [
                "Rate limits per phase: requests admitted (arrived at the worker) and tokens billed (the "
                "ledger's `started_at`), against one bucket plus the refill over the phase's length, "
                "RPM x (1 + T/60) and TPM x (1 + T/60). By replica: the replica the client sent it to.",
                "",
                "| phase | from-to (s) | admitted | bound | by replica | tokens | bound | holds |",
                "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
            ]
            for rp in r.rate_phases:
                lines.append(
                    f"| {rp['phase']} | {rp['from_s']}-{rp['to_s']} | {rp['admitted']} | {rp['rpm_bound']} | "
                    f"{', '.join(f'{k}: {v}' for k, v in rp['by_replica'].items())} | {rp['tokens']:,} | "
                    f"{rp['tpm_bound']:,} | {'yes' if rp['holds'] else 'NO'} |"
                )
            lines.append("")
    path = base.with_suffix(".md")
    path.write_text(keep_analysis(path, "\n".join(lines)))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upstream"]:
        p = argparse.ArgumentParser(prog="bench.fleet upstream")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--interval", type=float, default=CHUNK_INTERVAL_S)
        a = p.parse_args(argv[1:])
        run_upstream(a.port, a.interval)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--scenarios", default="steady,kill,redis,postgres")
    ap.add_argument("--tag", default="", help="suffix of the results' file name")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every duration (a quick try: 0.3)")
    args = ap.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    run_dir = RUNS / f"fleet-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "clients": args.clients,
        "replicas": REPLICAS,
        "run_dir": str(run_dir),
    }
    fleet = Fleet(run_dir, args.clients)
    results: list[ScenarioResult] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        fleet.start()
        for gw in fleet.gateways:
            fleet.start_gateway(gw)
        log(f"3 gateways up on ports {[g.port for g in fleet.gateways]}; run dir {run_dir}")
        for name in names:
            results.append(run_scenario(fleet, name, args.scale))
    finally:
        with contextlib.suppress(Exception):
            fleet.close()
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if not args.no_write:
        path = write(results, meta, args.out, stamp, args.tag)
        log(f"wrote {path} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
