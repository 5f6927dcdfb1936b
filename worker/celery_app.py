"""The Celery CLI's app (`celery -A worker.celery_app worker|beat|flower`): settings from the
environment, the task modules, the worker signals, and worker metrics in prometheus-client's
multiprocess mode. The top of the worker package: nothing in it imports this module."""

from __future__ import annotations

from celery import Celery


def celery_from_environment() -> Celery:
    from worker.multiprocess import use_multiprocess_dir

    use_multiprocess_dir()  # before any metric of the project exists
    from config import load_settings
    from worker import signals
    from worker.app import create_celery

    app = create_celery(load_settings(), include_tasks=True)
    signals.connect()
    app.set_default()
    return app


app = celery_from_environment()
