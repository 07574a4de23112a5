"""Turns py-spy's collapsed stacks (`py-spy record --format raw`) into "where the microseconds go".

Each line of the raw format is `frame;frame;...;leaf COUNT`, a frame being `function (file:line)`.
Three views, all as shares of the samples (py-spy records only while a thread runs Python, so idle
time is not in them), converted to microseconds per request with the CPU per request measured
without the profiler:
- own time by function (the leaf frame);
- time by layer (the leaf's package: uvicorn, starlette, pydantic, aiohttp, SQLAlchemy, ...);
- time by Tokenport call site: each sample charged to the innermost frame in serving/ or metering/,
  i.e. what each line of our code costs including the libraries it calls.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

# Layer of a frame, by the top-level package of its file (py-spy prints paths relative to sys.path).
LAYERS: dict[str, str] = {}
for _layer, _pkgs in (
    ("tokenport serving/", ("serving",)),
    ("tokenport metering/", ("metering",)),
    ("uvicorn + httptools (HTTP server)", ("uvicorn", "httptools")),
    ("starlette + fastapi + anyio (routing, middleware, responses)", ("starlette", "fastapi", "anyio")),
    ("pydantic (validation)", ("pydantic", "pydantic_core")),
    (
        "aiohttp + yarl + multidict (upstream client)",
        ("aiohttp", "yarl", "multidict", "propcache", "aiohappyeyeballs"),
    ),
    ("SQLAlchemy + sqlite3 (ledger commit, key refresh)", ("sqlalchemy", "sqlite3")),
    ("prometheus_client (metrics)", ("prometheus_client",)),
    ("py3langid + numpy (language detection)", ("py3langid", "numpy")),
    (
        "asyncio + uvloop + threads (event loop, to_thread)",
        ("asyncio", "uvloop", "concurrent", "threading", "queue", "selectors", "_weakrefset", "weakref"),
    ),
    ("orjson", ("orjson",)),
):
    for _p in _pkgs:
        LAYERS[_p] = _layer
STDLIB = "stdlib (uuid, hmac, datetime, dataclasses, enum, contextlib, ...)"


def layer_of(path: str) -> str:
    if path.startswith("<"):
        return "generated code (dataclass __init__ etc.)"
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    top = path.split("/", 1)[0].removesuffix(".py")
    if top in LAYERS:
        return LAYERS[top]
    if top in sys.stdlib_module_names or "/python3" in path:
        return STDLIB
    return "other: " + top


def is_ours(path: str) -> bool:
    return path.startswith(("serving/", "metering/")) or (
        "/work/" in path and ("/serving/" in path or "/metering/" in path)
    )


def short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        i = path.find(marker)
        if i >= 0:
            return path[i + len(marker) :]
    return path


@dataclass
class Profile:
    samples: int = 0
    own: Counter[str] = field(default_factory=Counter)
    layers: Counter[str] = field(default_factory=Counter)
    call_sites: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


def parse(raw: str) -> Profile:
    prof = Profile()
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = []
        for f in stack.split(";"):
            m = FRAME.match(f)
            if m is None:
                frames.append((f, "", ""))  # process / thread pseudo-frames
            else:
                frames.append((m["func"], m["file"], m["line"] or ""))
        frames = [fr for fr in frames if fr[1]]
        if not frames:
            continue
        prof.samples += count
        func, path, _lineno = frames[-1]
        prof.own[f"{func} ({short(path)})"] += count
        prof.layers[layer_of(path)] += count
        site = next((fr for fr in reversed(frames) if is_ours(fr[1])), None)
        prof.call_sites[
            "(no Tokenport frame: server, loop, ledger thread)"
            if site is None
            else f"{site[0]} ({short(site[1])}:{site[2]})"
        ] += count
        seen = set()
        for func_, path_, _ in frames:
            if is_ours(path_):
                key = f"{func_} ({short(path_)})"
                if key not in seen:
                    seen.add(key)
                    prof.inclusive[key] += count
    return prof


def table(counter: Counter[str], total: int, us_per_req: float | None, top: int, title: str) -> list[str]:
    head = f"| {title} | share | ~µs/request |" if us_per_req else f"| {title} | share |"
    out = [head, "| --- | ---: | ---: |" if us_per_req else "| --- | ---: |"]
    for name, n in counter.most_common(top):
        share = n / total if total else 0.0
        name_md = name.replace("|", "\\|")
        if us_per_req:
            out.append(f"| `{name_md}` | {share:6.1%} | {share * us_per_req:7.1f} |")
        else:
            out.append(f"| `{name_md}` | {share:6.1%} |")
    return out


def report(prof: Profile, *, us_per_req: float | None, title: str, top: int = 25) -> list[str]:
    lines = [
        f"### {title}",
        "",
        f"{prof.samples} samples with the GIL held"
        + (f"; µs = share × {us_per_req:.0f} µs CPU per request (clean run)." if us_per_req else "."),
        "",
    ]
    lines += ["By layer (own time of the innermost frame):", ""]
    lines += [*table(prof.layers, prof.samples, us_per_req, 20, "layer"), ""]
    lines += [
        (
            "By Tokenport call site (each sample charged to the innermost serving/ or metering/ frame, "
            "so library time is charged to the line of our code that called it):"
        ),
        "",
    ]
    lines += [*table(prof.call_sites, prof.samples, us_per_req, top, "call site"), ""]
    lines += ["Tokenport functions, inclusive:", ""]
    lines += [*table(prof.inclusive, prof.samples, us_per_req, 20, "function"), ""]
    lines += [f"Top {top} functions by own time:", ""]
    lines += [*table(prof.own, prof.samples, us_per_req, top, "function"), ""]
    return lines


def load(path: Path) -> Profile:
    return parse(path.read_text(encoding="utf-8", errors="replace"))
