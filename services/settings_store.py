"""Process-wide configuration (feature flags, public rate limits, role definitions), read through
the per-process L1, then Redis, then the database."""

from __future__ import annotations

from typing import Any

from cache import keys
from cache.l1 import read_through_l1
from events import CONFIG_CHANGED
from models import ConfigEntry, utcnow
from services.context import Services
from services.reads import cached
from services.uow import UnitOfWork

DEFAULTS: dict[str, Any] = {
    "feature_flags": {"new_ui_enabled": True, "ai_suggestions_enabled": False},
    "rate_limits": {"login_failures_per_minute_per_email": 10, "max_page_size": 200,
                    "max_body_bytes": 1_048_576},
    "roles": {"admin": ["org:manage", "users:manage", "projects:write", "tasks:write",
                        "cache:manage"],
              "member": ["projects:write", "tasks:write"]},
}


def get_config(services: Services, name: str) -> tuple[Any, str]:
    """(value, X-Cache)."""
    key = keys.config(name)

    def load_l2() -> Any:
        def load(db):
            row = db.get(ConfigEntry, name)
            return row.value if row else DEFAULTS.get(name)
        return cached(services, key, load)

    if not services.settings.cache_enabled:
        return load_l2()[0], "BYPASS"
    sources: list[str] = []

    def load() -> Any:
        value, source = load_l2()
        sources.append(source)
        return value

    value, from_l1 = read_through_l1(services.l1, key.name, key.family, load)
    return value, "HIT-L1" if from_l1 else sources[0]


def set_config(services: Services, name: str, value: Any) -> None:
    with UnitOfWork(services) as uow:
        row = uow.session.get(ConfigEntry, name)
        if row is None:
            uow.session.add(ConfigEntry(key=name, value=value, updated_at=utcnow()))
        else:
            row.value, row.updated_at = value, utcnow()
        uow.emit(CONFIG_CHANGED, "global", name=name)
        uow.commit()
