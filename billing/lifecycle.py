"""The life of a stored billing document, as data: statuses, operations, and which goes where.

::

    invoice:      (none) --save_draft--> draft <--save_draft/record_error--> error
                  draft | error --discard--> (none)
                  draft --finalize--> finalized --void--> void --reissue--> void (+ a new draft, finalized)
    credit note:  (none) --issue--> finalized          (born numbered; never changes)

The store only persists; the service asks `transition` before every write, inside the unit of work
that holds the row lock, so a status is checked exactly once, here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from billing.errors import DocumentStateError


class Kind(enum.StrEnum):
    INVOICE = "invoice"
    CREDIT_NOTE = "credit_note"


class Status(enum.StrEnum):
    DRAFT = "draft"  # built by a run, refreshed by the next run, not numbered
    ERROR = "error"  # a run could not build it: the reason is stored, finalize refuses it
    FINALIZED = "finalized"  # numbered and immutable
    VOID = "void"  # a finalized invoice reversed by its credit note


class Op(enum.StrEnum):
    SAVE_DRAFT = "save_draft"
    RECORD_ERROR = "record_error"
    DISCARD = "discard"
    FINALIZE = "finalize"
    VOID = "void"
    ISSUE = "issue"
    REISSUE = "reissue"  # bill a voided invoice's usage again on a new invoice (the void one stays void)
    CREDIT = "credit"  # a partial credit note: the invoice stays finalized (billing/partial_credit.py)


PENDING: frozenset[Status] = frozenset({Status.DRAFT, Status.ERROR})  # may still change or go away
ISSUED: frozenset[Status] = frozenset({Status.FINALIZED, Status.VOID})  # numbered: bills its events for good

# (kind, current status or None for "no row yet", operation) -> the status after it (None: row deleted).
TRANSITIONS: Mapping[tuple[Kind, Status | None, Op], Status | None] = {
    (Kind.INVOICE, None, Op.SAVE_DRAFT): Status.DRAFT,
    (Kind.INVOICE, None, Op.RECORD_ERROR): Status.ERROR,
    (Kind.INVOICE, Status.DRAFT, Op.SAVE_DRAFT): Status.DRAFT,
    (Kind.INVOICE, Status.DRAFT, Op.RECORD_ERROR): Status.ERROR,
    (Kind.INVOICE, Status.ERROR, Op.SAVE_DRAFT): Status.DRAFT,
    (Kind.INVOICE, Status.ERROR, Op.RECORD_ERROR): Status.ERROR,
    (Kind.INVOICE, Status.DRAFT, Op.DISCARD): None,
    (Kind.INVOICE, Status.ERROR, Op.DISCARD): None,
    (Kind.INVOICE, Status.DRAFT, Op.FINALIZE): Status.FINALIZED,
    (Kind.INVOICE, Status.FINALIZED, Op.VOID): Status.VOID,
    (Kind.INVOICE, Status.VOID, Op.REISSUE): Status.VOID,
    (Kind.INVOICE, Status.FINALIZED, Op.CREDIT): Status.FINALIZED,
    (Kind.CREDIT_NOTE, None, Op.ISSUE): Status.FINALIZED,
}

# What a refusal says: the rule of the operation, in words.
RULES: Mapping[Op, str] = {
    Op.SAVE_DRAFT: "only a pending (draft or error) invoice can be rebuilt",
    Op.RECORD_ERROR: "only a pending (draft or error) invoice can record an error",
    Op.DISCARD: "only a pending (draft or error) invoice can be discarded",
    Op.FINALIZE: "only a draft can be finalized",
    Op.VOID: "only a finalized invoice can be voided",
    Op.ISSUE: "only a new credit note can be issued",
    Op.REISSUE: "only a voided invoice can be re-issued",
    Op.CREDIT: "only a finalized invoice can be credited",
}


def allowed(kind: Kind | str, status: Status | str | None, op: Op) -> bool:
    return (Kind(kind), None if status is None else Status(status), op) in TRANSITIONS


def transition(kind: Kind | str, status: Status | str | None, op: Op, *, what: str = "") -> Status | None:
    """The status after `op`, or DocumentStateError naming the rule and the current status."""
    key = (Kind(kind), None if status is None else Status(status), op)
    if key not in TRANSITIONS:
        now = "new" if status is None else Status(status).value
        prefix = f"{what}: " if what else ""
        raise DocumentStateError(f"{prefix}{RULES[op]} (this {Kind(kind).value.replace('_', ' ')} is {now})")
    return TRANSITIONS[key]
