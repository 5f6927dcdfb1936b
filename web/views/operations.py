"""Public configuration, cache administration, health and metrics."""

from __future__ import annotations

import os

from flask import Blueprint, Response

from cache.store import tally_key
from services.directory import require_admin
from services.errors import DomainError
from services.settings_store import get_config
from web import schemas as s
from web.endpoint import endpoint, services

bp = Blueprint("operations", __name__)


class NotImplementedYet(DomainError):
    status, title = 501, "Not Implemented"


@endpoint(bp, "GET", "/api/public/feature-flags", summary="Feature flags", response=s.FeatureFlags,
          authenticated=False, public=True)
def feature_flags(services):
    flags, source = get_config(services, "feature_flags")
    return {"flags": flags}, source


@endpoint(bp, "GET", "/api/public/rate-limits", summary="Published rate limits",
          response=s.RateLimits, authenticated=False, public=True)
def rate_limits(services):
    limits, source = get_config(services, "rate_limits")
    return {"limits": limits}, source


@endpoint(bp, "POST", "/api/admin/cache/warm", summary="Warm this organization's cache now "
          "(admin)", response=s.TaskAccepted, status=202, errors=(403, 501))
def warm_cache(services, actor):
    require_admin(actor)
    warm = services.extras.get("warm_organization")
    if warm is None:
        raise NotImplementedYet("no worker is attached to this API")
    return {"task_id": warm(actor.org_id)}


@endpoint(bp, "DELETE", "/api/admin/cache", summary="Purge this organization's cached data "
          "(admin)", response=s.Status, status=202, errors=(403,))
def purge_cache(services, actor):
    require_admin(actor)
    # When Redis is unreachable the purge is owed: it runs before this process reads Redis again.
    done = services.cache.purge_organization(actor.org_id)
    return {"status": "purged" if done else "pending"}


@endpoint(bp, "GET", "/health", summary="Liveness (no dependencies)", response=s.Status,
          authenticated=False)
def health(services):
    return {"status": "ok"}


@bp.get("/health/ready")
def ready() -> Response:
    from sqlalchemy import text

    try:
        with services().db.session() as db:
            db.execute(text("SELECT 1"))
    except Exception as exc:
        return _json({"status": "unready", "database": str(exc.__class__.__name__)}, 503)
    return _json({"status": "ok"}, 200)


@bp.get("/health/cache")
def cache_health() -> Response:
    return _json(cache_report(services()), 200)


def cache_report(ctx) -> dict:
    breaker = ctx.cache.breaker.state
    try:
        def probe():
            ctx.cache.flush_counters()  # this process's pending tally counts too
            pipe = ctx.redis.pipeline(transaction=False)
            pipe.hgetall(tally_key())
            pipe.hgetall(tally_key(1))
            return (server_info(ctx.redis), *pipe.execute())
        info, now, before = ctx.cache.call("health", probe)
    except Exception as exc:
        return {"status": "unhealthy", "hit_rate": None, "memory_used_mb": None,
                "connected_clients": None, "breaker": breaker, "error": str(exc) or "unreachable"}
    hits = sum(int(t.get(b"hits", 0)) for t in (now, before))
    misses = sum(int(t.get(b"misses", 0)) for t in (now, before))
    hit_rate = hits / (hits + misses) if hits + misses else None
    problems = eviction_problems(info, ctx.settings)
    if hit_rate is not None and hit_rate < 0.6:
        problems.append(f"hit rate {hit_rate:.2f} is below 0.6")
    return {
        "status": "degraded" if problems else "healthy",
        "reasons": problems,
        "hit_rate": None if hit_rate is None else round(hit_rate, 4),
        "memory_used_mb": round(info["used_memory"] / 1024 / 1024, 2),
        "connected_clients": info["connected_clients"],
        "evicted_keys": info.get("evicted_keys", 0),
        "maxmemory_policy": info.get("maxmemory_policy"),
        "maxmemory_mb": round(int(info.get("maxmemory", 0)) / 1024 / 1024, 2),
        "breaker": breaker,
        "window": "last 1-2 hours, all API processes",
    }


def eviction_problems(info: dict, settings) -> list[str]:
    """Why the cache Redis could not make room by evicting: a full cache would refuse writes
    (every write would then owe an invalidation), and evicting would drop the broker's queues."""
    problems = []
    if info.get("maxmemory_policy") == "noeviction":
        problems.append("the cache Redis never evicts (maxmemory-policy noeviction): when full "
                        "it refuses writes; use allkeys-lru")
    if not int(info.get("maxmemory", 0)):
        problems.append("the cache Redis has no maxmemory: it grows until the machine runs out")
    if server_address(settings.celery_broker_url) in cache_addresses(settings):
        problems.append("the cache Redis is also the Celery broker's server: it cannot evict "
                        "without losing queued tasks; give the broker a Redis of its own")
    return problems


def cache_addresses(settings) -> set[tuple[str, int | str]]:
    """The cache's servers: the cluster's seed nodes when there is one, else REDIS_URL's."""
    if settings.redis_cluster_url:
        return {server_address(url) for url in settings.redis_cluster_url.split(",")}
    return {server_address(settings.redis_url)}


def server_address(url: str) -> tuple[str, int | str]:
    """host:port of a redis:// URL (the socket path of a unix:// one); localhost is 127.0.0.1."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return ("unix", parts.path)
    host = (parts.hostname or "127.0.0.1").lower()
    return ("127.0.0.1" if host == "localhost" else host, parts.port or 6379)
def server_info(client) -> dict:
    """INFO of a single Redis; of a cluster, summed over its masters (memory, clients,
    evictions)."""
    from redis.cluster import RedisCluster

    if not isinstance(client, RedisCluster):
        return client.info()
    per_node = list(client.info(target_nodes=RedisCluster.PRIMARIES).values())
    summed = dict(per_node[0])
    for field in ("used_memory", "connected_clients", "evicted_keys"):
        summed[field] = sum(int(info.get(field, 0)) for info in per_node)
    summed["cluster_masters"] = len(per_node)
    return summed


@bp.get("/metrics")
def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client import REGISTRY

    from cache import metrics as cache_metrics
    from cache.redis_info import RedisInfoCollector

    cache_metrics.lookups.flush()  # this process's counts; the others' are at most 1 s behind
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    # Read at scrape time, not kept in any process: a registry of its own for each scrape.
    live = CollectorRegistry()
    live.register(RedisInfoCollector(services().redis))
    return Response(generate_latest(registry) + generate_latest(live),
                    mimetype=CONTENT_TYPE_LATEST)


def _json(data: dict, status: int) -> Response:
    import orjson

    return Response(orjson.dumps(data), status=status, mimetype="application/json",
                    headers={"Cache-Control": "no-store"})
