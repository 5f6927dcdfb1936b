"""The outbox sweep (beat, every few seconds): re-send events still unprocessed after a while.

An event stays unprocessed when its publish failed (broker down), when the web process died
between commit and publish, or when its task was lost. The sweep sends it again; applying an
event twice changes nothing, so a sweep racing a slow worker costs only a duplicate task.
"""

from __future__ import annotations

import datetime as dt
import logging

from celery import shared_task
from sqlalchemy import delete, select

from cache.store import Unavailable
from models import OutboxEvent, utcnow
from worker.base import TaskBase
from worker.publish import PROCESS_EVENT

log = logging.getLogger(__name__)

BATCH = 1000
MAX_PAGES = 10
# A re-sent event is not re-sent again for this long (a backlog is not a loss).
RESEND_QUIET = 30
# Processed events are kept a day for inspection, then pruned.
KEEP_PROCESSED = dt.timedelta(days=1)
PRUNE_BATCH = 1000
MAX_PAGES = 10


@shared_task(base=TaskBase, bind=True, name="tasks.outbox.sweep")
def sweep(self, older_than: float = 10.0) -> dict:
    services = self.services
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    due, seen, after = [], 0, 0
    # Page past events re-sent recently (still queued behind a backlog): the oldest page alone
    # would otherwise hold the sweep up until their quiet period ends.
    for _ in range(MAX_PAGES):
        with services.db.session() as db:
            ids = list(db.scalars(select(OutboxEvent.id).where(
                OutboxEvent.processed_at.is_(None), OutboxEvent.created_at < cutoff,
                OutboxEvent.id > after).order_by(OutboxEvent.id).limit(BATCH)))
        if not ids:
            break
        seen += len(ids)
        due += _not_recently_resent(services, ids)
        after = ids[-1]
        if len(due) >= BATCH:
            break
    sent = 0
    for outbox_id in due:
        # Straight to the broker: a sweep that cannot reach it fails, and beat runs another.
        self.app.send_task(PROCESS_EVENT, args=[outbox_id])
        sent += 1
    if sent:
        from worker import metrics

        metrics.outbox_resent.inc(sent)
        log.warning("outbox sweep re-sent %d events (oldest id %d)", sent, due[0])
    pruned = _prune(self)
    return {"unprocessed_seen": seen, "resent": sent, "pruned": pruned}


def _not_recently_resent(services, ids: list[int]) -> list[int]:
    if not ids:
        return []
    cache = services.cache

    def mark():
        pipe = cache.client.pipeline(transaction=False)
        for outbox_id in ids:
            pipe.set(f"outbox:resent:{outbox_id}", "1", nx=True, ex=RESEND_QUIET)
        return pipe.execute()
    try:
        marked = cache.call("outbox", mark)
    except Unavailable:
        return ids  # without Redis nothing can be applied anyway; resending is harmless
    return [i for i, fresh in zip(ids, marked) if fresh]


def _prune(task) -> int:
    with task.session() as db:
        old = list(db.scalars(select(OutboxEvent.id).where(
            OutboxEvent.processed_at.is_not(None),
            OutboxEvent.processed_at < utcnow() - KEEP_PROCESSED).limit(PRUNE_BATCH)))
        if old:
            db.execute(delete(OutboxEvent).where(OutboxEvent.id.in_(old)))
    return len(old)
