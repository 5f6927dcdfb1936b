"""The effects of a committed event on the caches, shared by the web process and the worker."""

from __future__ import annotations

import datetime as dt
import logging

from aggregates import Delta
from cache import l1, metrics
from events import CONFIG_CHANGED, versions_for
from models import utcnow

log = logging.getLogger(__name__)


def apply_event(services, *, kind: str, org_id: str, payload: dict, event_id: str | None,
                source: str, written_at: dt.datetime | None = None, bumped=None) -> dict:
    """Retire the versions the event names and fold in its deltas. Idempotent; with `event_id`
    the bumps are applied once however often it runs (markers), without it (the web's first
    application, usually the only one) they leave nothing behind: see `mark_applied`.

    `bumped` (cache.store.Bumped) collects the tokens the bumps replaced.
    Returns what happened, for logs and tests: {"invalidated": bool, "deltas": [outcomes]}."""
    versions = versions_for(kind, org_id, payload)
    # The deltas ride on the bumps' round trip, after them: each was a round trip of its own, a
    # wait for a core on a busy machine between the write's commit and its answer.
    writes = [services.aggregates.delta_write(Delta.from_dict(d), source)
              for d in payload.get("deltas", [])] if services.cache.enabled else []
    invalidated = services.cache.invalidate(versions, org_ids=[org_id], family=kind.split(".")[0],
                                            source=source, event_id=event_id, bumped=bumped,
                                            side=writes)
    if kind == CONFIG_CHANGED:
        _announce_l1(services, payload["name"], invalidated)
    outcomes = [write.outcome() for write in writes]
    if written_at is not None and "applied" in outcomes:
        # Freshness: from the change's write (its outbox row) to the change visible in the stats.
        lag = (utcnow() - written_at).total_seconds()
        metrics.stats_freshness.labels(source).observe(max(lag, 0.0))
    return {"invalidated": invalidated, "deltas": outcomes}


def mark_applied(services, *, kind: str, org_id: str, payload: dict, event_id: str) -> None:
    """The event's bumps were applied (without markers) and it is handed on to be applied again:
    leave the markers, so that the second application does not retire what readers stored since."""
    services.cache.mark_applied(versions_for(kind, org_id, payload), event_id)


def _announce_l1(services, name: str, invalidated: bool) -> None:
    from cache.keys import config

    if invalidated and services.cache.enabled:
        try:
            services.cache.call("publish", lambda: l1.announce(
                services.redis, config(name).name, services.l1.origin))
        except Exception as exc:  # the L1 TTL bounds what a lost announcement costs
            log.warning("could not announce L1 invalidation of %s: %s", name, exc)
    # This process's own L1 at once, even when Redis is down (its subscriber skips the echo).
    services.l1.invalidate(config(name).name)
