"""A write: one transaction, its outbox rows, and what must happen after (never before) commit."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from aggregates import Delta
from events.apply import apply_event
from models import OutboxEvent
from services.context import Services

log = logging.getLogger(__name__)


class UnitOfWork:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.session: Session = services.db.writers()
        self.events: list[OutboxEvent] = []

    def __enter__(self) -> "UnitOfWork":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.session.rollback()  # and the events go with it: nothing was published
        self.session.close()

    def emit(self, kind: str, org_id: str, deltas: list[Delta] = (), **payload: Any) -> None:
        payload["deltas"] = [d.as_dict() for d in deltas]
        event = OutboxEvent(kind=kind, organization_id=org_id, payload=payload)
        self.session.add(event)
        self.events.append(event)

    def commit(self) -> None:
        self.session.commit()
        events, self.events = self.events, []
        for event in events:
            apply_event(self.services, kind=event.kind, org_id=event.organization_id,
                        payload=event.payload, event_id=event.event_id, source="web")
        if events:
            self._publish([e.id for e in events])

    def _publish(self, outbox_ids: list[int]) -> None:
        try:
            self.services.publish(outbox_ids)
        except Exception as exc:  # the outbox sweep re-sends it; the write stands
            log.warning("could not publish events %s (the sweep will): %s", outbox_ids, exc)
