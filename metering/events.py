"""The usage event: one immutable fact per request, keyed by its request id.

Token counts follow OpenAI's usage object: ``prompt_tokens`` *includes* ``cached_prompt_tokens``.
Billing and metrics split them into three token types that add up to the total:
``input`` (prompt minus cached), ``cached_input`` and ``output``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Outcome(str, enum.Enum):
    OK = "ok"
    CLIENT_CANCELLED = "client_cancelled"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"


class TokenType(str, enum.Enum):
    INPUT = "input"
    CACHED_INPUT = "cached_input"
    OUTPUT = "output"


TOKEN_TYPES: tuple[TokenType, ...] = (TokenType.INPUT, TokenType.CACHED_INPUT, TokenType.OUTPUT)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    origin_country: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    stream: bool
    outcome: Outcome
    started_at: datetime
    finished_at: datetime
    endpoint: str = "chat.completions"
    origin_source: str = "tenant"
    language: str | None = None
    serving_region: str | None = None
    worker_id: str | None = None
    estimated: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def input_tokens(self) -> int:
        """Prompt tokens not served from the prefix cache."""
        return self.prompt_tokens - self.cached_prompt_tokens

    def tokens_by_type(self) -> dict[TokenType, int]:
        return {
            TokenType.INPUT: self.input_tokens,
            TokenType.CACHED_INPUT: self.cached_prompt_tokens,
            TokenType.OUTPUT: self.completion_tokens,
        }
