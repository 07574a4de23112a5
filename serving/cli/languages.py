"""`tokenport languages measure`: the token tax per language, measured on the parallel corpus; and
`tokenport reports languages` (registered on the `reports` group): the token tax seen in real traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.common import fail, period, settings, stores

languages_app = typer.Typer(
    help="Multilingual token economics: the token tax per language.", no_args_is_help=True
)


@languages_app.command("measure")
def languages_measure(
    ctx: typer.Context,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="A served model whose tokenizer to measure (repeatable; default: every catalogued model "
            "with a prepared folder).",
        ),
    ] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option(
            "--reference",
            help="A reference tokenizer: qwen2.5, qwen3.5, deepseek-v4, llama3, cl100k, o200k, or "
            "NAME=PATH to a tokenizer.json (repeatable; default: every installed one).",
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    write_premiums: Annotated[
        Path | None,
        typer.Option(
            "--write-premiums",
            help="Also merge the premiums, dated today, into this file "
            "(configs/billing/language_premiums.csv).",
        ),
    ] = None,
) -> None:
    """Tokenize the parallel corpus with each tokenizer: tokens per sentence and the premium against
    English."""
    from metering.reftokenizers import TokenizerUnavailable
    from metering.tokentax_command import measure_command

    s = settings(ctx)
    models = model or [
        m.name
        for m in s.catalogue.models
        if (s.models_dir / m.name.replace("/", "--") / "tokenizer.json").is_file()
    ]
    try:
        text = measure_command(s.models_dir, models, reference or None, fmt, premiums_path=write_premiums)
    except (TokenizerUnavailable, ValueError) as exc:
        fail(str(exc))
    typer.echo(text, nl=False)


def reports_languages(
    ctx: typer.Context,
    period_: Annotated[str, typer.Option("--period", help="A calendar month in UTC, YYYY-MM.")],
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json, csv or html.")] = "json",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Per language and model: requests, tokens, characters, tokens per 1,000 characters and the premium
    against English on the same model, from the ledger (the same report as GET
    /admin/v1/reports/languages)."""
    from metering.language_report import FORMATS, language_report, render

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}")
    text = render(language_report(stores(ctx).usage, period(period_), model=model), fmt)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
