"""The worker fleet without a network: workers-file validation, DNS A/AAAA and SRV lookups (a fake
dnspython resolver, the system resolver on literals and localhost), discovery rounds (worker ids, a
failed lookup keeping the last set), the Kubernetes EndpointSlices client against a fake API server,
router workers (never ejected, no /metrics scrape) and the fleet metrics (a drained worker's series
removed, tokenport_workers{model,state})."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import dns.exception
import dns.resolver
import pytest
from aiohttp import web

from metering.events import TOKEN_TYPES
from metering.metrics import Metrics
from serving.proxy.discovery import (
    Discovery,
    DnsLookup,
    LookupFailed,
    WorkersFileError,
    load_workers_file,
)
from serving.proxy.kube import EndpointSlices, ready_endpoints
from serving.proxy.pool import Worker, WorkerPool
from tests.conftest import metric
from tests.serving.test_discovery import write_workers

# --- the workers file ---------------------------------------------------------------------------------
BAD_FILES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "unknown field": (
        [{"model": "m", "base_url": "http://h:8000", "colour": "red"}],
        "workers.0.colour: Extra inputs are not permitted",
    ),
    "unknown model": (
        [{"model": "m", "base_url": "http://h:8000"}, {"model": "nope", "base_url": "http://h:8001"}],
        "workers.1.model: 'nope' is not in the catalogue",
    ),
    "resolve and srv": (
        [{"model": "m", "base_url": "http://_http._tcp.h", "resolve": True, "discover": "srv"}],
        "resolve: true is discover: dns, not srv",
    ),
    "discover over https": (
        [{"model": "m", "base_url": "https://h:8443", "discover": "dns"}],
        "discover: dns reaches each address over plain http",
    ),
    "duplicate id": (
        [
            {"model": "m", "base_url": "http://a:8000", "id": "w1"},
            {"model": "m", "base_url": "http://b:8000", "id": "w1"},
        ],
        "workers.1.id: 'w1' is given twice",
    ),
    "bad base_url": ([{"model": "m", "base_url": "ftp://h"}], "base_url must be http(s)://host[:port]"),
    "unknown discover": ([{"model": "m", "base_url": "http://h", "discover": "mdns"}], "workers.0.discover"),
    "empty host label": ([{"model": "m", "base_url": "http://vllm..llm:8000"}], "workers.0.base_url"),
    "bad port": ([{"model": "m", "base_url": "http://h:99999"}], "workers.0.base_url"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_workers_file_is_refused_naming_the_file_entry_and_field(tmp_path: Path, case: str) -> None:
    entries, reason = BAD_FILES[case]
    path = tmp_path / "workers.yaml"
    write_workers(path, *entries)
    with pytest.raises(WorkersFileError) as info:
        load_workers_file(path, ["m"])
    assert str(info.value).startswith(f"{path}: "), info.value
    assert reason in str(info.value), info.value


def test_a_good_workers_file_and_resolve_as_discover_dns(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    path.write_text("workers: [1, 2", encoding="utf-8")
    with pytest.raises(WorkersFileError, match=r"workers\.yaml"):
        load_workers_file(path, ["m"])
    write_workers(
        path,
        {"model": "m", "base_url": "http://h:8000/", "id": "w1", "region": "eu"},
        {"model": "m", "base_url": "http://svc.ns:8000", "resolve": True},
        {"model": "m", "base_url": "http://router:80", "router": True, "health_path": "/ready"},
    )
    static, resolved, router = load_workers_file(path, ["m"])
    assert (static.base_url, static.discover, static.region) == ("http://h:8000", "static", "eu")
    assert resolved.discover == "dns"  # resolve: true is the first spelling of discover: dns
    assert (router.router, router.health_path, router.discover) == (True, "/ready", "static")


# --- DNS: A/AAAA from the system resolver, SRV from dnspython ------------------------------------------
class _Target:
    def __init__(self, name: str) -> None:
        self.name = name

    def to_text(self, omit_final_dot: bool = False) -> str:
        return self.name.rstrip(".") if omit_final_dot else self.name


@dataclass
class _Srv:
    target: _Target
    port: int


@dataclass
class FakeResolver:
    """dnspython's asyncresolver.Resolver as DnsLookup uses it: resolve(name, 'SRV', search=...)."""

    records: dict[str, Any]
    asked: list[tuple[str, str, bool]] = field(default_factory=list)

    async def resolve(self, name: str, rdtype: str, search: bool = False) -> list[_Srv]:
        self.asked.append((name, rdtype, search))
        found = self.records[name]
        if isinstance(found, type) and issubclass(found, BaseException):
            raise found
        assert isinstance(found, list)
        return found


async def test_srv_targets_become_their_addresses_and_a_missing_name_gives_none() -> None:
    lookup = DnsLookup()
    lookup._resolver = FakeResolver(
        {
            "_http._tcp.vllm.llm": [
                _Srv(_Target("localhost."), 8001),
                _Srv(_Target("127.0.0.1."), 8002),
                _Srv(_Target("127.0.0.1."), 8001),  # the same address twice: one worker
            ],
            "_http._tcp.gone.llm": dns.resolver.NXDOMAIN,
            "_http._tcp.zero.llm": dns.resolver.NoAnswer,
            "_http._tcp.flaky.llm": dns.exception.Timeout,
        }
    )
    assert await lookup("srv", "http://_http._tcp.vllm.llm") == [("127.0.0.1", 8001), ("127.0.0.1", 8002)]
    assert await lookup("srv", "http://_http._tcp.gone.llm") == []  # NXDOMAIN: none
    assert await lookup("srv", "http://_http._tcp.zero.llm") == []  # no records: scaled to zero
    with pytest.raises(LookupFailed, match="Timeout"):  # cannot be answered now: keep the last
        await lookup("srv", "http://_http._tcp.flaky.llm")
    assert lookup._resolver.asked[0] == ("_http._tcp.vllm.llm", "SRV", True)  # the pod's search domains


async def test_dns_addresses_of_a_literal_and_of_localhost() -> None:
    lookup = DnsLookup()
    assert await lookup("dns", "http://10.1.2.3:8000") == [("10.1.2.3", 8000)]
    assert await lookup("dns", "http://[fd00::7]:8000/v1") == [("fd00::7", 8000)]
    assert await lookup("dns", "http://localhost:8123") == [("127.0.0.1", 8123)]  # /etc/hosts
    assert await lookup("dns", "http://localhost") == [("127.0.0.1", 80)]  # base_url's default port


async def test_dns_name_not_found_gives_none_and_a_resolver_failure_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    errno = {"gone": socket.EAI_NONAME, "flaky": socket.EAI_AGAIN}

    async def getaddrinfo(host: str, *_a: Any, **_kw: Any) -> list[Any]:
        raise socket.gaierror(errno[host], "fake resolver")

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    lookup = DnsLookup()
    assert await lookup("dns", "http://gone:8000") == []
    with pytest.raises(LookupFailed, match="DNS flaky"):
        await lookup("dns", "http://flaky:8000")


# --- discovery rounds ----------------------------------------------------------------------------------
class FakeLookup:
    def __init__(self) -> None:
        self.answers: dict[str, list[tuple[str, int]]] = {}
        self.fail = False
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, kind: str, base_url: str) -> list[tuple[str, int]]:
        self.asked.append((kind, base_url))
        if self.fail:
            raise LookupFailed("SERVFAIL")
        return self.answers.get(base_url, [])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def ids(pool: WorkerPool) -> list[tuple[str, str, bool]]:
    return sorted((w.id, w.url, w.draining) for w in pool.workers)


@contextlib.asynccontextmanager
async def discovering(
    path: Path, session: aiohttp.ClientSession, **lookups: Any
) -> AsyncIterator[tuple[WorkerPool, Discovery, list[str]]]:
    """A started pool of model `m` fed by the workers file at `path` (read strictly, as at a start);
    the sources of the errors it counted."""
    errors: list[str] = []
    pool = WorkerPool([], models=["m"], interval_s=60)
    await pool.start(session)
    disco = Discovery(pool, [], path, 60, lookups=lookups or None, on_error=errors.append)
    disco.read(strict=True)
    try:
        yield pool, disco, errors
    finally:
        await pool.close()


async def test_every_address_is_a_worker_named_by_id_or_host(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # loopback addresses with nothing listening: health checks fail at once, membership is what counts
    lookup = FakeLookup()
    lookup.answers["http://vllm.llm:8000"] = [("127.0.0.2", 8000), ("127.0.0.3", 9000), ("::1", 8000)]
    lookup.answers["http://v6.llm:8000"] = [("::1", 8000)]
    lookup.answers["http://vllm-b.llm:8000"] = [("127.0.0.6", 8000), ("127.0.0.6", 8000)]
    lookup.answers["http://_http._tcp.other.llm"] = [("127.0.0.4", 8000)]
    path = tmp_path / "workers.yaml"
    write_workers(
        path,
        {"model": "m", "base_url": "http://vllm.llm:8000", "discover": "dns", "region": "eu"},
        {"model": "m", "base_url": "http://vllm-b.llm:8000", "discover": "dns", "id": "q"},
        {"model": "m", "base_url": "http://_http._tcp.other.llm", "discover": "srv"},
        {"model": "m", "base_url": "http://127.0.0.5:8000"},
        {"model": "m", "base_url": "http://v6.llm:8000", "discover": "dns"},
    )
    pool = WorkerPool([], models=["m"], interval_s=60)
    await pool.start(session)
    refreshed: list[int] = []
    disco = Discovery(
        pool, [], path, 60, lookups={"dns": lookup, "srv": lookup}, on_refresh=lambda: refreshed.append(1)
    )
    disco.read(strict=True)
    try:
        added = await disco.refresh()
    finally:
        await pool.close()
    assert ids(pool) == [
        ("127.0.0.5:8000", "http://127.0.0.5:8000", False),  # a static entry without an id: host:port
        ("_http._tcp.other.llm-127.0.0.4:8000", "http://127.0.0.4:8000", False),  # SRV's port is not 80
        ("q-127.0.0.6", "http://127.0.0.6:8000", False),  # the id names it; an address twice is one
        ("v6.llm-::1", "http://[::1]:8000", False),  # an IPv6-only name keeps them, in brackets
        ("vllm.llm-127.0.0.2", "http://127.0.0.2:8000", False),
        ("vllm.llm-127.0.0.3:9000", "http://127.0.0.3:9000", False),
        # not ::1 too: a dual-stack name is its IPv4 addresses (one pod, one worker)
    ]
    assert len(added) == 6 and refreshed == [1]
    assert {w.region for w in pool.workers if w.id.startswith("vllm.llm-")} == {"eu"}
    assert {w.region for w in pool.workers if w.id.startswith("q-")} == {"discovered"}
    assert not any(w.healthy for w in pool.workers)  # checked before serving: nothing listens there


async def test_a_failed_lookup_keeps_the_last_workers_and_counts_an_error(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    lookup = FakeLookup()
    lookup.answers["http://vllm.llm:8000"] = [("127.0.0.2", 8000), ("127.0.0.3", 8000)]
    path = tmp_path / "workers.yaml"
    write_workers(path, {"model": "m", "base_url": "http://vllm.llm:8000", "discover": "dns"})
    errors: list[str] = []
    metrics = Metrics(["m"])
    pool = WorkerPool([], models=["m"], interval_s=60)
    await pool.start(session)

    def on_error(source: str) -> None:
        errors.append(source)
        metrics.discovery_errors.labels(source).inc()

    disco = Discovery(pool, [], path, 60, lookups={"dns": lookup}, on_error=on_error)
    disco.read(strict=True)
    try:
        await disco.refresh()
        assert [w.id for w in pool.workers] == ["vllm.llm-127.0.0.2", "vllm.llm-127.0.0.3"]
        lookup.fail = True
        await disco.refresh()
        await disco.refresh()
        assert [w.id for w in pool.workers] == ["vllm.llm-127.0.0.2", "vllm.llm-127.0.0.3"]
        assert not any(w.draining for w in pool.workers)  # kept, not drained
        assert errors == ["dns", "dns"] and disco.errors == 2
        text = metrics.render().decode()
        assert metric(text, "tokenport_worker_discovery_errors_total", source="dns") == 2
        lookup.fail = False
        lookup.answers["http://vllm.llm:8000"] = [("127.0.0.3", 8000)]  # a pod replaced
        await disco.refresh()
        assert [w.id for w in pool.workers] == ["vllm.llm-127.0.0.3"]  # the other drained (nothing in flight)
        lookup.answers["http://vllm.llm:8000"] = []  # the name is gone (NXDOMAIN): none
        await disco.refresh()
        assert pool.workers == [] and pool.serves("m") and errors == ["dns", "dns"]
        # an entry whose kind has no lookup in this gateway is an error too, not a crash
        write_workers(path, {"model": "m", "base_url": "http://svc.ns:8000", "discover": "endpointslices"})
        await disco.refresh()
        assert errors == ["dns", "dns", "endpointslices"] and pool.workers == []
    finally:
        await pool.close()


async def test_a_bad_edit_is_counted_once_and_the_last_good_set_stays(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    path = tmp_path / "workers.yaml"
    write_workers(path, {"model": "m", "base_url": "http://127.0.0.2:8000", "id": "w1"})
    async with discovering(path, session) as (pool, disco, errors):
        await disco.refresh()
        write_workers(path, {"model": "m", "base_url": "http://127.0.0.3:8000", "id": "w1", "prot": 1})
        await disco.refresh()
        await disco.refresh()  # not again until the file changes
        assert [w.id for w in pool.workers] == ["w1"] and errors == ["workers_file"]
        with pytest.raises(WorkersFileError, match=r"workers\.0\.prot"):  # at a start it stops the start
            Discovery(WorkerPool([], models=["m"]), [], path, 60).read(strict=True)


# --- Kubernetes EndpointSlices -------------------------------------------------------------------------
SLICES: dict[str, Any] = {
    "items": [
        {
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": False, "terminating": True}},
                {"addresses": ["10.1.0.3"]},  # no conditions: ready (the API's rule)
                {"addresses": ["10.1.0.4"], "conditions": {"ready": None}},  # nil: ready
            ],
        },
        {"addressType": "FQDN", "ports": [{"port": 8000}], "endpoints": [{"addresses": ["x.example"]}]},
        {"addressType": "IPv6", "ports": [{"port": 8000}], "endpoints": [{"addresses": ["fd00::5"]}]},
    ]
}


@dataclass
class FakeKube:
    url: str
    sa: Path
    seen: list[tuple[str, str, str | None]]  # (namespace, labelSelector, Authorization)


@pytest.fixture
async def fake_kube(tmp_path: Path) -> AsyncIterator[FakeKube]:
    seen: list[tuple[str, str, str | None]] = []

    async def slices(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        seen.append((request.match_info["ns"], request.query.get("labelSelector", ""), auth))
        if auth != "Bearer tok-1":
            return web.json_response({"kind": "Status", "reason": "Forbidden"}, status=403)
        if request.match_info["ns"] != "llm" or request.query["labelSelector"].split("=")[1] != "vllm-qwen":
            return web.json_response({"kind": "EndpointSliceList", "items": []})
        return web.json_response(SLICES)

    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", slices)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok-1\n")
    (sa / "namespace").write_text("llm\n")
    try:
        yield FakeKube(f"http://127.0.0.1:{port}", sa, seen)
    finally:
        await runner.cleanup()


async def test_endpointslices_lists_the_ready_pods_of_a_service(fake_kube: FakeKube) -> None:
    kube = EndpointSlices(api_url=fake_kube.url, sa_dir=fake_kube.sa)
    try:
        want = [("10.1.0.1", 8000), ("10.1.0.3", 8000), ("10.1.0.4", 8000), ("fd00::5", 8000)]
        assert await kube("endpointslices", "http://vllm-qwen.llm.svc.cluster.local:8000") == want
        assert fake_kube.seen[-1] == ("llm", "kubernetes.io/service-name=vllm-qwen", "Bearer tok-1")
        assert await kube("endpointslices", "http://vllm-qwen:8000") == want  # the pod's own namespace
        # port 9000 named by number; a port neither listed nor named http: the slice's `http` port
        assert await kube("endpointslices", "http://vllm-qwen.llm:9000") == [
            ("10.1.0.1", 9000),
            ("10.1.0.3", 9000),
            ("10.1.0.4", 9000),
            ("fd00::5", 8000),  # the IPv6 slice has one port: that one
        ]
        assert await kube("endpointslices", "http://vllm-qwen.llm:7000") == want
        assert await kube("endpointslices", "http://vllm-qwen.other:8000") == []  # no slices: none
        (fake_kube.sa / "token").write_text("rotated")  # re-read every time; this one is refused
        with pytest.raises(LookupFailed, match=r"403 \(the gateway's ServiceAccount needs `list` on end"):
            await kube("endpointslices", "http://vllm-qwen.llm:8000")
        assert [auth for _ns, _sel, auth in fake_kube.seen][-1] == "Bearer rotated"
    finally:
        await kube.close()


async def test_endpointslices_outside_kubernetes_and_when_the_api_is_down(
    fake_kube: FakeKube, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    outside = EndpointSlices(api_url=None, sa_dir=tmp_path / "empty")
    outside.api_url = None  # whatever KUBERNETES_SERVICE_HOST says
    with pytest.raises(LookupFailed, match="names no namespace"):
        await outside("endpointslices", "http://vllm-qwen:8000")  # no SERVICE.NAMESPACE, not a pod
    with pytest.raises(LookupFailed, match="not running in Kubernetes"):
        await outside("endpointslices", "http://vllm-qwen.llm:8000")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = EndpointSlices(api_url=f"http://127.0.0.1:{closed}", sa_dir=fake_kube.sa)
    try:
        with pytest.raises(LookupFailed, match="Kubernetes API: "):
            await down("endpointslices", "http://vllm-qwen.llm:8000")
    finally:
        await down.close()


def test_endpoint_ports_are_chosen_by_number_then_by_the_name_http() -> None:
    def one(ports: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"addressType": "IPv4", "ports": ports, "endpoints": [{"addresses": ["10.0.0.1"]}]}]

    two = one([{"name": "a", "port": 1}, {"name": "http", "port": 2}])
    assert ready_endpoints(two, 1) == [("10.0.0.1", 1)]  # by number first
    assert ready_endpoints(two, 3) == [("10.0.0.1", 2)]  # then the one named http
    assert ready_endpoints(two, None) == [("10.0.0.1", 2)]
    unnamed = one([{"name": "a", "port": 1}, {"name": "b", "port": 2}])
    assert ready_endpoints(unnamed, 3) == []  # neither: not a guess
    assert ready_endpoints(one([{"name": "grpc", "port": 5}]), 3) == [("10.0.0.1", 5)]  # the only one


# --- routers -------------------------------------------------------------------------------------------
@dataclass
class PathServer:
    """A loopback HTTP server that answers 200 to every GET and records the paths."""

    paths: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> PathServer:
        async def handle(request: web.Request) -> web.Response:
            self.paths.append(request.path)
            return web.Response(text='vllm:num_requests_running{model_name="m"} 4.0\n')

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.parametrize("routing", ["least_loaded", "prefix_affinity"])
async def test_a_router_is_health_checked_on_its_path_and_its_metrics_never_read(
    session: aiohttp.ClientSession, routing: str
) -> None:
    router_srv, engine_srv = await PathServer().start(), await PathServer().start()
    router = Worker("router", "m", router_srv.url, "r", router=True, health_path="/ready")
    engine = Worker("engine", "m", engine_srv.url, "r")
    pool = WorkerPool([router, engine], routing=routing, interval_s=60)
    try:
        await pool.start(session)
        await pool.check_all()
    finally:
        await pool.close()
        await router_srv.stop()
        await engine_srv.stop()
    assert router.healthy and engine.healthy
    assert router_srv.paths == ["/ready", "/ready"]  # health only, on its own path
    assert engine_srv.paths == ["/health", "/metrics"] * 2  # an engine's load is read (the control)
    assert (router.queued, engine.queued) == (0, 4)


def test_a_router_is_never_ejected() -> None:
    router = Worker("router", "m", "http://router", "r", healthy=True, router=True)
    engine = Worker("engine", "m", "http://engine", "r", healthy=True)
    pool = WorkerPool([router, engine], eject_after=2, eject_base_s=60)
    for _ in range(10):
        pool.note_failure(router)
    pool.note_failure(engine)
    pool.note_failure(engine)
    assert (router.ejections, router.ejected_until, router.healthy) == (0, 0.0, True)
    assert pool.pick("m", exclude=[engine]) is router
    assert engine.ejections == 1 and not engine.healthy  # the same failures eject an engine
    pool.mark_failed(router)  # a broken connection: out until its health check passes, not ejected
    assert not router.healthy and router.ejected_until == 0.0


# --- fleet metrics -------------------------------------------------------------------------------------
def _series(metrics: Metrics, worker: str) -> list[str]:
    return [line for line in metrics.render().decode().splitlines() if f'worker="{worker}"' in line]


def test_a_drained_worker_s_series_are_removed() -> None:
    metrics = Metrics(["m"])
    w1 = Worker("w1", "m", "http://a", "r", healthy=True)
    w2 = Worker("w2", "m", "http://b", "r", healthy=True)
    pool = WorkerPool([w1, w2], on_gone=metrics.forget_worker, models=["m"])
    for w in (w1, w2):
        metrics.worker_healthy.labels(w.id, w.model).set(1)
        metrics.worker_ejections.labels(w.id, w.model).inc()
        metrics.child(metrics.upstream, "m", w.id).observe(0.2)
        for t in TOKEN_TYPES:
            metrics.drift_tokens.labels(w.id, w.model, t.value).set(3)
            metrics.drift_ratio.labels(w.id, w.model, t.value).set(0.1)
    assert _series(metrics, "w1")
    w1.inflight = 1  # a stream in flight: it drains, its series stay meanwhile
    pool.replace([Worker("w2", "m", "http://b", "r")])
    assert w1.draining and _series(metrics, "w1")
    w1.inflight = 0
    pool.sweep()
    assert w1 not in pool.workers and _series(metrics, "w1") == []
    kept = _series(metrics, "w2")
    assert any("tokenport_worker_healthy" in s for s in kept)
    assert any("tokenport_upstream_duration_seconds_count" in s for s in kept)
    # the same id back later gets fresh series (the cached child went with the old ones)
    metrics.child(metrics.upstream, "m", "w1").observe(0.5)
    assert metric(metrics.render().decode(), "tokenport_upstream_duration_seconds_count", worker="w1") == 1


def test_workers_are_counted_by_model_and_state() -> None:
    metrics = Metrics(["m", "n"])
    ws = [Worker(f"w{i}", "m", f"http://w{i}", "r") for i in range(3)]
    ws[2].draining = True
    metrics.count_workers(["m", "n"], ws)
    text = metrics.render().decode()
    assert metric(text, "tokenport_workers", model="m", state="active") == 2
    assert metric(text, "tokenport_workers", model="m", state="draining") == 1
    assert metric(text, "tokenport_workers", model="n", state="active") == 0
    assert 'tokenport_workers{model="n",state="draining"} 0.0' in text  # present at zero
    metrics.count_workers(["m", "n"], ws[:1])
    text = metrics.render().decode()
    assert metric(text, "tokenport_workers", model="m", state="active") == 1
    assert metric(text, "tokenport_workers", model="m", state="draining") == 0


# --- review fixes: in-place edits, a worker back while draining, one entry failing --------------------
def test_an_edit_that_keeps_the_url_reaches_the_worker_in_place() -> None:
    w = Worker("gpu-1", "m", "http://a:8000", "kz-ala-1", healthy=True)
    pool = WorkerPool([w], models=["m"])
    edited = Worker("gpu-1", "m", "http://a:8000", "de-fra-1", router=True, health_path="/ready")
    added = pool.replace([edited])
    assert added == [] and pool.workers == [w] and w.healthy  # no drain, no new health check
    assert (w.region, w.router, w.health_path) == ("de-fra-1", True, "/ready")
    renamed = pool.replace([Worker("gpu-2", "m", "http://a:8000", "de-fra-1")])  # a new id: a new worker
    assert [x.id for x in renamed] == ["gpu-2"] and w.draining


def test_a_worker_back_while_draining_is_taken_back_and_keeps_its_series() -> None:
    metrics = Metrics(["m"])
    w = Worker("w1", "m", "http://a", "r", healthy=True)
    pool = WorkerPool([w], on_gone=metrics.forget_worker, models=["m"])
    metrics.worker_healthy.labels("w1", "m").set(1)
    w.inflight = 1
    pool.replace([])  # its pod left the Service: it drains a stream
    assert w.draining
    assert pool.replace([Worker("w1", "m", "http://a", "r")]) == []  # back: the same object serves again
    assert not w.draining and pool.workers == [w]
    w.inflight = 0
    pool.sweep()
    assert pool.workers == [w] and _series(metrics, "w1")  # nothing drained, nothing removed


def test_a_drained_duplicate_does_not_remove_a_live_worker_s_series() -> None:
    metrics = Metrics(["m"])
    old = Worker("w1", "m", "http://a", "r", inflight=1, draining=True)
    live = Worker("w1", "m", "http://b", "r", healthy=True)
    pool = WorkerPool([old, live], on_gone=metrics.forget_worker, models=["m"])
    metrics.worker_healthy.labels("w1", "m").set(1)
    old.inflight = 0
    pool.sweep()
    assert pool.workers == [live] and _series(metrics, "w1")


async def test_one_entry_failing_in_any_way_keeps_its_last_set_and_the_round_goes_on(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    path = tmp_path / "workers.yaml"
    write_workers(
        path,
        {"model": "m", "base_url": "http://bad.llm:8000", "discover": "dns"},
        {"model": "m", "base_url": "http://good.llm:8000", "discover": "dns"},
    )

    class Lookups:
        calls = 0

        async def __call__(self, kind: str, base_url: str) -> list[tuple[str, int]]:
            self.calls += 1
            if "bad" in base_url and self.calls > 2:
                raise UnicodeError("label too long")  # not a LookupFailed: still only this entry's failure
            return [("127.0.0.9", 8000)] if "bad" in base_url else [(f"127.0.0.{self.calls}", 8000)]

    async with discovering(path, session, dns=Lookups()) as (pool, disco, errors):
        await disco.refresh()
        await disco.refresh()
    active = sorted(w.id for w in pool.workers if not w.draining)
    assert active == ["bad.llm-127.0.0.9", "good.llm-127.0.0.4"] and errors == ["dns"]


def test_the_session_header_cannot_be_one_http_or_the_gateway_uses() -> None:
    from pydantic import ValidationError

    from serving.settings import GatewaySettings

    for name in ("Content-Length", "host", "authorization", "x-request-id", "proxy-authorization"):
        with pytest.raises(ValidationError, match="name one of its own"):
            GatewaySettings(session_header=name)
    assert GatewaySettings(session_header="x-conversation").session_header == "x-conversation"


async def test_a_workers_file_gone_keeps_the_last_set_and_is_counted_once(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    path = tmp_path / "workers.yaml"
    write_workers(path, {"model": "m", "base_url": "http://127.0.0.7:8000", "id": "w7"})
    async with discovering(path, session) as (pool, disco, errors):
        await disco.refresh()
        path.unlink()  # deleted by mistake (a ConfigMap swap never leaves it missing)
        await disco.refresh()
        await disco.refresh()
        assert [(w.id, w.draining) for w in pool.workers] == [("w7", False)] and errors == ["workers_file"]
        write_workers(path)  # emptied on purpose: they drain
        await disco.refresh()
        assert [(w.id, w.draining) for w in pool.workers] in ([("w7", True)], [])
