"""Cache warm-ups: the strategy's CacheWarmer, filling exactly the keys the API reads.

Every value goes under the key the API reads, presented as the API presents it: the organization
and the lists through the service read functions themselves (with a synthetic actor of the
organization being warmed); projects through services.projects' key and presenter, looked up 100
per round trip and loaded 100 per query (only the misses), stored under the versions looked up
before the load, as a read-through miss stores them.

What a warm-up fills, per organization: the organization, the first page of members, the first
page of projects (all and ACTIVE), each active project, and project statistics:
- beat and worker start (`warm_all`): up to 100 active organizations and 500 active projects in
  all, busiest first, and the stats of the 50 busiest projects, busiest measured by the reads the
  API counts per hour (services.stats.hot_projects_key);
- POST /api/admin/cache/warm and `flask warm --org` (`warm_organization`): one organization, up
  to 500 active projects and the stats of each.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from celery import shared_task
from sqlalchemy import select

from aggregates import PROJECT_STATS
from cache.keys import AGGREGATE_TTL
from cache.store import Unavailable
from models import Organization, OrgStatus, Project, ProjectStatus
from services import directory, present, projects
from services.auth import Actor
from services.stats import REFRESH_AHEAD, hot_projects_key
from worker.base import TaskBase

log = logging.getLogger(__name__)

ORGANIZATION_LIMIT = 100
PROJECT_LIMIT = 500
HOT_STATS_LIMIT = 50
LIST_LIMIT = 50  # the API's default page: what a client's first request reads
LOOKUP_BATCH = 100
LAST_REPORT_KEY = "warmup:last:{trigger}"
RUN_LOCK = "lock:warmup:all"

Progress = Callable[[int], None]


@dataclass
class Report:
    trigger: str
    organizations: int = 0
    projects: int = 0
    projects_loaded: int = 0
    stats: int = 0
    stats_recounted: int = 0
    seconds: float = 0.0
    finished_at: float = 0.0
    organization_ids: list[str] = field(default_factory=list)


def _actor(org_id: str) -> Actor:
    return Actor(user_id="warmup", org_id=org_id, session_id="warmup", roles=("admin",),
                 email="")


class CacheWarmer:
    def __init__(self, services, progress: Progress | None = None) -> None:
        self.services = services
        self.progress = progress or (lambda n: None)

    # -- what to warm ---------------------------------------------------------------------------
    def busiest(self, limit: int) -> list[tuple[str, str]]:
        """(org_id, project_id) of the most read project stats in the last one to two hours."""
        cache = self.services.cache

        def both_hours() -> list:
            # Summed here, not by ZUNION: on a cluster the two hours' keys sit in other slots.
            pipe = cache.client.pipeline(transaction=False)
            for hours_ago in (0, 1):
                pipe.zrange(hot_projects_key(hours_ago), 0, -1, withscores=True)
            return pipe.execute()
        try:
            cache.flush_counters()
            hours = cache.call("hot", both_hours)
        except Unavailable:
            return []
        scores: dict = {}
        for member, score in (pair for hour in hours for pair in hour):
            scores[member] = scores.get(member, 0) + score
        ranked = sorted(scores.items(), key=lambda pair: -pair[1])
        found = []
        for member, _score in ranked[:limit]:
            org_id, _, project_id = (member.decode() if isinstance(member, bytes)
                                     else member).partition(":")
            found.append((org_id, project_id))
        return found

    def plan(self) -> tuple[list[str], dict[str, list[str]], list[tuple[str, str]]]:
        """Organizations (busiest first), their active projects within the limits, hot stats."""
        hot = self.busiest(HOT_STATS_LIMIT)
        hot_rank = {pid: i for i, (_, pid) in enumerate(hot)}
        with self.services.db.session() as db:
            orgs = list(db.scalars(select(Organization.id).where(
                Organization.status == OrgStatus.ACTIVE.value)
                .order_by(Organization.created_at.desc()).limit(ORGANIZATION_LIMIT)))
            hot_orgs = {o for o, _ in hot}
            if hot_orgs - set(orgs):
                orgs += list(db.scalars(select(Organization.id).where(
                    Organization.id.in_(hot_orgs - set(orgs)),
                    Organization.status == OrgStatus.ACTIVE.value)))
            orgs.sort(key=lambda o: o not in hot_orgs)  # stable: busiest organizations first
            orgs = orgs[:ORGANIZATION_LIMIT]
            rows = db.execute(select(Project.organization_id, Project.id).where(
                Project.organization_id.in_(orgs), Project.status == ProjectStatus.ACTIVE.value)
                .order_by(Project.updated_at.desc()).limit(PROJECT_LIMIT * 4)).all()
        rows.sort(key=lambda r: hot_rank.get(r.id, len(hot_rank)))
        per_org: dict[str, list[str]] = {o: [] for o in orgs}
        for org_id, project_id in rows[:PROJECT_LIMIT]:
            per_org[org_id].append(project_id)
        active = {pid for pids in per_org.values() for pid in pids}
        return orgs, per_org, [(o, p) for o, p in hot if p in active]

    # -- warming --------------------------------------------------------------------------------
    def warm_all(self, trigger: str) -> Report:
        started = time.perf_counter()
        report = Report(trigger)
        orgs, per_org, hot = self.plan()
        for org_id in orgs:
            self._warm_entities(org_id, per_org[org_id], report)
        from celeryconfig import WARMUP_INTERVAL

        # Refresh hot stats that would expire before the next run (they are never left to
        # expire while they are read).
        refresh_below = min(AGGREGATE_TTL, 2 * WARMUP_INTERVAL)
        for org_id, project_id in hot:
            self._warm_stats(org_id, project_id, refresh_below, report)
        return self._finish(report, started)

    def warm_organization(self, org_id: str, trigger: str = "admin") -> Report:
        started = time.perf_counter()
        report = Report(trigger)
        with self.services.db.session() as db:
            org = db.get(Organization, org_id)
            if org is None:
                return self._finish(report, started)
            project_ids = list(db.scalars(select(Project.id).where(
                Project.organization_id == org_id, Project.status == ProjectStatus.ACTIVE.value)
                .order_by(Project.updated_at.desc()).limit(PROJECT_LIMIT)))
        self._warm_entities(org_id, project_ids, report, count_progress=False)
        for project_id in project_ids:
            self._warm_stats(org_id, project_id, REFRESH_AHEAD, report)
            self.progress(1)
        return self._finish(report, started)

    def _warm_entities(self, org_id: str, project_ids: list[str], report: Report,
                       count_progress: bool = True) -> None:
        services, actor = self.services, _actor(org_id)
        directory.get_organization(services, actor)
        directory.list_users(services, actor, limit=LIST_LIMIT, cursor=None)
        for status in (None, ProjectStatus.ACTIVE.value):
            projects.list_projects(services, actor, status=status, limit=LIST_LIMIT, cursor=None)
        report.organizations += 1
        report.organization_ids.append(org_id)
        for batch in _chunks(project_ids, LOOKUP_BATCH):
            keys = [projects.project_key(actor, p) for p in batch]
            missing = [lk for lk in services.cache.lookup_many(keys) if not lk.hit]
            report.projects += len(batch)
            report.projects_loaded += self._load_projects(org_id, missing)
            if count_progress:
                self.progress(len(batch))

    def _load_projects(self, org_id: str, lookups: list) -> int:
        """What get_project stores on a miss (same key, same presenter, stored under the
        versions looked up before the load), for a batch in one query instead of one each."""
        if not lookups:
            return 0
        by_id = {lk.key.name.rpartition(":")[2]: lk for lk in lookups}
        with self.services.db.session() as db:
            rows = db.scalars(select(Project).where(Project.id.in_(list(by_id)),
                                                    Project.organization_id == org_id)).all()
        for row in rows:
            self.services.cache.store(by_id[row.id], present.project(row))
        return len(rows)

    def _warm_stats(self, org_id: str, project_id: str, refresh_below: float,
                    report: Report) -> None:
        store = self.services.aggregates
        try:
            snap = store.read(PROJECT_STATS, org_id, project_id)
        except Unavailable:
            return
        report.stats += 1
        if snap is not None and not snap.stale and snap.ttl >= refresh_below:
            return
        with self.services.db.session() as db:
            if store.recount(db, PROJECT_STATS, org_id, project_id, reason="warmup") is not None:
                report.stats_recounted += 1

    def _finish(self, report: Report, started: float) -> Report:
        report.seconds = round(time.perf_counter() - started, 4)
        report.finished_at = time.time()
        from worker import metrics

        metrics.warmup_keys.labels("project").inc(report.projects_loaded)
        metrics.warmup_keys.labels("project_stats").inc(report.stats_recounted)
        summary = {k: v for k, v in asdict(report).items() if k != "organization_ids"}
        log.info("warm-up (%s) done: %s", report.trigger, summary)
        try:
            cache = self.services.cache
            cache.call("set", lambda: cache.client.set(
                LAST_REPORT_KEY.format(trigger=report.trigger), json.dumps(summary), ex=86_400))
        except Unavailable:
            pass
        return report


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@shared_task(base=TaskBase, bind=True, name="tasks.warmup.warm_all")
def warm_all(self, trigger: str = "beat") -> dict:
    """One run at a time: a worker start and a beat tick together warm once."""
    cache = self.services.cache
    try:
        if not cache.call("lock", lambda: cache.client.set(RUN_LOCK, "1", nx=True, ex=600)):
            return {"skipped": "another warm-up is running"}
    except Unavailable:
        return {"skipped": "cache unreachable"}
    try:
        report = CacheWarmer(self.services).warm_all(trigger)
    finally:
        try:
            cache.call("unlock", lambda: cache.client.delete(RUN_LOCK))
        except Unavailable:
            pass
    return {k: v for k, v in asdict(report).items() if k != "organization_ids"}


@shared_task(base=TaskBase, bind=True, name="tasks.warmup.warm_organization")
def warm_organization(self, org_id: str) -> dict:
    report = CacheWarmer(self.services).warm_organization(org_id)
    return {k: v for k, v in asdict(report).items() if k != "organization_ids"}
