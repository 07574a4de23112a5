"""`tokenport up | gateway | worker | demo | reconcile`: run the platform (see serving/cli/__init__.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from serving.cli.common import settings as _settings
from serving.cli.common import stores
from serving.settings import Settings

console = Console()
DEMO_TENANT = "demo"


def _parse_workers(values: list[str]) -> list[object]:
    from serving.app import ExtraWorker

    out: list[object] = []
    for v in values:
        model, sep, url = v.partition("=")
        if not sep or not model or not url.startswith(("http://", "https://")):
            console.print(f"[red]error:[/red] --worker takes MODEL=BASE_URL (http://...), got {v!r}")
            raise typer.Exit(2)
        out.append(ExtraWorker(model=model, base_url=url))
    return out


def _with_cli_workers(settings: Settings, extra: list[object]) -> Settings:
    """Models given with --worker are served by those workers only (not by catalogued local ones)."""
    from serving.app import ExtraWorker
    from serving.settings import Catalogue, ModelSpec

    named = {e.model for e in extra if isinstance(e, ExtraWorker)}
    models = [m for m in settings.catalogue.models if m.name not in named]
    models += [ModelSpec(name=n) for n in sorted(named) if settings.catalogue.get(n) is None]
    kept = [m.model_copy(update={"workers": []}) if m.name in named else m for m in settings.catalogue.models]
    catalogue = Catalogue(
        default_model=None,
        models=kept + [m for m in models if m not in settings.catalogue.models],
        routes=settings.catalogue.routes,
    )  # routed names (`auto`) keep routing
    return settings.model_copy(update={"catalogue": catalogue})


def _check_bind(settings: Settings, host: str, port: int, processes: int = 1) -> None:
    """Local mode binds loopback only; the default admin token is refused elsewhere, warned about here.
    The gateway's port and its metrics listeners' ports must be free: said now, with the setting to
    change, not as a traceback once the workers have started."""
    from serving.settings import ConfigError, check_bind

    try:
        warnings = check_bind(settings, host)
        _check_ports_free(settings, host, port, processes)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    for w in warnings:
        logging.getLogger("tokenport.gateway").warning("%s", w)
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def _check_ports_free(settings: Settings, host: str, port: int, processes: int) -> None:
    from serving.metrics_listener import bind_tcp
    from serving.settings import ConfigError

    gw = settings.gateway
    wanted = [(host, port, "the gateway's port (--port, gateway.port)")]
    if gw.metrics_port:  # 0 = any free port, None = no listener
        last = gw.metrics_port + processes - 1
        shared = gw.metrics_host == host or {gw.metrics_host, host} & {"0.0.0.0", "::", ""}
        if last > 65535 or (shared and port and gw.metrics_port <= port <= last):
            raise ConfigError(
                f"the metrics ports {gw.metrics_port}..{last} (gateway.metrics_port + process) "
                + ("go past 65535" if last > 65535 else f"include the gateway's port {port}")
                + ": choose another gateway.metrics_port (TOKENPORT_GATEWAY__METRICS_PORT)."
            )
        for i in range(processes):
            what = "the metrics port (gateway.metrics_port)"
            if processes > 1:
                what = f"process {i}'s metrics port (gateway.metrics_port + {i})"
            wanted.append((gw.metrics_host, gw.metrics_port + i, what))
    for h, p, what in wanted:
        try:
            bind_tcp(h, p).close()
        except OSError as exc:
            raise ConfigError(
                f"{what} {h}:{p} cannot be used: {exc.strerror}. Stop what holds it or choose "
                "another port (TOKENPORT_GATEWAY__PORT / TOKENPORT_GATEWAY__METRICS_PORT; a metrics "
                "port of 0 takes any free port)."
            ) from exc


async def _serve(
    settings: Settings, extra: list[object], host: str, port: int, *, reuse_port: bool = False
) -> None:
    import uvicorn

    from serving.app import ExtraWorker, create_app
    from serving.settings import ConfigError

    try:
        app_ = create_app(settings, extra_workers=[e for e in extra if isinstance(e, ExtraWorker)])
    except ConfigError as exc:  # e.g. workers.file: named with its reason, never a traceback
        console.print(f"[red]configuration error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    from serving.limits.http_timeouts import uvicorn_options

    gw = settings.gateway  # header/body deadlines, header size cap, keep-alive (slowloris)
    # proxy_headers=False: X-Forwarded-For is judged by metering/geo.py against gateway.trusted_proxies
    config = uvicorn.Config(
        app_,
        host=host,
        port=port,
        loop="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
        proxy_headers=False,
        **uvicorn_options(gw.header_timeout_s, gw.max_header_bytes, gw.keep_alive_s, gw.max_connections),
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_exit)
    console.print(
        f"gateway listening on http://{host}:{port}  (OpenAI base URL: http://{host}:{port}/v1)",
        soft_wrap=True,
    )
    try:
        if reuse_port:  # one of `gateway --processes N`: the port is shared (serving/gateway_processes.py)
            from serving.gateway_processes import reuse_port_socket

            await server.serve(sockets=[reuse_port_socket(host, port)])
        else:
            await server.serve()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class _Server:
    """uvicorn's Server, with signals handled by the event loop (so `up` can stop its workers after
    the gateway has drained, instead of uvicorn re-raising the signal and killing the process)."""

    def __init__(self, config: object) -> None:
        import contextlib

        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[no-untyped-def]
                yield

        self._server = Server(config)  # type: ignore[arg-type]

    def request_exit(self) -> None:
        if self._server.should_exit:
            self._server.force_exit = True  # a second Ctrl-C stops without waiting for streams
        self._server.should_exit = True

    async def serve(self, sockets: list[object] | None = None) -> None:
        await self._server.serve(sockets=sockets)  # type: ignore[arg-type]


def _run(coro: object) -> None:
    """Run on uvloop when it is installed. (An ImportError raised *inside* the coroutine is the app's own
    error: it must not be taken for a missing uvloop and the coroutine run a second time.)"""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


def gateway(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Listen address (default from settings: 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default from settings: 8000).")] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(help="MODEL=BASE_URL of a running OpenAI-compatible worker (repeatable)."),
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Gateway processes on the one port (SO_REUSEPORT); process i's metrics on metrics_port + i.",
        ),
    ] = 1,
    per_process_limits: Annotated[
        bool,
        typer.Option(
            help="With --processes N and limits.backend memory: accept that each process counts its own "
            "budgets and rate limits (N times the configured amounts). Without it that is refused."
        ),
    ] = False,
    reuse_port: Annotated[
        bool, typer.Option(hidden=True, help="Share the port (set for each process).")
    ] = False,
) -> None:
    """Start only the gateway, in front of catalogued workers and/or --worker URLs."""
    _logging()
    settings = _settings(ctx)
    extra = _parse_workers(worker or [])
    if extra:
        settings = _with_cli_workers(settings, extra)
    if not reuse_port:  # a supervised process: its supervisor checked the ports
        _check_bind(settings, host or settings.gateway.host, port or settings.gateway.port, processes)
    if processes > 1:
        import sys

        from serving.gateway_processes import supervise

        if settings.limits.backend == "memory" and not per_process_limits:
            console.print(
                f"[red]error:[/red] --processes {processes} with limits.backend memory would let each "
                f"process spend a tenant's whole budget and rate limit ({processes}x the configured "
                "amounts). Set limits.backend: redis (TOKENPORT_LIMITS__BACKEND=redis) so the processes "
                "share them, or pass --per-process-limits to accept per-process counting."
            )
            raise typer.Exit(2)

        raise typer.Exit(supervise(sys.argv[1:], processes, settings.gateway.metrics_port))
    _run(
        _serve(
            settings,
            extra,
            host or settings.gateway.host,
            port or settings.gateway.port,
            reuse_port=reuse_port,
        )
    )


def reconcile(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only usage since T (YYYY-MM-DD or ISO time): the baseline is "
            "each worker's last snapshot at or before T."
        ),
    ] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            help="MODEL=BASE_URL, as given to `tokenport gateway --worker` (same worker ids); given, only"
            " these are reconciled. Repeatable."
        ),
    ] = None,
    max_drift_ratio: Annotated[float, typer.Option(help="Allowed |drift| / worker tokens.")] = 0.001,
    max_drift_tokens: Annotated[
        int, typer.Option(help="Allowed |drift| in tokens (the larger allowance wins).")
    ] = 0,
    cutoff_slack: Annotated[
        int,
        typer.Option(
            help="Output tokens a cut-off request may have generated "
            "after its last metered chunk (README: Metering)."
        ),
    ] = 16,
    snapshot: Annotated[
        bool,
        typer.Option("--snapshot/--no-snapshot", help="Store this run's counters as a baseline for --since."),
    ] = True,
    metrics_file: Annotated[
        Path | None,
        typer.Option(help="Also write the drift gauges to this file (Prometheus textfile format)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Compare ledger totals with the workers' own token counters; exit 1 past the threshold
    (3 when a worker could not be read)."""
    from rich.table import Table

    from metering.reconcile import Target, Tolerance, run
    from serving.app import ExtraWorker, build_workers
    from serving.cli.common import arg
    from serving.dates import parse_instant

    settings = _settings(ctx)
    extra = _parse_workers(worker or [])
    if extra:
        settings = _with_cli_workers(settings, extra)
    given = [e for e in extra if isinstance(e, ExtraWorker)]
    targets = [
        Target(w.id, w.model, w.url)
        for w in build_workers(settings, given)
        # with --worker, exactly those workers (the catalogue's others may not run where this runs)
        if not given or w.model in {e.model for e in given}
    ]
    if not targets:
        console.print("[red]error:[/red] no workers to reconcile (catalogue or --worker)")
        raise typer.Exit(2)
    since_at = arg(lambda: parse_instant(since, "--since", unix=False))
    usage = stores(ctx).usage
    tolerance = Tolerance(tokens=max_drift_tokens, ratio=max_drift_ratio, cutoff_slack=cutoff_slack)
    report = asyncio.run(run(usage, targets, since=since_at, tolerance=tolerance, save_snapshot=snapshot))
    if metrics_file is not None:
        _write_drift_metrics(metrics_file, report.rows)
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        table = Table(
            "worker",
            "model",
            "token type",
            "ledger",
            "worker counters",
            "drift",
            "ratio",
            "cut-off",
            "allowed",
            "",
        )
        for r in report.rows:
            table.add_row(
                r.worker,
                r.model,
                r.token_type,
                str(r.ledger),
                str(r.worker_tokens),
                f"{r.drift:+d}",
                f"{r.ratio:+.4%}",
                str(r.cut_off),
                f"{r.allowed:g}",
                "ok" if r.ok else "[red]DRIFT[/red]",
            )
        Console(width=max(console.width, 150)).print(table)
        for (w, m), baseline in report.baselines.items():
            console.print(
                f"{w} ({m}): since {baseline}; ledger up to seq {report.ledger_seq}", highlight=False
            )
        for w, err in report.unreachable.items():
            console.print(f"[red]unreachable[/red] {w}: {err}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)
    if report.unreachable:
        raise typer.Exit(3)


def _write_drift_metrics(path: Path, rows: Sequence[object]) -> None:
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    from metering.reconcile import DriftRow

    reg = CollectorRegistry()
    tokens = Gauge(
        "tokenport_metering_drift_tokens",
        "Ledger vs worker counter drift (tokens).",
        ["worker", "model", "token_type"],
        registry=reg,
    )
    ratio = Gauge(
        "tokenport_metering_drift_ratio",
        "Ledger vs worker counter drift (ratio).",
        ["worker", "model", "token_type"],
        registry=reg,
    )
    for r in rows:
        assert isinstance(r, DriftRow)
        tokens.labels(r.worker, r.model, r.token_type).set(r.drift)
        ratio.labels(r.worker, r.model, r.token_type).set(r.ratio)
    write_to_textfile(str(path), reg)


def worker_cmd(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Model name (default: the catalogue's default).")] = None,
) -> None:
    """Start only the vLLM worker(s) of one model, supervised, in the foreground."""
    _logging()
    settings = _settings(ctx)
    name = model or settings.catalogue.default_model
    if name is None or settings.catalogue.get(name) is None:
        console.print(f"[red]error:[/red] unknown model {name!r}")
        raise typer.Exit(2)
    _run(_supervise(settings, name, with_gateway=False))


def up(
    ctx: typer.Context, port: Annotated[int | None, typer.Option(help="Gateway port (default 8000).")] = None
) -> None:
    """Start every launched worker, wait until healthy, then the gateway. Ctrl-C stops everything."""
    _logging()
    settings = _settings(ctx)
    if port is not None:
        settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"port": port})})
    _check_bind(settings, settings.gateway.host, settings.gateway.port)  # before the workers start
    _run(_supervise(settings, None, with_gateway=True))


async def _supervise(settings: Settings, only_model: str | None, *, with_gateway: bool) -> None:
    from serving.workers.prepare import is_prepared
    from serving.workers.supervisor import Supervisor

    for m in settings.catalogue.models:
        if (only_model is None or m.name == only_model) and not is_prepared(settings.models_dir, m):
            console.print(f"[red]error:[/red] model {m.name} is not prepared: run `tokenport models prepare`")
            raise typer.Exit(2)
    sup = Supervisor(settings, only_model, report=lambda s: console.print(s, highlight=False))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None
    # Until the gateway takes over the signals, Ctrl-C / SIGTERM cancel the start-up cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        await sup.start()
        with console.status("waiting for workers (the first start compiles kernels: a minute or two)…") as st:
            await sup.wait_healthy(
                progress=lambda w, s: st.update(f"waiting for worker {w.spec.id} ({w.model.name}): {s:.0f}s")
            )
        console.print("[green]all workers healthy[/green]")
        if with_gateway:
            _print_demo(settings)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await _serve(settings, [], settings.gateway.host, settings.gateway.port)
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    except asyncio.CancelledError:
        console.print("interrupted")
    finally:
        console.print("stopping workers…")
        await asyncio.shield(sup.stop())
        console.print("stopped")


def _demo_key_path(settings: Settings) -> Path:
    return settings.data_dir / "demo.key"


def demo(
    ctx: typer.Context, quiet: Annotated[bool, typer.Option(help="Only set up, print nothing.")] = False
) -> None:
    """Create the demo tenant and a key (once; the key is kept in data/demo.key for local use)."""
    settings = _settings(ctx)
    tenants = stores(ctx).tenants
    path = _demo_key_path(settings)
    if tenants.get_tenant(DEMO_TENANT) is None:
        tenants.create_tenant(
            id=DEMO_TENANT,
            name="Demo Almaty Trading LLP",
            billing_country="KZ",
            business=True,
            tax_id="123456789013",
            currency="USD",
            language="ru",
        )
    if not path.is_file():
        _key, plaintext = tenants.create_key(DEMO_TENANT, name="demo")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(plaintext + "\n", encoding="utf-8")
        os.chmod(path, 0o600)
    if not quiet:
        _print_demo(settings)


def _print_demo(settings: Settings) -> None:
    path = _demo_key_path(settings)
    if not path.is_file():
        return
    key = path.read_text(encoding="utf-8").strip()
    base = f"http://{settings.gateway.host}:{settings.gateway.port}/v1"
    model = settings.catalogue.default_model or "MODEL"
    console.print(
        f"""
[bold]Demo tenant 'demo' (KZ, business), key in {path}[/bold]

curl {base}/chat/completions \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -H "X-Client-Country: KZ" \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

.venv/bin/python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="{key}")
r = client.chat.completions.create(model="{model}", max_tokens=32,
                                   messages=[{{"role": "user", "content": "Hello!"}}])
print(r.choices[0].message.content, r.usage)
EOF

Usage so far: .venv/bin/tokenport usage summary   |   export: .venv/bin/tokenport usage export --tenant demo
""",
        highlight=False,
        soft_wrap=True,
    )


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("TOKENPORT_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
