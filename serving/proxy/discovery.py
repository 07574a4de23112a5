"""Workers discovered and changed without a restart: a watched workers file, DNS and Kubernetes.

`workers.file` (settings; relative to the config folder) lists workers beside the catalogue's:

    workers:
      - {model: qwen2.5-7b-instruct, base_url: "http://10.0.3.17:8000", id: gpu-17, region: kz-ala-1}
      - {model: qwen2.5-7b-instruct, base_url: "http://vllm-qwen.llm.svc:8000", discover: dns}
      - {model: qwen2.5-7b-instruct, base_url: "http://_http._tcp.vllm-qwen.llm.svc", discover: srv}
      - {model: qwen2.5-7b-instruct, base_url: "http://vllm-qwen.llm:8000", discover: endpointslices}
      - {model: llama-3.1-8b, base_url: "http://vllm-router.llm:80", router: true}

Every `workers.refresh_s` the file is read again when it changed (its mtime and size: a Kubernetes
ConfigMap volume swaps a symlink, which stat follows) and each discovered entry is looked up again:

- `discover: dns` (or `resolve: true`): every A/AAAA address of the host is a worker (a headless
  Service lists its ready pods that way);
- `discover: srv`: every SRV target and port of the name;
- `discover: endpointslices`: the ready endpoints of the Kubernetes Service named by the host
  (`SERVICE.NAMESPACE`), read from the API server (serving/proxy/kube.py): a terminating pod leaves
  as soon as Kubernetes marks it, with no DNS TTL in between.

An address worker's id is `<id or host>-<address>` (`:<port>` added when its port is not base_url's).
A lookup that cannot be answered (timeout, no server, API error) keeps that entry's last addresses; a
name that does not exist or has no records (a Service scaled to zero) gives none. `router: true`: the
URL is a router in front of the engines (README: Running a fleet).

The pool (serving/proxy/pool.py `replace`) adds what is new after a health check and drains what is
gone. At start a bad file stops the gateway with its reason; later a bad edit (YAML, an unknown model,
a field, or the file gone: `workers: []` is how to remove them all) is logged with the file, the entry
and the field, counted in
`tokenport_worker_discovery_errors_total{source="workers_file"}`, and the last good set stays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.proxy.pool import Worker, WorkerPool

log = logging.getLogger("tokenport.discovery")
Kind = Literal["static", "dns", "srv", "endpointslices"]


class LookupFailed(Exception):
    """A lookup could not be answered now (timeout, no server, API error): keep what was known."""


class Lookup(Protocol):
    """The (address, port) pairs behind a discovered entry's base_url; [] when the name has none."""

    async def __call__(self, kind: str, base_url: str) -> list[tuple[str, int]]: ...


class FileWorker(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    base_url: str
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    region: str = "discovered"
    discover: Kind = "static"
    resolve: bool = False  # the first spelling of `discover: dns` (kept for files that use it)
    router: bool = False  # a router in front of the engines: no /metrics scrape, never ejected
    health_path: str = Field(default="/health", pattern=r"^/[A-Za-z0-9._~/-]*$")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be http(s)://host[:port]")
        try:
            parts.port  # noqa: B018 - raises on a bad port
            if not parts.hostname.startswith("["):
                parts.hostname.encode("idna")  # an empty or over-long label: refused here, not at lookup
        except (ValueError, UnicodeError) as exc:
            raise ValueError(f"base_url {value!r}: {exc}") from exc
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kind(self) -> FileWorker:
        if self.resolve:
            if self.discover not in ("static", "dns"):
                raise ValueError(f"resolve: true is discover: dns, not {self.discover}")
            self.discover = "dns"
        if self.discover != "static" and urlsplit(self.base_url).scheme != "http":
            raise ValueError(
                f"discover: {self.discover} reaches each address over plain http (a TLS certificate "
                "names the host, not a pod's address): use an http base_url"
            )
        return self


class WorkersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: list[FileWorker] = []


class WorkersFileError(ValueError):
    pass


def load_workers_file(path: Path, models: Iterable[str]) -> list[FileWorker]:
    """The file's workers, validated; WorkersFileError names the file, the entry and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WorkersFileError(f"{path}: {exc}") from exc
    try:
        parsed = WorkersFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise WorkersFileError(f"{path}: {where}: {msg}") from exc
    known = set(models)
    ids: set[str] = set()
    for i, w in enumerate(parsed.workers):
        if w.model not in known:
            raise WorkersFileError(
                f"{path}: workers.{i}.model: {w.model!r} is not in the catalogue (configs/models.yaml)"
            )
        if w.id is not None:
            if w.id in ids:
                raise WorkersFileError(f"{path}: workers.{i}.id: {w.id!r} is given twice")
            ids.add(w.id)
    return parsed.workers


def _host_port(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


class DnsLookup:
    """`dns`: every address of the host from the system's resolver (getaddrinfo: /etc/hosts, the
    resolver's search domains, so a pod's `svc.namespace` short names work); `srv`: the name's SRV
    records with dnspython's asyncio resolver, each target's addresses as for `dns`. A name that does
    not exist or has no records gives no addresses; a timeout or an unreachable server raises
    LookupFailed (the entry's last addresses stay)."""

    GONE = frozenset(
        getattr(socket, name)
        for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
        if hasattr(socket, name)
    )

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self._resolver: Any = None

    async def addresses(self, host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        try:
            async with asyncio.timeout(self.timeout_s):
                infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in self.GONE:
                return []
            raise LookupFailed(f"DNS {host}: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            raise LookupFailed(f"DNS {host}: {type(exc).__name__}: {exc}") from exc
        return sorted({str(i[4][0]) for i in infos})

    async def srv(self, name: str) -> list[tuple[str, int]]:
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        try:
            if self._resolver is None:
                self._resolver = dns.asyncresolver.Resolver()
                self._resolver.lifetime = self.timeout_s
            answer = await self._resolver.resolve(name, "SRV", search=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as exc:  # NoResolverConfiguration is one
            raise LookupFailed(f"DNS SRV {name}: {type(exc).__name__}: {exc}") from exc
        return [(rr.target.to_text(omit_final_dot=True), int(rr.port)) for rr in answer]

    async def __call__(self, kind: str, base_url: str) -> list[tuple[str, int]]:
        host, port = _host_port(base_url)
        if kind == "dns":
            return [(a, port) for a in await self.addresses(host)]
        targets = await self.srv(host)
        found = await asyncio.gather(*(self.addresses(t) for t, _p in targets))
        return sorted({(a, p) for (_t, p), addresses in zip(targets, found, strict=True) for a in addresses})


def address_url(base_url: str, address: str, port: int) -> str:
    """base_url with its host and port replaced (IPv6 in brackets)."""
    parts = urlsplit(base_url)
    host = f"[{address}]" if ":" in address else address
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, "", "")).rstrip("/")


def to_worker(entry: FileWorker, wid: str, url: str | None = None) -> Worker:
    return Worker(
        id=wid,
        model=entry.model,
        url=url or entry.base_url,
        region=entry.region,
        router=entry.router,
        health_path=entry.health_path,
    )


class Discovery:
    """Keeps the pool in step with the catalogue's workers, the workers file, DNS and Kubernetes."""

    def __init__(
        self,
        pool: WorkerPool,
        static: list[Worker],
        path: Path | None,
        refresh_s: float,
        *,
        lookups: dict[str, Lookup] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_refresh: Callable[[], None] | None = None,
    ) -> None:
        self.pool, self.static, self.path, self.refresh_s = pool, static, path, refresh_s
        self.lookups: dict[str, Lookup] = lookups or {}
        self._on_error, self._on_refresh = on_error, on_refresh
        self.models = {w.model for w in static} | set(pool.models)
        self._seen: tuple[float, int] | None = None
        self._entries: list[FileWorker] = []
        self._last: dict[str, list[Worker]] = {}  # per entry: its last discovered workers
        self._task: asyncio.Task[None] | None = None
        self.errors = 0

    def _error(self, source: str) -> None:
        self.errors += 1
        if self._on_error is not None:
            self._on_error(source)

    def read(self, *, strict: bool = False) -> None:
        """Read the file if it changed. strict (at start): a bad file raises WorkersFileError; later
        a bad edit is logged and counted, and the last good set stays."""
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError as exc:
            if strict:
                raise WorkersFileError(f"{self.path}: cannot read the workers file: {exc}") from exc
            if self._seen is not None:  # once per disappearance: a missing file is a bad edit too
                self._error("workers_file")
                log.error(
                    "%s cannot be read (%s): keeping the last good set (`workers: []` removes them)",
                    self.path,
                    exc,
                )
            self._seen = None
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._seen:
            return
        try:
            self._entries = load_workers_file(self.path, self.models)
            self._seen = stamp
            log.info(
                "%s: %d worker entr%s",
                self.path,
                len(self._entries),
                "y" if len(self._entries) == 1 else "ies",
            )
        except WorkersFileError as exc:
            if strict:
                raise
            self._error("workers_file")
            self._seen = stamp  # not again until it changes
            log.error("workers file refused, keeping the last good set: %s", exc)

    async def expand(self, entry: FileWorker) -> list[Worker]:
        """The workers one entry stands for: itself, or one per address it is discovered at (IPv4
        only when it has any: a dual-stack pod is one worker, not two)."""
        host, port = _host_port(entry.base_url)
        if entry.discover == "static":
            return [to_worker(entry, entry.id or urlsplit(entry.base_url).netloc[:64])]
        lookup = self.lookups.get(entry.discover)
        if lookup is None:
            raise LookupFailed(f"no {entry.discover} lookup in this gateway")
        found = set(await lookup(entry.discover, entry.base_url))
        v4 = {(a, p) for a, p in found if ":" not in a}
        name = entry.id or host
        return [
            to_worker(
                entry,
                (f"{name}-{address}" + (f":{p}" if p != port else ""))[:64],
                address_url(entry.base_url, address, p),
            )
            for address, p in sorted(v4 or found)
        ]

    @staticmethod
    def _key(entry: FileWorker) -> str:
        return f"{entry.model} {entry.base_url} {entry.discover} {entry.id}"

    async def _expand_or_keep(self, entry: FileWorker) -> list[Worker]:
        key = self._key(entry)
        try:
            self._last[key] = await self.expand(entry)
        except Exception as exc:  # noqa: BLE001 - one entry's failure keeps its last set, never the round's
            self._error(entry.discover)
            log.warning(
                "cannot look up %s (%s: %s: %s): keeping its last %d worker(s)",
                entry.base_url,
                entry.discover,
                type(exc).__name__,
                exc,
                len(self._last.get(key, [])),
            )
        return self._last.get(key, [])

    async def refresh(self) -> list[Worker]:
        """One round: read, look up every entry at once, replace; the new workers are health-checked
        before they serve."""
        if self.path is not None:
            self.read()
        groups = await asyncio.gather(*(self._expand_or_keep(e) for e in self._entries))
        keep = {self._key(e) for e in self._entries}
        for stale in set(self._last) - keep:  # entries no longer in the file
            del self._last[stale]
        added = self.pool.replace([*self.static, *(w for g in groups for w in g)])
        if added:
            await asyncio.gather(*(self.pool.check(w) for w in added))
        if self._on_refresh is not None:
            self._on_refresh()
        return added

    async def start(self) -> None:
        await self.refresh()  # the file was read strictly at create time (serving/app.py)
        self._task = asyncio.create_task(self._loop(), name="worker-discovery")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let discovery die: the pool keeps its current set
                log.exception("worker discovery round failed")

    async def close(self) -> None:
        """Stop the rounds and close the lookups that hold a connection (the Kubernetes API's)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for lookup in {id(lk): lk for lk in self.lookups.values()}.values():
            close = getattr(lookup, "close", None)
            if close is not None:
                await close()
