"""`tokenport languages measure`: the token tax per language, measured on the parallel corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.common import fail, settings

languages_app = typer.Typer(help="Multilingual token economics: the token tax per language.", no_args_is_help=True)


@languages_app.command("measure")
def languages_measure(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="A served model whose tokenizer to measure (repeatable; default: every catalogued model "
        "with a prepared folder).")] = None,
    reference: Annotated[list[str] | None, typer.Option(
        "--reference", help="A reference tokenizer: qwen2.5, qwen3.5, deepseek-v4, llama3, cl100k, o200k, or "
        "NAME=PATH to a tokenizer.json (repeatable; default: every installed one).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    write_premiums: Annotated[Path | None, typer.Option(
        "--write-premiums", help="Also merge the premiums, dated today, into this file "
        "(configs/billing/language_premiums.csv).")] = None,
) -> None:
    """Tokenize the parallel corpus with each tokenizer: tokens per sentence and the premium against English."""
    from metering.reftokenizers import TokenizerUnavailable
    from metering.tokentax_command import measure_command

    s = settings(ctx)
    models = model or [m.name for m in s.catalogue.models
                       if (s.models_dir / m.name.replace("/", "--") / "tokenizer.json").is_file()]
    try:
        text = measure_command(s.models_dir, models, reference or None, fmt, premiums_path=write_premiums)
    except (TokenizerUnavailable, ValueError) as exc:
        fail(str(exc))
    typer.echo(text, nl=False)
