"""Worker-side Prometheus metrics: task counts, durations, failures, queue lengths.

Celery's prefork pool runs tasks in several processes, so the worker uses prometheus-client's
multiprocess mode with a directory of its own (never the web's: `make up` gives gunicorn one). The
main worker process serves the sum of all its pool processes on WORKER_METRICS_PORT (default
9808; 0 turns it off), queue lengths included, read from the broker at scrape time.
"""

from __future__ import annotations

import logging
import os

# Imported only after worker.multiprocess.use_multiprocess_dir() in Celery processes.
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808


tasks_total = Counter("celery_tasks_total", "Tasks run, by outcome", ["task", "outcome"])
task_duration = Histogram(
    "celery_task_duration_seconds", "Task run time", ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
task_failures = Counter("celery_task_failures_total", "Tasks that failed for good",
                        ["task", "exception"])
outbox_resent = Counter("outbox_events_resent_total", "Events the outbox sweep re-sent")
warmup_keys = Counter("warmup_keys_filled_total", "Cache entries a warm-up filled", ["family"])


class QueueLengthCollector:
    """`celery_queue_length{queue}` and `celery_unacked_messages`, read from the broker."""

    def __init__(self, broker_url: str, queues: list[str]) -> None:
        self.broker_url = broker_url
        self.queues = queues

    def collect(self):
        import redis
        from prometheus_client.core import GaugeMetricFamily

        lengths = GaugeMetricFamily("celery_queue_length", "Messages waiting in a queue",
                                    labels=["queue"])
        unacked = GaugeMetricFamily("celery_unacked_messages",
                                    "Messages delivered to workers and not yet acknowledged")
        client = redis.Redis.from_url(self.broker_url, socket_timeout=0.5,
                                      socket_connect_timeout=0.5)
        try:
            pipe = client.pipeline(transaction=False)
            for queue in self.queues:
                # The Redis transport keeps one list per priority step: name, name\x06\x163, ...
                for step in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
                    pipe.llen(queue + step)
            pipe.hlen("unacked")
            replies = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("queue lengths unavailable: %s", exc)
            return
        finally:
            client.close()
        for i, queue in enumerate(self.queues):
            lengths.add_metric([queue], sum(replies[4 * i:4 * i + 4]))
        unacked.add_metric([], replies[-1])
        yield lengths
        yield unacked


def serve(broker_url: str, queues: list[str]) -> None:
    """In the main worker process: expose the pool's metrics, summed, plus queue lengths."""
    port = int(os.environ.get("WORKER_METRICS_PORT") or DEFAULT_PORT)
    if port == 0:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueLengthCollector(broker_url, queues))
    try:
        start_http_server(port, addr=os.environ.get("WORKER_METRICS_ADDR", "127.0.0.1"),
                          registry=registry)
        log.info("worker metrics on http://127.0.0.1:%d/metrics", port)
    except OSError as exc:  # a second worker on this machine: its metrics stay unexposed
        log.warning("worker metrics port %d unavailable: %s", port, exc)


def process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
