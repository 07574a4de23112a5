"""Launching and supervising vLLM worker processes.

Each launched worker runs `settings.workers.command` (by default `python -m
vllm.entrypoints.openai.api_server`) on loopback, in its own session (so a terminal's Ctrl-C reaches
only us), with its output in data/logs/worker-<id>.log. A worker that exits is reported and
restarted with exponential back-off; stop() terminates all of them (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from serving.settings import ModelSpec, Settings, WorkerSpec
from serving.workers.prepare import model_location

log = logging.getLogger("tokenport.workers")
METERING_FLAGS = ("--enable-force-include-usage", "--enable-prompt-tokens-details")
EMBEDDING_FLAGS = ("--runner", "pooling", "--convert", "embed")  # vLLM's pooling runner: /v1/embeddings


def worker_command(settings: Settings, model: ModelSpec, worker: WorkerSpec) -> list[str]:
    assert worker.port is not None
    return [
        *settings.workers.command,
        "--model",
        model_location(settings.models_dir, model),
        "--served-model-name",
        model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(worker.port),
        "--dtype",
        model.dtype,
        "--max-model-len",
        str(model.max_model_len),
        *METERING_FLAGS,
        *(EMBEDDING_FLAGS if model.kind == "embedding" else ()),
        *(
            ("--enable-auto-tool-choice", "--tool-call-parser", model.tool_call_parser)
            if model.tool_call_parser and model.kind == "generate"
            else ()
        ),
        *model.worker_args,
    ]


@dataclass
class ManagedWorker:
    model: ModelSpec
    spec: WorkerSpec
    command: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    healthy: bool = False
    history: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(
        self, settings: Settings, only_model: str | None = None, report: Callable[[str], None] = print
    ) -> None:
        self.settings = settings
        self.report = report
        self.workers = [
            ManagedWorker(m, w, worker_command(settings, m, w), settings.logs_dir / f"worker-{w.id}.log")
            for m in settings.catalogue.models
            for w in m.workers
            if w.launched and (only_model is None or m.name == only_model)
        ]
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def _spawn(self, w: ManagedWorker) -> None:
        w.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.workers.env}
        logf = open(w.log_path, "ab")  # noqa: SIM115, ASYNC230 - handed to the child; opening is instant
        try:
            w.process = await asyncio.create_subprocess_exec(
                *w.command, stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            logf.close()
        w.started_at = time.monotonic()
        w.healthy = False

    async def start(self) -> None:
        for w in self.workers:
            self.report(
                f"starting worker {w.spec.id} for {w.model.name} on 127.0.0.1:{w.spec.port} "
                f"(log: {w.log_path})"
            )
            await self._spawn(w)
            self._tasks.append(asyncio.create_task(self._watch(w), name=f"watch-{w.spec.id}"))

    async def wait_healthy(
        self, timeout_s: float | None = None, progress: Callable[[ManagedWorker, float], None] | None = None
    ) -> None:
        deadline = time.monotonic() + (timeout_s or self.settings.workers.start_timeout_s)
        async with aiohttp.ClientSession() as session:
            while not all(w.healthy for w in self.workers):
                if time.monotonic() > deadline:
                    bad = [w.spec.id for w in self.workers if not w.healthy]
                    raise TimeoutError(
                        f"worker(s) {', '.join(bad)} not healthy in time; see {self.settings.logs_dir}"
                    )
                for w in self.workers:
                    if w.healthy:
                        continue
                    if w.process is not None and w.process.returncode is not None and w.restarts == 0:
                        raise RuntimeError(
                            f"worker {w.spec.id} exited with code {w.process.returncode} "
                            f"during start-up; last lines of {w.log_path}:\n{tail(w.log_path)}"
                        )
                    try:
                        async with session.get(
                            w.spec.url() + "/health", timeout=aiohttp.ClientTimeout(total=2)
                        ) as r:
                            w.healthy = r.status == 200
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        pass
                    if progress is not None:
                        progress(w, time.monotonic() - w.started_at)
                await asyncio.sleep(1.0)

    async def _watch(self, w: ManagedWorker) -> None:
        backoff = 1.0
        while not self._stopping:
            assert w.process is not None
            code = await w.process.wait()
            if self._stopping:
                return
            w.history.append(code)
            w.healthy = False
            ran = time.monotonic() - w.started_at
            if ran > 300:
                backoff = 1.0
            self.report(
                f"worker {w.spec.id} exited with code {code} after {ran:.0f}s; "
                f"restarting in {backoff:.0f}s (log: {w.log_path})"
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.workers.restart_backoff_max_s)
            if self._stopping:
                return
            w.restarts += 1
            await self._spawn(w)

    async def stop(self, grace_s: float = 20.0) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        procs = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for p in procs:
            _signal_group(p.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), grace_s)
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    _signal_group(p.pid, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
