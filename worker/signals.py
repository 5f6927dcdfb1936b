"""Worker process signals: services per pool process, metrics, and a warm-up at start.
`connect()` wires them (worker.celery_app calls it once for the CLI's app)."""

from __future__ import annotations

import gc
import logging
import os

from celery import current_app, signals

from worker.base import close_process_services, reset_after_fork

log = logging.getLogger(__name__)


def _build_services(**_) -> None:
    """In each pool process, right after the fork: its services, then everything it holds so far
    (modules, the app, the services) moved out of the collector's sight, as the API's gunicorn
    workers do (web/gunicorn_conf.py). A full collection walked all of it: about 54 ms of a pool
    process's CPU each time, with the task it was running stopped meanwhile (BENCHMARKS.md)."""
    reset_after_fork(current_app)
    gc.collect()
    gc.freeze()


def _close_services(pid=None, **_) -> None:
    from worker import metrics  # only once the multiprocess switch has happened

    close_process_services()
    metrics.process_dead(pid or os.getpid())


def _serve_metrics(sender=None, **_) -> None:
    from worker import metrics

    app = sender.app
    queues = [q.name for q in app.conf.task_queues]
    metrics.declare_tasks(sorted(n for n in app.tasks if not n.startswith("celery.")))
    metrics.serve(app.conf.broker_url, queues, getattr(app, "taskcache_settings", None))


def _warm_up_on_start(sender=None, **_) -> None:
    """A fresh worker often follows a deploy or a Redis restart: fill the cache now rather than at
    the first beat tick. WARMUP_ON_START=0 turns it off."""
    if os.environ.get("WARMUP_ON_START", "1").strip().lower() in {"0", "false", "no", "off"}:
        return
    try:
        sender.app.send_task("tasks.warmup.warm_all", kwargs={"trigger": "worker_ready"})
    except Exception as exc:
        log.warning("could not send the start-up warm-up: %s", exc)


def connect() -> None:
    """Idempotent (each handler has a dispatch_uid)."""
    for signal, handler in ((signals.worker_process_init, _build_services),
                            (signals.worker_process_shutdown, _close_services),
                            (signals.worker_init, _serve_metrics),
                            (signals.worker_ready, _warm_up_on_start)):
        signal.connect(handler, weak=False, dispatch_uid=f"taskcache.{handler.__name__}")
