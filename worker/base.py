"""One task base class: it owns the process's services and a task's session, its metrics and its
retries. Services are built once per worker process, after the fork (never inherited: a pooled
database connection shared by two processes corrupts both)."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator

import redis
from celery import Task
from celery.exceptions import Retry
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cache.store import Unavailable
from worker.publish import attach_publisher

log = logging.getLogger(__name__)

# Errors that pass by themselves: a Redis or database restart, a lock wait timeout, a dropped
# connection. Anything else is a bug and fails at once (retrying it would only repeat it).
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, OperationalError, Unavailable)

_services = None
_services_pid: int | None = None


def process_services(app):
    """This process's Services, built on first use after a fork."""
    global _services, _services_pid
    if _services is None or _services_pid != os.getpid():
        if _services is not None:
            # Inherited from the parent: drop its pool without closing the parent's sockets.
            _services.db.engine.dispose(close=False)
        from config import load_settings
        from services.context import build_services

        settings = getattr(app, "taskcache_settings", None) or load_settings()
        _services = build_services(settings, subscribe_l1=False)
        attach_publisher(_services, app)
        _services_pid = os.getpid()
    return _services


def reset_after_fork(app) -> None:
    process_services(app)


def close_process_services() -> None:
    global _services
    if _services is not None and _services_pid == os.getpid():
        _services.close()
    _services = None


class TaskBase(Task):
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 0.5          # 0.5 s, 1 s, 2 s ... each randomised (jitter) ...
    retry_backoff_max = 60       # ... up to celeryconfig.LONGEST_COUNTDOWN
    retry_jitter = True
    max_retries = 8

    @property
    def services(self):
        return process_services(self.app)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write session: committed when the block ends, rolled back when it raises."""
        session = self.services.db.writers()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def __call__(self, *args, **kwargs):
        from worker import metrics

        started = time.perf_counter()
        outcome = "succeeded"
        try:
            return super().__call__(*args, **kwargs)
        except Retry:
            outcome = "retried"
            raise
        except BaseException as exc:
            outcome = "failed"
            metrics.task_failures.labels(self.name, type(exc).__name__).inc()
            raise
        finally:
            metrics.tasks_total.labels(self.name, outcome).inc()
            metrics.task_duration.labels(self.name).observe(time.perf_counter() - started)
