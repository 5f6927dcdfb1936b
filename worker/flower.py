"""`python -m worker.flower [flower options]`: Flower on the project's Celery app, with every
page behind its authentication. Flower 2.2 serves /metrics (task names, worker hosts) and
/healthcheck to anyone, even with --basic-auth; here they ask for the same credentials."""

from __future__ import annotations

import sys

MAX_TASKS = 1000


def require_auth_on_every_page() -> None:
    from flower.views import monitor
    from tornado.web import authenticated

    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not getattr(handler.get, "__wrapped__", None):
            handler.get = authenticated(handler.get)


def main(argv: list[str]) -> None:
    require_auth_on_every_page()
    from celery.bin.celery import main as celery_main

    # Flower keeps every task it has seen, 100,000 by default, about 7 KB each: its memory grows
    # until it holds that many. The last 1,000 tasks bound it to about 7 MB and are the last ten
    # minutes at the soak's load (a write sends a worker a task only when the web could not
    # finish its event); rates and history are in Prometheus (celery_tasks_total).
    sys.argv = ["celery", "-A", "worker.celery_app", "flower", f"--max_tasks={MAX_TASKS}", *argv]
    celery_main()


if __name__ == "__main__":
    main(sys.argv[1:])
