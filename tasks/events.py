"""Applying an outbox event: the worker half of every write.

The web process applied the event right after commit; doing it again here changes nothing then
(idempotency marker per event, sequence numbers per delta) and repairs everything when the web
process could not (it crashed after commit, or Redis was down).
"""

from __future__ import annotations

import logging

from celery import shared_task
from sqlalchemy import update

from aggregates import Delta
from cache.store import Unavailable
from events.apply import apply_event
from models import OutboxEvent, utcnow
from worker.base import TaskBase

log = logging.getLogger(__name__)

# Delta outcomes that mean the cached aggregate cannot be trusted to converge by itself.
NEEDS_RECOUNT = {"missing", "buffered", "overflow"}


@shared_task(base=TaskBase, bind=True, name="tasks.events.process_event")
def process_event(self, outbox_id: int) -> str:
    services = self.services
    with services.db.session() as session:
        event = session.get(OutboxEvent, outbox_id)
    if event is None:
        return "gone"  # pruned after it was processed
    if event.processed_at is not None:
        return "done"  # a duplicate delivery (the sweep re-sent it)
    result = apply_event(services, kind=event.kind, org_id=event.organization_id,
                         payload=event.payload, event_id=event.event_id, source="worker",
                         written_at=event.created_at)
    if not result["invalidated"] or "unavailable" in result["deltas"]:
        # Redis is down: not processed; retried with backoff (and re-sent by the sweep).
        raise Unavailable(f"cache unreachable while applying event {outbox_id}")
    schedule = services.extras["schedule_recount"]
    for data, outcome in zip(event.payload.get("deltas", []), result["deltas"]):
        if outcome in NEEDS_RECOUNT:
            delta = Delta.from_dict(data)
            schedule(delta.kind, delta.org_id, delta.owner_id, "coalesced")
    # A short write of its own (on SQLite the write lock is the database's only one).
    with self.session() as session:
        session.execute(update(OutboxEvent).where(OutboxEvent.id == outbox_id,
                                                  OutboxEvent.processed_at.is_(None))
                        .values(processed_at=utcnow()))
    return "applied"
