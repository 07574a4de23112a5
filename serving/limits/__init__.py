"""Guardrails for money and abuse: rate limits, budgets held by reservation, per-tenant caps.

policy.py        LimitPolicy / Budget (frozen) and how tenant, key and defaults combine
store.py         the only limits SQL (limit_policies); every change bumps the registry version
cache.py         PolicyCache: every gateway process holds the policies, reloaded within 0.25 s
tokens.py        worst-case prompt token counts (the model's tokenizer, or bytes as an upper bound)
pricing.py       Pricer protocol; the billing price book adapter (money budgets)
backend.py       the admission algorithm on state: token buckets + budget holds; in-process backend
redis_backend.py the same algorithm as atomic Lua scripts, shared by every gateway process
limiter.py       Limiter: admit -> reservation -> settle / release, headers, fail-open/closed
guard.py         the request path's entry point: hostile-input checks, caps, reservation size
http_timeouts.py header/body read timeouts and header size limit (slowloris)
errors.py        429 / 408 / 400 errors specific to limits (subclasses of serving.errors)
wiring.py        build_guardrails(settings, ...): what create_app wires in
"""
