"""Cache-aware routing (issue 14): a conversation's requests stay on one worker (rendezvous hashing of
its prompt prefix or `user`), a hot one spills over past the load bound, a worker leaving moves only
its own conversations; vLLM's own queue counts as load."""

from __future__ import annotations

from dataclasses import dataclass

from serving.proxy import routing
from serving.proxy.pool import Worker, WorkerPool


@dataclass
class W:
    id: str
    inflight: int = 0
    queued: int = 0
    kv_usage: float = 0.0


def chat(system: str, *turns: str) -> dict[str, object]:
    msgs = [{"role": "system", "content": system}] + [{"role": "user", "content": t} for t in turns]
    return {"model": "m", "messages": msgs}


def test_a_conversation_keeps_its_worker_and_conversations_spread() -> None:
    workers = [W("a"), W("b"), W("c")]
    long = "You are a support agent for Almaty Trade LLP. " * 20
    first = routing.choose(workers, routing.affinity_key(chat(long + "conv-1", "hello")))
    later = routing.choose(workers, routing.affinity_key(chat(long + "conv-1", "hello", "and then?")))
    assert first is later  # the same prefix (the first 512 characters) on the same worker
    owners = {routing.choose(workers, routing.affinity_key(chat(f"conv-{i} " + long))).id for i in range(30)}
    assert owners == {"a", "b", "c"}  # different conversations use every worker
    assert routing.affinity_key({"model": "m", "user": "u-42", "messages": []}) == "user:u-42"
    assert routing.affinity_key({"model": "m", "input": "hi"}) == "prefix:hi"
    assert routing.affinity_key({"model": "m"}) is None


def test_the_load_bound_spills_a_hot_conversation_and_removal_moves_only_its_keys() -> None:
    workers = [W("a"), W("b")]
    key = "prefix:hot"
    owner = routing.choose(workers, key)
    owner.inflight = 10  # far above the average (+1) x 1.25
    assert routing.choose(workers, key) is not owner
    owner.inflight = 0
    other = next(w for w in workers if w is not owner)
    other.queued = 7  # vLLM's own queue (other replicas' requests) counts as load
    assert routing.choose(workers, None) is owner
    keys = [f"prefix:k{i}" for i in range(200)]
    three = [W("a"), W("b"), W("c")]
    before = {k: routing.choose(three, k).id for k in keys}
    after = {k: routing.choose([w for w in three if w.id != "c"], k).id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "c" for k in moved)  # only the removed worker's keys moved


def test_vllm_queue_is_read_from_its_metrics() -> None:
    page = (
        b'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        b'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 9.0\n'
    )
    assert routing.vllm_queue(page) == 5 and routing.vllm_queue(b"") == 0
    kv = b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.97\n'
    assert routing.vllm_kv_usage(page + kv) == 0.97 and routing.vllm_kv_usage(page) == 0.0


def test_a_worker_with_a_full_kv_cache_is_avoided_while_another_has_room() -> None:
    full, roomy = W("full", kv_usage=0.97), W("roomy", inflight=3)
    assert routing.choose([full, roomy], None) is roomy  # least loaded: 3 in flight beats a full cache
    key = next(
        k
        for k in (f"user:{i}" for i in range(100))
        if routing.choose([W("full"), W("roomy")], k).id == "full"
    )
    assert routing.choose([full, roomy], key) is roomy  # its affinity worker is full: it spills
    assert routing.choose([full], key) is full  # alone, it still serves (vLLM queues)


def test_the_pool_uses_the_policy() -> None:
    ws = [Worker("w1", "m", "http://a", "r", healthy=True), Worker("w2", "m", "http://b", "r", healthy=True)]
    affinity = WorkerPool(ws, routing="prefix_affinity")
    key = routing.affinity_key(chat("a long shared system prompt"))
    assert len({affinity.pick("m", key=key).id for _ in range(5)}) == 1
    ws[0].inflight, ws[1].inflight = 3, 0
    least = WorkerPool(ws, routing="least_loaded")
    assert least.pick("m", key=key).id == "w2"
