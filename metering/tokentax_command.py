"""What ``tokenport languages measure`` runs: the served models' and the reference tokenizers over the
parallel corpus (metering/tokentax.py), rendered, and optionally merged into the dated premium file
(metering/language_premiums.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path

from metering import reftokenizers
from metering.clock import utcnow
from metering.language_premiums import write_premiums
from metering.tokentax import FORMATS, TextTokenizer, load_corpus, measure, render


def measure_command(
    models_dir: Path,
    models: Sequence[str],
    references: Sequence[str] | None = None,
    fmt: str = "table",
    corpus_path: Path | None = None,
    premiums_path: Path | None = None,
    measured_on: date | None = None,
) -> str:
    """What ``tokenport languages measure`` prints.

    `models`: served model names whose prepared folder (``models_dir/<name>``) has a tokenizer.json.
    `references`: reference tokenizer names (`metering.reftokenizers.REFERENCES`) or ``NAME=PATH`` to
    a tokenizer.json; None = every built-in reference whose package is installed (the others are
    listed under the table). Raises `reftokenizers.TokenizerUnavailable` for a model or reference
    asked for by name that cannot be loaded, ValueError for an unknown format.
    `premiums_path`: also merge the premiums into that dated premium file (`metering.language_premiums`),
    as measured on `measured_on` (default: today, UTC).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    tokenizers: dict[str, TextTokenizer] = {}
    for model in models:
        tokenizers[model] = reftokenizers.model_tokenizer(models_dir, model)
    skipped: list[str] = []
    if references is None:
        for ref in reftokenizers.REFERENCES:
            try:
                tokenizers[ref.name] = ref.load()
            except reftokenizers.TokenizerUnavailable as exc:
                skipped.append(f"{ref.name}: {exc}")
    else:
        for spec in references:
            name, tok = reftokenizers.load_spec(spec)
            tokenizers[name] = tok
    if not tokenizers:
        raise reftokenizers.TokenizerUnavailable("no tokenizer to measure (name a model or a reference)")
    corpus = load_corpus(corpus_path)
    result = measure(tokenizers, corpus)
    text = render(result, fmt)
    if premiums_path is not None:
        source = f"tokenport languages measure, corpus {corpus.name} ({len(corpus.sentences)} sentences)"
        write_premiums(premiums_path, result, measured_on or utcnow().date(), source)
    if fmt == "table" and skipped:
        text += "\nnot measured (install the `langs` extra: pip install 'tokenport[langs]'):\n"
        text += "".join(f"  {line}\n" for line in skipped)
    return text
