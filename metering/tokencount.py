"""Counting tokens with the model's own tokenizer, for the rare response that carries no usage.

vLLM reports usage on every response (the workers run with --enable-force-include-usage, and the
gateway asks for it on every streamed chunk). When a response still comes back without it, the
gateway never records zero: it counts the tokens itself and marks the event ``estimated``.

- The tokenizer is the prepared model folder's ``tokenizer.json`` (``data/models/<name>/``), read
  with the ``tokenizers`` library; the chat template (``chat_template.jinja`` or the one in
  ``tokenizer_config.json``) is rendered with Jinja2 the way vLLM does, to count a chat prompt.
- Completion tokens: the generated text of each choice, tokenized without special tokens, plus
  one end-of-sequence token for a choice that finished with ``stop`` (vLLM counts it).
- A model without a local folder (a remote ``base_url`` worker serving a model not prepared here):
  completion tokens of a stream are the token chunks relayed (vLLM sends one token per chunk);
  everything else is estimated from its length (about 4 UTF-8 bytes per token). The event is marked
  ``estimated`` either way and counted in ``tokenport_usage_estimated_total``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metering.events import base_endpoint

log = logging.getLogger("tokenport.tokencount")


class ModelTokenizer:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                config = {}
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template = _compile(template) if template else None

    @property
    def encoder(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (shared with the admission counter)."""
        return self._tok

    def count(self, text: str, *, special: bool = False) -> int:
        return len(self._tok.encode(text, add_special_tokens=special).ids)

    def prompt_tokens(self, endpoint: str, body: Mapping[str, Any]) -> int | None:
        if endpoint == "chat.completions":
            messages = body.get("messages")
            if self._template is None or not isinstance(messages, list):
                return None
            try:
                rendered = self._template.render(
                    messages=[_flatten(m) for m in messages],
                    add_generation_prompt=True,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                    tools=body.get("tools"),
                    strftime_now=lambda fmt: datetime.now(UTC).strftime(fmt),
                )
            except Exception as exc:  # noqa: BLE001 - a template error makes the count unknown, not fatal
                log.warning("chat template of %s failed: %s", self.folder.name, exc)
                return None
            return self.count(rendered, special=False)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.count(prompt, special=True)
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, int) for p in prompt):
                return len(prompt)
            total = 0
            for p in prompt:
                if isinstance(p, str):
                    total += self.count(p, special=True)
                elif isinstance(p, list):
                    total += len(p)
            return total
        return None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _flatten(message: Any) -> Any:
    """Text content parts joined into one string, as vLLM hands text-only messages to templates."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = (p.get("text") for p in message["content"] if isinstance(p, dict))
        text = "".join(t for t in parts if isinstance(t, str))  # "text" may be anything a client sent
        return {**message, "content": text}
    return message


def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class TokenCounter:
    """Tokenizers of the catalogued models that have a prepared folder, loaded on first use."""

    def __init__(self, folders: Mapping[str, Path]) -> None:
        self._folders = dict(folders)
        self._loaded: dict[str, ModelTokenizer | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_models_dir(cls, models_dir: Path, models: Iterable[str]) -> TokenCounter:
        return cls({m: models_dir / m.replace("/", "--") for m in models})

    def tokenizer(self, model: str) -> ModelTokenizer | None:
        if model in self._loaded:
            return self._loaded[model]
        with self._lock:
            if model not in self._loaded:
                folder = self._folders.get(model)
                tok: ModelTokenizer | None = None
                if folder is not None and (folder / "tokenizer.json").is_file():
                    try:
                        tok = ModelTokenizer(folder)
                    except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer means "unknown"
                        log.warning("cannot load the tokenizer of %s from %s: %s", model, folder, exc)
                self._loaded[model] = tok
        return self._loaded[model]

    def preload(self) -> None:
        for model in self._folders:
            self.tokenizer(model)

    def completion_tokens(
        self,
        model: str,
        texts: Mapping[int, str],
        finish: Mapping[int, str | None],
        chunks: int | None = None,
    ) -> int:
        """Tokens generated for these choices. Without a tokenizer: the relayed token chunks of a
        stream (vLLM sends one token per chunk), else a byte-length estimate."""
        tok = self.tokenizer(model)
        if tok is None:
            return chunks if chunks is not None else sum(rough_count(t) for t in texts.values())
        return sum(tok.count(t) + (1 if finish.get(i) == "stop" else 0) for i, t in texts.items()) + sum(
            1 for i, r in finish.items() if r == "stop" and i not in texts
        )

    def prompt_tokens(self, model: str, endpoint: str, body: Mapping[str, Any]) -> int:
        """The prompt's tokens: exact with the tokenizer, else a byte-length estimate."""
        endpoint, body = counted_as(base_endpoint(endpoint), body)  # a batch line counts as its route
        tok = self.tokenizer(model)
        exact = None if tok is None else tok.prompt_tokens(endpoint, body)
        return exact if exact is not None else rough_count(prompt_text(endpoint, body))


def rough_count(text: str) -> int:
    """About four bytes of UTF-8 per token (BPE tokenizers on mixed text); never 0 for non-empty text."""
    n = len(text.encode("utf-8"))
    return (n + 3) // 4


def prompt_text(endpoint: str, body: Mapping[str, Any]) -> str:
    if endpoint == "chat.completions":
        parts = []
        for m in body.get("messages") or []:
            m = _flatten(m)
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                parts.append(m["content"])
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return ""


def counted_as(endpoint: str, body: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """An embeddings input is counted as a completion prompt (same shapes), a Responses request as the
    chat messages it becomes; the two original endpoints as they are."""
    if endpoint == "embeddings":
        return "completions", {"prompt": body.get("input")}
    if endpoint == "responses":
        return "chat.completions", {"messages": responses_messages(body), "tools": body.get("tools")}
    return endpoint, body


def responses_messages(body: Mapping[str, Any]) -> list[Any]:
    """The chat messages a Responses request's `instructions` and `input` amount to (for counting only):
    message items keep their role and content (text parts are text), other items (tool calls and their
    outputs) are counted as JSON."""
    messages: list[Any] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and "content" in item:
                messages.append({"role": str(item.get("role") or "user"), "content": item["content"]})
            else:
                messages.append({"role": "tool", "content": None, "item": item})
    return messages
