"""The rows that own aggregates (a project, a user): row-locked for the rest of a write's
transaction, and each change to their counts numbered on them (`stats_seq`) and carried by the
write's event as a delta.

In SQLAlchemy Core statements built once, not through the ORM: on this path an ORM
`Session.get(..., with_for_update=True)` cost about 390 us of the API's CPU and an ORM flush of
one UPDATE about 600 us, against 100-130 us for the same statement in Core (BENCHMARKS.md, "A
write in Core statements"); a task's status change made five such statements."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update

from aggregates import Delta
from models import Project, User
from services.uow import UnitOfWork

KINDS = {Project: "project", User: "user"}


@dataclass
class Numbered:
    """A locked row that owns an aggregate, with the number of its last change."""

    model: type
    id: str
    organization_id: str
    seq: int


@functools.cache
def _lock_statement(model: type) -> Any:
    table = model.__table__
    return (select(table.c.organization_id, table.c.stats_seq)
            .where(table.c.id == bindparam("row_id")).with_for_update())


@functools.cache
def _number_statement(model: type) -> Any:
    table = model.__table__
    return update(table).where(table.c.id == bindparam("row_id")).values(
        stats_seq=bindparam("seq"))


def lock_numbered(uow: UnitOfWork, model: type, row_id: str, org_id: str) -> Numbered | None:
    """The row, locked until the transaction ends; None if there is none in `org_id`."""
    row = uow.execute(_lock_statement(model), {"row_id": row_id}).first()
    if row is None or row[0] != org_id:
        return None
    return Numbered(model, row_id, row[0], row[1])


class Numbering:
    """Numbers the changes of one transaction on rows it locked (`lock_numbered`)."""

    def __init__(self, uow: UnitOfWork, org_id: str) -> None:
        self.uow = uow
        self.org_id = org_id
        self.deltas: list[Delta] = []

    def number(self, row: Numbered | None, changes: dict[str, int]) -> None:
        """Change `row`'s counts by `changes` (none for a row that is None: no assignee)."""
        if row is None:
            return
        row.seq += 1
        self.uow.execute(_number_statement(row.model), {"row_id": row.id, "seq": row.seq})
        self.deltas.append(Delta(KINDS[row.model], self.org_id, row.id, row.seq, changes))
