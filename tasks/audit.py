"""The staleness auditor (beat), grown from the stats drift audit, and the tenants' memory estimate.

Each run samples cached values the API would serve (entities, first list pages, statistics),
builds their names from database ids through cache/keys.py (no KEYS, no SCAN), and compares each
with the database as the API presents it, read *after* the cached value. A difference can be a
write in flight (committed between the two reads, its invalidation a few milliseconds behind), so
it is looked at again after a grace period: if the value was retired meanwhile (its version
tokens moved, or it expired) or now equals a fresh database read, it was in flight; otherwise it
is stale: counted in `cache_audit_stale_total{entity_type}` and retired (statistics: recounted,
which also counts `stats_drift_corrected_total` when the sequence numbers agreed). Every value
compared counts in `cache_audit_checked_total{entity_type}`. In a healthy system stale stays 0.

The auditor reads Redis directly (version tokens with MGET, then the value): it creates no
version token and counts no hit or miss, so it neither changes the cache nor the hit rates.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from celery import shared_task
from sqlalchemy import select

from aggregates import PROJECT_STATS, USER_STATS, Aggregate
from cache import codec, keys
from cache import metrics as cache_metrics
from cache.store import MISSING, Unavailable, unwrap
from cache.tenants import org_of
from models import AuthSession, Organization, Project, Task, User
from services import auth, directory, notifications, projects, tasks
from tasks.warmup import LIST_LIMIT, CacheWarmer
from worker.base import TaskBase

log = logging.getLogger(__name__)

SAMPLE = int(os.environ.get("CACHE_AUDIT_SAMPLE") or 20)  # ids per kind per run
GRACE = 1.0  # seconds a difference is given to resolve itself before it counts as stale
PAGE_SIZES = (LIST_LIMIT, 20)  # the warm-ups' first pages and the common client page
TENANT_MEMORY_KEY = "ops:tenant-memory"
TENANT_MEMORY_SAMPLE = 1000
TENANT_TOP = 10


@dataclass
class Check:
    """One cached value and how the database answers the same question."""

    key: keys.Key
    load: Callable[[Any], Any]
    stored_name: str | None = None
    tokens: list | None = None
    cached: Any = MISSING


@dataclass
class StatsCheck:
    agg: Aggregate
    org_id: str
    owner_id: str
    seen: tuple[int, dict] | None = None  # the database's (seq, presented stats), first pass


@dataclass
class Report:
    checked: dict
    stale: dict
    in_flight: dict

    def as_dict(self) -> dict:
        return {"checked": self.checked, "stale": self.stale, "in_flight": self.in_flight}


# -- sampling ------------------------------------------------------------------------------------
def _sample_ids(db, column, n: int, *where) -> list:
    """About n ids from a random point of the id order (ids are random: a fair sample, one
    index range scan, no ORDER BY RAND())."""
    pivot = str(uuid.uuid4())
    query = select(column).where(*where)
    found = list(db.scalars(query.where(column >= pivot).order_by(column).limit(n)))
    if len(found) < n:
        found += list(db.scalars(query.where(column < pivot).order_by(column)
                                 .limit(n - len(found))))
    return found


def plan(services, sample: int = SAMPLE) -> tuple[list[Check], list[StatsCheck]]:
    """What this run looks at: candidate keys built from sampled ids (most may not be cached)."""
    checks: list[Check] = []
    stats: list[StatsCheck] = []
    # The busiest projects too (most read, so most likely written while cached): the project,
    # its first task pages and its stats, besides the random sample.
    busiest = CacheWarmer(services).busiest(sample)
    with services.db.session() as db:
        org_ids = _sample_ids(db, Organization.id, sample)
        for org_id in org_ids:
            checks.append(Check(keys.organization(org_id), directory.load_organization(org_id)))
            for status in (None, "ACTIVE"):
                for limit in PAGE_SIZES:
                    checks.append(Check(
                        keys.project_list(org_id, status=status, limit=limit, cursor=None),
                        projects.load_projects_page(org_id, status, limit, None)))
            for limit in PAGE_SIZES:
                checks.append(Check(keys.member_list(org_id, limit=limit, cursor=None),
                                    directory.load_members_page(org_id, limit, None)))
        sampled = set(_sample_ids(db, Project.id, sample)) | {p for _, p in busiest}
        for org_id, project_id in db.execute(select(Project.organization_id, Project.id).where(
                Project.id.in_(sorted(sampled)))).all():
            checks.append(Check(keys.project(org_id, project_id),
                                projects.load_project(org_id, project_id)))
            for limit in PAGE_SIZES:
                checks.append(Check(
                    keys.project_tasks(org_id, project_id, status=None, assignee_id=None,
                                       limit=limit, cursor=None),
                    tasks.load_tasks_page(project_id, None, None, limit, None)))
            stats.append(StatsCheck(PROJECT_STATS, org_id, project_id))
        for org_id, task_id in db.execute(select(Task.organization_id, Task.id).where(
                Task.id.in_(_sample_ids(db, Task.id, sample)))).all():
            checks.append(Check(keys.task(org_id, task_id), tasks.load_task(org_id, task_id)))
            checks.append(Check(keys.task_comments(org_id, task_id, limit=LIST_LIMIT,
                                                   cursor=None),
                                tasks.load_comments_page(task_id, LIST_LIMIT, None)))
        for org_id, user_id in db.execute(select(User.organization_id, User.id).where(
                User.id.in_(_sample_ids(db, User.id, sample)))).all():
            checks.append(Check(keys.user(org_id, user_id), directory.load_user(org_id, user_id)))
            checks.append(Check(keys.unread_count(org_id, user_id),
                                notifications.load_unread_count(user_id)))
            stats.append(StatsCheck(USER_STATS, org_id, user_id))
        for row in db.execute(select(AuthSession.organization_id, AuthSession.user_id,
                                     AuthSession.id).where(AuthSession.id.in_(
                                         _sample_ids(db, AuthSession.id, sample)))).all():
            checks.append(Check(keys.session(row[0], row[1], row[2]),
                                auth.load_session(row[2], row[1])))
    return checks, stats


# -- reading the cache without touching it --------------------------------------------------------
def _read_cached(services, checks: list[Check]) -> None:
    """Resolve each key's stored name from its current version tokens and read the value: two
    round trips for the batch. A key whose version key is missing holds no value."""
    if not checks:
        return
    client = services.cache.client

    def tokens():
        pipe = client.pipeline(transaction=False)
        for check in checks:
            pipe.mget(check.key.versions)
        return pipe.execute()

    for check, found in zip(checks, services.cache.call("audit", tokens)):
        check.tokens = found
        # The value is current while it was stored under the current tokens (`<tokens>|blob`).
        check.stored_name = (None if any(t is None for t in found) else
                             check.key.name + "@" + ".".join(t.decode() for t in found))
        check.cached = MISSING
    named = [c for c in checks if c.stored_name]

    def values():
        pipe = client.pipeline(transaction=False)
        for check in named:
            pipe.get(check.key.name)
        return pipe.execute()

    for check, raw in zip(named, services.cache.call("audit", values) if named else []):
        blob = unwrap(raw, check.stored_name.rpartition("@")[2])
        if blob is not None:
            check.cached = codec.decode(blob)


def _same(a: Any, b: Any) -> bool:
    # Cached values went through JSON: compare both as JSON would present them.
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        b, option=orjson.OPT_SORT_KEYS)


def _truth(services, checks: list[Check]) -> list:
    with services.db.session() as db:
        return [check.load(db) for check in checks]


# -- the audit -------------------------------------------------------------------------------------
def audit(services, sample: int = SAMPLE, grace: float = GRACE) -> Report:
    report = Report({}, {}, {})

    def count(table: dict, family: str, metric) -> None:
        table[family] = table.get(family, 0) + 1
        metric.labels(family).inc()
        if metric is cache_metrics.audit_checked:  # a stale ratio of 0 is a value, not a gap
            cache_metrics.audit_stale.labels(family)
            cache_metrics.audit_in_flight.labels(family)

    checks, stats = plan(services, sample)
    _read_cached(services, checks)
    cached = [c for c in checks if c.cached is not MISSING]
    truths = _truth(services, cached)  # read after the cached values
    suspects = []
    for check, truth in zip(cached, truths):
        count(report.checked, check.key.family, cache_metrics.audit_checked)
        if not _same(check.cached, truth):
            suspects.append(check)
    stats_suspects = _first_stats_pass(services, stats, report, count)
    if suspects or stats_suspects:
        time.sleep(grace)
    _recheck(services, suspects, report, count)
    _recheck_stats(services, stats_suspects, report, count)
    if report.stale:
        log.warning("cache audit found stale values (retired): %s", report.stale)
    return report


def _recheck(services, suspects: list[Check], report: Report, count) -> None:
    if not suspects:
        return
    before = {id(c): (c.stored_name, c.cached) for c in suspects}
    _read_cached(services, suspects)
    still = [c for c in suspects if c.stored_name == before[id(c)][0]
             and c.cached is not MISSING]
    truths = _truth(services, still)
    stale = {id(c) for c, truth in zip(still, truths) if not _same(c.cached, truth)}
    for check in suspects:
        family = check.key.family
        if id(check) not in stale:
            count(report.in_flight, family, cache_metrics.audit_in_flight)
            continue
        count(report.stale, family, cache_metrics.audit_stale)
        log.warning("stale %s in cache: %s", family, check.stored_name)
        name = check.key.name
        try:  # retire that value: the next read loads it again
            services.cache.call("audit", lambda: services.cache.client.delete(name))
        except Unavailable:
            pass


def _stats_verdict(services, s: StatsCheck) -> str:
    """'absent', 'same', 'flagged' (the answer says stale: true), 'behind' or 'different'.

    The first pass compares with the database read after the cache; the re-check compares with
    what that first database read saw: a project written all the time is always a few deltas
    behind its latest commits (each applied milliseconds after its commit), so only not having
    caught up, after the grace period, with changes committed before it began counts."""
    snap = services.aggregates.read(s.agg, s.org_id, s.owner_id, counted=False)
    if snap is None:
        return "absent"
    if s.seen is None:
        with services.db.session() as db:
            counted = s.agg.count(db, s.owner_id)  # after the cached read
        if counted is None:
            return "different"  # the owner is gone and its stats are still served
        s.seen = (counted[0], s.agg.present(s.owner_id, counted[1]))
    seq, presented = s.seen
    if snap.seq > seq or (snap.seq == seq and snap.stats == presented):
        return "same"
    if snap.stale:
        return "flagged"
    return "behind" if snap.seq < seq else "different"


def _first_stats_pass(services, stats: list[StatsCheck], report: Report, count) -> list:
    suspects = []
    for s in stats:
        try:
            verdict = _stats_verdict(services, s)
        except Unavailable:
            continue
        if verdict == "absent":
            continue
        count(report.checked, f"{s.agg.kind}_stats", cache_metrics.audit_checked)
        if verdict != "same":
            suspects.append(s)
    return suspects


def _recheck_stats(services, suspects: list[StatsCheck], report: Report, count) -> None:
    for s in suspects:
        family = f"{s.agg.kind}_stats"
        try:
            verdict = _stats_verdict(services, s)
        except Unavailable:
            continue
        # A gap the answer admits (stale: true) is honest, and one that caught up was in flight.
        if verdict in ("absent", "same", "flagged"):
            count(report.in_flight, family, cache_metrics.audit_in_flight)
            continue
        count(report.stale, family, cache_metrics.audit_stale)
        log.warning("stale %s in cache (%s): %s", family, verdict, s.owner_id)
        with services.db.session() as db:
            try:
                services.aggregates.recount(db, s.agg, s.org_id, s.owner_id, reason="audit")
            except Unavailable:
                pass


@shared_task(base=TaskBase, bind=True, name="tasks.audit.audit_cache")
def audit_cache(self, sample: int = SAMPLE) -> dict:
    try:
        return audit(self.services, sample).as_dict()
    except Unavailable:
        return {"skipped": "cache unreachable"}


# -- the tenants' memory ---------------------------------------------------------------------------
def tenant_memory(services, sample: int = TENANT_MEMORY_SAMPLE, top: int = TENANT_TOP) -> dict:
    """Redis memory per organization, estimated from random keys (RANDOMKEY: a uniform sample,
    bounded work, no SCAN of the keyspace): each organization's share of the sampled bytes times
    the estimated size of all keys. The `top` largest by name, the rest as `other`; keys of no
    organization (version keys, process-wide configuration, markers) as `shared`."""
    client = services.cache.client

    def names():
        pipe = client.pipeline(transaction=False)
        for _ in range(sample):
            pipe.randomkey()
        pipe.dbsize()
        return pipe.execute()

    *found, dbsize = services.cache.call("audit", names)
    unique = sorted({n for n in found if n is not None})

    def usage():
        pipe = client.pipeline(transaction=False)
        for name in unique:
            pipe.memory_usage(name, samples=0)
        return pipe.execute()

    sizes = services.cache.call("audit", usage) if unique else []
    per_org: dict[str, int] = {}
    for name, size in zip(unique, sizes):
        owner = org_of(name.decode(errors="replace")) or "shared"
        per_org[owner] = per_org.get(owner, 0) + int(size or 0)
    sampled_bytes = sum(per_org.values())
    total = sampled_bytes / len(unique) * dbsize if unique else 0
    ranked = sorted(((o, b) for o, b in per_org.items() if o != "shared"), key=lambda p: -p[1])
    scale = total / sampled_bytes if sampled_bytes else 0
    out = {org: round(b * scale) for org, b in ranked[:top]}
    out["other"] = round(sum(b for _, b in ranked[top:]) * scale)
    out["shared"] = round(per_org.get("shared", 0) * scale)
    return {"bytes": out, "sampled": len(unique), "keys": dbsize, "at": time.time()}


@shared_task(base=TaskBase, bind=True, name="tasks.audit.tenant_memory")
def measure_tenant_memory(self) -> dict:
    services = self.services
    try:
        report = tenant_memory(services)
        services.cache.call("audit", lambda: services.cache.client.set(
            TENANT_MEMORY_KEY, json.dumps(report), ex=3600))
    except Unavailable:
        return {"skipped": "cache unreachable"}
    return {"sampled": report["sampled"], "keys": report["keys"]}

