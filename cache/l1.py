"""The per-process cache (L1): bounded, thread-safe, expiring on the monotonic clock.

It holds only small process-wide data read on most requests (feature flags, configuration, role
definitions). A change publishes the key on a Redis shard channel (SPUBLISH, Redis 7); every
process drops it from its L1. On a Redis Cluster a shard channel lives on the master serving its
slot (and its replicas): each process subscribes there, not to every node as classic pub/sub
broadcasts. Missed messages (Redis down, reconnect, the channel's shard failing over) clear the
whole L1, and the short TTL bounds what a lost message could cost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import redis
from cachetools import TTLCache

from cache import metrics
from cache.store import MISSING

log = logging.getLogger(__name__)

CHANNEL = "cache:l1:invalidate"
CLEAR_ALL = "*"


class L1Cache:
    def __init__(self, maxsize: int = 1024, ttl: float = 30.0) -> None:
        self._data: TTLCache = TTLCache(maxsize=maxsize, ttl=ttl, timer=time.monotonic)
        self._lock = threading.Lock()
        # Bumped by every invalidation: a load that began before one must not be kept after it
        # (the L1's stale-set race: the message can arrive while the old value is being loaded).
        self._epoch = 0
        # Names this process publishes carry it, so that its subscriber skips its own echo (the
        # writer already dropped the name synchronously; the echo would drop the fresh value).
        self.origin = os.urandom(4).hex()

    def get(self, name: str, family: str) -> Any:
        with self._lock:
            value = self._data.get(name, MISSING)
        metrics.lookups.add("l1", family, value is not MISSING)
        return value

    def set(self, name: str, value: Any, epoch: int | None = None) -> bool:
        """Keep `value`, unless an invalidation came after `epoch` (see `epoch()`)."""
        with self._lock:
            if epoch is not None and epoch != self._epoch:
                return False
            self._data[name] = value
            return True

    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def invalidate(self, name: str) -> None:
        with self._lock:
            self._epoch += 1
            if name == CLEAR_ALL:
                self._data.clear()
            else:
                self._data.pop(name, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def announce(client: redis.Redis, name: str, origin: str = "") -> None:
    """Tell every process (but `origin`, which dropped it already) to drop `name` from its L1."""
    client.spublish(CHANNEL, f"{origin} {name}" if origin else name)


class ChannelMoved(redis.ConnectionError):
    """The server unsubscribed us (the channel's slot moved away from the node)."""


def channel_node(client) -> redis.Redis:
    """A plain connection to the node that serves CHANNEL: the client itself on a single Redis;
    on a cluster, the master of the channel's slot, looked up afresh (a failover moves it). It
    never retries by itself: a lost connection must surface, so that the L1 is cleared."""
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry

    if not isinstance(client, RedisCluster):
        return client
    client.nodes_manager.initialize()
    node = client.get_node_from_key(CHANNEL)
    kwargs = node.redis_connection.connection_pool.connection_kwargs
    return redis.Redis(host=node.host, port=node.port, socket_timeout=None,
                       socket_connect_timeout=kwargs.get("socket_connect_timeout"),
                       retry=Retry(NoBackoff(), 0), health_check_interval=0)


class L1Subscriber:
    """A daemon thread applying invalidations published by any process to this process's L1."""

    def __init__(self, client: redis.Redis, l1: L1Cache, retry: float = 1.0) -> None:
        self._client = client
        self._l1 = l1
        self._retry = retry
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="l1-subscriber", daemon=True)

    def start(self) -> "L1Subscriber":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (redis.RedisError, OSError) as exc:
                log.debug("l1 subscriber lost redis: %s", exc)
            self.ready.clear()
            self._l1.invalidate(CLEAR_ALL)  # what was published meanwhile is unknown
            self._stop.wait(self._retry)

    def _listen(self) -> None:
        node = channel_node(self._client)
        pubsub = node.pubsub()
        try:
            pubsub.ssubscribe(CHANNEL)
            self._l1.invalidate(CLEAR_ALL)
            self.ready.set()
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.5)
                if message and message["type"] == "sunsubscribe":
                    raise ChannelMoved(f"unsubscribed from {CHANNEL}")
                if message and message["type"] == "smessage":
                    data = message["data"]
                    data = data.decode() if isinstance(data, bytes) else data
                    origin, _, name = data.rpartition(" ")
                    if origin != self._l1.origin:
                        self._l1.invalidate(name)
        finally:
            pubsub.close()
            if node is not self._client:
                node.close()


def read_through_l1(l1: L1Cache, name: str, family: str, load: Callable[[], Any]) -> tuple[Any, bool]:
    value = l1.get(name, family)
    if value is not MISSING:
        return value, True
    epoch = l1.epoch()
    value = load()
    l1.set(name, value, epoch)
    return value, False
