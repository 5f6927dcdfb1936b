"""Keyset pagination over (created_at, id): stable under inserts, no OFFSET scans."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any, Callable

import orjson
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from services.errors import Invalid

# The page size of a list read without `limit` (web/schemas.py Page).
DEFAULT_LIMIT = 50


def encode_cursor(created_at: dt.datetime, row_id: str) -> str:
    raw = orjson.dumps([created_at.isoformat(), row_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = orjson.loads(raw)
        return dt.datetime.fromisoformat(created), str(row_id)
    except Exception:
        raise Invalid("cursor", "is not a cursor this API returned") from None


def page(session: Session, query: Select, model: Any, *, limit: int, cursor: str | None,
         present: Callable[[Any], dict], newest_first: bool = True) -> dict:
    created, ident = model.created_at, model.id
    if cursor:
        at, last_id = decode_cursor(cursor)
        if newest_first:
            query = query.where(or_(created < at, and_(created == at, ident < last_id)))
        else:
            query = query.where(or_(created > at, and_(created == at, ident > last_id)))
    order = (created.desc(), ident.desc()) if newest_first else (created.asc(), ident.asc())
    # Plain rows, not ORM objects: a page is only presented, and building 50 tracked objects
    # was most of what loading one cost (and of what a write's warm-up costs).
    columns = query.with_only_columns(*model.__table__.columns, maintain_column_froms=True)
    rows = session.execute(columns.order_by(*order).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more else None
    return {"items": [present(r) for r in rows], "next_cursor": next_cursor}
