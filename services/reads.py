"""Read-through helpers shared by every read service."""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy.orm import Session

from cache.keys import Key
from cache.store import Lookup
from services.context import Services


def cached(services: Services, key: Key, load: Callable[[Session], Any],
           lookup: Lookup | None = None) -> tuple[Any, str]:
    """The value of `key` from Redis, else `load(session)` stored for the next reader.
    Returns (value, X-Cache)."""

    def from_db() -> Any:
        with services.db.session() as session:
            return load(session)

    return services.cache.read_through(key, from_db, lookup)
