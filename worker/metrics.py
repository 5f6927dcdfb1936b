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
from prometheus_client import Counter, Gauge, Histogram

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
# Beat's pulse: the outbox sweep succeeds every few seconds while beat and a worker both run.
last_success = Gauge("celery_task_last_success_timestamp_seconds",
                     "Unix time a task last succeeded", ["task"], multiprocess_mode="max")
OUTCOMES = ("succeeded", "failed", "retried")


def declare_tasks(names) -> None:
    """Every task's outcome series exists from the start at 0: a failure ratio is 0, not no data,
    until something fails."""
    for name in names:
        for outcome in OUTCOMES:
            tasks_total.labels(name, outcome)


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


class OutboxCollector:
    """`outbox_unprocessed_events` and `outbox_oldest_unprocessed_age_seconds` (0 when none),
    read from the database at scrape time (ix_outbox_processed serves both)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._engine = None

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import create_engine, func, select

        from models import OutboxEvent, utcnow

        if self._engine is None:
            self._engine = create_engine(self.database_url, pool_size=1, max_overflow=0,
                                         pool_pre_ping=True)
        unprocessed = OutboxEvent.processed_at.is_(None)
        try:
            with self._engine.connect() as conn:
                count = conn.scalar(select(func.count()).select_from(OutboxEvent)
                                    .where(unprocessed))
                oldest = conn.scalar(select(OutboxEvent.created_at).where(unprocessed)
                                     .order_by(OutboxEvent.id).limit(1))
        except Exception as exc:  # the database is down: no figure rather than a wrong one
            log.debug("outbox figures unavailable: %s", exc)
            return
        yield GaugeMetricFamily("outbox_unprocessed_events",
                                "Outbox events the worker has not applied yet", value=count or 0)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("outbox_oldest_unprocessed_age_seconds",
                                "Age of the oldest unprocessed outbox event (0 when none)",
                                value=max(age, 0.0))


class TenantMemoryCollector:
    """`cache_tenant_memory_bytes{org}`: the busiest organizations by Redis memory and `other`,
    as last estimated by the tenant memory task (tasks/audit.py), read from the cache Redis."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    def collect(self):
        import json

        import redis
        from prometheus_client.core import GaugeMetricFamily

        from tasks.audit import TENANT_MEMORY_KEY

        client = redis.Redis.from_url(self.redis_url, socket_timeout=0.5,
                                      socket_connect_timeout=0.5)
        try:
            raw = client.get(TENANT_MEMORY_KEY)
        except (redis.RedisError, OSError) as exc:
            log.debug("tenant memory unavailable: %s", exc)
            return
        finally:
            client.close()
        if not raw:
            return
        report = json.loads(raw)
        family = GaugeMetricFamily("cache_tenant_memory_bytes",
                                   "Estimated Redis memory of an organization's cached data "
                                   "(top organizations, the rest as other, shared: not tenant "
                                   "data)", labels=["org"])
        for org, size in report["bytes"].items():
            family.add_metric([org], size)
        yield family
        yield GaugeMetricFamily("cache_tenant_memory_sampled_keys",
                                "Keys the last tenant memory estimate sampled",
                                value=report["sampled"])


def serve(broker_url: str, queues: list[str], settings=None) -> None:
    """In the main worker process: expose the pool's metrics, summed, plus queue lengths, the
    outbox's backlog and the tenants' memory."""
    port = int(os.environ.get("WORKER_METRICS_PORT") or DEFAULT_PORT)
    if port == 0:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueLengthCollector(broker_url, queues))
    if settings is not None:
        registry.register(OutboxCollector(settings.database_url))
        registry.register(TenantMemoryCollector(settings.redis_url))
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
