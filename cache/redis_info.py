"""Redis's own figures (memory, evictions, keyspace hits) on the API's /metrics, read with INFO at
scrape time: the strategy's memory and eviction thresholds need them, and no exporter is assumed.
Every API process reports the same server: aggregate with max(), not sum()."""

from __future__ import annotations

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_COUNTERS = {
    "evicted_keys": "Keys Redis evicted to stay under maxmemory",
    "expired_keys": "Keys Redis removed because their TTL ran out",
    "keyspace_hits": "Redis key lookups that found the key",
    "keyspace_misses": "Redis key lookups that found nothing",
}


class RedisInfoCollector:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self):
        up = GaugeMetricFamily("redis_up", "1 when the cache Redis answered INFO at this scrape")
        try:
            info = self.client.info()
        except (redis.RedisError, OSError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("redis_memory_used_bytes", "Redis used_memory",
                                value=info.get("used_memory", 0))
        yield GaugeMetricFamily("redis_memory_max_bytes", "Redis maxmemory (0: no limit)",
                                value=info.get("maxmemory", 0))
        yield GaugeMetricFamily("redis_connected_clients", "Redis connected_clients",
                                value=info.get("connected_clients", 0))
        for field, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"redis_{field}", doc, value=info.get(field, 0))
        keys = GaugeMetricFamily("redis_db_keys", "Keys per logical database", labels=["db"])
        for name, stats in info.items():
            if name.startswith("db") and isinstance(stats, dict):
                keys.add_metric([name], stats.get("keys", 0))
        yield keys
