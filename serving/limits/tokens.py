"""Worst-case prompt token counts for admission, before the request reaches a worker.

With the model's own tokenizer (`<data_dir>/models/<model>/tokenizer.json`, via the `tokenizers`
library) each piece of the prompt is counted exactly and a fixed allowance is added for what the chat
template wraps around it (per message and per request); tool definitions get a 25 % margin because
templates re-render their JSON. Without a tokenizer, the UTF-8 byte length of the same pieces is used:
a byte-level BPE token always covers at least one byte, so bytes are an upper bound (a generous one,
about 4x for English). Either way the count is only used to hold budget and to check the prompt
length cap; the ledger always records the worker's own counts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from metering.tokencount import TokenCounter, responses_messages

log = logging.getLogger("tokenport.limits")

PER_MESSAGE = 8  # role markers and separators the chat template adds around each message
PER_REQUEST = 16  # BOS, system preamble and the assistant prefix
PER_PROMPT = 2  # completions: BOS/EOS around a raw prompt
BIG = 16_384  # prompts larger than this (bytes) are tokenized in a thread


@dataclass(frozen=True, slots=True)
class PromptCount:
    tokens: int  # worst case for the whole request, prompt side
    prompts: int  # how many prompts (completions can take a batch); completion budget is per prompt
    exact: bool  # counted with the model's tokenizer (else bytes)


def _text_pieces(body: dict[str, Any]) -> tuple[list[str], list[str], int]:
    """(text pieces, JSON pieces that get a margin, number of messages) of a chat request."""
    texts: list[str] = []
    structured: list[str] = []
    messages = body.get("messages") or []
    for m in messages:
        if not isinstance(m, dict):
            structured.append(orjson.dumps(m).decode())
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str) and len(part) <= 2:
                    texts.append(part["text"])
                else:
                    structured.append(orjson.dumps(part).decode())
        elif content is not None:
            structured.append(orjson.dumps(content).decode())
        rest = {k: v for k, v in m.items() if k not in ("content", "role")}
        if rest:
            structured.append(orjson.dumps(rest).decode())
    for field in ("tools", "functions"):
        if body.get(field):
            structured.append(orjson.dumps(body[field]).decode())
    return texts, structured, len(messages)


class PromptCounter:
    def __init__(self, models_dir: Path, shared: TokenCounter | None = None) -> None:
        self._dir = models_dir
        self._shared = shared  # the gateway's tokenizers, so each model's is loaded once per process
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, model: str) -> Any:
        if self._shared is not None:
            found = self._shared.tokenizer(model)
            return None if found is None else found.encoder
        if model not in self._tokenizers:
            self._tokenizers[model] = self._load(model)
        return self._tokenizers[model]

    def _load(self, model: str) -> Any:
        path = self._dir / model / "tokenizer.json"
        if "/" in model or ".." in model or not path.is_file():
            return None
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a broken tokenizer file falls back to bytes
            log.warning("tokenizer for %s unusable (%s); counting bytes", model, exc)
            return None

    def _lengths(self, model: str, pieces: list[str]) -> tuple[list[int], bool]:
        tok = self.tokenizer(model)
        if tok is None or not pieces:
            return [len(p.encode("utf-8", "surrogatepass")) for p in pieces], tok is not None
        return [len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False)], True

    def count_chat(self, model: str, body: dict[str, Any]) -> PromptCount:
        texts, structured, n_messages = _text_pieces(body)
        plain, exact = self._lengths(model, texts)
        framed, _ = self._lengths(model, structured)
        tokens = sum(plain) + sum(n + (n + 3) // 4 for n in framed) + PER_MESSAGE * n_messages + PER_REQUEST
        return PromptCount(tokens=tokens, prompts=1, exact=exact)

    def count_completion(self, model: str, body: dict[str, Any]) -> PromptCount:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list):
            prompts = prompt
        else:
            prompts = [orjson.dumps(prompt).decode()]
        texts = [p for p in prompts if isinstance(p, str)]
        ids = [len(p) for p in prompts if isinstance(p, list)]
        lengths, exact = self._lengths(model, texts)
        suffix = body.get("suffix")
        extra, _ = self._lengths(model, [suffix] if isinstance(suffix, str) else [])
        tokens = sum(lengths) + sum(ids) + sum(extra) + PER_PROMPT * max(1, len(prompts))
        return PromptCount(tokens=tokens, prompts=max(1, len(prompts)), exact=exact)

    def count_embedding(self, model: str, body: dict[str, Any]) -> PromptCount:
        """An embeddings input has the shapes of a completion prompt (text, texts, token ids)."""
        return self.count_completion(model, {"prompt": body.get("input")})

    def count_responses(self, model: str, body: dict[str, Any]) -> PromptCount:
        """A Responses input (text or items) and its instructions, counted as the chat messages they
        become."""
        return self.count_chat(model, {"messages": responses_messages(body), "tools": body.get("tools")})

    async def count(self, model: str, endpoint: str, body: dict[str, Any], size_hint: int) -> PromptCount:
        fn = {
            "chat.completions": self.count_chat,
            "embeddings": self.count_embedding,
            "responses": self.count_responses,
        }.get(endpoint, self.count_completion)
        if size_hint > BIG:
            return await asyncio.to_thread(fn, model, body)
        return fn(model, body)
