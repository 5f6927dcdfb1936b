"""Prometheus metrics of the cache. Declared once per process, as prometheus-client expects;
in gunicorn they are aggregated across workers through PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

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
# bump set; "superseded" when a later write had replaced them before the store (nothing stored).
warmed = Counter("cache_warmed_total", "Values loaded and stored right after a write, so that the "
                 "next reader hits", ["entity_type", "outcome"])
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


_lookup_series: dict[tuple[str, str, bool], object] = {}


def count_lookup(layer: str, family: str, hit: bool) -> None:
    """A reader's lookup as a hit or a miss of its layer and key family. A warm read counts two or
    three of them; the series is found once per process, where `labels()` takes a lock and builds
    its key on every call (3.4% of a warm task GET's GIL samples under load)."""
    series = _lookup_series.get((layer, family, hit))
    if series is None:
        series = _lookup_series[layer, family, hit] = (hits if hit else misses).labels(layer,
                                                                                       family)
    series.inc()
