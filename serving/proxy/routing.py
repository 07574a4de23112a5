"""Which worker of a model takes a request (serving/proxy/pool.py `WorkerPool.pick`).

Load: the requests the gateway has in flight on the worker, or vLLM's own count of running + waiting
requests from its `/metrics` (scraped with each health check), whichever is larger: the worker's
queue also holds requests from other gateway replicas and batch lines. A worker whose KV cache is
nearly full (vLLM's `kv_cache_usage_perc` at or above ``KV_FULL``) counts ``KV_PENALTY`` more: new
requests there would wait for memory or preempt running ones, so both policies go elsewhere while
another worker has room.

Policies (`gateway.routing`):

- ``least_loaded``: the healthy worker with the smallest load.
- ``prefix_affinity`` (cache-aware): requests that share a conversation go to the same worker, so
  vLLM's prefix cache already holds their common prefix. The affinity key is the request's session
  header (`gateway.session_header`, default `x-session-id`), else its `user` (session affinity),
  else the start of its prompt (the first ``PREFIX_CHARS`` characters of the messages, prompt or
  input: a multi-turn chat keeps its system prompt and first turns). Workers are
  ranked by rendezvous hashing of (key, worker id), so adding or removing a worker moves only the keys
  it owned, and the first in that order whose load is within ``LOAD_BOUND`` x the average (+1) takes
  the request; past the bound, least-loaded decides (a hot conversation cannot overload one worker).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Protocol

PREFIX_CHARS = 512
LOAD_BOUND = 1.25  # a preferred worker may carry up to 25 % more than the average (+1) before spilling
_VLLM_GAUGE = re.compile(rb"^vllm:num_requests_(running|waiting)\{[^}]*\} ([0-9.eE+-]+)$", re.MULTILINE)
_VLLM_KV = re.compile(rb"^vllm:(?:kv|gpu)_cache_usage_perc\{[^}]*\} ([0-9.eE+-]+)$", re.MULTILINE)
KV_FULL = 0.95
KV_PENALTY = 1000


class Routable(Protocol):
    id: str
    inflight: int
    queued: int
    kv_usage: float


def load(w: Routable) -> int:
    return max(w.inflight, w.queued) + (KV_PENALTY if w.kv_usage >= KV_FULL else 0)


def vllm_queue(metrics_text: bytes) -> int:
    """Running + waiting requests from a vLLM `/metrics` page (0 when it has none)."""
    return int(sum(float(v) for _kind, v in _VLLM_GAUGE.findall(metrics_text)))


def vllm_kv_usage(metrics_text: bytes) -> float:
    """The fullest KV cache on a vLLM `/metrics` page, 0..1 (0 when it has none)."""
    return max((float(v) for v in _VLLM_KV.findall(metrics_text)), default=0.0)


def affinity_key(body: dict[str, Any], session: str | None = None) -> str | None:
    """The session (the `gateway.session_header` header, else the body's `user`) or the start of the
    prompt; None when the request has none of them."""
    if session:
        return "session:" + session[:256]
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [str(p.get("text", "")) for p in content if isinstance(p, dict)]
            if sum(map(len, parts)) >= PREFIX_CHARS:
                break
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            parts.append(value[0])
    text = "\n".join(parts)[:PREFIX_CHARS]
    return "prefix:" + text if text else None


def _score(key: str, worker_id: str) -> bytes:
    return hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8).digest()


def choose(workers: Sequence[Routable], key: str | None) -> Routable:
    """The worker for a request among healthy `workers` (not empty); see the module docstring."""
    if key is None or len(workers) == 1:
        return min(workers, key=load)
    average = sum(load(w) for w in workers) / len(workers)
    for w in sorted(workers, key=lambda w: _score(key, w.id), reverse=True):
        if load(w) <= LOAD_BOUND * average + 1:
            return w
    return min(workers, key=load)
