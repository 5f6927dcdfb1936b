"""Read-through helpers shared by every read service."""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from cache.keys import Key
from cache.store import Lookup
from services.context import Services


def cached(services: Services, key: Key, load: Callable[[Session], Any],
           lookup: Lookup | None = None) -> tuple[Any, str]:
    """The value of `key` from Redis, else `load(session)` stored for the next reader.
    Returns (value, X-Cache)."""

    def from_db() -> Any:
        for attempt in (1, 2):
            try:
                with services.db.session() as session:
                    return load(session)
            except DBAPIError as exc:
                # A connection lost mid-read (killed, server restarted): a read runs again on
                # a fresh one; pre-ping keeps the pool from handing out another dead one.
                if not exc.connection_invalidated or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    return services.cache.read_through(key, from_db, lookup)
