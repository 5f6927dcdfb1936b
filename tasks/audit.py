"""The drift audit (beat): a full recount of the busiest projects' statistics.

Deltas keep statistics exact by design; the audit is the check that they do. A recount that finds
the cached counts wrong at the same sequence number replaces them and counts the correction in
`stats_drift_corrected_total` (AggregateStore.replace): in a healthy system it stays at zero.
"""

from __future__ import annotations

import logging

from celery import shared_task

from aggregates import PROJECT_STATS
from cache import metrics as cache_metrics
from cache.store import Unavailable
from tasks.warmup import CacheWarmer
from worker.base import TaskBase

log = logging.getLogger(__name__)

AUDIT_LIMIT = 20


@shared_task(base=TaskBase, bind=True, name="tasks.audit.audit_stats")
def audit_stats(self, limit: int = AUDIT_LIMIT) -> dict:
    services = self.services
    outcomes: dict[str, int] = {}
    for org_id, project_id in CacheWarmer(services).busiest(limit):
        with services.db.session() as db:
            counted = PROJECT_STATS.count(db, project_id)
        if counted is None:
            continue
        seq, counts = counted
        cache_metrics.aggregate_recomputes.labels("project", "audit").inc()
        try:
            outcome = services.aggregates.replace(PROJECT_STATS, org_id, project_id, seq, counts)
        except Unavailable:
            outcome = "unavailable"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "drift":
            log.warning("drift corrected in the stats of project %s", project_id)
    return outcomes
