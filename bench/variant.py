"""Run the gateway with experimental patches, to measure what a suggested change would buy.

    python -m bench.variant --patches langid_off -- gateway --port P --worker MODEL=URL
    python -m bench.run --patches langid_off ...        (the benchmark starts gateways this way)

Nothing here changes the product: each patch monkeypatches one spot in this process only, as a
prototype of a change proposed in bench/results/profile-*.md. The prototypes that were measured and
then built into the product (the ASGI front, reading `receive` directly, the coalescing plain-ASGI
relay, raw sqlite3 ledger appends, the writer thread, synchronous=NORMAL as a setting) were removed
from here with that change (git history: bench/variant.py before 2026-11-24). Patches:

- langid_off     LanguageDetector.detect returns "en" (upper bound of what detection costs)
- labels_cache   prometheus_client `.labels(...)` memoized per metric and label values (the
                 gateway's hot path already caches its children in Metrics.child)
"""

from __future__ import annotations

import sys
from typing import Any

PATCHES: dict[str, Any] = {}


def patch(name: str) -> Any:
    def deco(fn: Any) -> Any:
        PATCHES[name] = fn
        return fn

    return deco


@patch("langid_off")
def _langid_off() -> None:
    from metering.language import LanguageDetector

    LanguageDetector.detect = lambda self, text: "en"  # type: ignore[method-assign]


@patch("labels_cache")
def _labels_cache() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    orig = MetricWrapperBase.labels

    def labels(self: Any, *values: Any, **kw: Any) -> Any:
        if kw:
            return orig(self, *values, **kw)
        cache = self.__dict__.get("_tp_children")
        if cache is None:
            cache = self.__dict__["_tp_children"] = {}
        child = cache.get(values)
        if child is None:
            child = cache[values] = orig(self, *values)
        return child

    MetricWrapperBase.labels = labels  # type: ignore[method-assign]


def main() -> None:
    argv = sys.argv[1:]
    names: list[str] = []
    if argv[:1] == ["--patches"]:
        names = [n for n in argv[1].split(",") if n]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        sys.exit(f"unknown patch(es) {unknown}; known: {', '.join(PATCHES)}")
    for n in names:
        PATCHES[n]()
    from serving.cli import main as cli_main

    sys.argv = ["tokenport", *argv]
    cli_main()


if __name__ == "__main__":
    main()
