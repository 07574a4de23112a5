"""Language of a request (ISO 639-1), detected offline from a bounded sample of the prompt.

The detector is py3langid's naive Bayes model (it ships inside the PyPI wheel), cut down at load time
to the languages of the markets served (`DEFAULT_LANGUAGES`):

- only those languages' weight columns are kept (py3langid's own `set_languages` copies them and
  keeps the full 142-language matrix too: a third less time, 5 MB more memory);
- byte n-gram features never seen in any of those languages are dropped, and the automaton that
  finds them is rebuilt over the features kept (same longest-match scan), with one column per byte
  class instead of 256 per row: 74 MB of resident model becomes 36 MB. Answers are py3langid's
  after `set_languages` with the same languages (identical on every prefix of the test prompts: a
  dropped feature weighed the same, its class's floor, in every language kept);
- the scan reads the first `SAMPLE_CHARS` (200) characters: one or two sentences of a prompt;
- text whose letters are mostly one unambiguous script (Han without kana, kana, Hangul, Thai) is
  decided by the script alone; Cyrillic, Arabic and Latin text always goes to the model (kk or ru,
  fa or ar, tr or az or en);
- answers are cached per sample (system prompts, retries and agents repeat themselves).

py3langid's class for text without language ("zxx": numbers, symbols, JSON) is kept and answers
"und", and so does most text in scripts no language of the set uses (Georgian, Hebrew, Greek); text
in another language of a script the set uses gets the nearest language of the set (Polish: pt).
"""

from __future__ import annotations

import contextlib
import functools
import unicodedata
from array import array
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported with the model, not with this module
    import numpy as np
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    FloatArray = npt.NDArray[np.float32]

# Markets: China (zh) selling tokens to Central Asia (kk, uz, ky, tg, tk), Russia and its neighbours
# (ru, uk, az), Türkiye (tr), the Gulf and its neighbours (ar, fa, hi), plus the usual languages of
# international business (en, de, fr, es, pt, it, ja, ko, id, ms, vi, th). Every code is ISO 639-1
# and known to py3langid's model.
DEFAULT_LANGUAGES: tuple[str, ...] = (
    "en", "zh", "ru", "uk", "kk", "uz", "ky", "tg", "tk", "az", "tr", "ar", "fa", "hi",
    "de", "fr", "es", "pt", "it", "ja", "ko", "id", "ms", "vi", "th",
)  # fmt: skip
SAMPLE_CHARS = 200
MIN_CHARS = 12
UNDETERMINED = "und"
NO_LANGUAGE = "zxx"  # py3langid's class for text without language (numbers, code, symbols): "und"
CACHE_SIZE = 4096

# Scripts counted on UTF-8 bytes (`data.translate(None, _NOT_X)` keeps the bytes of X): lead bytes
# 0xE0-0xEF start the characters U+0800-U+FFFF, 0xE4-0xE9 the CJK ideographs U+4000-U+9FFF, 0xEA-0xED
# U+A000-U+DFFF (mostly Hangul syllables); E3 81-E3 83 start kana, E0 B8-E0 B9 Thai. "Letters" are
# ASCII letters and every non-ASCII character (punctuation included: it only makes the rule stricter).
_NOT_WIDE = bytes(b for b in range(256) if b < 0xE0 or b > 0xEF)
_NOT_HAN = bytes(b for b in range(256) if b < 0xE4 or b > 0xE9)
_NOT_HANGUL = bytes(b for b in range(256) if b < 0xEA or b > 0xED)
_NOT_LETTER = bytes(b for b in range(256) if not (chr(b).isascii() and chr(b).isalpha()) and b < 0xC0)


class LanguageDetector:
    """Detects the language of a prompt sample among `languages` (default: `DEFAULT_LANGUAGES`)."""

    def __init__(self, languages: Sequence[str] | None = None, cache_size: int = CACHE_SIZE) -> None:
        import numpy as np

        wanted = tuple(dict.fromkeys(DEFAULT_LANGUAGES if languages is None else languages))
        if not wanted:
            raise ValueError("at least one language is needed")
        self.languages = frozenset(wanted) - {NO_LANGUAGE}
        self._table, self._nextmove, self._rowbase, self._output, self._weights, self._prior, labels = _load(
            (*wanted, NO_LANGUAGE)
        )
        self._labels = [UNDETERMINED if label == NO_LANGUAGE else label for label in labels]
        _return_free_memory()
        self._none = len(self._weights) - 1  # what states that end no feature emit: a row of zeros
        self._edge = np.ones(1, dtype=bool)
        self._cached = functools.lru_cache(maxsize=cache_size)(self._detect)

    def detect(self, text: str) -> str:
        """ISO 639-1 code of `text` (only its first `SAMPLE_CHARS` characters are read), or "und"."""
        return self._cached(text[:SAMPLE_CHARS])

    def _detect(self, sample: str) -> str:
        if len(sample.strip()) < MIN_CHARS:
            return UNDETERMINED
        if sample.isupper():
            sample = sample.lower()
        data = unicodedata.normalize("NFC", sample).encode("utf-8", "surrogatepass")
        if not sample.isascii():
            by_script = self._by_script(data)
            if by_script is not None:
                return by_script
        return self._classify(data)

    def _by_script(self, data: bytes) -> str | None:
        """The language when most letters are in a script that only one language of the set uses."""
        wide = data.translate(None, _NOT_WIDE)  # one byte per character in U+0800-U+FFFF
        if not wide:
            return None
        letters = len(data.translate(None, _NOT_LETTER))  # ASCII letters and non-ASCII characters
        han = len(wide.translate(None, _NOT_HAN))
        kana = data.count(b"\xe3\x81") + data.count(b"\xe3\x82") + data.count(b"\xe3\x83")
        if 2 * (han + kana) > letters:
            if 10 * kana >= han + kana:  # kanji with kana; a few kana in Chinese text: ask the model
                lang = "ja"
            elif kana:
                return None
            else:
                lang = "zh"
        elif 2 * len(wide.translate(None, _NOT_HANGUL)) > letters:
            lang = "ko"
        elif 2 * (data.count(b"\xe0\xb8") + data.count(b"\xe0\xb9")) > letters:
            lang = "th"
        else:
            return None
        return lang if lang in self.languages else None

    def _classify(self, data: bytes) -> str:
        """py3langid's naive Bayes: sum over features of log(1 + count) x weight, plus the prior."""
        import numpy as np

        data = data.translate(self._table)
        nextmove, rowbase = self._nextmove, self._rowbase
        state = 0
        states = [state := nextmove[rowbase[state] + byte] for byte in data]
        found = self._output[np.frombuffer(array("q", states), dtype=np.int64)]
        found.sort()
        if found[0] == self._none:  # not one feature
            return UNDETERMINED
        bounds = np.flatnonzero(np.concatenate((self._edge, found[1:] != found[:-1], self._edge)))
        counts = np.log1p(bounds[1:] - bounds[:-1], dtype=np.float32)
        scores = counts @ self._weights.take(found[bounds[:-1]], axis=0) + self._prior
        return self._labels[int(scores.argmax())]


def _load(
    languages: tuple[str, ...],
) -> tuple[bytes, array[int], list[int], IntArray, FloatArray, FloatArray, list[str]]:
    """py3langid's model restricted to `languages`: (byte -> class table, transitions, row offset per
    state, feature per state, weights per feature and class, prior per class, label per class)."""
    import numpy as np
    from py3langid.langid import MODEL_DIR, MODEL_FILE
    from py3langid.modelio import load_model

    ptc, pc, classes, nextmove, row, out = load_model(MODEL_DIR / MODEL_FILE)
    unknown = set(languages) - set(classes)
    if unknown:
        raise ValueError(f"py3langid has no model for {sorted(unknown)}")
    columns = [i for i, c in enumerate(classes) if c in languages]  # a language may have two (scripts)
    weights = np.asarray(ptc[:, columns], dtype=np.float32)
    del ptc
    # A feature at its column's floor in every language kept was never seen in their training text.
    keep = ~(weights == weights.min(axis=0)).all(axis=1)
    rows = np.frombuffer(nextmove, dtype=_dtype(nextmove)).reshape(-1, 256)
    state_row = np.frombuffer(row, dtype=_dtype(row)).astype(np.int64)
    dfa = _prune(rows, state_row, np.asarray(out, dtype=np.int64), keep)
    del rows, nextmove, row, out
    weights = np.concatenate((weights[keep], np.zeros((1, len(columns)), dtype=np.float32)))
    prior = np.asarray(pc, dtype=np.float32)[columns]
    return (*dfa, weights, prior, [str(classes[i]) for i in columns])


def _return_free_memory() -> None:
    """Hand the loader's scratch memory (the full model, freed but kept by glibc's heap) back to the OS."""
    import ctypes

    with contextlib.suppress(AttributeError, OSError, TypeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def _dtype(values: array[int]) -> Any:
    import numpy as np

    return {2: np.uint16, 4: np.uint32, 8: np.uint64}[values.itemsize]


def _levels(depth: IntArray) -> list[IntArray]:
    """The states of each depth, shallowest first."""
    import numpy as np

    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(int(depth.max()) + 2))
    return [order[bounds[d] : bounds[d + 1]] for d in range(len(bounds) - 1)]


def _prune(
    rows: npt.NDArray[Any], state_row: IntArray, out: IntArray, keep: npt.NDArray[np.bool_]
) -> tuple[bytes, array[int], list[int], IntArray]:
    """Rebuild py3langid's feature automaton (Aho-Corasick emitting the longest feature ending at each
    byte) over the features in `keep`. Returns (byte -> class table, transitions (row x class), row
    offset per state, index among the kept features per state, or their count where none ends)."""
    import numpy as np

    n = len(state_row)
    # 1. The trie inside the automaton: breadth first, an edge reaching a state for the first time is a
    #    trie edge (any other edge goes to a state no deeper than the one it leaves).
    depth = np.full(n, -1, dtype=np.int64)
    parent = np.zeros(n, dtype=np.int64)
    label = np.zeros(n, dtype=np.int64)
    depth[0] = 0
    frontier, level = np.zeros(1, dtype=np.int64), 0
    while frontier.size:
        level += 1
        found = []
        for chunk in range(0, frontier.size, 4096):
            sources = frontier[chunk : chunk + 4096]
            targets = rows[state_row[sources]]
            src, byte = np.nonzero(depth[targets] < 0)
            new = targets[src, byte].astype(np.int64)
            depth[new], parent[new], label[new] = level, sources[src], byte
            found.append(new)
        frontier = np.concatenate(found)
    # 2. Each kept feature's own state (the shallowest emitting it), and every prefix of one.
    emitting = np.flatnonzero(out >= 0)
    emitting = emitting[np.lexsort((depth[emitting], out[emitting]))]
    own = emitting[np.r_[True, out[emitting][1:] != out[emitting][:-1]]]
    kept_index = np.cumsum(keep) - 1
    own_feature = np.full(n, -1, dtype=np.int64)
    own_feature[own] = np.where(keep[out[own]], kept_index[out[own]], -1)
    alive = own_feature >= 0
    alive[0] = True
    for nodes in reversed(_levels(depth)[1:]):
        alive[parent[nodes[alive[nodes]]]] = True
    # 3. The kept trie, numbered breadth first; a byte class per byte on an edge, one for all others.
    old = np.flatnonzero(alive)
    old = old[np.argsort(depth[old], kind="stable")]
    new_id = np.full(n, -1, dtype=np.int64)
    new_id[old] = np.arange(old.size)
    depth, label, feature, parent = depth[old], label[old], own_feature[old], new_id[parent[old]]
    del new_id, own_feature, alive
    used = np.unique(label[1:])
    width = used.size + (used.size < 256)
    table = np.full(256, min(used.size, 255), dtype=np.uint8)
    table[used] = np.arange(used.size)
    cls = table[label].astype(np.int64)
    # 4. Aho-Corasick one level at a time: a state's row is its failure state's row with its own
    #    children on top; a leaf shares its failure state's row.
    m = old.size
    has_child = np.zeros(m, dtype=bool)
    has_child[parent[1:]] = True
    has_child[0] = True
    inner = np.flatnonzero(has_child)
    row_of = np.full(m, -1, dtype=np.int64)
    row_of[inner] = np.arange(inner.size)
    narrow = np.uint16 if m <= 1 << 16 else np.uint32
    moves = np.zeros((inner.size, width), dtype=narrow)
    fail = np.zeros(m, dtype=np.int64)
    emits = np.where(feature >= 0, feature, int(keep.sum()))
    levels = _levels(depth)
    for d, nodes in enumerate(levels):
        if d >= 2:
            fail[nodes] = moves[row_of[fail[parent[nodes]]], cls[nodes]]
        if d >= 1:
            inherit = nodes[feature[nodes] < 0]
            emits[inherit] = emits[fail[inherit]]
            leaves = nodes[~has_child[nodes]]
            row_of[leaves] = row_of[fail[leaves]]
            branches = nodes[has_child[nodes]]
            moves[row_of[branches]] = moves[row_of[fail[branches]]]
        if d + 1 < len(levels):
            kids = levels[d + 1]
            moves[row_of[parent[kids]], cls[kids]] = kids
    nextmove = array("H" if narrow is np.uint16 else "I")
    nextmove.frombytes(moves.tobytes())
    return table.tobytes(), nextmove, (row_of * width).tolist(), emits


def prompt_sample(body: Mapping[str, Any]) -> str:
    """The text to detect from: the last user message (chat) or the prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                content = msg.get("content")
                if isinstance(content, str):
                    return content[:SAMPLE_CHARS]
                if isinstance(content, list):
                    parts = [p.get("text", "") for p in content if isinstance(p, dict)]
                    return " ".join(str(p) for p in parts)[:SAMPLE_CHARS]
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:SAMPLE_CHARS]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0][:SAMPLE_CHARS]
    return ""
