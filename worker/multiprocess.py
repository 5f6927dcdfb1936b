"""prometheus-client's multiprocess mode for the Celery processes (see worker/metrics.py).

Kept apart from worker/metrics.py: importing that module creates the metrics, which must happen
after this switch."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def use_multiprocess_dir() -> str:
    """Point prometheus-client at a fresh directory owned by this process tree.

    The Celery CLI imports prometheus-client (through Flower's plugin) before it loads our app, so
    the value class chosen at that import is replaced here; no metric exists yet at this point,
    every one created afterwards writes to the directory."""
    path = os.environ.get("WORKER_PROMETHEUS_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="taskcache-worker-metrics-")
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    return path
