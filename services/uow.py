"""A write: one transaction, its outbox rows, and what must happen after (never before) commit.

After commit the web applies each event itself (read-your-writes). An event it applied whole is
marked processed there (statistics nobody cached: once it has scheduled their recount); only one it
could not finish (Redis down, a delta out of order) goes to a worker, and the outbox sweep re-sends
whatever neither step reached (the web died after commit, the broker was down)."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from sqlalchemy import Executable, Result, insert, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from aggregates import Delta
from cache import metrics
from cache.keys import Key
from cache.store import Bumped, Lookup
from events import versions_for
from events.apply import apply_event, mark_applied
from models import OutboxEvent, new_id, utcnow
from services.context import Services

log = logging.getLogger(__name__)

Load = Callable[[Session], Any]
# The new value made from the one cached under the tokens a warm-up's lookup saw: cheaper than a
# load, and as fresh (see `UnitOfWork.warm`).
Revise = Callable[[Any, Session], Any]
# How a warm-up's value is made before the commit, from its lookup (None: loaded).
Make = Callable[[Lookup, Session], Any]
_UNKNOWN = object()


@dataclass
class Emitted:
    """An outbox row this transaction inserted (models.OutboxEvent's columns)."""

    id: int
    event_id: str
    kind: str
    organization_id: str
    payload: dict
    created_at: dt.datetime


@functools.cache
def _insert(model: type) -> Executable:
    return insert(model.__table__)


class UnitOfWork:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.session: Session = services.db.writers()
        self.events: list[Emitted] = []
        self.to_warm: list[tuple[Key, Load, Make | None]] = []

    def __enter__(self) -> "UnitOfWork":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.session.rollback()  # and the events go with it: nothing was published
        self.session.close()

    def execute(self, statement: Executable, params: dict | None = None) -> Result:
        """A Core statement in the write's transaction: for the hot writes' statements, which
        cost a fraction of the ORM's (services/numbering.py)."""
        return self.session.connection().execute(statement, params)

    def insert(self, model: type, row: dict) -> Result:
        """One row of `model`'s table, in Core (see `execute`)."""
        return self.execute(_insert(model), row)

    def emit(self, kind: str, org_id: str, deltas: list[Delta] = (), **payload: Any) -> None:
        """Record a domain event in the outbox, in this transaction (inserted at once)."""
        payload["deltas"] = [d.as_dict() for d in deltas]
        row = {"event_id": new_id(), "kind": kind, "organization_id": org_id,
               "payload": payload, "created_at": utcnow()}
        inserted = self.insert(OutboxEvent, row)
        self.events.append(Emitted(id=inserted.inserted_primary_key[0], **row))

    def warm(self, key: Key, load: Load, revise: Revise | None = None, *,
             known: Any = _UNKNOWN) -> None:
        """After commit, store the new value of `key` (which the write's events retire) from
        committed data, so that the next reader hits (see `_load_to_warm`).

        `known`, when given, is that value as this write commits it (its own row, presented):
        stored without a load. `revise(current, session)`, when given, is used instead of `load`
        if the lookup found a value: the value cached under the tokens it saw, which every write
        bumped before the lookup is in (versioned keys), revised with this write's committed
        change. Either is stored under the same condition as a loaded one: no other write bumped
        in between; when another did, the value is loaded again after the bumps (`load`)."""
        make: Make | None = None
        if known is not _UNKNOWN:
            def make(lookup: Lookup, session: Session) -> Any:
                return known
        elif revise is not None:
            def make(lookup: Lookup, session: Session) -> Any:
                return revise(lookup.value, session) if lookup.hit else load(session)
        self.to_warm.append((key, load, make))

    def commit(self) -> None:
        self.session.flush()  # statements first: a connection lost here lost nothing committed
        loaded = self._load_to_warm()
        try:
            self.session.commit()
        except OperationalError as exc:
            if not self._committed_after_all(exc):
                raise
        events, self.events = self.events, []
        bumped = Bumped()
        finished, unfinished = [], []
        named: set[str] = set()
        for i, event in enumerate(events):
            fields = {"kind": event.kind, "org_id": event.organization_id,
                      "payload": event.payload}
            if i == len(events) - 1:
                self._store_with_last_bumps(loaded, bumped, named)
            named.update(versions_for(event.kind, event.organization_id, event.payload))
            result = apply_event(self.services, **fields, event_id=None, source="web",
                                 written_at=event.created_at, bumped=bumped)
            self._recount_missing(event, result)
            if is_finished(result):
                finished.append(event.id)
                continue
            if result["invalidated"]:
                mark_applied(self.services, **fields, event_id=event.event_id)
            unfinished.append(event.id)
        if loaded:
            self._store_warmed(loaded, bumped, named)
        if finished:
            self._mark_processed(finished)
        if unfinished:
            self._publish(unfinished)

    def _load_to_warm(self) -> list[tuple[Lookup, Load, Any]]:
        """The values to warm, each loaded after a lookup of its tokens, in the write's own
        transaction: flushed, its locks held, about to commit. Stored by the bumps' own script,
        and only if no other write bumped since that lookup (cache.store._BUMP, `Bumped`).

        Why the transaction's view is the committed one: READ COMMITTED (db/) shows each
        statement every commit before it, and this write's rows, which commit as they are. A
        write that commits after the load bumps after the lookup, so it fails the check or
        retires the value; and every writer of a project's tasks waits for the project's lock
        this write holds. Loading here, not after the commit, spares a session of its own and
        the queries of what the write already holds (`known`: the task is its own row). Until the
        bump readers read the old value, which is right while the write is unanswered."""
        if not self.to_warm or not self.services.settings.warm_after_write:
            return []
        return self._lookup_and_load(self.to_warm, only_missing=False, session=self.session)

    def _lookup_and_load(self, targets: list[tuple[Key, Load, Make | None]], *,
                         only_missing: bool,
                         session: Session | None = None) -> list[tuple[Lookup, Load, Any]]:
        """Each target's lookup, its loader and the value loaded, or revised (after the
        lookup), in `session` or, after the commit, a session of its own."""
        try:
            lookups = self.services.cache.lookup_many([key for key, _, _ in targets],
                                                      counted=False)
            due = [(lookup, load, make) for lookup, (_, load, make) in zip(lookups, targets)
                   if lookup.tokens is not None and not (only_missing and lookup.hit)]
            if not due:
                return []  # Redis unreachable (or nothing missing): nothing to load
            if session is not None:
                return self._loaded(due, session)
            with self.services.db.session() as own:
                return self._loaded(due, own)
        except Exception as exc:  # a failed warm-up is a later miss, not a failed write
            if session is not None and isinstance(exc, DBAPIError):
                raise  # but in the write's own transaction, its commit would meet the fault
            log.warning("warm-up after a write failed to load: %s", exc)
            return []

    @staticmethod
    def _loaded(due: list[tuple[Lookup, Load, Make | None]],
                session: Session) -> list[tuple[Lookup, Load, Any]]:
        return [(lookup, load, make(lookup, session) if make else load(session))
                for lookup, load, make in due]

    @staticmethod
    def _store_with_last_bumps(loaded: list[tuple[Lookup, Load, Any]],
                               bumped: Bumped, named: set[str]) -> None:
        """Have the last event's bump script store the loaded values (cache.store._BUMP) under
        the tokens the earlier events' bumps left, if those bumps were this write's alone."""
        for lookup, _, value in loaded:
            tokens = bumped.replace(lookup.key.versions, lookup.tokens, named)
            if tokens is not None:
                bumped.store_with_next_bumps(lookup.key, tokens, value)

    def _store_warmed(self, loaded: list[tuple[Lookup, Load, Any]],
                      bumped: Bumped, named: set[str]) -> None:
        """Each value the bumps did not store, under the tokens they set; one that cannot be
        (another writer of the same list bumped between this write's lookup and its bump, a
        common case on a busy project) is looked up, loaded and stored again after the bumps,
        the way a reader would: otherwise its next reader misses and loads it anyway."""
        again = []
        try:
            for lookup, load, value in loaded:
                key = lookup.key
                if key.name in bumped.stored:
                    metrics.warmed.labels(key.family, "stored").inc()
                    continue
                tokens = bumped.replace(key.versions, lookup.tokens, named)
                if tokens is not None and self.services.cache.store(Lookup(key, tokens), value):
                    metrics.warmed.labels(key.family, "stored").inc()
                else:
                    again.append((key, load, None))
            for lookup, _, value in self._lookup_and_load(again, only_missing=True):
                stored = self.services.cache.store(lookup, value)
                metrics.warmed.labels(lookup.key.family,
                                      "reloaded" if stored else "superseded").inc()
        except Exception as exc:  # the write is committed: a failed warm-up is a later miss
            log.warning("warm-up after a write failed to store: %s", exc)

    def _committed_after_all(self, exc: OperationalError) -> bool:
        """A connection lost during COMMIT: did the server commit? The write's first outbox row
        says, read on a fresh connection with a locking read, which waits for a COMMIT still in
        flight. Found: it committed, the after-commit steps run. Absent: the server rolled it
        back and the error may run the write again (`retryable`). Unknown (no outbox row, or
        the database unreachable): the error stands, never run twice."""
        if not exc.connection_invalidated or not self.events:
            exc.during_commit = True
            return False
        first = self.events[0].event_id
        try:
            with self.services.db.writers() as probe:
                found = probe.scalar(select(OutboxEvent.id)
                                     .where(OutboxEvent.event_id == first).with_for_update())
                probe.rollback()
        except DBAPIError:
            exc.during_commit = True
            return False
        log.warning("connection lost during COMMIT; the write %s (%s)", first,
                    "committed" if found else "was rolled back: running it again")
        return found is not None

    def _recount_missing(self, event: Emitted, result: dict) -> None:
        """A delta to an aggregate nobody has cached ("missing") leaves only a recount to do
        (tasks/events.py): schedule it here, coalesced as the worker would, and the event needs
        no worker pass (one Celery task, its outbox stamp and Flower's share less per write to
        such an aggregate). One that cannot be scheduled stays for the worker."""
        ensure = self.services.extras.get("ensure_recount")
        if ensure is None or "missing" not in result["deltas"]:
            return
        for i, (data, outcome) in enumerate(zip(event.payload["deltas"], result["deltas"])):
            if outcome == "missing":
                delta = Delta.from_dict(data)
                if ensure(delta.kind, delta.org_id, delta.owner_id, "coalesced"):
                    result["deltas"][i] = "recount_scheduled"

    def _mark_processed(self, outbox_ids: list[int]) -> None:
        """Nothing is left for a worker to do: say so (in the next batch of stamps,
        services/stamps.py), instead of sending it a task that would apply the event again and
        change nothing (that pass cost a write more CPU, in the worker, Flower and the broker,
        than the write itself)."""
        if self.services.stamps is not None:
            self.services.stamps.add(outbox_ids)
        metrics.outbox_events.labels("finished_by_web").inc(len(outbox_ids))

    def _publish(self, outbox_ids: list[int]) -> None:
        try:
            self.services.publish(outbox_ids)
            metrics.outbox_events.labels("sent_to_worker").inc(len(outbox_ids))
        except Exception as exc:  # the outbox sweep re-sends it; the write stands
            metrics.outbox_events.labels("left_to_sweep").inc(len(outbox_ids))
            log.warning("could not publish events %s (the sweep will): %s", outbox_ids, exc)


# Delta outcomes after which the cached aggregate converges without a worker (anything else, a
# worker looks at again: it schedules a recount where one is needed). "unread": statistics nobody
# cached that no change recounts (aggregates.USER_STATS): nothing is stale.
SETTLED = {"applied", "duplicate", "recount_scheduled", "unread"}


def is_finished(result: dict) -> bool:
    """The web's application of an event left nothing to do: every version it names was bumped
    and every delta folded into a cached aggregate."""
    return result["invalidated"] and all(outcome in SETTLED for outcome in result["deltas"])


F = TypeVar("F", bound=Callable[..., Any])
# MySQL/MariaDB: 1213 deadlock, 1205 lock wait timeout. The transaction was rolled back whole,
# nothing was committed or published, so running the write again is safe.
RETRYABLE_CODES = {1213, 1205}


def retryable(exc: OperationalError) -> bool:
    """A deadlock, or a connection lost (killed, server restarted) before COMMIT was sent: the
    server rolled the transaction back, so it runs again on a fresh connection. Lost during
    COMMIT, the outcome is unknown and the error stands."""
    if getattr(exc.orig, "args", [None])[0] in RETRYABLE_CODES:
        return True
    return exc.connection_invalidated and not getattr(exc, "during_commit", False)


def retry_on_deadlock(fn: F, attempts: int = 4) -> F:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except OperationalError as exc:
                if not retryable(exc) or attempt == attempts:
                    raise
                log.info("%s: %s, retrying (attempt %d)", fn.__name__, exc.orig, attempt)
                time.sleep(random.uniform(0.005, 0.03) * attempt)
        raise AssertionError("unreachable")
    return run  # type: ignore[return-value]
