"""A slow fake vLLM worker for the open-streams memory test: nginx cannot drip a body, this can.

`python -m bench.slow_upstream --port P [--interval 0.5] [--chunks 240]` answers every POST with a
vLLM-shaped SSE stream (continuous usage) that sends one content chunk every `interval` seconds, and
`GET /health` with 200. Streams stay open for about interval * chunks seconds unless the client leaves.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from bench import fake


def make_app(interval: float, chunks: int) -> web.Application:
    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="")

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await resp.write(fake.sse_role_chunk().encode())
            for i in range(chunks):
                await asyncio.sleep(interval)
                await resp.write(fake.sse_content_chunk(i, last=i == chunks - 1).encode())
            await resp.write(fake.sse_tail(chunks).encode())
        except ConnectionResetError:  # the client (the gateway) went away
            pass
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--chunks", type=int, default=240)
    a = p.parse_args()
    web.run_app(
        make_app(a.interval, a.chunks),
        host="127.0.0.1",
        port=a.port,
        print=None,
        backlog=4096,
        access_log=None,
        handle_signals=True,
    )


if __name__ == "__main__":
    main()
