"""Celery settings (`worker.app.create_celery` loads this module; URLs come from config.Settings).

Every interval below can be shortened from the environment, which the worker tests do; production
keeps the defaults.
"""

from __future__ import annotations

import os

from kombu import Queue


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


# Messages are JSON: a poisoned queue must not run code (no pickle anywhere).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"
timezone = "UTC"
enable_utc = True

# A task is acknowledged after it ran, and a task whose worker process died (SIGKILL, OOM) is put
# back on its queue: every task here is idempotent, so running one twice is safe, losing one is not.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Nothing reads task results: the effects are in Redis and the database.
task_ignore_result = True
task_store_errors_even_if_ignored = False
worker_hijack_root_logger = False
broker_connection_retry_on_startup = True
# A broker outage of any length must not end a worker or beat: reconnect forever (the consumer
# backs off up to broker_connection_retry's interval_max, 30 s, between tries), never give up.
broker_connection_max_retries = None

# Flower and `celery events` need these.
worker_send_task_events = True
task_send_sent_event = True

# The longest countdown or ETA any task gets: a retry's backoff (TaskBase.retry_backoff_max).
# The Redis transport re-delivers an unacknowledged message after `visibility_timeout`, so it must
# be longer than every countdown, or delayed tasks would run twice; it is also how long a task of
# a worker killed as a whole (not just one pool process) waits before it is re-delivered.
LONGEST_COUNTDOWN = 60
VISIBILITY_TIMEOUT = int(_seconds("CELERY_VISIBILITY_TIMEOUT", 300))
assert VISIBILITY_TIMEOUT > LONGEST_COUNTDOWN, "visibility_timeout must exceed every countdown"
broker_transport_options = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    # A dead broker must fail a publish fast (the outbox sweep re-sends it); 5 s is above the
    # transport's 1 s BRPOP poll, which a socket timeout must not cut.
    "socket_connect_timeout": 1,
    "socket_timeout": 5,
}
broker_connection_timeout = 1

# Separate queues, so a long warm-up never delays an invalidation or a recount.
task_default_queue = "celery"
# Each queue with its own routing key: a Queue without one gets the default key "celery", and a
# message to any of them would then be copied to all four.
task_queues = tuple(Queue(name, routing_key=name)
                    for name in ("invalidate", "recompute", "warmup", "celery"))
task_routes = {
    "tasks.events.*": {"queue": "invalidate"},
    "tasks.outbox.*": {"queue": "invalidate"},
    "tasks.stats.*": {"queue": "recompute"},
    "tasks.audit.*": {"queue": "recompute"},
    "tasks.warmup.*": {"queue": "warmup"},
}

# The outbox sweep re-sends events still unprocessed after OUTBOX_SWEEP_AGE seconds.
OUTBOX_SWEEP_INTERVAL = _seconds("OUTBOX_SWEEP_INTERVAL", 5)
OUTBOX_SWEEP_AGE = _seconds("OUTBOX_SWEEP_AGE", 10)
WARMUP_INTERVAL = _seconds("WARMUP_INTERVAL", 120)
# The staleness auditor (tasks/audit.py; it also does what the stats drift audit did).
CACHE_AUDIT_INTERVAL = _seconds("CACHE_AUDIT_INTERVAL", 60)
TENANT_MEMORY_INTERVAL = _seconds("TENANT_MEMORY_INTERVAL", 300)

# Exactly one beat runs these (`make up` starts one). `expires`: a run that waited longer than its
# interval (workers were down) is dropped, the next one does the same work.
beat_schedule = {
    "outbox-sweep": {
        "task": "tasks.outbox.sweep",
        "schedule": OUTBOX_SWEEP_INTERVAL,
        "kwargs": {"older_than": OUTBOX_SWEEP_AGE},
        "options": {"expires": OUTBOX_SWEEP_INTERVAL},
    },
    "warm-up": {
        "task": "tasks.warmup.warm_all",
        "schedule": WARMUP_INTERVAL,
        "kwargs": {"trigger": "beat"},
        "options": {"expires": WARMUP_INTERVAL},
    },
    "cache-audit": {
        "task": "tasks.audit.audit_cache",
        "schedule": CACHE_AUDIT_INTERVAL,
        "options": {"expires": CACHE_AUDIT_INTERVAL},
    },
    "tenant-memory": {
        "task": "tasks.audit.tenant_memory",
        "schedule": TENANT_MEMORY_INTERVAL,
        "options": {"expires": TENANT_MEMORY_INTERVAL},
    },
}

# RedBeat (`celery beat -S redbeat.RedBeatScheduler`, as `make up-cluster` runs two beats): the
# schedule's state and the lock that lets exactly one beat send live in a Redis that never evicts:
# the broker's (`redbeat_redis_url`, set with `broker_url` in worker.app), never the cache, which
# evicts and is purged. A beat extends the lock on every tick (at most `--max-interval` apart); a
# standby polls for it every max-interval, so the schedule resumes within lock timeout +
# max-interval of a crash.
redbeat_redis_options = {"socket_timeout": 5, "socket_connect_timeout": 1}
redbeat_lock_timeout = int(_seconds("REDBEAT_LOCK_TIMEOUT", 5))
