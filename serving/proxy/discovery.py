"""Workers discovered and changed without a restart: a watched workers file, and DNS names.

`workers.file` (settings; relative to the config folder) lists workers beside the catalogue's:

    workers:
      - {model: qwen2.5-7b-instruct, base_url: "http://10.0.3.17:8000", id: gpu-17, region: kz-ala-1}
      - {model: qwen2.5-7b-instruct, base_url: "http://vllm-qwen.llm.svc:8000", resolve: true}

Every `workers.refresh_s` the file is read again when it changed, and each `resolve: true` entry is
looked up in DNS: every address of the name becomes a worker (`<id or host>-<address>`), which is how
a Kubernetes headless Service lists its ready pods (EndpointSlices behind it; no Kubernetes API
client here). The pool (serving/proxy/pool.py `replace`) adds what is new after a health check and
drains what is gone. A bad edit (YAML, an unknown model, a field) is logged with the file, the entry
and the field, and the last good set stays.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.proxy.pool import Worker, WorkerPool

log = logging.getLogger("tokenport.discovery")


class FileWorker(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    base_url: str
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    region: str = "discovered"
    resolve: bool = False  # every DNS address of the host is a worker (a headless Service)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be http(s)://host[:port]")
        return value.rstrip("/")


class WorkersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: list[FileWorker] = []


class WorkersFileError(ValueError):
    pass


def load_workers_file(path: Path, models: Iterable[str]) -> list[FileWorker]:
    """The file's workers, validated; WorkersFileError names the file, the entry and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise WorkersFileError(f"{path}: {exc}") from exc
    try:
        parsed = WorkersFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WorkersFileError(f"{path}: {where}: {first['msg']}") from exc
    known = set(models)
    for i, w in enumerate(parsed.workers):
        if w.model not in known:
            raise WorkersFileError(
                f"{path}: workers.{i}.model: {w.model!r} is not in the catalogue (configs/models.yaml)"
            )
    return parsed.workers


async def expand(entry: FileWorker, n: int) -> list[Worker]:
    """The workers one entry stands for: itself, or one per address of its DNS name."""
    parts = urlsplit(entry.base_url)
    host = parts.hostname or ""
    name = entry.id or (host if entry.resolve else f"file-{n}")
    if not entry.resolve:
        return [Worker(id=name, model=entry.model, url=entry.base_url, region=entry.region)]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for address in sorted({str(i[4][0]) for i in infos}):
        shown = f"[{address}]" if ":" in address else address
        netloc = f"{shown}:{parts.port}" if parts.port else shown
        url = urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
        out.append(Worker(id=f"{name}-{address}", model=entry.model, url=url, region=entry.region))
    return out


class Discovery:
    """Keeps the pool in step with the catalogue's workers, the workers file and DNS."""

    def __init__(self, pool: WorkerPool, static: list[Worker], path: Path | None, refresh_s: float) -> None:
        self.pool, self.static, self.path, self.refresh_s = pool, static, path, refresh_s
        self.models = {w.model for w in static} | set(pool.models)
        self._seen: tuple[float, int] | None = None
        self._entries: list[FileWorker] = []
        self._last: dict[str, list[Worker]] = {}  # per entry: its last resolved workers
        self._task: asyncio.Task[None] | None = None
        self.errors = 0

    def _read(self) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            if self._entries:
                log.warning("%s is gone: its workers drain", self.path)
            self._entries, self._seen = [], None
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
            self.errors += 1
            self._seen = stamp  # not again until it changes
            log.error("workers file refused, keeping the last good set: %s", exc)

    async def refresh(self) -> list[Worker]:
        """One round: read, resolve, replace; the new workers are health-checked before they serve."""
        if self.path is not None:
            self._read()
        found: list[Worker] = list(self.static)
        for n, entry in enumerate(self._entries):
            key = f"{n}:{entry.model}:{entry.base_url}"
            try:
                self._last[key] = await expand(entry, n)
            except OSError as exc:  # DNS down: keep what it resolved to last time
                log.warning(
                    "cannot resolve %s (%s): keeping its last %d worker(s)",
                    entry.base_url,
                    exc,
                    len(self._last.get(key, [])),
                )
            found += self._last.get(key, [])
        added = self.pool.replace(found)
        if added:
            await asyncio.gather(*(self.pool.check(w) for w in added))
        return added

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="worker-discovery")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let discovery die: the pool keeps its current set
                log.exception("worker discovery round failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
