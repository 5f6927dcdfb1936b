"""Gunicorn settings for `make up` (`gunicorn -c web/gunicorn_conf.py "web:create_app()"`).

The bind address comes from the command line. Environment: WEB_CONCURRENCY (worker processes),
GUNICORN_ACCESS_LOG=1 (access log on stdout), PROMETHEUS_MULTIPROC_DIR (set by `make up`).
"""

import gc
import os


def _cores() -> int:
    """CPUs this process may run on (a container's CPU set), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


# Threads cover I/O waits (database, Redis); more processes than 4 only multiply per-process L1
# caches and connection pools on a development machine.
workers = int(os.environ.get("WEB_CONCURRENCY") or min(2 * _cores() + 1, 4))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS") or "gthread"
threads = int(os.environ.get("GUNICORN_THREADS") or 4)
# Connections one worker process holds at once (gthread: in flight plus kept alive). gunicorn's
# 1,000 let one process accept every kept-alive connection of a client that opens them together
# (wrk's 16 all landed in one process in 2 runs of 8): that process runs on one core (the GIL)
# while the others idle, and throughput halved. Twice the threads leaves room for keep-alive and
# sends the rest to other processes (BENCHMARKS.md, "Connections per process").
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS") or 2 * threads)
graceful_timeout = 10
accesslog = "-" if _flag("GUNICORN_ACCESS_LOG") else None
errorlog = "-"
# Gunicorn 23+ opens a control socket at one fixed path per user by default: a second gunicorn
# (the tests', another checkout's) would take it over. Nothing here uses gunicornc.
control_socket_disable = True


def on_starting(server):
    """Gunicorn's own error answers in problem+json, and no Server header (web/gunicorn_edges)."""
    from web import gunicorn_edges

    gunicorn_edges.install()


def child_exit(server, worker):
    """A dead worker's live gauges must leave /metrics (prometheus_client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):
    """A worker dies with its master, even a SIGKILLed one (gunicorn's own check of the parent
    only runs between requests); `make up` sets the same on the master (stack/supervisor.py)."""
    from stack.redis_server import die_with_parent

    die_with_parent()


def post_worker_init(worker):
    """The objects the worker made loading the app (modules, the app, its services) move out of
    the collector's sight: a full collection then walks only what requests made since. It walked
    them all, 100 ms of one core under load, stopping every thread of the process for 230-460 ms
    of wall time on 2 busy cores (BENCHMARKS.md, "Garbage collection")."""
    gc.collect()
    gc.freeze()
