"""The Celery side of the system: the app factory, the web's publisher, worker signals and metrics.

Imports stay lazy: the web process imports this package for `attach_publisher` only, and the
Celery CLI must be able to switch prometheus-client to multiprocess mode (worker/celery_app.py)
before any metric of the project is created.
"""

from __future__ import annotations


def create_celery(settings):
    from worker.app import create_celery as factory

    return factory(settings)


def attach_publisher(services, app=None) -> None:
    from worker.publish import attach_publisher as attach

    attach(services, app)


def register_cli(flask_app) -> None:
    from worker.cli import warm_command

    flask_app.cli.add_command(warm_command)


__all__ = ["attach_publisher", "create_celery", "register_cli"]
