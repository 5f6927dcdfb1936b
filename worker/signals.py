"""Worker process signals: services per pool process, metrics, and a warm-up at start."""

from __future__ import annotations

import logging
import os

from celery import signals

log = logging.getLogger(__name__)


@signals.worker_process_init.connect(weak=False)
def _build_services(**_) -> None:
    """In each pool process, right after the fork."""
    from celery import current_app

    from worker.base import reset_after_fork

    reset_after_fork(current_app)


@signals.worker_process_shutdown.connect(weak=False)
def _close_services(pid=None, **_) -> None:
    from worker import metrics
    from worker.base import close_process_services

    close_process_services()
    metrics.process_dead(pid or os.getpid())


@signals.worker_init.connect(weak=False)
def _serve_metrics(sender=None, **_) -> None:
    from worker import metrics

    app = sender.app
    queues = [q.name for q in app.conf.task_queues]
    metrics.declare_tasks(sorted(n for n in app.tasks if not n.startswith("celery.")))
    metrics.serve(app.conf.broker_url, queues, getattr(app, "taskcache_settings", None))


@signals.worker_ready.connect(weak=False)
def _warm_up_on_start(sender=None, **_) -> None:
    """A fresh worker often follows a deploy or a Redis restart: fill the cache now rather than at
    the first beat tick. WARMUP_ON_START=0 turns it off."""
    if os.environ.get("WARMUP_ON_START", "1").strip().lower() in {"0", "false", "no", "off"}:
        return
    try:
        sender.app.send_task("tasks.warmup.warm_all", kwargs={"trigger": "worker_ready"})
    except Exception as exc:
        log.warning("could not send the start-up warm-up: %s", exc)
