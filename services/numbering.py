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
from typing import Any, Callable

from sqlalchemy import Result, bindparam, func, select, update

from aggregates import Delta
from models import Project, User
from services.uow import UnitOfWork

KINDS = {Project: "project", User: "user"}


@dataclass
class Numbered:
    """A locked row that owns an aggregate, with the number of its last change. `taken`: the
    lock itself took that number (`lock_numbered(..., take=True)`), for a change not yet told."""

    model: type
    id: str
    organization_id: str
    seq: int
    taken: bool = False


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


@functools.cache
def _take_statement(model: type, dialect: str) -> tuple[Any, Callable[[Result], int | None]]:
    """The row's lock and its next number in one statement, and how to read the number from its
    answer (None: no such row in the organization). MariaDB has no UPDATE ... RETURNING:
    LAST_INSERT_ID(expr) hands the value back in the statement's own answer (the cursor's
    lastrowid), as its manual shows for sequences."""
    table = model.__table__
    matched = update(table).where(table.c.id == bindparam("row_id"),
                                  table.c.organization_id == bindparam("org_id"))
    if dialect in ("mysql", "mariadb"):
        return (matched.values(stats_seq=func.last_insert_id(table.c.stats_seq + 1)),
                _last_insert_id)
    return (matched.values(stats_seq=table.c.stats_seq + 1).returning(table.c.stats_seq),
            Result.scalar)


def _last_insert_id(result: Result) -> int | None:
    return result.lastrowid if result.rowcount == 1 else None


def lock_numbered(uow: UnitOfWork, model: type, row_id: str, org_id: str, *,
                  take: bool = False) -> Numbered | None:
    """The row, locked until the transaction ends; None if there is none in `org_id`.

    `take`: for a write that numbers a change of the row's counts (a task created, deleted or
    given a status, a comment; a member's assignment), the lock takes the change's number in the
    same statement, a round trip fewer under the lock; the write must then tell the change
    (`Numbering.number`, an empty one if it changed nothing), or the aggregate sees a gap."""
    if take:
        return _lock_taking_number(uow, model, row_id, org_id)
    row = uow.execute(_lock_statement(model), {"row_id": row_id}).first()
    if row is None or row[0] != org_id:
        return None
    return Numbered(model, row_id, row[0], row[1])


def _lock_taking_number(uow: UnitOfWork, model: type, row_id: str,
                        org_id: str) -> Numbered | None:
    statement, read = _take_statement(model, uow.session.get_bind().dialect.name)
    seq = read(uow.execute(statement, {"row_id": row_id, "org_id": org_id}))
    return None if seq is None else Numbered(model, row_id, org_id, int(seq), taken=True)


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
        if row.taken:  # numbered by its lock
            row.taken = False
        else:
            row.seq += 1
            self.uow.execute(_number_statement(row.model), {"row_id": row.id, "seq": row.seq})
        self.deltas.append(Delta(KINDS[row.model], self.org_id, row.id, row.seq, changes))
