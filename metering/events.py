"""The usage event: one immutable fact per request, keyed by its request id.

This dataclass is the one definition of what an event holds. Its field order is the order the hash
covers (metering/chain.py) and the column order of `usage_events`; every form of an event (database
row, canonical hash form, spool JSON, export) is derived from it by metering/event_codec.py, and the
`usage_events` columns by metering/schema.py. Adding a field means adding it here (with its
`max_length` when it is text) and a migration; tests/metering/test_event_codec.py checks that every
codec carries every field.

Token counts follow OpenAI's usage object: ``prompt_tokens`` *includes* ``cached_prompt_tokens``.
Billing and metrics split them into three token types that add up to the total:
``input`` (prompt minus cached), ``cached_input`` and ``output``; an embeddings request
(``endpoint == "embeddings"``) has only ``embedding_input`` (all its prompt tokens), priced apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


# (str, Enum), not StrEnum: str() and format() of the members keep their long-standing form.
class Outcome(str, enum.Enum):  # noqa: UP042
    OK = "ok"
    CLIENT_CANCELLED = "client_cancelled"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"


class TokenType(str, enum.Enum):  # noqa: UP042  as Outcome
    INPUT = "input"
    CACHED_INPUT = "cached_input"
    OUTPUT = "output"
    EMBEDDING_INPUT = "embedding_input"


TOKEN_TYPES: tuple[TokenType, ...] = (
    TokenType.INPUT,
    TokenType.CACHED_INPUT,
    TokenType.OUTPUT,
    TokenType.EMBEDDING_INPUT,
)
EMBEDDINGS = "embeddings"  # the `endpoint` of an embeddings request

# A line of a Batch API batch (serving/batches/) is metered under its route's endpoint with this
# prefix ("batch.chat.completions"), so billing prices it at the book's batch discount.
BATCH_PREFIX = "batch."


def is_batch(endpoint: str) -> bool:
    return endpoint.startswith(BATCH_PREFIX)


def base_endpoint(endpoint: str) -> str:
    """The route's endpoint of an event's `endpoint` ("batch.chat.completions" -> "chat.completions")."""
    return endpoint.removeprefix(BATCH_PREFIX)


def width(max_length: int) -> dict[str, Any]:
    """Field metadata of a text field: at most `max_length` characters (its database column's width)."""
    return {"max_length": max_length}


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEvent:
    # The order of the fields is the order of the canonical hash form: never reorder them; a new
    # field goes at the end (and changes the hash of the events that carry it, not of the old ones).
    request_id: str = field(metadata=width(64))
    tenant_id: str = field(metadata=width(64))
    key_id: str = field(metadata=width(32))
    model: str = field(metadata=width(128))
    endpoint: str = field(default="chat.completions", metadata=width(32))
    origin_country: str = field(metadata=width(2))
    origin_source: str = field(default="tenant", metadata=width(16))
    language: str | None = field(default=None, metadata=width(8))
    serving_region: str | None = field(default=None, metadata=width(64))
    worker_id: str | None = field(default=None, metadata=width(64))
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    stream: bool
    outcome: Outcome = field(metadata=width(24))
    estimated: bool = False
    started_at: datetime
    finished_at: datetime
    # Text size of what the tokens were counted from, never the text (None: recorded before they existed).
    prompt_chars: int | None = None  # characters of the prompt's text (messages' text content, or prompt)
    prompt_bytes: int | None = None  # its UTF-8 bytes
    completion_chars: int | None = None  # characters of the text generated (a cut stream: what was relayed)
    completion_bytes: int | None = None

    @property
    def input_tokens(self) -> int:
        """Prompt tokens not served from the prefix cache."""
        return self.prompt_tokens - self.cached_prompt_tokens

    def tokens_by_type(self) -> dict[TokenType, int]:
        if self.endpoint == EMBEDDINGS:
            return {TokenType.EMBEDDING_INPUT: self.prompt_tokens}
        return {
            TokenType.INPUT: self.input_tokens,
            TokenType.CACHED_INPUT: self.cached_prompt_tokens,
            TokenType.OUTPUT: self.completion_tokens,
        }
