"""Faults and beat, each test with a worker and a broker Redis of its own: a broker outage loses
no event, a worker process killed during a recompute has it redelivered, beat's warm-up fills the
keys it promises and its drift audit corrects and counts drift."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from cache_helpers import CACHED
from aggregates import PROJECT_STATS
from stack.redis_server import RedisServer
from worker_fixtures import exact, new_project, read_stats, start_worker, unprocessed, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database_url(database_url, tmp_path_factory):  # noqa: F811
    """A database of this module's own, on the same backend: the outbox sweep here re-sends every
    unprocessed event, and the rest of the suite, which runs without a worker, leaves thousands."""
    from conftest import fresh_database

    backend = "sqlite" if database_url.startswith("sqlite") else "mariadb"
    with fresh_database(backend, tmp_path_factory.mktemp("faults")) as url:
        yield url


@pytest.fixture
def own_broker():
    server = RedisServer.start(maxmemory_policy="noeviction")
    yield server
    server.stop()


@pytest.fixture
def settings(settings, own_broker):  # noqa: F811  (the conftest's, with this test's broker)
    return settings.with_overrides(celery_broker_url=own_broker.url_for(0))


@pytest.fixture
def launch(database_url, redis_server, own_broker, tmp_path):
    started = []

    def _launch(**options):
        worker = start_worker(database_url, redis_server.url_for(0), own_broker.url_for(0),
                              tmp_path, **options)
        started.append(worker)
        return worker
    yield _launch
    for worker in started:
        worker.stop()


def test_a_broker_outage_during_writes_loses_no_event(client, admin, services, own_broker,
                                                      launch):
    worker = launch(beat=True, OUTBOX_SWEEP_INTERVAL=1, OUTBOX_SWEEP_AGE=2)
    org_id = admin.organization["id"]
    project_id = new_project(client, admin)
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="setup events")

    own_broker.kill()
    slowest = 0.0
    for i in range(20):
        started = time.monotonic()
        answer = client.post(f"/api/projects/{project_id}/tasks",
                             json={"title": f"t{i}", "status": "COMPLETED" if i % 3 else "TODO"},
                             headers=admin.headers)
        slowest = max(slowest, time.monotonic() - started)
        assert answer.status_code == 201
    # Generous (the machine is shared): the point is that no write hangs on the dead broker.
    assert slowest < 3.0, f"a write waited {slowest:.2f} s for the dead broker"
    assert unprocessed(services, org_id) >= 20  # nothing reached a worker

    own_broker.restart()  # empty, as after a crash without persistence
    wait_until(lambda: unprocessed(services, org_id) == 0, 60, 0.5,
               "the sweep to deliver every event")
    # The stats were never read: the events' deltas missed, the worker recounted.
    wait_until(lambda: exact(services, PROJECT_STATS, org_id, project_id), 10, 0.1,
               "exact stats")
    assert read_stats(client, admin, project_id).json["total_tasks"] == 20
    assert worker.metric("outbox_events_resent_total") >= 20


def test_a_worker_killed_during_a_recompute_has_it_redelivered(client, admin, services, launch):
    launch(concurrency=1, TASKCACHE_TEST_SLOW_RECOUNT=1.5)
    org_id = admin.organization["id"]
    project_id = new_project(client, admin)
    read_stats(client, admin, project_id)  # cached: the writes below apply as deltas
    for i in range(5):
        client.post(f"/api/projects/{project_id}/tasks", json={"title": f"t{i}"},
                    headers=admin.headers)
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="setup events")
    services.cache.purge_organization(org_id)  # the stats are gone: only a recount brings them
    assert services.aggregates.read(PROJECT_STATS, org_id, project_id) is None

    assert services.extras["schedule_recount"]("project", org_id, project_id)
    started = f"test:recount-started:{project_id}"
    victim = int(wait_until(lambda: services.redis.lindex(started, 0), 10, 0.02,
                            "the recount to start"))
    os.kill(victim, signal.SIGKILL)

    rerun = int(wait_until(lambda: services.redis.lindex(started, 1), 20, 0.05,
                           "the recount to be redelivered"))
    assert rerun != victim
    wait_until(lambda: exact(services, PROJECT_STATS, org_id, project_id), 10, 0.1,
               "exact stats after the redelivered recount")
    assert read_stats(client, admin, project_id).json["total_tasks"] == 5
    assert services.redis.llen(started) == 2  # exactly one redelivery, no duplicate run


def _report(services, trigger: str) -> dict | None:
    raw = services.redis.get(f"warmup:last:{trigger}")
    return json.loads(raw) if raw else None


def test_beat_warm_up_fills_what_it_promises_and_the_audit_corrects_drift(client, admin,
                                                                         services, launch):
    org_id = admin.organization["id"]
    active = [new_project(client, admin, f"P{i}") for i in range(3)]
    archived = new_project(client, admin, "Old")
    client.patch(f"/api/projects/{archived}", json={"status": "ARCHIVED"}, headers=admin.headers)
    hot, cold = active[0], active[1]
    client.post(f"/api/projects/{hot}/tasks", json={"title": "t"}, headers=admin.headers)
    for _ in range(3):  # reads are what makes a project "busiest"
        read_stats(client, admin, hot)

    worker = launch(beat=True, WARMUP_ON_START=1, WARMUP_INTERVAL=2, CACHE_AUDIT_INTERVAL=2)
    # The worker's start-up warm-up is skipped when beat's first tick holds the run lock (one
    # warm-up at a time): either one finishing means the first warm-up is done.
    wait_until(lambda: _report(services, "worker_ready") or _report(services, "beat"), 20, 0.1,
               "the first warm-up (start-up or beat)")

    assert client.delete("/api/admin/cache", headers=admin.headers).status_code == 202
    purged = time.time()
    wait_until(lambda: (_report(services, "beat") or {}).get("finished_at", 0) > purged, 20,
               0.1, "a beat warm-up after the purge")
    for url in ["/api/orgs/current", "/api/users", "/api/projects",
                "/api/projects?status=ACTIVE"]:
        assert client.get(url, headers=admin.headers).headers["X-Cache"] in CACHED, url
    for project_id in active:
        assert client.get(f"/api/projects/{project_id}",
                          headers=admin.headers).headers["X-Cache"] in CACHED
    assert client.get(f"/api/projects/{archived}", headers=admin.headers).headers[
        "X-Cache"] == "MISS"
    answer = read_stats(client, admin, hot)
    assert answer.headers["X-Cache"] in CACHED and answer.json["total_tasks"] == 1
    assert read_stats(client, admin, cold).headers["X-Cache"] == "MISS"  # never read: not hot

    # Drift: the cached counts disagree with the database at the same sequence number.
    drift = 'stats_drift_corrected_total{aggregate="project"}'
    before = worker.metric(drift)
    name = PROJECT_STATS.name(org_id, hot)
    services.redis.hincrby(name, "TODO", 5)
    assert not exact(services, PROJECT_STATS, org_id, hot)
    wait_until(lambda: exact(services, PROJECT_STATS, org_id, hot), 15, 0.1,
               "the audit to correct the drift")
    wait_until(lambda: worker.metric(drift) >= before + 1, 5, 0.2, "the drift metric")
