"""The token tax: what the same sentences cost in tokens, per language and per tokenizer.

A parallel corpus (`metering/data/parallel_corpus.jsonl`: the same sentences in every language, one
JSON object per sentence: ``{"id", "domain", "text": {language: sentence}}``; provenance in
`metering/data/README.md`) is tokenized with each tokenizer; per (tokenizer, language) the result has
the sentences, tokens, characters and UTF-8 bytes, tokens per sentence, tokens per 1,000 characters,
and the *premium*: tokens of the language divided by tokens of English over the same sentences (only
the sentences present in both count, so a corpus with a missing translation stays comparable).

Everything here is pure: tokenizers come in as objects with ``count(text) -> int`` (a served model's
`metering.tokencount.ModelTokenizer` fits; `metering.reftokenizers` loads the reference ones offline)
and the renderers return text. metering/tokentax_command.py composes them into ``tokenport languages
measure``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

CORPUS_FILE = "parallel_corpus.jsonl"
CORPUS_NAME = "tokenport-parallel-v1"
BASELINE = "en"
# The languages the corpus must carry (issue 15): the markets served, plus hi and ur of the Gulf trade.
REQUIRED_LANGUAGES: tuple[str, ...] = ("en", "zh", "ru", "kk", "uz", "ky", "tg", "ar", "fa", "tr", "ur", "hi")
FORMATS = ("table", "json", "csv")
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")


class TextTokenizer(Protocol):
    """Anything that counts the tokens of a text (no special tokens added)."""

    def count(self, text: str) -> int: ...


class CorpusError(ValueError):
    """A corpus file that cannot be used: where (file, line) and why."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


@dataclass(frozen=True)
class Sentence:
    id: str
    domain: str
    texts: Mapping[str, str]


@dataclass(frozen=True)
class Corpus:
    sentences: tuple[Sentence, ...]
    name: str = CORPUS_NAME

    @property
    def languages(self) -> tuple[str, ...]:
        """Every language of the corpus, in the order of first appearance."""
        seen: dict[str, None] = {}
        for s in self.sentences:
            seen.update(dict.fromkeys(s.texts))
        return tuple(seen)


def load_corpus(path: Path | None = None, name: str | None = None) -> Corpus:
    """The corpus at `path` (default: the one shipped in `metering/data/`), validated."""
    if path is None:
        source = resources.files("metering").joinpath("data", CORPUS_FILE)
        text, label = source.read_text(encoding="utf-8"), CORPUS_FILE
    else:
        text, label = path.read_text(encoding="utf-8"), str(path)
    return parse_corpus(text, label, name or (CORPUS_NAME if path is None else Path(label).stem))


def parse_corpus(text: str, label: str = "<corpus>", name: str = CORPUS_NAME) -> Corpus:
    sentences: list[Sentence] = []
    ids: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CorpusError(label, number, f"not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise CorpusError(label, number, "not a JSON object")
        sid, domain, texts = record.get("id"), record.get("domain", ""), record.get("text")
        if not isinstance(sid, str) or not sid:
            raise CorpusError(label, number, "'id' must be a non-empty string")
        if sid in ids:
            raise CorpusError(label, number, f"duplicate id {sid!r}")
        if not isinstance(domain, str):
            raise CorpusError(label, number, "'domain' must be a string")
        if not isinstance(texts, dict) or not texts:
            raise CorpusError(label, number, "'text' must be an object {language: sentence}")
        for lang, sentence in texts.items():
            if not _LANGUAGE.match(lang):
                raise CorpusError(label, number, f"language {lang!r} is not an ISO 639 code")
            if not isinstance(sentence, str) or not sentence.strip():
                raise CorpusError(label, number, f"sentence {sid!r} in {lang!r} is empty")
        ids.add(sid)
        sentences.append(Sentence(sid, domain, dict(texts)))
    if not sentences:
        raise CorpusError(label, 0, "no sentences")
    return Corpus(tuple(sentences), name)


def _q(value: Decimal, places: str) -> Decimal:
    return value.quantize(Decimal(places), rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Measurement:
    """One tokenizer on one language of the corpus."""

    tokenizer: str
    language: str
    sentences: int
    tokens: int
    characters: int
    utf8_bytes: int
    paired_sentences: int  # sentences present in this language and in the baseline
    paired_tokens: int  # this language's tokens over those sentences
    baseline_tokens: int  # the baseline's tokens over the same sentences

    @property
    def tokens_per_sentence(self) -> Decimal:
        return _q(Decimal(self.tokens) / self.sentences, "0.01") if self.sentences else Decimal(0)

    @property
    def tokens_per_1k_chars(self) -> Decimal:
        return _q(Decimal(self.tokens) * 1000 / self.characters, "0.1") if self.characters else Decimal(0)

    @property
    def premium(self) -> Decimal | None:
        """Tokens of this language / tokens of the baseline, same sentences (None without a baseline)."""
        if not self.baseline_tokens:
            return None
        return _q(Decimal(self.paired_tokens) / self.baseline_tokens, "0.001")


@dataclass(frozen=True)
class MeasureResult:
    corpus: str
    baseline: str
    tokenizers: tuple[str, ...]
    languages: tuple[str, ...]
    rows: tuple[Measurement, ...]

    def get(self, tokenizer: str, language: str) -> Measurement:
        for row in self.rows:
            if row.tokenizer == tokenizer and row.language == language:
                return row
        raise KeyError((tokenizer, language))


def measure(
    tokenizers: Mapping[str, TextTokenizer], corpus: Corpus, baseline: str = BASELINE
) -> MeasureResult:
    """Tokenize every sentence of `corpus` with every tokenizer; premiums against `baseline`."""
    languages = corpus.languages
    rows: list[Measurement] = []
    for name, tok in tokenizers.items():
        counts = [{lang: tok.count(text) for lang, text in s.texts.items()} for s in corpus.sentences]
        for lang in languages:
            present = [(s, c) for s, c in zip(corpus.sentences, counts, strict=True) if lang in s.texts]
            paired = [(s, c) for s, c in present if baseline in s.texts]
            rows.append(
                Measurement(
                    tokenizer=name,
                    language=lang,
                    sentences=len(present),
                    tokens=sum(c[lang] for _, c in present),
                    characters=sum(len(s.texts[lang]) for s, _ in present),
                    utf8_bytes=sum(len(s.texts[lang].encode("utf-8")) for s, _ in present),
                    paired_sentences=len(paired),
                    paired_tokens=sum(c[lang] for _, c in paired),
                    baseline_tokens=sum(c[baseline] for _, c in paired),
                )
            )
    return MeasureResult(corpus.name, baseline, tuple(tokenizers), languages, tuple(rows))


# ---- renderers ---------------------------------------------------------------------------------------

_COLUMNS = (
    "tokenizer",
    "language",
    "sentences",
    "tokens",
    "characters",
    "utf8_bytes",
    "tokens_per_sentence",
    "tokens_per_1000_chars",
    "premium_vs_baseline",
)


def _cells(m: Measurement) -> list[str]:
    premium = m.premium
    return [
        m.tokenizer,
        m.language,
        str(m.sentences),
        str(m.tokens),
        str(m.characters),
        str(m.utf8_bytes),
        str(m.tokens_per_sentence),
        str(m.tokens_per_1k_chars),
        "" if premium is None else str(premium),
    ]


def _grid(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]


def render_table(result: MeasureResult) -> str:
    """A premium matrix (language x tokenizer), then each tokenizer's detail."""
    title = (
        f"Token premium vs {result.baseline} (tokens of the language / tokens of {result.baseline}, "
        f"same sentences; corpus {result.corpus})"
    )
    out = [title, ""]
    matrix = []
    for lang in result.languages:
        row = [lang]
        for tok in result.tokenizers:
            premium = result.get(tok, lang).premium
            row.append("-" if premium is None else f"{premium:.2f}x")
        matrix.append(row)
    out += _grid(["language", *result.tokenizers], matrix)
    for tok in result.tokenizers:
        out += ["", f"{tok}:"]
        body = [_cells(result.get(tok, lang))[1:] for lang in result.languages]
        out += _grid(
            ["language", "sentences", "tokens", "chars", "bytes", "tok/sent", "tok/1k chars", "premium"], body
        )
    return "\n".join(out) + "\n"


def _number(value: Decimal | None) -> Any:
    return None if value is None else float(value)


def render_json(result: MeasureResult) -> str:
    return (
        json.dumps(
            {
                "corpus": result.corpus,
                "baseline": result.baseline,
                "tokenizers": list(result.tokenizers),
                "languages": list(result.languages),
                "measurements": [
                    {
                        "tokenizer": m.tokenizer,
                        "language": m.language,
                        "sentences": m.sentences,
                        "tokens": m.tokens,
                        "characters": m.characters,
                        "utf8_bytes": m.utf8_bytes,
                        "tokens_per_sentence": _number(m.tokens_per_sentence),
                        "tokens_per_1000_chars": _number(m.tokens_per_1k_chars),
                        "premium": _number(m.premium),
                        "paired_sentences": m.paired_sentences,
                    }
                    for m in result.rows
                ],
            },
            ensure_ascii=False,
            indent=2,
        )
        + "\n"
    )


def render_csv(result: MeasureResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_COLUMNS)
    writer.writerows(_cells(m) for m in result.rows)
    return buf.getvalue()


def render(result: MeasureResult, fmt: str) -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "csv":
        return render_csv(result)
    if fmt == "table":
        return render_table(result)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


# ---- the command -----------------------------------------------------------------------------------
