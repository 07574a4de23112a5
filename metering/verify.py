"""Checking the ledger's hash chain, and a tenant's own downloaded events.

Every stored event carries ``hash = sha256(prev_hash + canonical(event))`` (metering/chain.py) and
the ``prev_hash`` of the event before it (``GENESIS`` for the first). Walking the ledger in ``seq``
order finds the first broken link:

- ``edited``: the event's hash is not the hash of its own content and ``prev_hash``; the row was
  changed after it was written (a token count, a tenant, a timestamp, or the hash itself);
- ``broken_link``: the event's ``prev_hash`` is not the hash of the event before it: an event was
  deleted or inserted here, or events were reordered;
- ``anchor``: an expected (seq, hash) pair recorded earlier (e.g. a published chain head) does not
  match: the history up to it was rewritten, or the tail was cut off.

A chain can only prove what it is anchored to: someone able to rewrite every row and recompute
every hash after an edit leaves a valid chain, which is why chain heads are handed out (usage API,
``tokenport usage verify`` output) and can be checked later with ``--anchor SEQ:HASH``.

A tenant sees only its own events, so it cannot walk the whole chain, but it can recompute the
hash of each of its events from the event's content and ``prev_hash`` (``verify_event_rows``) and
add up its tokens without trusting us.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from metering.chain import GENESIS, chain_hash
from metering.event_codec import canonical_time, codec
from metering.events import UsageEvent
from metering.store_sql import StoredEvent

# The fields a tenant's download carries for each event, in the order the hash covers them.
CANONICAL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UsageEvent))


@dataclass(frozen=True, slots=True)
class Break:
    seq: int | None
    request_id: str | None
    kind: str  # edited | broken_link | anchor
    detail: str

    def describe(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "the ledger"
        rid = f" ({self.request_id})" if self.request_id else ""
        return f"{self.kind} at {where}{rid}: {self.detail}"


@dataclass
class ChainReport:
    events: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    first_break: Break | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    anchors_checked: int = 0
    errors: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "anchors_checked": self.anchors_checked,
            "first_break": None
            if self.first_break is None
            else {
                "seq": self.first_break.seq,
                "request_id": self.first_break.request_id,
                "kind": self.first_break.kind,
                "detail": self.first_break.detail,
            },
        }


def parse_anchor(text: str) -> tuple[int, str]:
    """`SEQ:HASH` -> (seq, hash)."""
    seq, sep, h = text.partition(":")
    if not sep or not seq.strip().isdigit() or len(h.strip()) != 64:
        raise ValueError(f"an anchor is SEQ:HASH (a sequence number and a 64-hex-digit hash), got {text!r}")
    return int(seq), h.strip().lower()


def verify_chain(events: Iterable[StoredEvent], anchors: Mapping[int, str] | None = None) -> ChainReport:
    """Walk events in seq order (the whole ledger, from the first event) and stop at the first break."""
    report = ChainReport()
    pending = dict(anchors or {})
    prev_hash = GENESIS
    prev_seq: int | None = None
    for stored in events:
        e = stored.event
        if stored.prev_hash != prev_hash:
            before = f"the event at seq {prev_seq}" if prev_seq is not None else "the start of the ledger"
            report.first_break = Break(
                stored.seq,
                e.request_id,
                "broken_link",
                f"prev_hash {stored.prev_hash[:16]}… is not the hash of {before} "
                f"({prev_hash[:16]}…): an event was deleted, inserted or reordered here",
            )
            return report
        expected = chain_hash(stored.prev_hash, e)
        if stored.hash != expected:
            report.first_break = Break(
                stored.seq,
                e.request_id,
                "edited",
                f"stored hash {stored.hash[:16]}… is not the hash of the event's content "
                f"({expected[:16]}…): the row was changed after it was written",
            )
            return report
        if stored.seq in pending:
            want = pending.pop(stored.seq)
            report.anchors_checked += 1
            if want != stored.hash:
                report.first_break = Break(
                    stored.seq,
                    e.request_id,
                    "anchor",
                    f"hash {stored.hash[:16]}… differs from the anchor {want[:16]}…: "
                    "the history up to here was rewritten",
                )
                return report
        report.events += 1
        report.prompt_tokens += e.prompt_tokens
        report.cached_prompt_tokens += e.cached_prompt_tokens
        report.completion_tokens += e.completion_tokens
        prev_hash, prev_seq = stored.hash, stored.seq
        report.head_seq, report.head_hash = stored.seq, stored.hash
    for seq, want in sorted(pending.items()):
        kind_detail = (
            "no event with this seq: the ledger was cut off before it"
            if seq > report.head_seq
            else "no event with this seq: it was deleted"
        )
        report.first_break = Break(seq, None, "anchor", f"anchor {want[:16]}…: {kind_detail}")
        return report
    return report


# --- a tenant's download -----------------------------------------------------------------------------
def event_row_hash(row: Mapping[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON array of CANONICAL_FIELDS), from a downloaded row alone."""
    content = orjson.dumps(codec().trim([row[f] for f in CANONICAL_FIELDS]))
    return hashlib.sha256(str(row["prev_hash"]).encode() + content).hexdigest()


def verify_event_rows(rows: Iterable[Mapping[str, Any]]) -> ChainReport:
    """Check every downloaded event's own hash (and that the events come in order) and total the
    tokens. Needs nothing but the rows: this is what a tenant runs to check our totals. The rows'
    position is `tenant_seq` (the tenant API's download) or `seq` (the admin API's)."""
    report = ChainReport()
    prev: Mapping[str, Any] | None = None
    for row in rows:
        pos = "tenant_seq" if "tenant_seq" in row else "seq"
        missing = [f for f in (*CANONICAL_FIELDS, pos, "prev_hash", "hash") if f not in row]
        if missing:
            report.first_break = Break(
                row.get(pos), row.get("request_id"), "edited", f"the row lacks {', '.join(missing)}"
            )
            return report
        expected = event_row_hash(row)
        if expected != row["hash"]:
            report.first_break = Break(
                row[pos],
                row["request_id"],
                "edited",
                f"hash {str(row['hash'])[:16]}… is not the hash of the row's content ({expected[:16]}…)",
            )
            return report
        if prev is not None and (pos not in prev or int(row[pos]) <= int(prev[pos])):
            report.first_break = Break(
                row[pos],
                row["request_id"],
                "broken_link",
                f"{pos} {row[pos]} does not follow {pos} {prev.get(pos)}",
            )
            return report
        report.events += 1
        report.prompt_tokens += int(row["prompt_tokens"])
        report.cached_prompt_tokens += int(row["cached_prompt_tokens"])
        report.completion_tokens += int(row["completion_tokens"])
        report.head_seq, report.head_hash = int(row[pos]), str(row["hash"])
        prev = row
    return report


def event_row(stored: StoredEvent, *, tenant_view: bool = False) -> dict[str, Any]:
    """One event as handed out: every field the hash covers, in canonical form, plus the chain. The
    tenant's view carries the event's position among the tenant's events (`tenant_seq`) instead of
    its ledger position (`seq`), which would tell how many requests other tenants made."""
    position = {"tenant_seq": stored.tenant_seq} if tenant_view else {"seq": stored.seq}
    return {
        **position,
        **codec().canonical_fields(stored.event),
        "recorded_at": canonical_time(stored.recorded_at),
        "prev_hash": stored.prev_hash,
        "hash": stored.hash,
    }
