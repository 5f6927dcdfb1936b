"""What operators and the performance budget rely on: database queries and Redis round trips per
hot request, /health/cache, /metrics, and the per-organization purge."""

from __future__ import annotations

import orjson
import pytest

from tests.cache_helpers import CACHED, count_round_trips, count_sql
from conftest import redis_mode


@pytest.fixture
def project(client, admin):
    made = client.post("/api/projects", json={"name": "Launch"}, headers=admin.headers).json
    client.post(f"/api/projects/{made['id']}/tasks", json={"title": "T"}, headers=admin.headers)
    return made


def cost(client, services, url, headers) -> tuple[int, int, str]:
    """(SQL statements, Redis round trips, X-Cache) of one request."""
    with count_sql(services) as sql, count_round_trips(services) as trips:
        answer = client.get(url, headers=headers)
    assert answer.status_code == 200
    return sql.count, trips.count, answer.headers["X-Cache"]


@pytest.mark.parametrize("path, max_trips", [
    ("/api/projects/{id}", 1),          # session + project, prefetched together
    ("/api/projects/{id}/tasks", 2),    # session + project (404 check), then the list
    ("/api/projects/{id}/stats", 1),    # session + project + stats hash, together
    ("/api/me", 3),                     # session + user + organization
    ("/api/orgs/current", 1),           # session + organization, prefetched together
])
def test_a_warm_hot_request_never_touches_the_database(client, admin, project, services, path,
                                                       max_trips):
    url = path.format(id=project["id"])
    client.get(url, headers=admin.headers)
    # The batched counters (the tests flush them on every request) ride on a request's round
    # trip once per interval; on a cluster they go to other shards: not this request's cost.
    services.cache.counters.interval = 3600
    services.cache.near.clear()  # this request reads Redis (its next ones: test below)
    sql, trips, source = cost(client, services, url, admin.headers)
    print(f"\n{path}: {trips} Redis round trips, {sql} SQL statements ({source})")
    assert source == "HIT-L2"
    assert sql == 0
    # On a cluster a request's keys sit in its session's and its entity's slices: one
    # pipeline writes to each master concerned, then reads each (the waits overlap).
    assert trips <= max_trips * (3 if redis_mode() == "cluster" else 1)


@pytest.mark.parametrize("path", ["/api/projects/{id}", "/api/projects/{id}/tasks",
                                  "/api/projects/{id}/stats", "/api/me"])
def test_a_hot_request_read_twice_costs_no_round_trip(client, admin, project, services, path):
    """The near cache: once a process has read a request's keys from Redis it serves them
    itself (Redis tells it when they change: tests/test_cache_near.py)."""
    url = path.format(id=project["id"])
    services.cache.counters.interval = 3600
    services.cache.near.trust_window = 30  # a busy test machine may delay a heartbeat
    client.get(url, headers=admin.headers)
    client.get(url, headers=admin.headers)
    sql, trips, source = cost(client, services, url, admin.headers)
    assert (sql, trips, source) == (0, 0, "HIT-L1")


def test_a_status_change_after_its_commit_costs_one_round_trip(client, admin, project,
                                                                services):
    """After the commit, the write's bumps and its deltas to the project's and the assignee's
    cached statistics go to Redis together: on a busy machine each round trip is a wait for a
    core between the commit and the answer (freshness)."""
    me = admin.user["id"]
    task = client.post(f"/api/projects/{project['id']}/tasks", headers=admin.headers,
                       json={"title": "Counted", "assignee_id": me}).json
    for url in (f"/api/projects/{project['id']}/stats", f"/api/users/{me}/stats"):
        assert client.get(url, headers=admin.headers).status_code == 200  # both cached
    services.cache.counters.interval = 3600  # not this write's cost (see above)
    with count_round_trips(services) as trips:
        changed = client.patch(f"/api/tasks/{task['id']}", json={"status": "COMPLETED"},
                               headers=admin.headers)
    assert changed.status_code == 200
    # The warm-up's lookup under the locks, then the bumps with both deltas.
    assert trips.count <= 2 * (3 if redis_mode() == "cluster" else 1), trips.commands
    for url, field in ((f"/api/projects/{project['id']}/stats", "completed_tasks"),
                       (f"/api/users/{me}/stats", "completed_tasks")):
        stats = client.get(url, headers=admin.headers)
        assert stats.headers["X-Cache"].startswith("HIT"), url
        assert stats.json[field] == 1, (url, stats.json)


def test_a_warm_list_page_is_encoded_once_per_cached_copy(client, admin, project, services,
                                                           monkeypatch):
    """A large page served from the near cache is the same object each time: its JSON and ETag
    are made once, and a write (a new copy) gets new ones."""
    from web import endpoint

    url = f"/api/projects/{project['id']}/tasks"
    tasks = [client.post(url, json={"title": f"Task {i}", "description": "d" * 300},
                         headers=admin.headers).json for i in range(12)]
    services.cache.near.trust_window = 30  # a busy test machine may delay a heartbeat
    first = client.get(url, headers=admin.headers)
    assert len(first.get_data()) >= 4096  # kept encoded from that size (web.endpoint)
    encodings = []
    monkeypatch.setattr(endpoint, "orjson", type("Counting", (), {"dumps": staticmethod(
        lambda data: encodings.append(data) or orjson.dumps(data))}))
    again = [client.get(url, headers=admin.headers) for _ in range(3)]
    assert [a.headers["X-Cache"] for a in again[1:]] == ["HIT-L1", "HIT-L1"]
    assert len(encodings) <= 1  # the first may have read Redis: a new copy
    assert {a.get_data() for a in again} == {first.get_data()}
    assert {a.headers["ETag"] for a in again} == {first.headers["ETag"]}
    patched = client.patch(f"/api/tasks/{tasks[0]['id']}", json={"title": "Renamed"},
                           headers=admin.headers)
    assert patched.status_code == 200
    after = client.get(url, headers=admin.headers)
    assert after.headers["ETag"] != first.headers["ETag"]
    assert [t["title"] for t in after.json["items"] if t["id"] == tasks[0]["id"]] == ["Renamed"]


def test_a_warm_stats_hash_is_parsed_once_per_cached_copy(client, admin, project, services,
                                                          monkeypatch):
    """The near cache hands each stats read the same hash: it is parsed once, and the hash a
    write leaves is parsed anew."""
    import aggregates

    url = f"/api/projects/{project['id']}/stats"
    services.cache.near.trust_window = 30  # a busy test machine may delay a heartbeat
    client.get(url, headers=admin.headers)
    parsed = []
    real = aggregates._parse_hash
    monkeypatch.setattr(aggregates, "_parse_hash",
                        lambda *args: parsed.append(args[1]) or real(*args))
    reads = [client.get(url, headers=admin.headers) for _ in range(4)]
    assert [r.headers["X-Cache"] for r in reads[1:]] == ["HIT-L1"] * 3
    assert len(parsed) <= 1  # the first may have read Redis: a new copy
    assert len({r.json["total_tasks"] for r in reads}) == 1
    client.post(f"/api/projects/{project['id']}/tasks", json={"title": "One more"},
                headers=admin.headers)
    after = client.get(url, headers=admin.headers)
    assert after.json["total_tasks"] == reads[-1].json["total_tasks"] + 1


def test_a_flag_read_from_l1_costs_no_round_trip(client, services):
    client.get("/api/public/feature-flags")
    sql, trips, source = cost(client, services, "/api/public/feature-flags", {})
    assert (sql, trips, source) == (0, 0, "HIT-L1")


def test_a_cold_project_get_costs_one_query(client, admin, project, services):
    client.get("/api/me", headers=admin.headers)
    with count_sql(services) as sql:
        answer = client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    assert answer.headers["X-Cache"] == "MISS"
    queries = [q for q in sql.statements if q.split()[0].upper() not in ("BEGIN", "COMMIT",
                                                                        "ROLLBACK")]
    assert len(queries) == 1, sql.statements


# -- /health/cache ---------------------------------------------------------------------------------
def test_cache_health_is_healthy_with_a_good_hit_rate_and_degraded_below_0_6(client, admin,
                                                                             project):
    fresh = client.get("/health/cache")
    assert fresh.status_code == 200 and fresh.json["status"] in ("healthy", "degraded")
    assert fresh.json["connected_clients"] >= 1 and fresh.json["memory_used_mb"] > 0
    for _ in range(30):
        client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    good = client.get("/health/cache").json
    assert good["status"] == "healthy" and good["hit_rate"] >= 0.6
    for i in range(120):  # every page is a new key: misses
        client.get(f"/api/projects?limit={1 + i % 200}&status=ACTIVE", headers=admin.headers)
        client.get(f"/api/projects?limit={1 + i % 200}", headers=admin.headers)
    bad = client.get("/health/cache").json
    assert bad["status"] == "degraded" and bad["hit_rate"] < 0.6


@pytest.mark.skipif(redis_mode() == "cluster", reason="a cluster loses one master at a time: "
                    "tests/test_cache_cluster.py")
def test_cache_health_is_unhealthy_while_redis_is_down(client, redis_server):
    redis_server.kill()
    try:
        down = client.get("/health/cache")
        assert down.status_code == 200
        assert down.json["status"] == "unhealthy"
    finally:
        redis_server.restart()


# -- /metrics ---------------------------------------------------------------------------------------
def test_metrics_expose_hits_misses_durations_and_the_breaker(client, admin, project):
    for _ in range(2):
        client.get(f"/api/projects/{project['id']}", headers=admin.headers)
        client.get("/api/public/feature-flags")
    text = client.get("/metrics").get_data(as_text=True)
    for line in ['cache_hits_total{cache_layer="redis",entity_type="project"}',
                 'cache_misses_total{cache_layer="redis",entity_type="project"}',
                 'cache_hits_total{cache_layer="l1",entity_type="config"}',
                 'cache_operation_duration_seconds_bucket{cache_layer="redis",le="0.001",'
                 'operation="get"}',
                 'cache_breaker_open ']:
        assert line in text, line


def test_lookup_counts_reach_their_series_within_the_interval_without_a_scrape():
    """Readers' hits and misses are counted in the process and added to Prometheus by a thread
    of its own: exact, and visible to a scrape of another process within the interval."""
    import uuid

    from prometheus_client import REGISTRY

    from cache.metrics import LookupCounts
    from worker_fixtures import wait_until

    counts = LookupCounts(interval=0.05)
    family = f"test_{uuid.uuid4().hex[:8]}"  # series of its own in this process's registry

    def series(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"cache_layer": "redis",
                                                "entity_type": family}) or 0.0

    for _ in range(5):
        counts.add("redis", family, True)
    counts.add("redis", family, False)
    wait_until(lambda: series("cache_hits_total") == 5 and series("cache_misses_total") == 1,
               timeout=10, what="the counts in their series")
    counts.add("redis", family, True)
    wait_until(lambda: series("cache_hits_total") == 6, timeout=10, what="a later count")
    assert series("cache_misses_total") == 1



def test_a_forked_worker_counts_only_its_own_lookups():
    """A gunicorn worker is forked from a process that may have counted: the parent's counts,
    not yet flushed, are the parent's to add; the child flushes its own, with a thread of its own."""
    import os
    import uuid

    from prometheus_client import REGISTRY

    from cache.metrics import LookupCounts

    counts = LookupCounts(interval=60)  # the parent's counts wait for its flusher
    family = f"test_{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        counts.add("redis", family, True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        import time

        counts.interval = 0.05
        counts.add("redis", family, True)
        deadline = time.monotonic() + 10
        value = 0.0
        while time.monotonic() < deadline:
            value = REGISTRY.get_sample_value("cache_hits_total", {
                "cache_layer": "redis", "entity_type": family}) or 0.0
            if value:
                time.sleep(0.2)  # a wrong count would show by now too
                value = REGISTRY.get_sample_value("cache_hits_total", {
                    "cache_layer": "redis", "entity_type": family})
                break
            time.sleep(0.02)
        os.write(write, str(value).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    reported = os.read(read, 64).decode()
    os.close(read)
    assert status == 0
    assert float(reported) == 1.0


# -- purge ---------------------------------------------------------------------------------------------
def test_purging_the_cache_purges_only_the_callers_organization(client, sign_up):
    a, b = sign_up("A"), sign_up("B")
    urls = {}
    for account in (a, b):
        made = client.post("/api/projects", json={"name": "P"}, headers=account.headers).json
        urls[account.email] = f"/api/projects/{made['id']}"
        client.get(urls[account.email], headers=account.headers)
        client.get(f"{urls[account.email]}/stats", headers=account.headers)
    assert client.delete("/api/admin/cache", headers=a.headers).status_code == 202
    assert client.get(urls[a.email], headers=a.headers).headers["X-Cache"] == "MISS"
    assert client.get(f"{urls[a.email]}/stats", headers=a.headers).headers["X-Cache"] == "MISS"
    assert client.get(urls[b.email], headers=b.headers).headers["X-Cache"] in CACHED
    assert client.get(f"{urls[b.email]}/stats", headers=b.headers).headers["X-Cache"] in CACHED


def test_only_an_admin_may_purge(client, admin):
    email = f"m-{admin.email}"
    client.post("/api/users", json={"email": email, "password": "correct horse battery",
                                    "display_name": "M"}, headers=admin.headers)
    token = client.post("/api/auth/login", json={"email": email,
                                                 "password": "correct horse battery"}).json
    answer = client.delete("/api/admin/cache",
                           headers={"Authorization": f"Bearer {token['access_token']}"})
    assert answer.status_code == 403


def test_cache_health_is_degraded_with_a_reason_when_the_cache_cannot_evict(settings, client):
    from stack.redis_server import RedisServer

    assert client.get("/health/cache").json["reasons"] == []  # maxmemory set, allkeys-lru, own
    with RedisServer.start(maxmemory_policy="noeviction") as plain:
        from services.context import build_services
        from web import create_app

        # A plain Redis shared by cache and broker, as the old default configuration was (and
        # no cluster, which would be the cache instead: TEST_REDIS=cluster).
        shared = settings.with_overrides(redis_url=plain.url_for(0), redis_cluster_url=None,
                                         celery_broker_url=f"redis://localhost:{plain.port}/1")
        built = build_services(shared, subscribe_l1=False)
        try:
            body = create_app(shared, built).test_client().get("/health/cache").json
        finally:
            built.close()
        assert body["status"] == "degraded" and body["maxmemory_policy"] == "noeviction"
        assert body["maxmemory_mb"] == 0
        reasons = " | ".join(body["reasons"])
        assert "noeviction" in reasons and "no maxmemory" in reasons
        assert "broker" in reasons  # same host:port, another database number
