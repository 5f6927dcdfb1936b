"""Redis down, slow or cut off: the API keeps answering from the database with bounded latency,
writes made meanwhile are kept, the breaker opens and closes by itself, and no value retired
during the outage is served after it."""

from __future__ import annotations

import time

import pytest
import redis

from cache_helpers import CACHED
from services.context import build_services
from tests.cache_helpers import TcpProxy, percentile, raw
from conftest import redis_mode
from web import create_app

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    redis_mode() == "cluster", reason="these take the single redis-server down; on a cluster one "
    "master fails at a time: tests/test_cache_cluster.py")]


@pytest.fixture
def project(client, admin):
    return client.post("/api/projects", json={"name": "Before"}, headers=admin.headers).json


def timed(client, method, url, **kw):
    started = time.perf_counter()
    answer = getattr(client, method)(url, **kw)
    return answer, time.perf_counter() - started


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_with_redis_killed_the_api_answers_from_the_database_and_recovers(
        client, admin, project, services, redis_server):
    url = f"/api/projects/{project['id']}"
    tasks_url = f"{url}/tasks"
    for u in (url, tasks_url, f"{url}/stats"):
        client.get(u, headers=admin.headers)
    assert client.get(url, headers=admin.headers).headers["X-Cache"] in CACHED

    redis_server.kill()
    try:
        latencies, sources = [], set()
        for i in range(60):
            for u in (url, tasks_url, f"{url}/stats", "/api/me"):
                answer, took = timed(client, "get", u, headers=admin.headers)
                assert answer.status_code == 200, (u, answer.json)
                latencies.append(took)
                sources.add(answer.headers.get("X-Cache"))
            if i == 10:  # writes during the outage
                assert client.patch(url, json={"name": "During"},
                                    headers=admin.headers).status_code == 200
                assert client.post(tasks_url, json={"title": "written while down"},
                                   headers=admin.headers).status_code == 201
        assert sources == {"BYPASS"}
        assert services.cache.breaker.state in ("open", "half_open")
        p99 = percentile(latencies, 0.99)
        print(f"\nRedis down: {len(latencies)} requests, p50 "
              f"{percentile(latencies, 0.5) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        assert p99 < 1.0
        assert client.get(url, headers=admin.headers).json["name"] == "During"
    finally:
        redis_server.restart()

    assert wait_until(lambda: client.get(url, headers=admin.headers).headers["X-Cache"]
                      in ("MISS", *CACHED))
    assert services.cache.breaker.state == "closed"
    after = client.get(url, headers=admin.headers)
    assert after.json["name"] == "During" and after.headers["X-Cache"] in CACHED
    titles = [t["title"] for t in client.get(tasks_url, headers=admin.headers).json["items"]]
    assert titles == ["written while down"]
    stats = client.get(f"{url}/stats", headers=admin.headers).json
    assert stats["total_tasks"] == 1 and stats["stale"] is False


def test_with_redis_paused_the_api_answers_within_a_bound_and_recovers_by_itself(
        client, admin, project, services):
    url = f"/api/projects/{project['id']}"
    client.get(url, headers=admin.headers)
    control = raw(services)
    control.execute_command("CLIENT", "PAUSE", 2000, "ALL")
    paused_at = time.monotonic()
    latencies = []
    try:
        while time.monotonic() - paused_at < 1.5:
            answer, took = timed(client, "get", url, headers=admin.headers)
            assert answer.status_code == 200
            assert answer.headers["X-Cache"] == "BYPASS"
            latencies.append(took)
    finally:
        control.execute_command("CLIENT", "UNPAUSE")
    print(f"\nRedis paused: {len(latencies)} requests, max {max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 5  # the breaker stopped paying the timeout on every request
    assert percentile(latencies, 0.99) < 1.0
    assert wait_until(lambda: client.get(url, headers=admin.headers).headers["X-Cache"]
                      in CACHED)
    assert services.cache.breaker.state == "closed"


def redis_errors() -> float:
    """Failed Redis calls so far in this process: a call the breaker skipped is not one."""
    from cache import metrics

    return sum(s.value for s in metrics.errors.collect()[0].samples if s.name.endswith("_total"))


def test_the_breaker_opens_on_failure_and_closes_by_itself(client, admin, project, services,
                                                           redis_server):
    url = f"/api/projects/{project['id']}"
    breaker = services.cache.breaker
    assert breaker.state == "closed"
    redis_server.kill()
    try:
        client.get(url, headers=admin.headers)
        assert breaker.state == "open"
        metrics = client.get("/metrics").get_data(as_text=True)
        assert "cache_breaker_open 1.0" in metrics
        tried_before = redis_errors()
        _, took = timed(client, "get", url, headers=admin.headers)  # open: Redis is not asked
        assert redis_errors() == tried_before
        assert took < 1.0
    finally:
        redis_server.restart()
    time.sleep(services.settings.breaker_cooldown)
    assert client.get(url, headers=admin.headers).status_code == 200  # the probe
    assert breaker.state == "closed"
    assert "cache_breaker_open 0.0" in client.get("/metrics").get_data(as_text=True)


def test_a_redis_that_answers_with_an_error_does_not_wedge_the_breaker(client, admin, project,
                                                                       services):
    """The half-open probe gets an error *reply* (here: out of memory). Redis answered, so the
    breaker must not stay half-open, refusing every later call."""
    from cache.store import Unavailable

    url = f"/api/projects/{project['id']}"
    control = raw(services)
    services.cache.breaker.record_failure()  # as after a blip
    control.config_set("maxmemory-policy", "noeviction")
    control.config_set("maxmemory", "1")
    try:
        time.sleep(services.settings.breaker_cooldown)
        with pytest.raises(Unavailable, match="maxmemory"):  # the probe is a write: OOM
            services.cache.call("set", lambda: services.redis.set("probe", "1", ex=10))
    finally:
        control.config_set("maxmemory", "0")
        control.config_set("maxmemory-policy", "allkeys-lru")
    assert wait_until(lambda: client.get(url, headers=admin.headers).headers["X-Cache"]
                      in ("MISS", *CACHED), timeout=3), services.cache.breaker.state
    assert services.cache.breaker.state == "closed"


def test_an_invalidation_owed_from_an_outage_is_paid_before_anything_is_served(
        client, admin, project, services, settings):
    """An API instance loses Redis while Redis keeps its data; a write's invalidation fails.
    When the instance reaches Redis again it must retire the old values before reading."""
    proxy = TcpProxy(services.redis.connection_pool.connection_kwargs["port"])
    cut_off = build_services(settings.with_overrides(redis_url=proxy.url()), subscribe_l1=False)
    try:
        other = create_app(settings, cut_off).test_client()
        url = f"/api/projects/{project['id']}"
        list_url = "/api/projects"
        for u in (url, list_url):
            other.get(u, headers=admin.headers)
            assert other.get(u, headers=admin.headers).headers["X-Cache"] in CACHED

        proxy.cut()
        changed = other.patch(url, json={"name": "After"}, headers=admin.headers)
        assert changed.status_code == 200
        assert other.get(url, headers=admin.headers).json["name"] == "After"  # from the DB

        proxy.heal()
        time.sleep(settings.breaker_cooldown)
        for u in (url, list_url):
            answer = other.get(u, headers=admin.headers)
            name = answer.json["name"] if u == url else answer.json["items"][0]["name"]
            assert name == "After", (u, answer.headers["X-Cache"])
        assert other.get(url, headers=admin.headers).headers["X-Cache"] in CACHED
        # The purge was paid in the shared Redis: every instance sees the write now.
        assert client.get(url, headers=admin.headers).json["name"] == "After"
    finally:
        cut_off.close()
        proxy.close()


def test_writes_while_redis_is_down_are_persisted_and_sessions_still_end(client, admin,
                                                                         redis_server):
    redis_server.kill()
    try:
        made = client.post("/api/projects", json={"name": "Offline"}, headers=admin.headers)
        assert made.status_code == 201
        assert client.post("/api/auth/logout", headers=admin.headers).status_code == 204
        assert client.get("/api/me", headers=admin.headers).status_code == 401
    finally:
        redis_server.restart()
    assert client.get("/api/me", headers=admin.headers).status_code == 401
    login = client.post("/api/auth/login", json={"email": admin.email, "password": admin.password})
    headers = {"Authorization": f"Bearer {login.json['access_token']}"}
    assert [p["name"] for p in client.get("/api/projects", headers=headers).json["items"]] == [
        "Offline"]


def test_no_redis_error_escapes_as_a_5xx(client, admin, project, redis_server):
    url = f"/api/projects/{project['id']}"
    redis_server.kill()
    try:
        for u in (url, f"{url}/stats", f"{url}/tasks", "/api/public/feature-flags",
                  f"/api/users/{admin.user['id']}/stats", "/api/me/notifications/unread-count",
                  "/health/ready"):
            assert client.get(u, headers=admin.headers).status_code == 200, u
        assert client.delete("/api/admin/cache", headers=admin.headers).status_code == 202
        bad = client.post("/api/auth/login", json={"email": admin.email, "password": "wrong!!!"})
        assert bad.status_code == 401
    finally:
        redis_server.restart()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=1, socket_connect_timeout=0.1).ping()  # (sanity: a dead port fails)
