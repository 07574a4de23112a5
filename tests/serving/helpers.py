"""Small helpers shared by the gateway tests: raw SSE reading and error-shape checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from tests.conftest import MODEL

if TYPE_CHECKING:
    import httpx2  # the openai SDK's fork of httpx: its errors carry an httpx2.Response

ERROR_KEYS = {"message", "type", "param", "code"}


def chat_body(text: str = "Say hello", /, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def auth(api_key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", **headers}


def request_ids(resp: httpx.Response | httpx2.Response) -> list[str]:
    return resp.headers.get_list("x-request-id")


def assert_openai_error(
    resp: httpx.Response | httpx2.Response,
    status: int,
    *,
    type: str | None = None,
    code: object = ...,
    param: object = ...,
) -> dict[str, Any]:
    """The body is exactly {"error": {"message", "type", "param", "code"}} and one X-Request-Id is set."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"]
    if type is not None:
        assert err["type"] == type, err
    if code is not ...:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    ids = request_ids(resp)
    assert len(ids) == 1 and ids[0].startswith("req_"), resp.headers
    return err


@dataclass
class RawStream:
    status: int
    headers: httpx.Headers
    events: list[dict[str, Any]] = field(default_factory=list)
    raw_events: list[bytes] = field(default_factory=list)
    done: bool = False

    @property
    def request_id(self) -> str:
        ids = self.headers.get_list("x-request-id")
        assert len(ids) == 1
        return ids[0]


async def read_sse(resp: httpx.Response, *, stop_after: int | None = None) -> RawStream:
    """Read `data:` events from a streaming httpx response (optionally only the first few)."""
    out = RawStream(resp.status_code, resp.headers)
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                out.raw_events.append(payload)
                if payload == b"[DONE]":
                    out.done = True
                else:
                    out.events.append(orjson.loads(payload))
            if stop_after is not None and len(out.events) >= stop_after:
                return out
    return out


async def stream_raw(
    http: httpx.AsyncClient,
    api_key: str,
    body: dict[str, Any],
    path: str = "/v1/chat/completions",
    **headers: str,
) -> RawStream:
    async with http.stream("POST", path, json=body, headers=auth(api_key, **headers)) as resp:
        if resp.status_code != 200:
            await resp.aread()
            out = RawStream(resp.status_code, resp.headers)
            out.events.append(resp.json())
            return out
        return await read_sse(resp)
