"""Language of a request (ISO 639-1), detected offline from a bounded sample of the prompt."""

from __future__ import annotations

from typing import Any

SAMPLE_CHARS = 400
MIN_CHARS = 12
UNDETERMINED = "und"


class LanguageDetector:
    """py3langid (its model ships inside the PyPI wheel); loaded once, used on the first 400 chars."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        self._ident = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=False)

    def detect(self, text: str) -> str:
        sample = text[:SAMPLE_CHARS]
        if len(sample.strip()) < MIN_CHARS:
            return UNDETERMINED
        lang, _score = self._ident.classify(sample)
        return str(lang)


def prompt_sample(body: dict[str, Any]) -> str:
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
