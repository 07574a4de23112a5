"""What every `tokenport` command group shares: the settings, the stores (opened once per command),
errors printed and turned into exit codes, and the `--json` option."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from metering.clock import InvalidPeriod, Period
from serving.dates import InvalidTime
from serving.services import Stores, open_stores
from serving.settings import Settings

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
err_console = Console(stderr=True)


def settings(ctx: typer.Context) -> Settings:
    s: Settings = ctx.obj["settings"]()
    return s


def stores(ctx: typer.Context) -> Stores:
    """The stores and services over the configured database, migrated (once per command)."""
    cached: Stores | None = ctx.obj.get("stores")
    if cached is None:
        cached = ctx.obj["stores"] = open_stores(settings(ctx))
    return cached


def fail(message: str, code: int = 2, console: Console | None = None) -> NoReturn:
    (console or Console()).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def arg(fn: Callable[[], T]) -> T:
    """An option read with serving/dates.py or Period: exit 2 with the message when it is invalid."""
    try:
        return fn()
    except (InvalidTime, InvalidPeriod) as exc:
        fail(str(exc), 2, err_console)


def period(text: str) -> Period:
    return arg(lambda: Period.parse(text))


def emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
