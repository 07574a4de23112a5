"""Issue 7's benchmark: `make bench` (or `python -m bench.run [--quick]`).

What it does, on one machine, with nothing but Debian's nginx and wrk and this repository's venv:
1. starts a fake OpenAI upstream: nginx returning fixed vLLM bodies (bench/fake.py), one port for
   chat completions, one for a 20-chunk SSE stream with continuous usage;
2. starts a bare nginx reverse proxy in front of it, and Tokenport's gateway (authentication on,
   every request metered and committed to the SQLite ledger before it answers, metrics on), each
   pinned to its own core (`--sut-cpus`, default 1) while wrk and the fake upstream share the
   other (`--load-cpus`, default 0);
3. runs wrk against direct / nginx / tokenport, non-streaming and streaming, at 1, 4, 32 and 128
   connections, and measures requests/s, latency percentiles, errors, and CPU per request of the
   system under test (utime+stime of its process tree from /proc, divided by completed requests);
4. holds 1,000 open streams through the gateway against a slow Python upstream and reads the
   gateway's resident memory;
5. runs two gateway processes on one shared ledger, checks throughput and the ledger (row count,
   unique request ids, hash chain);
6. profiles the gateway under load with py-spy and writes where the microseconds go;
7. prints one table and writes bench/results/<date>-<host>.md (+ .json) and profile-<date>.md.

Everything it starts runs in its own session and is killed on exit (normal, error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import fake
from bench import profile as prof

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
RUNS = BENCH / ".run"
LUA = BENCH / "lua" / "post.lua"
VENV_BIN = (
    Path(sys.executable).parent
    if (Path(sys.executable).parent / "tokenport").exists()
    else ROOT / ".venv" / "bin"
)
MODEL = fake.MODEL
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Issue 7's targets and the figures to beat (docs: /work/shared/reference/environment.md).
TARGET_CPU_JSON_US = 400
TARGET_CPU_SSE_US = 600
NORMAL_TARGET = "tokenport sync=NORMAL"  # the same gateway, SQLite ledger without an fsync per commit
TARGET_ADDED_P50_MS = 0.4
TARGET_ADDED_P99_MS = 2.0
TARGET_RSS_MB = 300
LITELLM_CPU_JSON_US = 8920
LITELLM_CPU_SSE_US = 24700

METRICS_TOKEN = "bench-metrics-token-0123456789"  # gateway.metrics_token of the gateways the bench starts
ANALYSIS_MARK = "<!-- analysis: written by hand, kept when the tables above are regenerated -->"
PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "pydantic",
    "pydantic_core",
    "orjson",
    "SQLAlchemy",
    "prometheus_client",
    "py3langid",
    "py-spy",
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process the benchmark starts: own session each, so a stop kills its whole tree."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpus: str | None,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        p = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
        out.close()
        self.running[p.pid] = (name, p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        self.running.pop(p.pid, None)
        if p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(
            ProcessLookupError
        ):  # anything left in the session (children that ignored it)
            os.killpg(p.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _pid, (_name, p) in list(self.running.items()):
            self.stop(p, timeout=5.0)

    def tail(self, name: str, n: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, proc: subprocess.Popen[bytes], procs: Procs, name: str, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready at {url} after {timeout:.0f}s:\n{procs.tail(name)}")


# --------------------------------------------------------------------------- /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from #3 (state) on


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of the processes (all their threads), from /proc/PID/stat."""
    user = system = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:
            user += int(f[11])  # utime (field 14)
            system += int(f[12])  # stime (field 15)
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_times(pids))


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


def core_busy(cpus: str) -> float:
    """Busy seconds (everything but idle and iowait) of the given cores, from /proc/stat."""
    wanted = {f"cpu{c}" for c in expand_cpus(cpus)}
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in wanted:
            v = [int(x) for x in parts[1:]]
            busy += sum(v[:8]) - v[3] - v[4]
    return busy / CLK_TCK


def expand_cpus(cpus: str) -> list[int]:
    out: list[int] = []
    for part in cpus.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


# --------------------------------------------------------------------------- the gateway's own view

GATEWAY_HISTOGRAMS = {
    "duration": "tokenport_request_duration_seconds",  # whole request, in the gateway
    "upstream": "tokenport_upstream_duration_seconds",  # waiting on the worker
    "overhead": "tokenport_gateway_overhead_seconds",  # gateway's own time (excludes upstream)
    "commit": "tokenport_ledger_commit_seconds",  # one group commit (per commit, not per request)
    "batch": "tokenport_ledger_commit_batch_events",  # events per group commit
}


def scrape(port: int) -> dict[str, float]:
    """Sums of the _sum and _count series of the gateway's histograms (empty if /metrics fails)."""
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    wanted = set(GATEWAY_HISTOGRAMS.values())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for suffix in ("_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in wanted:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def gateway_view(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean of each histogram over a run: ms (times) or events (batch)."""
    view = {}
    for key, metric in GATEWAY_HISTOGRAMS.items():
        n = after.get(metric + "_count", 0.0) - before.get(metric + "_count", 0.0)
        total = after.get(metric + "_sum", 0.0) - before.get(metric + "_sum", 0.0)
        if n > 0:
            view[key] = round(total / n * (1 if key == "batch" else 1000), 3)
    return view


# --------------------------------------------------------------------------- wrk


@dataclass
class Run:
    target: str  # direct | nginx | tokenport | tokenport x2 ...
    mode: str  # json | sse
    conns: int
    duration_s: float
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    errors: int = 0
    errors_detail: dict[str, int] = field(default_factory=dict)
    sut_cpu_s: float = 0.0
    sut_cpu_us_per_req: float = 0.0
    sut_user_us_per_req: float = 0.0  # of which user time (Python, C extensions)
    sut_sys_us_per_req: float = 0.0  # of which kernel time (sockets, epoll, fsync)
    upstream_cpu_us_per_req: float = 0.0
    sut_core_other_pct: float = 0.0  # busy time on the SUT's core(s) not used by the SUT (noise)
    ledger_rows: int | None = None  # rows the gateway committed during the run (tokenport only)
    wrk_threads: int = 1
    reruns: int = 0  # 1 when the cell was measured again because of other load on the SUT core
    gateway_view: dict[str, float] = field(default_factory=dict)  # means from the gateway's /metrics


def one_port_text(rp: dict[str, Any] | None, one: dict[str, Any]) -> str:
    """The `tokenport gateway --processes 2` cell (one port, SO_REUSEPORT) against one process."""
    if not rp:
        return ""
    return (
        f"On one port, `tokenport gateway --processes 2` (SO_REUSEPORT, both cores): {rp['rps']:,} req/s "
        f"({rp['speedup']}x one process), {rp['cpu_us_per_req']:,} us CPU per request "
        f"({rp['cpu_per_req_ratio']}x), p99 {rp['p99_ms']:.0f} ms, {rp['errors']} errors."
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.stamp = dt.datetime.now(dt.UTC)
        self.run_dir = RUNS / self.stamp.strftime("%Y%m%dT%H%M%SZ")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.run_dir)
        self.sut = args.sut_cpus
        self.load = args.load_cpus
        self.runs: list[Run] = []
        self.extra: dict[str, Any] = {}
        self.notes: list[str] = []
        self.data_dir = self.run_dir / "data"
        self.key = ""
        self.upstream: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.reruns = 0
        self.code = Path(args.code).resolve() if args.code else ROOT

    # ---- environment

    def env(self, **extra: str) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            {
                "TOKENPORT_DATA_DIR": str(self.data_dir),
                "TOKENPORT_LOG_LEVEL": "WARNING",
                # /metrics on the public port with a token (each gateway's own listener on a free port),
                # and wrk's X-Client-Country believed from loopback, as before these became settings
                "TOKENPORT_GATEWAY__METRICS_TOKEN": METRICS_TOKEN,
                "TOKENPORT_GATEWAY__METRICS_PORT": "0",
                "TOKENPORT_GATEWAY__TRUSTED_PROXIES": '["127.0.0.1/32", "::1/128"]',
            }
        )
        if self.code != ROOT:  # product code from another checkout; bench/ (variants) from this one
            e["PYTHONPATH"] = f"{self.code}{os.pathsep}{ROOT}"
        e.update(extra)
        return e

    def machine(self) -> dict[str, Any]:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        flagset = set(flags.group(1).split()) if flags else set()
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        versions = {}
        for p in PACKAGES:
            try:
                versions[p] = metadata.version(p)
            except metadata.PackageNotFoundError:
                versions[p] = None

        def cmd(argv: list[str]) -> str:
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
                return (r.stdout + r.stderr).strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                return "?"

        git = cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "serving", "metering"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if self.code != ROOT:
            git = f"{git} (product code taken from {self.code})"
            dirty = ""
        return {
            "host": socket.gethostname(),
            "date_utc": self.stamp.isoformat(timespec="seconds"),
            "cpu_model": m.group(1).strip() if m else "?",
            "cpu_flags": sorted(f for f in flagset if f.startswith(("avx512f", "amx", "avx2"))),
            "cores": os.cpu_count(),
            "memory_gb": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
            "kernel": platform.release(),
            "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")
            if hasattr(platform, "freedesktop_os_release")
            else "?",
            "python": platform.python_version(),
            "nginx": cmd(["nginx", "-v"]),
            "wrk": cmd(["wrk", "-v"]),
            "packages": versions,
            "git": git + (" + uncommitted changes in serving/ or metering/" if dirty else ""),
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
            "sut_cpus": self.sut,
            "load_cpus": self.load,
        }

    # ---- services

    def render(self, template: str, prefix: Path, **ports: int) -> Path:
        prefix.mkdir(parents=True, exist_ok=True)
        text = (BENCH / "nginx" / template).read_text()
        text = text.replace("@PREFIX@", str(prefix))
        text = text.replace("@JSON_RETURN@", fake.nginx_return(fake.chat_json(), "json_part"))
        text = text.replace("@SSE_RETURN@", fake.nginx_return(fake.sse_body(), "sse_part"))
        for k, v in ports.items():
            text = text.replace(f"@{k.upper()}@", str(v))
        if "@" in re.sub(r"'[^']*'", "", text):
            raise RuntimeError(f"unrendered placeholder in {template}")
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        return conf

    def start_nginx(self, name: str, template: str, cpus: str, **ports: int) -> subprocess.Popen[bytes]:
        prefix = self.run_dir / name
        conf = self.render(template, prefix, **ports)
        test = subprocess.run(
            ["nginx", "-t", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
            capture_output=True,
            text=True,
            check=False,
        )
        if test.returncode != 0:
            raise RuntimeError(f"nginx config {conf} is invalid:\n{test.stderr}")
        return self.procs.start(
            name, ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], cpus=cpus
        )

    def start_gateway(
        self,
        name: str,
        upstream_port: int,
        cpus: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = port or free_port()
        cmd = (
            [str(VENV_BIN / "python"), "-m", "bench.variant", "--patches", ",".join(self.a.patches), "--"]
            if self.a.patches
            else [str(VENV_BIN / "tokenport")]
        )
        p = self.procs.start(
            name,
            [
                *cmd,
                "gateway",
                "--port",
                str(port),
                "--worker",
                f"{MODEL}=http://127.0.0.1:{upstream_port}",
                *extra,
            ],
            cpus=cpus,
            env=self.env(**(env or {})),
            cwd=self.code,
        )
        wait_http(f"http://127.0.0.1:{port}/healthz", p, self.procs, name, timeout=60)
        return p, port

    def create_account(self) -> None:
        tp = str(VENV_BIN / "tokenport")
        env = self.env()
        subprocess.run(
            [
                tp,
                "tenants",
                "create",
                "--id",
                "bench",
                "--name",
                "Bench Almaty LLP",
                "--billing-country",
                "KZ",
                "--business",
                "--json",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=self.code,
            timeout=120,
        )
        out = subprocess.run(
            [tp, "keys", "create", "--tenant", "bench", "--name", "bench", "--json"],
            check=True,
            capture_output=True,
            env=env,
            cwd=self.code,
            timeout=120,
            text=True,
        )
        self.key = json.loads(out.stdout)["key"]

    def ledger_db(self) -> Path:
        return self.data_dir / "tokenport.db"

    def ledger_count(self) -> int:
        db = self.ledger_db()
        if not db.exists():
            return 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute("SELECT count(*) FROM usage_events").fetchone()[0])
        except sqlite3.OperationalError:
            return 0
        finally:
            con.close()

    # ---- sanity: each target answers correctly (and the gateway refuses a bad key)

    def check_target(self, port: int, mode: str, auth: bool) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello! What is the capital of Kazakhstan?"}],
        }
        if mode == "sse":
            body["stream"] = True
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers=headers,
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            if r.status != 200:
                raise RuntimeError(f"port {port} answered {r.status}")
        if mode == "json":
            usage = json.loads(raw)["usage"]
            assert usage["completion_tokens"] == fake.CONTENT_CHUNKS, usage
        else:
            events = [ln for ln in raw.decode().split("\n\n") if ln.startswith("data:")]
            assert events[-1] == "data: [DONE]", events[-1:]
            contents = [e for e in events[:-1] if json.loads(e[5:]).get("choices")]
            assert len(contents) == fake.CONTENT_CHUNKS + 1, len(contents)  # role chunk + 20
        if auth:
            bad = urllib.request.Request(
                req.full_url,
                data=req.data,
                method="POST",
                headers={**headers, "Authorization": "Bearer tp_nope_nope"},
            )
            try:
                urllib.request.urlopen(bad, timeout=10)
                raise RuntimeError("the gateway accepted a bad API key")
            except urllib.error.HTTPError as e:
                if e.code != 401:
                    raise RuntimeError(f"bad key: expected 401, got {e.code}") from e

    # ---- wrk

    def wrk(
        self,
        port: int,
        mode: str,
        conns: int,
        duration: float,
        *,
        auth: bool,
        sut: subprocess.Popen[bytes] | None,
        target: str,
        record: bool = True,
    ) -> Run:
        threads = max(1, min(conns, len(expand_cpus(self.load))))
        argv = [
            "taskset",
            "-c",
            self.load,
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(conns),
            "-d",
            f"{duration:g}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{port}/v1/chat/completions",
        ]
        env = dict(
            os.environ,
            BENCH_STREAM="1" if mode == "sse" else "0",
            BENCH_KEY=self.key if auth else "",
            BENCH_MODEL=MODEL,
        )
        sut_pids = tree(sut.pid) if sut is not None else []
        up_pids = tree(self.upstream.pid) if self.upstream is not None else []
        rows0 = self.ledger_count() if target.startswith("tokenport") else None
        m0 = scrape(port) if target.startswith("tokenport") else {}
        (cu0, cs0), u0, b0 = cpu_times(sut_pids), cpu_seconds(up_pids), core_busy(self.sut)
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60, check=False)
        elapsed = time.monotonic() - t0
        (cu1, cs1), u1, b1 = cpu_times(sut_pids), cpu_seconds(up_pids), core_busy(self.sut)
        m = re.search(r"^BENCH_JSON (\{.*\})$", r.stdout, re.MULTILINE)
        if r.returncode != 0 or m is None:
            raise RuntimeError(f"wrk failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        w = json.loads(m.group(1))
        run = Run(
            target=target, mode=mode, conns=conns, duration_s=w["duration_us"] / 1e6, wrk_threads=threads
        )
        run.requests = w["requests"]
        run.rps = w["requests"] / (w["duration_us"] / 1e6)
        run.p50_ms, run.p90_ms, run.p99_ms, run.p999_ms = (
            w[k] / 1000 for k in ("p50_us", "p90_us", "p99_us", "p999_us")
        )
        run.max_ms, run.mean_ms = w["lat_max_us"] / 1000, w["lat_mean_us"] / 1000
        run.errors_detail = {k[4:]: w[k] for k in w if k.startswith("err_") and w[k]}
        run.errors = sum(run.errors_detail.values())
        run.sut_cpu_s = (cu1 - cu0) + (cs1 - cs0)
        if run.requests:
            run.sut_cpu_us_per_req = run.sut_cpu_s / run.requests * 1e6
            run.sut_user_us_per_req = (cu1 - cu0) / run.requests * 1e6
            run.sut_sys_us_per_req = (cs1 - cs0) / run.requests * 1e6
            run.upstream_cpu_us_per_req = (u1 - u0) / run.requests * 1e6
        if sut is not None and target != "direct":
            run.sut_core_other_pct = (
                max(0.0, (b1 - b0) - run.sut_cpu_s) / elapsed * 100 / len(expand_cpus(self.sut))
            )
        if rows0 is not None:
            time.sleep(0.3)  # let the last group commit land
            run.ledger_rows = self.ledger_count() - rows0
            run.gateway_view = gateway_view(m0, scrape(port))
        if record:
            self.runs.append(run)
            log(
                f"{target:<10} {mode:<4} c={conns:<4} {run.rps:>10,.0f} req/s  p50 {run.p50_ms:7.2f} ms  "
                f"p99 {run.p99_ms:7.2f} ms  cpu {run.sut_cpu_us_per_req:8.1f} us/req  errors {run.errors}"
                + (f"  ledger +{run.ledger_rows}" if run.ledger_rows is not None else "")
            )
        return run

    # ---- phases

    def phase_matrix(self) -> None:
        a = self.a
        jp, sp = self.ports["json"], self.ports["sse"]
        targets = [t for t in ("direct", "nginx", "tokenport") if t in a.only]
        proxy = None
        if "nginx" in targets:
            self.ports["proxy_json"], self.ports["proxy_sse"] = free_port(), free_port()
            proxy = self.start_nginx(
                "proxy",
                "proxy.conf.in",
                self.sut,
                json_port=jp,
                sse_port=sp,
                proxy_json_port=self.ports["proxy_json"],
                proxy_sse_port=self.ports["proxy_sse"],
            )
            wait_http(f"http://127.0.0.1:{self.ports['proxy_json']}/health", proxy, self.procs, "proxy")
        for mode in a.modes:
            for target in targets:
                gw = None
                if target == "direct":
                    port, sut, auth = (jp if mode == "json" else sp), self.upstream, False
                elif target == "nginx":
                    port, sut, auth = self.ports["proxy_" + mode], proxy, False
                else:
                    gw, port = self.start_gateway(f"gateway-{mode}", jp if mode == "json" else sp, self.sut)
                    sut, auth = gw, True
                try:
                    self.check_target(port, mode, auth)
                    self.wrk(port, mode, 32, a.warmup, auth=auth, sut=sut, target=target, record=False)
                    for c in a.conns:
                        run = self.wrk(port, mode, c, a.duration, auth=auth, sut=sut, target=target)
                        if run.sut_core_other_pct > a.noisy_pct and self.reruns < a.max_reruns:
                            # Someone else used the SUT's core: measure the cell once more, keep the
                            # quieter run.
                            self.reruns += 1
                            log(
                                f"  {run.sut_core_other_pct:.0f}% other load on core {self.sut}: measuring "
                                "again"
                            )
                            again = self.wrk(
                                port, mode, c, a.duration, auth=auth, sut=sut, target=target, record=False
                            )
                            again.reruns = 1
                            if again.sut_core_other_pct < run.sut_core_other_pct:
                                self.runs[self.runs.index(run)] = again
                    if gw is not None and mode == "json":
                        self.extra["gateway_rss_after_load_mb"] = round(rss_bytes(tree(gw.pid)) / 2**20, 1)
                finally:
                    if gw is not None:
                        self.procs.stop(gw)
        if proxy is not None:
            self.procs.stop(proxy)

    def phase_normal(self) -> None:
        """Added latency at 1 connection with the SQLite ledger at synchronous=NORMAL (no fsync per
        group commit: what the fsync costs each response, see metering.sqlite_synchronous)."""
        for mode in self.a.modes:
            gw, port = self.start_gateway(
                f"gateway-normal-{mode}",
                self.ports[mode],
                self.sut,
                env={"TOKENPORT_METERING__SQLITE_SYNCHRONOUS": "NORMAL"},
            )
            try:
                self.check_target(port, mode, True)
                self.wrk(port, mode, 32, self.a.warmup, auth=True, sut=gw, target=NORMAL_TARGET, record=False)
                for c in (1, 32):
                    self.wrk(port, mode, c, self.a.duration, auth=True, sut=gw, target=NORMAL_TARGET)
            finally:
                self.procs.stop(gw)

    def phase_memory(self) -> None:
        """RSS of the gateway with N open streams (slow upstream: one chunk every interval)."""
        n = self.a.streams
        slow_port = free_port()
        slow = self.procs.start(
            "slow-upstream",
            [
                str(VENV_BIN / "python"),
                "-m",
                "bench.slow_upstream",
                "--port",
                str(slow_port),
                "--interval",
                "0.5",
                "--chunks",
                "240",
            ],
            cpus=self.load,
            env=dict(os.environ),
        )
        try:
            wait_http(f"http://127.0.0.1:{slow_port}/health", slow, self.procs, "slow-upstream")
            gw, port = self.start_gateway("gateway-streams", slow_port, self.sut)
            try:
                idle = rss_bytes(tree(gw.pid))
                rows0 = self.ledger_count()
                res = asyncio.run(
                    hold_streams(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        self.key,
                        n,
                        lambda: rss_bytes(tree(gw.pid)),
                        timeout=120,
                    )
                )
                time.sleep(1.5)
                res["ledger_rows_after_close"] = self.ledger_count() - rows0
                res["rss_idle_mb"] = round(idle / 2**20, 1)
                res["rss_after_close_mb"] = round(rss_bytes(tree(gw.pid)) / 2**20, 1)
                res["per_stream_kb"] = round(
                    (res["rss_peak_mb"] - res["rss_idle_mb"]) * 1024 / max(1, res["opened"]), 1
                )
                self.extra["memory"] = res
                log(
                    f"memory: {res['opened']}/{n} streams open, gateway RSS {res['rss_peak_mb']} MB "
                    f"(idle {res['rss_idle_mb']} MB, {res['per_stream_kb']} KB/stream), errors "
                    f"{res['errors']}, "
                    f"ledger +{res['ledger_rows_after_close']} after the client left"
                )
            finally:
                self.procs.stop(gw)
        finally:
            self.procs.stop(slow)

    def phase_multi(self) -> None:
        """1 vs 2 gateway processes (separate ports, one shared SQLite ledger), non-streaming, 32 "
        "connections."""
        d = self.a.duration
        jp = self.ports["json"]
        a_gw, a_port = self.start_gateway("gateway-multi-a", jp, self.sut)
        b_gw = None
        try:
            self.check_target(a_port, "json", auth=True)
            self.wrk(a_port, "json", 32, self.a.warmup, auth=True, sut=a_gw, target="tokenport", record=False)
            one = self.wrk(a_port, "json", 32, d, auth=True, sut=a_gw, target="tokenport x1", record=False)
            b_gw, b_port = self.start_gateway("gateway-multi-b", jp, self.load)
            self.check_target(b_port, "json", auth=True)
            rows0 = self.ledger_count()
            results: dict[str, Run] = {}

            def go(name: str, port: int, sut: subprocess.Popen[bytes]) -> None:
                results[name] = self.wrk(
                    port, "json", 16, d, auth=True, sut=sut, target="tokenport x2", record=False
                )

            import threading

            ts = [
                threading.Thread(target=go, args=("a", a_port, a_gw)),
                threading.Thread(target=go, args=("b", b_port, b_gw)),
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            time.sleep(0.5)
            rows = self.ledger_count() - rows0
            two_rps = results["a"].rps + results["b"].rps
            done_reqs = results["a"].requests + results["b"].requests
            self.extra["multi"] = {
                "one_process": {
                    "rps": round(one.rps),
                    "cpu_us_per_req": round(one.sut_cpu_us_per_req, 1),
                    "p50_ms": one.p50_ms,
                    "p99_ms": one.p99_ms,
                    "errors": one.errors,
                    "cpus": self.sut,
                    "commit_ms": one.gateway_view.get("commit"),
                    "events_per_commit": one.gateway_view.get("batch"),
                },
                "two_processes": {
                    "rps": round(two_rps),
                    "cpu_us_per_req": [round(results[k].sut_cpu_us_per_req, 1) for k in ("a", "b")],
                    "rps_each": [round(results[k].rps) for k in ("a", "b")],
                    "errors": results["a"].errors + results["b"].errors,
                    "p50_ms": [results[k].p50_ms for k in ("a", "b")],
                    "p99_ms": [results[k].p99_ms for k in ("a", "b")],
                    "commit_ms": [results[k].gateway_view.get("commit") for k in ("a", "b")],
                    "events_per_commit": [results[k].gateway_view.get("batch") for k in ("a", "b")],
                    "cpus": [self.sut, self.load],
                    "completed_requests": done_reqs,
                    "ledger_rows": rows,
                    "ledger_ok": done_reqs <= rows <= done_reqs + 32,
                },
                "speedup": round(two_rps / one.rps, 2) if one.rps else None,
            }
            self.procs.stop(a_gw)
            self.procs.stop(b_gw)
            a_gw = b_gw = None
            # the same, on ONE port: `tokenport gateway --processes 2` (SO_REUSEPORT), both cores
            both = f"{self.sut},{self.load}"
            r_gw, r_port = self.start_gateway(
                "gateway-reuseport", jp, both, extra=["--processes", "2", "--per-process-limits"]
            )
            try:
                self.check_target(r_port, "json", auth=True)
                self.wrk(
                    r_port, "json", 32, self.a.warmup, auth=True, sut=r_gw, target="tokenport", record=False
                )
                rp = self.wrk(
                    r_port, "json", 32, d, auth=True, sut=r_gw, target="tokenport --processes 2", record=False
                )
            finally:
                self.procs.stop(r_gw)
            self.extra["multi"]["one_port_two_processes"] = {
                "rps": round(rp.rps),
                "cpu_us_per_req": round(rp.sut_cpu_us_per_req, 1),
                "p50_ms": rp.p50_ms,
                "p99_ms": rp.p99_ms,
                "errors": rp.errors,
                "cpus": both,
                "speedup": round(rp.rps / one.rps, 2) if one.rps else None,
                "cpu_per_req_ratio": round(rp.sut_cpu_us_per_req / one.sut_cpu_us_per_req, 2)
                if one.sut_cpu_us_per_req
                else None,
            }
            log(
                f"multi: one port, --processes 2: {rp.rps:,.0f} req/s "
                f"({self.extra['multi']['one_port_two_processes']['speedup']}x), "
                f"CPU/request {rp.sut_cpu_us_per_req:,.0f} us vs {one.sut_cpu_us_per_req:,.0f}"
            )
            log(
                f"multi: 1 process {one.rps:,.0f} req/s, 2 processes {two_rps:,.0f} req/s "
                f"({self.extra['multi']['speedup']}x); ledger +{rows} rows for {done_reqs} completed requests"
            )
        finally:
            for g in (a_gw, b_gw):
                if g is not None:
                    self.procs.stop(g)

    def phase_profile(self) -> None:
        pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
        if pyspy is None:
            log("py-spy not found: installing it into the venv (PyPI)")
            subprocess.run([str(VENV_BIN / "pip"), "install", "-q", "py-spy"], check=True, timeout=300)
            pyspy = str(VENV_BIN / "py-spy")
        secs = self.a.profile_seconds
        out: dict[str, Any] = {}
        for mode in self.a.profile_modes:
            gw, port = self.start_gateway(f"gateway-profile-{mode}", self.ports[mode], self.sut)
            try:
                self.check_target(port, mode, auth=True)
                self.wrk(port, mode, 32, self.a.warmup, auth=True, sut=gw, target="tokenport", record=False)
                raw = self.run_dir / f"profile-{mode}.txt"
                spy = subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        self.load,
                        pyspy,
                        "record",
                        "--pid",
                        str(gw.pid),
                        "--duration",
                        str(secs),
                        "--rate",
                        "250",
                        "--gil",
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                run = self.wrk(
                    port,
                    mode,
                    self.a.profile_conns,
                    secs + 1,
                    auth=True,
                    sut=gw,
                    target="tokenport",
                    record=False,
                )
                try:
                    spy_out = spy.communicate(timeout=secs + 30)[0].decode(errors="replace")
                except subprocess.TimeoutExpired:
                    os.killpg(spy.pid, signal.SIGKILL)
                    spy_out = spy.communicate()[0].decode(errors="replace")
                if not raw.exists():
                    self.notes.append(f"py-spy produced no profile for {mode}: {spy_out[-500:]}")
                    continue
                out[mode] = {
                    "raw": raw,
                    "rps_under_profiler": run.rps,
                    "seconds": secs,
                    "cpu_us_under_profiler": run.sut_cpu_us_per_req,
                    "user_us_under_profiler": run.sut_user_us_per_req,
                    "sys_us_under_profiler": run.sut_sys_us_per_req,
                }
                log(f"profile {mode}: {raw} ({run.rps:,.0f} req/s under the profiler)")
            finally:
                self.procs.stop(gw)
        self.extra["profiles"] = out

    # ---- report

    def direct(self, mode: str, conns: int) -> Run | None:
        return next(
            (r for r in self.runs if r.target == "direct" and r.mode == mode and r.conns == conns), None
        )

    def table(self) -> list[str]:
        head = (
            "| target | mode | conns | req/s | p50 ms | p90 ms | p99 ms | max ms | CPU µs/req (SUT) | errors "
            "| req/s ÷ direct | +p50 ms | +p99 ms | ledger rows/req | other load on SUT core |"
        )
        out = [head, "|" + " --- |" * 3 + " ---: |" * 12]
        for r in self.runs:
            d = self.direct(r.mode, r.conns)
            ratio = (
                f"{r.rps / d.rps:.3f}"
                if d and d.rps and r.target != "direct"
                else "1"
                if r.target == "direct"
                else "-"
            )
            add50 = f"{r.p50_ms - d.p50_ms:+.2f}" if d and r.target != "direct" else "-"
            add99 = f"{r.p99_ms - d.p99_ms:+.2f}" if d and r.target != "direct" else "-"
            rows = f"{r.ledger_rows / r.requests:.3f}" if r.ledger_rows is not None and r.requests else "-"
            other = (
                (f"{r.sut_core_other_pct:.0f}%" + (" (2nd try)" if r.reruns else ""))
                if r.target != "direct"
                else "-"
            )
            err = str(r.errors) + (
                f" ({', '.join(f'{k} {v}' for k, v in r.errors_detail.items())})" if r.errors else ""
            )
            out.append(
                f"| {r.target} | {'stream' if r.mode == 'sse' else 'json'} | {r.conns} | {r.rps:,.0f} | "
                f"{r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} | "
                f"{r.sut_cpu_us_per_req:,.1f} | "
                f"{err} | {ratio} | {add50} | {add99} | {rows} | {other} |"
            )
        return out

    def verdicts(self) -> list[str]:
        def find(target: str, mode: str, conns: int) -> Run | None:
            return next(
                (r for r in self.runs if r.target == target and r.mode == mode and r.conns == conns), None
            )

        out = ["| issue 7 target | measured | verdict |", "| --- | --- | --- |"]

        def row(name: str, value: str, ok: bool | None) -> None:
            out.append(f"| {name} | {value} | {'n/a' if ok is None else 'PASS' if ok else 'FAIL'} |")

        for mode, limit, litellm in (
            ("json", TARGET_CPU_JSON_US, LITELLM_CPU_JSON_US),
            ("sse", TARGET_CPU_SSE_US, LITELLM_CPU_SSE_US),
        ):
            r = find("tokenport", mode, 32)
            label = "non-streaming" if mode == "json" else "20-chunk streaming"
            if r:
                row(
                    f"CPU per {label} request at 32 connections <= {limit} µs",
                    f"{r.sut_cpu_us_per_req:,.0f} µs ({litellm / r.sut_cpu_us_per_req:.1f}x less than "
                    f"LiteLLM's {litellm:,} µs)",
                    r.sut_cpu_us_per_req <= limit,
                )
        for target, how in (("tokenport", ""), (NORMAL_TARGET, ", ledger synchronous=NORMAL")):
            for mode in ("json", "sse"):
                r, d = find(target, mode, 1), find("direct", mode, 1)
                if r and d:
                    a50, a99 = r.p50_ms - d.p50_ms, r.p99_ms - d.p99_ms
                    label = "non-streaming" if mode == "json" else "streaming (whole response)"
                    row(
                        f"added latency at 1 connection, {label}{how}: p50 <= {TARGET_ADDED_P50_MS} ms, "
                        f"p99 <= {TARGET_ADDED_P99_MS} ms",
                        f"p50 {a50:+.2f} ms, p99 {a99:+.2f} ms",
                        a50 <= TARGET_ADDED_P50_MS and a99 <= TARGET_ADDED_P99_MS,
                    )
        for mode in ("json", "sse"):
            r = find("tokenport", mode, 128)
            if r:
                row(
                    f"errors at 128 connections ({'stream' if mode == 'sse' else 'json'})",
                    f"{r.errors} of {r.requests:,} requests",
                    r.errors == 0,
                )
        mem = self.extra.get("memory")
        if mem:
            row(
                f"resident memory with {self.a.streams:,} open streams <= {TARGET_RSS_MB} MB",
                f"{mem['rss_peak_mb']} MB ({mem['opened']} streams open, idle {mem['rss_idle_mb']} MB)",
                mem["rss_peak_mb"] <= TARGET_RSS_MB and mem["opened"] == self.a.streams,
            )
        multi = self.extra.get("multi")
        if multi:
            t = multi["two_processes"]
            row(
                "several gateway processes: throughput grows; one shared ledger correct",
                f"1 process {multi['one_process']['rps']:,} req/s, 2 processes {t['rps']:,} req/s "
                f"({multi['speedup']}x); ledger {t['ledger_rows']:,} rows for {t['completed_requests']:,} "
                "completed; "
                f"chain {self.extra.get('chain', {}).get('ok', '?')}",
                bool(
                    multi["speedup"]
                    and multi["speedup"] > 1.0
                    and t["ledger_ok"]
                    and self.extra.get("chain", {}).get("ok")
                ),
            )
        return out

    def write(self, machine: dict[str, Any]) -> Path | None:
        suffix = "-quick" if self.a.quick else ""
        day = self.stamp.strftime("%Y-%m-%d")
        name = f"{day}-{machine['host']}{suffix}"
        md: list[str] = [
            f"# Tokenport benchmark, {machine['date_utc']} on {machine['host']}"
            + (f" (gateway patched: {', '.join(self.a.patches)})" if self.a.patches else ""),
            "",
        ]
        md += ["## Machine", ""]
        md += [
            f"- CPU: {machine['cpu_model']} ({machine['cores']} cores; {', '.join(machine['cpu_flags'])})",
            f"- Memory: {machine['memory_gb']} GB; kernel {machine['kernel']}; {machine['os']}",
            f"- Python {machine['python']}; {machine['nginx']}; {machine['wrk']}",
            "- Packages: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v),
            f"- Code: git {machine['git']}",
            f"- Pinning: system under test on core(s) {self.sut}; wrk and the fake upstream on core(s) "
            f"{self.load}",
            (
                f"- Load average at start {' '.join(machine['loadavg_start'])}, at end "
                f"{' '.join(machine['loadavg_end'])}"
                " (other jobs on the machine make the figures noisy: see the last column)"
            ),
            "",
        ]
        md += [
            "## Method",
            "",
            (
                f"wrk {self.a.duration:g} s per cell (after a {self.a.warmup:g} s warm-up per target), one "
                "thread per load core; "
                "fake upstream = nginx `return 200` with a vLLM chat completion / a vLLM stream with "
                "continuous usage "
                f"(role chunk + {fake.CONTENT_CHUNKS} content chunks + usage chunk + [DONE]). "
                "Tokenport: `tokenport gateway --worker smollm2-135m-instruct=http://127.0.0.1:PORT`, "
                "SQLite ledger "
                "(WAL, synchronous=FULL: an fsync per group commit; the `tokenport sync=NORMAL` rows run "
                "the same gateway "
                "with `metering.sqlite_synchronous: NORMAL`), one tenant + key, authentication, metering "
                "committed before the response, "
                "and metrics all on; wrk sends `Authorization` and `X-Client-Country`. CPU µs/req = "
                "utime+stime of the "
                "system under test's process tree (/proc/PID/stat) / completed requests (direct: the "
                "upstream nginx "
                "itself, which shares its core with wrk). `ledger rows/req` = usage events committed during "
                "the cell / "
                "requests wrk completed (1.000 = every request metered; a hair above 1 = requests in flight "
                "when wrk "
                "stopped). `other load on SUT core` = busy time on the SUT's core not spent by the SUT."
            ),
            "",
        ]
        md += ["## Results", "", *self.table(), ""]
        md += ["## Against issue 7", "", *self.verdicts(), ""]
        views = [r for r in self.runs if r.gateway_view]
        if views:
            md += [
                "## Inside the gateway (means from its own /metrics over each cell)",
                "",
                (
                    "`in gateway` = request start to response (or stream end) as the gateway measures it; "
                    "`upstream` "
                    "= waiting on the worker; `gateway overhead` = the gateway's own share; `commit` = one "
                    "ledger "
                    "group commit (SQLite, in a thread) and `events/commit` its batch size. Compare `in "
                    "gateway` with "
                    "wrk's mean to see time spent before the gateway sees a request (accept, queueing on "
                    "the loop)."
                ),
                "",
                "| target | mode | conns | wrk mean ms | in gateway ms | upstream ms | gateway overhead ms "
                "| commit ms | events/commit |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for r in views:
                v = r.gateway_view
                md.append(
                    f"| {r.target} | {'stream' if r.mode == 'sse' else 'json'} | {r.conns} | "
                    f"{r.mean_ms:.2f} | "
                    + " | ".join(
                        f"{v[k]:.2f}" if k in v else "-"
                        for k in ("duration", "upstream", "overhead", "commit")
                    )
                    + f" | {v.get('batch', 0):.1f} |"
                )
            md.append("")
        mem = self.extra.get("memory")
        if mem:
            md += [
                "## Open streams",
                "",
                (
                    f"{mem['opened']} of {self.a.streams} streams opened through one gateway process (slow "
                    "Python upstream, "
                    f"one chunk every 0.5 s), errors {mem['errors']}, opened in {mem['open_seconds']} s. "
                    "Gateway RSS: idle "
                    f"{mem['rss_idle_mb']} MB, peak {mem['rss_peak_mb']} MB ({mem['per_stream_kb']} KB per "
                    "stream), "
                    f"{mem['rss_after_close_mb']} MB after the client closed them all. Ledger rows for the "
                    f"abandoned streams: {mem['ledger_rows_after_close']} (expect {mem['opened']}: each is "
                    "metered "
                    "`client_cancelled`)."
                ),
                "",
            ]
        multi = self.extra.get("multi")
        if multi:
            o, t = multi["one_process"], multi["two_processes"]
            md += [
                "## Several gateway processes",
                "",
                (
                    f"Non-streaming, 32 connections in total, one SQLite ledger shared by the processes. "
                    f"1 process (core {o['cpus']}): {o['rps']:,} req/s at {o['cpu_us_per_req']} µs/req, p50 "
                    f"{o['p50_ms']:.1f} ms, "
                    f"p99 {o['p99_ms']:.1f} ms. "
                    f"2 processes (cores {t['cpus'][0]} and {t['cpus'][1]}, 16 connections each, separate "
                    "ports): "
                    f"{t['rps']:,} req/s ({' + '.join(f'{x:,}' for x in t['rps_each'])}) at "
                    f"{' / '.join(str(x) for x in t['cpu_us_per_req'])} µs/req, p50 "
                    f"{' / '.join(f'{x:.1f}' for x in t['p50_ms'])} ms, "
                    f"p99 {' / '.join(f'{x:.1f}' for x in t['p99_ms'])} ms, errors {t['errors']}: "
                    f"{multi['speedup']}x. "
                    f"Ledger: {t['ledger_rows']:,} rows committed for {t['completed_requests']:,} requests "
                    "completed "
                    f"({'consistent' if t['ledger_ok'] else 'INCONSISTENT'})."
                ),
                "",
            ]
            md += [
                (
                    f"Ledger group commits: 1 process {o['commit_ms']} ms for {o['events_per_commit']} "
                    "events per commit; "
                    f"2 processes {' / '.join(str(x) for x in t['commit_ms'])} ms for "
                    f"{' / '.join(str(x) for x in t['events_per_commit'])} events per commit (the processes "
                    "take "
                    "turns on SQLite's write lock)."
                ),
                "",
            ]
            md += [
                (
                    "The second process shares core 0 with wrk and the fake upstream on a 2-core machine, "
                    "so this shows that processes share the ledger correctly and what a second core buys "
                    "here, not clean linear scaling. "
                    + one_port_text(multi.get("one_port_two_processes"), multi["one_process"])
                ),
                "",
            ]
        chain = self.extra.get("chain")
        if chain:
            md += [
                (
                    f"Ledger integrity after the whole run: {chain['rows']:,} rows, "
                    f"{chain['distinct_request_ids']:,} "
                    "distinct request ids, hash chain "
                    f"{'verified' if chain['ok'] else 'BROKEN at ' + str(chain.get('first_bad'))}, "
                    f"outcomes {chain['outcomes']}."
                ),
                "",
            ]
        if self.notes:
            md += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        text = "\n".join(md)
        print("\n" + text)
        if self.a.no_write:
            return None
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text)
        payload = {
            "machine": machine,
            "args": {k: v for k, v in vars(self.a).items()},
            "runs": [asdict(r) for r in self.runs],
            "extra": {k: v for k, v in self.extra.items() if k != "profiles"},
        }
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {RESULTS / (name + '.md')} and .json")
        return RESULTS / f"{name}.md"

    def write_profile(self) -> None:
        profiles = self.extra.get("profiles") or {}
        if not profiles:
            return
        day = self.stamp.strftime("%Y-%m-%d")
        suffix = "-quick" if self.a.quick else ""
        md = [
            "# Where the microseconds go: Tokenport gateway profile, "
            f"{self.stamp.isoformat(timespec='seconds')}",
            "",
            (
                f"py-spy {self._pyspy_version()} `record --gil --rate 250 --format raw` on the gateway "
                "process for "
                f"{self.a.profile_seconds} s under wrk at {self.a.profile_conns} connections "
                "(authentication, ledger, metrics on; fake nginx "
                "upstream), gateway on its own core. `--gil` keeps only samples of the thread holding the "
                "GIL, i.e. "
                "Python actually running (not threads idling in the pool, not fsync or epoll waits); uvloop "
                "makes its "
                "socket syscalls with the GIL held, so their kernel time is in the samples too (charged to "
                "the Python "
                "line that wrote). The µs column converts shares into the total CPU per request (user + "
                "kernel) of "
                "the clean run without the profiler: at high load the GIL-held time and the process's CPU "
                "time agree "
                "within a few percent. Collapsed stacks: bench/.run/ (not committed)."
            ),
            "",
        ]
        for mode, p in profiles.items():
            clean = next(
                (
                    r
                    for r in self.runs
                    if r.target == "tokenport" and r.mode == mode and r.conns == self.a.profile_conns
                ),
                None,
            )
            user = clean.sut_user_us_per_req if clean else p["user_us_under_profiler"]
            sys_ = clean.sut_sys_us_per_req if clean else p["sys_us_under_profiler"]
            label = "non-streaming" if mode == "json" else "streaming (20 chunks)"
            parsed = prof.load(p["raw"])
            gil = parsed.samples / (250 * p["seconds"]) if p["seconds"] else 0
            md += [
                f"## {label}",
                "",
                (
                    "CPU per request "
                    f"{'(clean run at 32 connections)' if clean else '(under the profiler)'}: "
                    f"{user + sys_:,.0f} µs = user {user:,.0f} µs + kernel {sys_:,.0f} µs. Under the "
                    "profiler: "
                    f"{p['rps_under_profiler']:,.0f} req/s, {p['cpu_us_under_profiler']:,.0f} µs/req; the "
                    "GIL was held "
                    f"{gil:.0%} of the wall time (the one core is the limit when this nears 100%)."
                ),
                "",
            ]
            md += prof.report(
                parsed, us_per_req=user + sys_, title=f"{label}: where the CPU per request goes"
            )
        if not self.a.no_write:
            path = RESULTS / f"profile-{day}{suffix}.md"
            text = "\n".join(md)
            if path.exists() and ANALYSIS_MARK in path.read_text():
                # keep the hand-written analysis of that day's profile below the generated tables
                text += "\n" + ANALYSIS_MARK + path.read_text().split(ANALYSIS_MARK, 1)[1]
            path.write_text(text)
            log(f"wrote {path}")
        else:
            print("\n".join(md))

    def _pyspy_version(self) -> str:
        exe = shutil.which("py-spy", path=str(VENV_BIN)) or "py-spy"
        try:
            return subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.split()[-1]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    def verify_chain(self) -> None:
        """Every row once, and the hash chain intact (recomputed with the product's own chain_hash)."""
        sys.path.insert(0, str(self.code))
        from metering.chain import GENESIS, chain_hash
        from metering.db import make_engine
        from metering.store_sql import UsageStore

        engine = make_engine(f"sqlite:///{self.ledger_db()}")
        try:
            store = UsageStore(engine)
            prev, n, first_bad = GENESIS, 0, None
            for se in store.iter_events():
                if first_bad is None and (se.prev_hash != prev or chain_hash(prev, se.event) != se.hash):
                    first_bad = se.seq
                prev = se.hash
                n += 1
        finally:
            engine.dispose()
        con = sqlite3.connect(f"file:{self.ledger_db()}?mode=ro", uri=True)
        try:
            distinct = con.execute("SELECT count(DISTINCT request_id) FROM usage_events").fetchone()[0]
            outcomes = dict(
                con.execute("SELECT outcome, count(*) FROM usage_events GROUP BY outcome").fetchall()
            )
        finally:
            con.close()
        self.extra["chain"] = {
            "rows": n,
            "distinct_request_ids": distinct,
            "ok": first_bad is None and distinct == n,
            "first_bad": first_bad,
            "outcomes": outcomes,
        }
        log(
            f"ledger: {n} rows, {distinct} distinct ids, chain "
            f"{'ok' if first_bad is None else 'BROKEN at ' + str(first_bad)}"
        )

    # ---- main

    def main(self) -> int:
        machine = self.machine()
        log(f"run dir {self.run_dir}; SUT on core(s) {self.sut}, wrk + upstream on core(s) {self.load}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.create_account()
        self.ports["json"], self.ports["sse"] = free_port(), free_port()
        self.upstream = self.start_nginx(
            "upstream",
            "upstream.conf.in",
            self.load,
            json_port=self.ports["json"],
            sse_port=self.ports["sse"],
        )
        wait_http(f"http://127.0.0.1:{self.ports['json']}/health", self.upstream, self.procs, "upstream")
        self.check_target(self.ports["json"], "json", auth=False)
        self.check_target(self.ports["sse"], "sse", auth=False)
        phases = [
            ("matrix", self.phase_matrix),
            ("normal", self.phase_normal),
            ("memory", self.phase_memory),
            ("multi", self.phase_multi),
            ("profile", self.phase_profile),
        ]
        for name, fn in phases:
            if name in self.a.skip:
                continue
            t0 = time.monotonic()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - report and go on with the other phases
                log(f"phase {name} failed: {exc}")
                self.notes.append(f"phase {name} failed: {str(exc)[:800]}")
            log(f"phase {name}: {time.monotonic() - t0:.0f} s")
        self.procs.stop(self.upstream)
        try:
            self.verify_chain()
        except Exception as exc:  # noqa: BLE001 - report it in the results
            self.notes.append(f"ledger verification failed: {exc}")
        machine["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        self.write(machine)
        self.write_profile()
        if not self.a.keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return 0


async def hold_streams(url: str, key: str, n: int, rss: Any, *, timeout: float) -> dict[str, Any]:
    """Open n streaming requests, wait until each got its first content chunk, sample RSS, then leave."""
    import aiohttp

    body = json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": 256,
            "messages": [{"role": "user", "content": "Tell me a long story about the Silk Road."}],
        }
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "X-Client-Country": "UZ"}
    opened = errors = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    first_error: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened, errors
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                chunks = 0
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        chunks += 1
                        if chunks == 2:  # role chunk + one content chunk: the stream is really flowing
                            break
                opened += 1
                if opened + errors == n:
                    all_open.set()
                await release.wait()
        except Exception as exc:  # noqa: BLE001 - counted as an error of the memory phase
            errors += 1
            if not first_error:
                first_error.append(repr(exc)[:300])
            if opened + errors == n:
                all_open.set()

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30)
    ) as s:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(one(s)) for _ in range(n)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), timeout)
        open_s = time.monotonic() - t0
        peak = 0
        for _ in range(10):  # ~2 s with every stream open and dripping
            peak = max(peak, rss())
            await asyncio.sleep(0.2)
        release.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "streams": n,
        "opened": opened,
        "errors": errors,
        "first_error": first_error[0] if first_error else None,
        "open_seconds": round(open_s, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="3 s cells, 5 s profile of the non-streaming path only"
    )
    p.add_argument("--duration", type=float, help="seconds per wrk cell (default 8, quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per target (default 2, quick 1)")
    p.add_argument("--conns", default="1,4,32,128", help="connection counts (default 1,4,32,128)")
    p.add_argument(
        "--only", default="direct,nginx,tokenport", help="targets (default direct,nginx,tokenport)"
    )
    p.add_argument("--modes", default="json,sse", help="json,sse (default both)")
    p.add_argument("--skip", default="", help="phases to skip: matrix,normal,memory,multi,profile")
    p.add_argument(
        "--streams", type=int, default=1000, help="open streams for the memory test (default 1000)"
    )
    p.add_argument("--profile-seconds", type=int, help="py-spy duration (default 10, quick 5)")
    p.add_argument("--profile-modes", default=None, help="json,sse (default both; quick: json)")
    p.add_argument("--profile-conns", type=int, default=32, help="connections while profiling (default 32)")
    p.add_argument("--sut-cpus", default=None, help="cores for the system under test (default 1)")
    p.add_argument("--load-cpus", default=None, help="cores for wrk and the fake upstream (default 0)")
    p.add_argument(
        "--noisy-pct",
        type=float,
        default=25.0,
        help="re-measure a cell once when other processes used more than this %% of the SUT core",
    )
    p.add_argument(
        "--max-reruns", type=int, default=6, help="at most this many re-measured cells (default 6)"
    )
    p.add_argument(
        "--code",
        default=None,
        help="run the product code of another checkout (e.g. `git archive HEAD` unpacked) instead of this "
        "tree",
    )
    p.add_argument(
        "--patches",
        default="",
        help="run the gateway through bench/variant.py with these experimental patches (implies --no-write)",
    )
    p.add_argument("--keep", action="store_true", help="keep the run's ledger in bench/.run/")
    p.add_argument("--no-write", action="store_true", help="print only; write nothing under bench/results/")
    a = p.parse_args(argv)
    a.duration = a.duration or (3.0 if a.quick else 8.0)
    a.warmup = a.warmup or (1.0 if a.quick else 2.0)
    a.profile_seconds = a.profile_seconds or (5 if a.quick else 10)
    a.profile_modes = [m for m in (a.profile_modes or ("json" if a.quick else "json,sse")).split(",") if m]
    a.conns = [int(c) for c in a.conns.split(",") if c]
    a.only = [t for t in a.only.split(",") if t]
    a.modes = [m for m in a.modes.split(",") if m]
    a.skip = [s for s in a.skip.split(",") if s]
    a.patches = [x for x in a.patches.split(",") if x]
    if a.patches:
        a.no_write = True
    ncpu = os.cpu_count() or 1
    if a.sut_cpus is None or a.load_cpus is None:
        if ncpu >= 2:
            a.sut_cpus = a.sut_cpus or "1"
            a.load_cpus = a.load_cpus or "0"
        else:
            a.sut_cpus = a.sut_cpus or "0"
            a.load_cpus = a.load_cpus or "0"
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(
                f"bench: {tool} is missing (Debian: apt-get install -y nginx wrk util-linux; or `make "
                "system-deps`)",
                file=sys.stderr,
            )
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it (1,000 streams)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, set(expand_cpus(parse_args(argv).load_cpus)))
    bench = Bench(args)
    atexit.register(bench.procs.stop_all)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return bench.main()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
