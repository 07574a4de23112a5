"""The `tokenport` command (`[project.scripts] tokenport = "serving.cli:main"`), one module per group:

    run.py        up, gateway, worker, demo, reconcile
    models.py     models prepare | list, db upgrade
    accounts.py   tenants create | list, keys create | revoke | list
    limits.py     tenants set-limits | top-up | limits, keys set-limits, admin audit | purge-content
    usage.py      usage export | summary | verify
    billing.py    invoices, fx, reports
    languages.py  languages measure, reports languages

Commands use the same application services and JSON shapes as the admin API (serving/services.py,
serving/accounts.py, serving/invoicing.py) and never import the HTTP packages.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from serving.cli import run
from serving.cli.accounts import keys_app, tenants_app
from serving.cli.billing import fx_app, invoices_app, reports_app
from serving.cli.credits import credits_app
from serving.cli.languages import languages_app, reports_languages
from serving.cli.limits import admin_app
from serving.cli.models import db_app, models_app
from serving.cli.usage import usage_app
from serving.settings import ConfigError, Settings, load_settings

__all__ = ["app", "main"]

app = typer.Typer(
    help="Tokenport: sell LLM tokens across borders.", no_args_is_help=True, pretty_exceptions_enable=False
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(help="Settings file (default: configs/tokenport.yaml).", envvar="TOKENPORT_CONFIG"),
    ] = None,
) -> None:
    @cache
    def settings() -> Settings:
        try:
            return load_settings(config)
        except ConfigError as exc:
            Console().print(f"[red]configuration error:[/red] {exc}", highlight=False)
            raise typer.Exit(2) from exc

    ctx.obj = {"settings": settings}


for _typer, _name in (
    (models_app, "models"),
    (tenants_app, "tenants"),
    (keys_app, "keys"),
    (usage_app, "usage"),
    (db_app, "db"),
    (admin_app, "admin"),
    (invoices_app, "invoices"),
    (credits_app, "credits"),
    (fx_app, "fx"),
    (reports_app, "reports"),
    (languages_app, "languages"),
):
    app.add_typer(_typer, name=_name)
reports_app.command("languages")(reports_languages)
app.command()(run.gateway)
app.command()(run.reconcile)
app.command("worker")(run.worker_cmd)
app.command()(run.up)
app.command()(run.demo)


def main() -> None:
    app()
