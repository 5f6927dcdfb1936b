"""What every request and every task works with, built once per process from the settings."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import redis
from cachetools import LRUCache
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from aggregates import AggregateStore
from cache.breaker import CircuitBreaker
from cache.l1 import L1Cache, L1Subscriber
from cache.near import NearCache
from cache.store import DisabledCache, RedisCache
from config import Settings
from db import Database
from services.stamps import ProcessedStamps

log = logging.getLogger(__name__)

Publisher = Callable[[Sequence[int]], None]


def _no_publisher(outbox_ids: Sequence[int]) -> None:
    """Until a Celery app is attached the outbox sweep delivers events."""


class Memo:
    """A bounded, thread-safe map of facts that never change once written (which project a task
    is in): what a process forgets costs one query again, what it keeps is never wrong."""

    def __init__(self, maxsize: int) -> None:
        self._data: LRUCache = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            return self._data.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


# About 350 B an entry (an organization's and a task's ids, the project's, the LRU's bookkeeping;
# by tracemalloc): 2.7 MiB at most. Writes follow the reads' Zipf law: the hot tasks stay.
TASK_PROJECTS = 8_192


@dataclass
class Services:
    settings: Settings
    db: Database
    redis: redis.Redis | RedisCluster
    cache: RedisCache
    aggregates: AggregateStore
    l1: L1Cache
    publish: Publisher = _no_publisher
    l1_subscriber: L1Subscriber | None = None
    stamps: ProcessedStamps | None = None
    extras: dict = field(default_factory=dict)
    task_projects: Memo = field(default_factory=lambda: Memo(TASK_PROJECTS))

    def close(self) -> None:
        if self.stamps:
            self.stamps.stop()
        if self.l1_subscriber:
            self.l1_subscriber.stop()
        if self.cache.near:
            self.cache.near.stop()
        self.cache.refreshes.stop()
        self.db.dispose()
        self.redis.close()


def redis_client(settings: Settings, **overrides) -> redis.Redis | RedisCluster:
    """The cache's client: a Redis Cluster when REDIS_CLUSTER_URL names one, else REDIS_URL. Both
    run the same commands, scripts and key names."""
    options = dict(socket_timeout=settings.redis_socket_timeout,
                   socket_connect_timeout=settings.redis_socket_timeout,
                   retry_on_timeout=False, health_check_interval=0)
    options.update(overrides)
    if settings.redis_cluster_url:
        from stack.redis_cluster import parse_cluster_url

        seeds = [ClusterNode(host, port)
                 for host, port in parse_cluster_url(settings.redis_cluster_url)]
        options.pop("retry_on_timeout", None)  # deprecated on a cluster: timeouts are retried
        # One retry: enough to follow a failover's new slot map, short enough for the breaker
        # to see a dead shard instead of a request waiting through the cluster's own backoff.
        options.setdefault("retry", Retry(NoBackoff(), 1))
        return RedisCluster(startup_nodes=seeds, require_full_coverage=False, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def build_services(settings: Settings, *, subscribe_l1: bool = True) -> Services:
    db = Database.connect(settings.database_url)
    client = redis_client(settings)
    breaker = CircuitBreaker(settings.breaker_cooldown)
    cache_cls = RedisCache if settings.cache_enabled else DisabledCache
    cache = cache_cls(client, breaker, counter_interval=settings.counter_flush_interval,
                      refresh_ahead=settings.cache_refresh_ahead)
    l1 = L1Cache()
    services = Services(settings, db, client, cache, AggregateStore(cache), l1,
                        stamps=ProcessedStamps(db))
    if subscribe_l1 and settings.cache_enabled:
        # Pub/sub blocks on reads: its connection must not share the request timeout.
        # Nor retry by itself: a lost connection must surface so that the L1 is cleared.
        listener = redis_client(settings, socket_timeout=None, retry=Retry(NoBackoff(), 0))
        services.l1_subscriber = L1Subscriber(listener, l1).start()
        # Subscribing clears the L1 (what was published before is unknown): let that happen
        # before the first request fills it, or the first values are dropped again at once.
        services.l1_subscriber.ready.wait(timeout=1.0)
        if settings.near_cache_entries > 0:
            cache.near = NearCache(client, max_entries=settings.near_cache_entries).start()
            cache.near.ready.wait(timeout=1.0)
    return services
