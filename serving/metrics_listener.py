"""The operator's metrics listener: GET /metrics on its own address (gateway.metrics_host/metrics_port,
loopback by default), apart from the public port, because the series carry every tenant's id,
token volumes by country, language and model, and estimated spend.

Started and stopped by the gateway's lifespan (serving/app.py); an ASGI app of one route served by
a second uvicorn server in the same event loop (signals stay with the main server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from starlette.types import Receive, Scope, Send

from metering.metrics import Metrics

log = logging.getLogger("tokenport.gateway")
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsApp:
    """GET /metrics -> the exposition; anything else 404."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            status, body, media = 200, self.metrics.render(), CONTENT_TYPE
        else:
            status, body, media = 404, b"not found: the metrics listener serves GET /metrics\n", b"text/plain"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # the gateway's server owns the signals
        yield


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port as the gateway's listeners bind (SO_REUSEADDR); OSError says why
    it cannot be (the CLI checks its ports with it before starting)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class MetricsListener:
    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        config = uvicorn.Config(
            MetricsApp(metrics),
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            loop="none",
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket
        self.host = host
        self.port = port

    async def start(self) -> None:
        """Bind (an OSError says why it cannot, e.g. the port is taken) and serve in the background."""
        try:
            sock = bind_tcp(self.host, self.port)
        except OSError as exc:
            raise OSError(
                exc.errno, f"the metrics listener cannot bind {self.host}:{self.port} (gateway.metrics_port)"
            ) from exc
        self.port = sock.getsockname()[1]  # the port actually bound (0 = any free port)
        self._sock = sock
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="metrics listener")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the metrics listener stopped during startup")
            await asyncio.sleep(0.01)
        log.info("metrics listener on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
            self._sock.close()
