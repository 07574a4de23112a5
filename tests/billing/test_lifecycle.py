"""billing.lifecycle: every (kind, status, operation) combination, allowed or refused, against the table."""

from __future__ import annotations

import itertools

import pytest

from billing.errors import DocumentStateError
from billing.lifecycle import ISSUED, PENDING, TRANSITIONS, Kind, Op, Status, allowed, transition

I, C = Kind.INVOICE, Kind.CREDIT_NOTE  # noqa: E741  short names keep the transition table readable
D, E, F, V = Status.DRAFT, Status.ERROR, Status.FINALIZED, Status.VOID

# The whole table, written out independently of the module: what each operation may start from.
EXPECTED: dict[tuple[Kind, Status | None, Op], Status | None] = {
    (I, None, Op.SAVE_DRAFT): D,
    (I, D, Op.SAVE_DRAFT): D,
    (I, E, Op.SAVE_DRAFT): D,
    (I, None, Op.RECORD_ERROR): E,
    (I, D, Op.RECORD_ERROR): E,
    (I, E, Op.RECORD_ERROR): E,
    (I, D, Op.DISCARD): None,
    (I, E, Op.DISCARD): None,
    (I, D, Op.FINALIZE): F,
    (I, F, Op.VOID): V,
    (I, V, Op.REISSUE): V,
    (I, F, Op.CREDIT): F,  # a partial credit note: the invoice stays issued
    (C, None, Op.ISSUE): F,
}


@pytest.mark.parametrize(("kind", "status", "op"), list(itertools.product(Kind, [None, *Status], Op)))
def test_every_transition(kind: Kind, status: Status | None, op: Op) -> None:
    key = (kind, status, op)
    assert allowed(kind, status, op) is (key in EXPECTED)
    if key in EXPECTED:
        assert transition(kind, status, op) is EXPECTED[key]
    else:
        with pytest.raises(DocumentStateError) as refused:
            transition(kind, status, op, what="TP-INV-2026-000001")
        assert str(refused.value).startswith("TP-INV-2026-000001: only ")
        assert f"is {status.value if status else 'new'})" in str(refused.value)


def test_table_is_exactly_the_expected_one_and_statuses_partition() -> None:
    assert dict(TRANSITIONS) == EXPECTED
    assert set(Status) == PENDING | ISSUED and not PENDING & ISSUED
    # Nothing leaves an issued status except void, and nothing comes back from void
    # (a re-issue is a new invoice).
    assert {k for k in TRANSITIONS if k[1] in ISSUED} == {
        (I, F, Op.VOID),
        (I, V, Op.REISSUE),
        (I, F, Op.CREDIT),
    }
    assert all(TRANSITIONS[k] is V for k in TRANSITIONS if k[1] is V)


def test_strings_from_the_database_are_accepted() -> None:
    assert transition("invoice", "draft", Op.FINALIZE) is Status.FINALIZED
    with pytest.raises(
        DocumentStateError, match="only a draft can be finalized \\(this invoice is finalized\\)"
    ):
        transition("invoice", "finalized", Op.FINALIZE)
