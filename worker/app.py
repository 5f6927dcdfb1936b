"""The Celery app factory.

`create_celery(settings)` gives a bare app (the web process uses one to send tasks by name);
`celery_from_environment()` is the CLI's app: settings from the environment, task modules,
worker signals, and worker metrics in prometheus-client's multiprocess mode.
"""

from __future__ import annotations

from celery import Celery

TASK_MODULES = ["tasks.events", "tasks.stats", "tasks.warmup", "tasks.outbox", "tasks.audit"]


def create_celery(settings, *, include_tasks: bool = False) -> Celery:
    app = Celery("taskcache", include=TASK_MODULES if include_tasks else None)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.celery_broker_url
    app.conf.redbeat_redis_url = settings.celery_broker_url
    # Settings travel with the app, not through global state (worker.base builds per-process
    # services from them).
    app.taskcache_settings = settings
    return app


def celery_from_environment() -> Celery:
    from worker.multiprocess import use_multiprocess_dir

    use_multiprocess_dir()  # before any metric of the project exists
    from config import load_settings
    from worker import signals  # noqa: F401  (connects the worker signals)

    app = create_celery(load_settings(), include_tasks=True)
    app.set_default()
    return app
