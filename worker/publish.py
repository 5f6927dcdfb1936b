"""What the web process (and the worker itself) uses to hand work to Celery.

`attach_publisher(services)` wires three functions into `Services`:
- `publish(outbox_ids)`: one `tasks.events.process_event` per event, after commit;
- `extras["schedule_recount"](kind, org_id, owner_id, reason)`: a coalesced recount
  (`extras["ensure_recount"]`: the same, true when one will count after the call);
- `extras["warm_organization"](org_id) -> task_id`: POST /api/admin/cache/warm.

A broker outage must never hold a request for long: a publish tries briefly, then gives up for a
few seconds (later publishes return at once) and the outbox sweep delivers what was not sent.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from services.errors import DomainError
from worker.app import create_celery

log = logging.getLogger(__name__)

PROCESS_EVENT = "tasks.events.process_event"
RECOUNT = "tasks.stats.recount"
WARM_ORGANIZATION = "tasks.warmup.warm_organization"

# Two quick tries (the second after 0.1 s), never the default's minutes of retrying.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.1,
                 "interval_max": 0.2}
# After a failed publish, skip the broker this long: the sweep re-sends what was skipped.
BROKER_COOLDOWN = 2.0
# A pending recount's marker outlives its countdown by far; it only expires by itself when the
# task it announced was lost (then the next change schedules a new one).
PENDING_TTL = 60


def pending_key(kind: str, owner_id: str) -> str:
    return f"pending:recount:{kind}:{owner_id}"


class BrokerUnavailable(DomainError):
    status, title = 503, "Service Unavailable"


class Publisher:
    def __init__(self, app, services) -> None:
        self.app = app
        self.services = services
        self._down_until = 0.0
        self._lock = threading.Lock()

    # -- the broker, guarded ------------------------------------------------------------------
    def _send(self, name: str, args: list, **options):
        if time.monotonic() < self._down_until:
            raise ConnectionError("broker marked down after a recent failure")
        try:
            return self.app.send_task(name, args=args, retry=True, retry_policy=PUBLISH_RETRY,
                                      **options)
        except Exception:
            with self._lock:
                self._down_until = time.monotonic() + BROKER_COOLDOWN
            raise

    # -- the three entry points -------------------------------------------------------------
    def publish(self, outbox_ids: Sequence[int]) -> None:
        """Raises when the broker is down; the unit of work logs it, the sweep re-sends."""
        for outbox_id in outbox_ids:
            self._send(PROCESS_EVENT, [outbox_id])

    def schedule_recount(self, kind: str, org_id: str, owner_id: str,
                         reason: str = "coalesced") -> bool:
        """Coalesced: at most one recount per aggregate is pending. The task deletes the marker
        before it counts, so a change made while it runs schedules the next run. Returns True
        when this call scheduled one. Never raises: a lost recount only delays freshness."""
        return self._schedule(kind, org_id, owner_id, reason) == "scheduled"

    def ensure_recount(self, kind: str, org_id: str, owner_id: str,
                       reason: str = "coalesced") -> bool:
        """A recount will count after this call: this call scheduled it, or one was pending and
        has not started (it deletes its marker first). False when none could be scheduled."""
        return self._schedule(kind, org_id, owner_id, reason) in ("scheduled", "pending")

    def _schedule(self, kind: str, org_id: str, owner_id: str, reason: str) -> str:
        """"scheduled", "pending" (one was already) or "failed" (Redis or the broker down)."""
        from cache.store import Unavailable

        cache = self.services.cache
        key = pending_key(kind, owner_id)
        try:
            if not cache.call("coalesce", lambda: cache.client.set(key, "1", nx=True,
                                                                   ex=PENDING_TTL)):
                return "pending"
        except Unavailable:
            return "failed"
        try:
            self._send(RECOUNT, [kind, org_id, owner_id, reason],
                       countdown=self.services.settings.recompute_countdown)
            return "scheduled"
        except Exception as exc:
            log.warning("could not schedule a recount of %s %s: %s", kind, owner_id, exc)
            try:
                cache.call("coalesce", lambda: cache.client.delete(key))
            except Unavailable:
                pass
            return "failed"

    def warm_organization(self, org_id: str) -> str:
        try:
            return self._send(WARM_ORGANIZATION, [org_id]).id
        except Exception as exc:
            raise BrokerUnavailable("the task queue is unreachable; try again shortly") from exc


def attach_publisher(services, app=None) -> Publisher:
    if app is None:
        app = create_celery(services.settings)
    publisher = Publisher(app, services)
    services.publish = publisher.publish
    services.extras["celery"] = app
    services.extras["publisher"] = publisher
    services.extras["schedule_recount"] = publisher.schedule_recount
    services.extras["ensure_recount"] = publisher.ensure_recount
    services.extras["warm_organization"] = publisher.warm_organization
    return publisher
