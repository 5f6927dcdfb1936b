"""Coalesced recounts of project and user statistics."""

from __future__ import annotations

import os
import time

from celery import shared_task

from aggregates import AGGREGATES
from services.stats import needs_recount
from worker.base import TaskBase
from worker.publish import pending_key

# Tests only: seconds a recount sleeps between taking its marker and counting, so a test can
# kill the worker process in the middle of one. Unset in production.
SLOW_RECOUNT_ENV = "TASKCACHE_TEST_SLOW_RECOUNT"


@shared_task(base=TaskBase, bind=True, name="tasks.stats.recount")
def recount(self, kind: str, org_id: str, owner_id: str, reason: str = "coalesced") -> str:
    """`reason` labels stats_recomputes_total: "coalesced" (a delta found no hash, a gap or an
    overflow), "refresh_ahead" or "stalled_gap" (asked by a read), apart from the inline recounts
    of requests ("cold_miss") and the warm-ups' and the auditor's."""
    services = self.services
    # Before reading: a change that lands from here on finds no marker and schedules another run,
    # so nothing committed during this recount can be left out.
    services.redis.delete(pending_key(kind, owner_id))
    _test_delay(services, owner_id)
    if _still_fresh(services, kind, org_id, owner_id):
        return "fresh"
    with services.db.session() as session:
        stats = services.aggregates.recount(session, AGGREGATES[kind], org_id, owner_id,
                                            reason=reason)
    return "gone" if stats is None else "counted"


def _still_fresh(services, kind: str, org_id: str, owner_id: str) -> bool:
    """Recounts are asked for when a delta arrived out of order, a TTL runs out, or there is no
    hash at all. Gaps usually fill within milliseconds, as the missing delta lands: unless the
    hash is missing, stalled or about to expire, counting again (0.5 s of SQL for a 200,000-task
    project) would change nothing."""
    snapshot = services.aggregates.read(AGGREGATES[kind], org_id, owner_id)
    return snapshot is not None and not needs_recount(snapshot)


def _test_delay(services, owner_id: str) -> None:
    delay = float(os.environ.get(SLOW_RECOUNT_ENV) or 0)
    if delay:
        services.redis.rpush(f"test:recount-started:{owner_id}", os.getpid())
        time.sleep(delay)
