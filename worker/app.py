"""The Celery app factory: a bare app from settings (the web process uses one to send tasks by
name; `worker.celery_app` builds the CLI's app on top of it).

The worker package's modules depend one way: celery_app -> signals -> base -> publish -> app.
"""

from __future__ import annotations

from celery import Celery

from worker.broker_fix import close_channels_even_when_the_broker_is_gone

TASK_MODULES = ["tasks.events", "tasks.stats", "tasks.warmup", "tasks.outbox", "tasks.audit"]


def create_celery(settings, *, include_tasks: bool = False) -> Celery:
    close_channels_even_when_the_broker_is_gone()
    app = Celery("taskcache", include=TASK_MODULES if include_tasks else None)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.celery_broker_url
    app.conf.redbeat_redis_url = settings.celery_broker_url
    # Settings travel with the app, not through global state (worker.base builds per-process
    # services from them).
    app.taskcache_settings = settings
    return app
