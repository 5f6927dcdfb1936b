"""Prometheus metrics of the cache. Declared once per process, as prometheus-client expects;
in gunicorn they are aggregated across workers through PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections import deque
from typing import Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram

hits = Counter("cache_hits_total", "Cache hits", ["cache_layer", "entity_type"])
misses = Counter("cache_misses_total", "Cache misses", ["cache_layer", "entity_type"])
duration = Histogram(
    "cache_operation_duration_seconds",
    "Cache operation duration",
    ["operation", "cache_layer"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
errors = Counter("cache_errors_total", "Cache operations that failed (served as misses)",
                 ["operation"])
invalidations = Counter("cache_invalidations_total", "Cache version bumps", ["entity_type", "source"])
# After a task write (services/tasks.py warm_after_write): "stored" under the tokens the write's
# bump set; "reloaded" when another writer's bump came between the warm-up's lookup and the
# write's, and the value was looked up, loaded and stored again after it; "superseded" when even
# that store found newer tokens (nothing stored).
warmed = Counter("cache_warmed_total", "Values loaded and stored right after a write, so that the "
                 "next reader hits", ["entity_type", "outcome"])
# A value read in the last part of its TTL, loaded again and stored before it expires
# (cache/store.py RedisCache._refresh): "stored"; "superseded" when a write retired the version
# it was read under (nothing stored); "failed" when Redis or the database could not be reached.
refreshed = Counter("cache_refreshed_ahead_total", "Values loaded again before their TTL ran "
                    "out, because they were still being read", ["entity_type", "outcome"])
# After a write's commit (services/uow.py): events the web applied whole and marked processed,
# events sent to a worker to finish, and events neither could take (the outbox sweep re-sends them).
outbox_events = Counter("outbox_events_total", "Events after their write's commit, by who takes "
                        "them on", ["outcome"])
stale_served = Counter("cache_stale_served_total", "Values served while known to be stale",
                       ["entity_type"])
singleflight_waits = Counter("cache_singleflight_waits_total",
                             "Readers that waited for another reader's load", ["entity_type",
                                                                               "outcome"])
breaker_open = Gauge("cache_breaker_open", "1 while the Redis circuit breaker is open",
                     multiprocess_mode="max")
breaker_transitions = Counter("cache_breaker_transitions_total", "Circuit breaker state changes",
                              ["state"])
inline_computations = Counter("stats_inline_computations_total",
                              "Aggregates computed on a request (cold misses)", ["aggregate"])
aggregate_deltas = Counter("stats_deltas_total", "Aggregate deltas by outcome",
                           ["aggregate", "outcome", "source"])
aggregate_drift = Counter("stats_drift_corrected_total",
                          "Aggregates a full recount found wrong and corrected", ["aggregate"])
aggregate_recomputes = Counter("stats_recomputes_total", "Full aggregate recounts",
                               ["aggregate", "reason"])
stats_freshness = Histogram(
    "stats_freshness_seconds",
    "From a counted change's write (its outbox row) to its delta folded into the cached stats",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
# Per organization, bounded (cache/tenants.py): the busiest organizations of this process by name,
# every other one summed as org="other".
tenant_lookups = Counter("cache_tenant_lookups_total",
                         "Redis lookups of tenant data by organization (busiest by name, the rest "
                         "as other)", ["org", "result"])
# The staleness auditor (tasks/audit.py).
audit_checked = Counter("cache_audit_checked_total",
                        "Cached values the auditor compared with the database", ["entity_type"])
audit_stale = Counter("cache_audit_stale_total",
                      "Cached values that differed from the database after a re-check (retired)",
                      ["entity_type"])
audit_in_flight = Counter("cache_audit_in_flight_total",
                          "Differences explained by a write in flight (retired or caught up "
                          "before the re-check): not stale", ["entity_type"])
# The near cache (cache/near.py): per-process copies kept coherent by Redis client tracking.
near_invalidations = Counter("cache_near_invalidations_total",
                             "Keys Redis reported changed to this process's near cache")
near_entries = Gauge("cache_near_entries", "Copies held by the near cache",
                     multiprocess_mode="livesum")
near_bytes = Gauge("cache_near_bytes", "Estimated memory of the near cache's copies",
                   multiprocess_mode="livesum")
near_probes = Counter("cache_near_probes_total",
                      "Requests that pinged Redis themselves because the near cache's heartbeat "
                      "was late (a busy process)")


def drain(queue: deque) -> Iterator:
    """Take what `queue` holds now, oldest first, while other threads go on appending (each
    popleft is atomic; the deque is never swapped, so no append is lost)."""
    for _ in range(len(queue)):
        yield queue.popleft()


class LookupCounts:
    """Readers' lookups as hits and misses (by layer, key family and organization), counted in
    this process and added to their Prometheus series once per `interval` seconds by a thread of
    its own, started in each process on its first count. A warm read makes two or three lookups,
    and in multiprocess mode every increment is an mmap write under a lock: one by one, with the
    tenants' series, they were 34 of a warm task GET's 235 us in-process (BENCHMARKS.md).
    A request appends its lookups to a deque (atomic, no lock: gunicorn's threads queued on the
    lock that was here) and the flush sums them."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()  # starting the flusher, and one flush at a time
        self._pending: deque[tuple[tuple[str, str, bool, str | None], ...]] = deque()
        self._series: dict[tuple[str, str, bool], object] = {}
        self._flusher_pid: int | None = None
        # A forked child (a gunicorn worker) starts with no flusher and nothing counted: its
        # parent's counts are the parent's. Checked here, not on every count: os.getpid() was
        # 5% of a warm task GET's samples in-process.
        os.register_at_fork(after_in_child=self._forget_parent)

    def add(self, layer: str, family: str, hit: bool, org_id: str | None = None) -> None:
        self.add_all(((layer, family, hit, org_id),))

    def add_all(self, lookups: Iterable[tuple[str, str, bool, str | None]]) -> int:
        """Count (layer, family, hit, org_id) lookups; returns the hits."""
        counted = tuple(lookups)
        self._pending.append(counted)
        if self._flusher_pid is None:
            self._start_flusher()
        return sum(lookup[2] for lookup in counted)

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher_pid is None:
                self._flusher_pid = os.getpid()
                threading.Thread(target=self._flush_every_interval, name="lookup-counts",
                                 daemon=True).start()

    def _forget_parent(self) -> None:
        self._lock = threading.Lock()
        self._pending = deque()
        self._flusher_pid = None

    def flush(self) -> None:
        """Add what was counted since the last flush (/metrics calls it before a scrape)."""
        from cache import tenants

        with self._lock:
            pending = collections.Counter(lookup for lookups in drain(self._pending)
                                          for lookup in lookups)
        for (layer, family, hit, org_id), count in pending.items():
            series = self._series.get((layer, family, hit))
            if series is None:
                series = self._series[layer, family, hit] = (hits if hit else misses).labels(
                    layer, family)
            series.inc(count)
            if org_id:
                tenants.count_lookup(org_id, hit, count)

    def _flush_every_interval(self) -> None:
        pid = os.getpid()
        while self._flusher_pid == pid:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - metrics must never stop counting
                logging.getLogger(__name__).exception("lookup counts not flushed")


lookups = LookupCounts()
