"""Project and user statistics: served from Redis; computed on a request only on a cold miss,
once per key however many requests miss together."""

from __future__ import annotations

import datetime as dt
import functools
import time

from aggregates import PROJECT_STATS, USER_STATS, Aggregate, Snapshot, StatsRead
from cache import keys, metrics
from cache.store import BYPASS, HIT_L1, HIT_L2, MISS, MISSING, STALE, Unavailable, _token
from services.auth import Actor
from services.context import Services
from services.directory import get_user
from services.errors import NotFound
from services.projects import get_project

# Ask a worker to recount once less than this much of the 5-minute TTL is left (refresh-ahead).
REFRESH_AHEAD = 60
# A delta that arrives before its predecessor waits in the hash; the predecessor normally lands
# within milliseconds (both come from the web right after their commits, and again from the
# outbox). Only a gap that has made no progress for this long is worth a full recount.
GAP_PATIENCE = 2.0


def needs_recount(snap: Snapshot) -> bool:
    return (snap.stale and snap.stalled >= GAP_PATIENCE) or 0 <= snap.ttl < REFRESH_AHEAD


@functools.lru_cache(maxsize=1024)  # a hot project's stats are served many times per recount
def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _respond(stats: dict, computed_at: float, stale: bool) -> dict:
    return {**stats, "computed_at": _iso(computed_at), "stale": stale}


def _compute(services: Services, agg: Aggregate, actor: Actor, owner_id: str) -> dict:
    metrics.inline_computations.labels(agg.kind).inc()
    with services.db.session() as db:
        stats = services.aggregates.recount(db, agg, actor.org_id, owner_id, reason="cold_miss")
    if stats is None:
        raise NotFound(f"no such {agg.kind}")
    return _respond(stats, time.time(), False)


def _schedule_recount(services: Services, agg: Aggregate, org_id: str, owner_id: str,
                      reason: str) -> None:
    schedule = services.extras.get("schedule_recount")
    if schedule:
        schedule(agg.kind, org_id, owner_id, reason)


def recount_reason(snap: Snapshot) -> str:
    """Why a read asks for a recount (the `reason` of stats_recomputes_total)."""
    return "stalled_gap" if snap.stale and snap.stalled >= GAP_PATIENCE else "refresh_ahead"


def _from_snapshot(services: Services, agg: Aggregate, actor: Actor, owner_id: str,
                   snap: Snapshot) -> tuple[dict, str]:
    if needs_recount(snap):
        _schedule_recount(services, agg, actor.org_id, owner_id, recount_reason(snap))
    if snap.stale:
        metrics.stale_served.labels(f"{agg.kind}_stats").inc()
        return _respond(snap.stats, snap.computed_at, True), STALE
    return _respond(snap.stats, snap.computed_at, False), HIT_L1 if snap.layer == "l1" else HIT_L2


def read_stats(services: Services, agg: Aggregate, actor: Actor, owner_id: str,
               also=None, prefetched: StatsRead | None = None) -> tuple[dict, str]:
    """`prefetched`: the same read, already made in the session's round trip."""
    store = services.aggregates
    try:
        if prefetched is not None and prefetched.reply is not MISSING:
            snap = prefetched.snapshot()
        else:
            snap = store.read(agg, actor.org_id, owner_id, also)
    except Unavailable:
        return _compute(services, agg, actor, owner_id), BYPASS
    if snap is not None:
        return _from_snapshot(services, agg, actor, owner_id, snap)
    if not services.cache.enabled:
        return _compute(services, agg, actor, owner_id), BYPASS
    return _single_flight(services, agg, actor, owner_id)


def _single_flight(services: Services, agg: Aggregate, actor: Actor,
                   owner_id: str) -> tuple[dict, str]:
    cache = services.cache
    lock, token = f"lock:{agg.name(actor.org_id, owner_id)}", _token()
    try:
        leader = cache.call("lock", lambda: cache.client.set(lock, token, nx=True, px=30_000))
    except Unavailable:
        return _compute(services, agg, actor, owner_id), BYPASS
    if leader:
        try:
            # A leader whose miss came just before the previous leader stored: nothing to do.
            snap = services.aggregates.read(agg, actor.org_id, owner_id)
            if snap is not None:
                return _from_snapshot(services, agg, actor, owner_id, snap)
            return _compute(services, agg, actor, owner_id), MISS
        except Unavailable:
            return _compute(services, agg, actor, owner_id), BYPASS
        finally:
            cache._unlock(lock, token)
    deadline = time.monotonic() + 30
    delay = 0.005
    while time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
        try:
            # The lock first: once it is seen gone, the leader's store is visible to the read.
            locked = cache.call("get", lambda: cache.client.exists(lock))
            snap = services.aggregates.read(agg, actor.org_id, owner_id)
            if snap is not None:
                metrics.singleflight_waits.labels(f"{agg.kind}_stats", "served").inc()
                return _from_snapshot(services, agg, actor, owner_id, snap)
            if not locked:
                break
        except Unavailable:
            break
    metrics.singleflight_waits.labels(f"{agg.kind}_stats", "gave_up").inc()
    return _compute(services, agg, actor, owner_id), MISS


def project_stats(services: Services, actor: Actor, project_id: str, lookup=None,
                  prefetched: StatsRead | None = None) -> tuple[dict, str]:
    """One round trip when warm and prefetched by the view (see `project_stats_reads`): the
    session, the project (`lookup`), the stats hash and the read tally together."""
    get_project(services, actor, project_id, lookup)
    return read_stats(services, PROJECT_STATS, actor, project_id,
                      also=_count_read(services, actor.org_id, project_id), prefetched=prefetched)


def project_stats_reads(services: Services, org_id: str, project_id: str) -> list:
    """What a project stats request reads, for the session's round trip."""
    return [keys.project(org_id, project_id),
            services.aggregates.side_read(PROJECT_STATS, org_id, project_id,
                                          also=_count_read(services, org_id, project_id))]


# Reads of project stats per hour, the warm-ups' measure of "busiest" (tasks/warmup.py).
HOT_PROJECTS_TTL = 7200


def hot_projects_key(hours_ago: int = 0) -> str:
    return f"hot:projects:{int(time.time() // 3600) - hours_ago}"


def _count_read(services: Services, org_id: str, project_id: str):
    """Count the read in this process; the batch rides on the stats read's pipeline when due
    (no round trip of its own, and not one write per read to a single key)."""
    counters = services.cache.counters

    def queue(pipe) -> None:  # pipe is None when the read was served from the near cache
        counters.zincr(hot_projects_key(), f"{org_id}:{project_id}", HOT_PROJECTS_TTL)
        if pipe is not None:
            counters.queue_flush(pipe)
    return queue


def user_stats(services: Services, actor: Actor, user_id: str) -> tuple[dict, str]:
    get_user(services, actor, user_id)
    return read_stats(services, USER_STATS, actor, user_id)
