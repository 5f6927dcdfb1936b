"""The worker pipeline against one real Celery worker per backend (subprocess), real Redis, real
MariaDB/SQLite: stats follow writes, bursts coalesce, rollbacks publish nothing, warm-ups fill what
they promise, Flower lists the worker behind its basic auth.

Freshness bound stated by these tests: project stats reflect a write in the first read after the
write's response when they are cached (the web applies the write's ordered delta after commit),
and within COLD_BOUND seconds when they were not cached (the worker recounts, coalesced, after
settings.recompute_countdown = 0.2 s).
"""

from __future__ import annotations

import base64
import random
import threading
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import func, select

from cache_helpers import CACHED
from aggregates import PROJECT_STATS, USER_STATS
from cache import metrics as cache_metrics
from events import PROJECT_UPDATED
from models import Task
from services import tasks as task_service
from stack.redis_server import free_port
from worker_fixtures import (actor_of, broker, exact, new_project, outbox_count,  # noqa: F401
                             read_stats, spawn, unprocessed, wait_until, worker)

COLD_BOUND = 2.0
BOUND = 1.0
BURST_WRITES = 500
BURST_THREADS = 8
MAX_BURST_RECOMPUTES = 10


@pytest.fixture
def settings(settings, broker):  # noqa: F811  (the conftest's, with the worker tests' broker)
    return settings.with_overrides(celery_broker_url=broker.url_for(0))


def inline_count() -> float:
    return cache_metrics.inline_computations.labels("project")._value.get()


def handed(outcome: str) -> float:
    """Events of this process's writes, by who took them on after commit."""
    return cache_metrics.outbox_events.labels(outcome)._value.get()


PROCESSED = 'celery_tasks_total{outcome="succeeded",task="tasks.events.process_event"}'


# -- tests ----------------------------------------------------------------------------------------
def test_stats_follow_writes_within_the_stated_bound(client, admin, services, worker):
    org_id = admin.organization["id"]
    project_id = new_project(client, admin)
    inline_before = inline_count()

    # Not cached yet: the worker sees the delta miss and recounts (no request computes it).
    created = client.post(f"/api/projects/{project_id}/tasks", json={"title": "first"},
                          headers=admin.headers)
    assert created.status_code == 201
    started = time.monotonic()
    wait_until(lambda: services.aggregates.read(PROJECT_STATS, org_id, project_id), COLD_BOUND,
               what="the worker's recount of cold stats")
    cold_latency = time.monotonic() - started
    first = read_stats(client, admin, project_id)
    assert first.headers["X-Cache"] in CACHED
    assert first.json["total_tasks"] == 1 and first.json["open_tasks"] == 1

    task_id = created.json["id"]
    steps = [
        ("create", lambda: client.post(f"/api/projects/{project_id}/tasks",
                                       json={"title": "second", "status": "BLOCKED"},
                                       headers=admin.headers),
         {"total_tasks": 2, "open_tasks": 1, "BLOCKED": 1}),
        ("status change", lambda: client.patch(f"/api/tasks/{task_id}",
                                               json={"status": "COMPLETED"},
                                               headers=admin.headers),
         {"total_tasks": 2, "completed_tasks": 1, "open_tasks": 0}),
        ("comment", lambda: client.post(f"/api/tasks/{task_id}/comments", json={"body": "hi"},
                                        headers=admin.headers),
         {"total_comments": 1}),
        ("delete", lambda: client.delete(f"/api/tasks/{task_id}", headers=admin.headers),
         {"total_tasks": 1, "completed_tasks": 0, "total_comments": 0, "BLOCKED": 1}),
    ]
    for name, write, expected in steps:
        answer = write()
        assert answer.status_code in (200, 201, 204), (name, answer.json)
        written = time.monotonic()

        def fresh():
            body = read_stats(client, admin, project_id)
            flat = {**body.json, **body.json["tasks_by_status"]}
            return body if all(flat[k] == v for k, v in expected.items()) else None
        body = wait_until(fresh, BOUND, what=f"stats to reflect the {name}")
        assert time.monotonic() - written < BOUND
        assert body.headers["X-Cache"] in CACHED, name
        assert body.json["stale"] is False

    # Every event reached the worker, the stats are exact, and no request computed them.
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="the outbox to drain")
    assert exact(services, PROJECT_STATS, org_id, project_id)
    assert inline_count() == inline_before
    print(f"cold stats filled by the worker {cold_latency * 1000:.0f} ms after the write")


@pytest.mark.slow
def test_a_burst_of_writes_ends_exact_with_a_handful_of_recomputes(admin, client, services,
                                                                   worker):
    org_id, me = admin.organization["id"], admin.user["id"]
    actor = actor_of(admin)
    project_id = new_project(client, admin, "Busy")
    recomputes = 'stats_recomputes_total{aggregate="project",reason="coalesced"}'
    before = worker.metric(recomputes)
    # The member's statistics read once: cached, so that the burst's deltas keep them (nobody
    # recounts a member's statistics nobody cached).
    assert client.get(f"/api/users/{me}/stats", headers=admin.headers).status_code == 200
    events_before, processed_before = outbox_count(services, org_id), worker.metric(PROCESSED)
    by_web, to_worker = handed("finished_by_web"), handed("sent_to_worker")
    errors: list[BaseException] = []
    per_thread = BURST_WRITES // BURST_THREADS

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        try:
            for _ in range(per_thread):
                roll = rng.random()
                if roll < 0.55 or not mine:
                    task = task_service.create_task(services, actor, project_id, {
                        "title": "t", "status": rng.choice(["TODO", "IN_PROGRESS", "COMPLETED"]),
                        "assignee_id": me if rng.random() < 0.5 else None})
                    mine.append(task["id"])
                elif roll < 0.8:
                    task_service.update_task(services, actor, rng.choice(mine), {
                        "status": rng.choice(["TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED"])})
                elif roll < 0.95:
                    task_service.create_comment(services, actor, rng.choice(mine), body="c")
                else:
                    task_service.delete_task(services, actor, mine.pop(rng.randrange(len(mine))))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(BURST_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = time.monotonic() - started
    assert not errors, errors

    wait_until(lambda: unprocessed(services, org_id) == 0, 60, 0.2, "the outbox to drain")
    wait_until(lambda: exact(services, PROJECT_STATS, org_id, project_id), 10, 0.1,
               "exact project stats")
    wait_until(lambda: exact(services, USER_STATS, org_id, me), 10, 0.1, "exact user stats")
    with services.db.session() as db:
        tasks_in_db = db.scalar(select(func.count()).select_from(Task).where(
            Task.project_id == project_id))
    api = read_stats(client, admin, project_id)
    assert api.json["total_tasks"] == tasks_in_db and api.headers["X-Cache"] in CACHED

    wait_until(lambda: services.redis.exists(f"pending:recount:project:{project_id}") == 0, 5,
               what="no recount pending")
    time.sleep(0.5)  # a last recount may still be counting: let the metric see it
    ran = worker.metric(recomputes) - before
    print(f"{BURST_WRITES} writes in {written:.1f} s, {ran:.0f} coalesced recomputes")
    assert 1 <= ran <= MAX_BURST_RECOMPUTES
    # Every event was taken on after its commit: the web finished most, and every one it could
    # not finish (a delta out of order between the writers) a worker processed.
    events = outbox_count(services, org_id) - events_before
    by_web, to_worker = handed("finished_by_web") - by_web, handed("sent_to_worker") - to_worker
    print(f"{events} events: {by_web:.0f} finished by the web, {to_worker:.0f} sent to a worker")
    assert by_web + to_worker == events and by_web > events / 2
    assert worker.metric(PROCESSED) - processed_before >= to_worker
    assert 'celery_queue_length{queue="invalidate"}' in worker.metrics()


def test_a_rolled_back_write_publishes_nothing(admin, client, services, worker):
    from services.uow import UnitOfWork

    org_id = admin.organization["id"]
    project_id = new_project(client, admin)
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="setup events")
    published: list = []
    real_publish = services.publish

    def recording(ids):
        published.append(list(ids))
        real_publish(ids)
    services.publish = recording
    events_before, tasks_before = outbox_count(services, org_id), worker.metric(PROCESSED)

    with pytest.raises(RuntimeError):
        with UnitOfWork(services) as uow:
            uow.emit(PROJECT_UPDATED, org_id, project_id=project_id)
            uow.session.flush()  # the row reached the database, inside the transaction
            raise RuntimeError("the write fails after its event was written")
    time.sleep(1.0)
    assert published == []
    assert outbox_count(services, org_id) == events_before
    assert worker.metric(PROCESSED) == tasks_before

    # The same write committed is applied and marked processed by the web (in its next batch of
    # stamps): nothing is left for a worker, so nothing is sent.
    with UnitOfWork(services) as uow:
        uow.emit(PROJECT_UPDATED, org_id, project_id=project_id)
        uow.commit()
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="the web's stamp")
    assert published == []
    assert outbox_count(services, org_id) == events_before + 1

    # Committed while the cache cannot take its bump, it is published once, and the worker
    # processes it once Redis is back.
    real_invalidate = services.cache.invalidate
    services.cache.invalidate = lambda *args, **kwargs: False
    try:
        with UnitOfWork(services) as uow:
            uow.emit(PROJECT_UPDATED, org_id, project_id=project_id)
            uow.commit()
    finally:
        services.cache.invalidate = real_invalidate
    assert len(published) == 1
    wait_until(lambda: worker.metric(PROCESSED) == tasks_before + 1, 10,
               what="the committed event's task")
    assert unprocessed(services, org_id) == 0


def _promised_keys_are_cached(client, account, active: list[str], archived: list[str],
                              expected: dict | None = None) -> None:
    for url in ["/api/orgs/current", "/api/users", "/api/projects",
                "/api/projects?status=ACTIVE"]:
        answer = client.get(url, headers=account.headers)
        assert answer.headers["X-Cache"] in CACHED, url
    for project_id in active:
        answer = client.get(f"/api/projects/{project_id}", headers=account.headers)
        assert answer.headers["X-Cache"] in CACHED, project_id
        if expected:
            assert answer.json == expected[project_id]
        assert read_stats(client, account, project_id).headers["X-Cache"] in CACHED
    for project_id in archived:  # not promised: not warmed
        answer = client.get(f"/api/projects/{project_id}", headers=account.headers)
        assert answer.headers["X-Cache"] == "MISS"


def test_admin_warm_fills_the_organization_keys(client, admin, services, worker):
    active = [new_project(client, admin, f"P{i}") for i in range(3)]
    archived = new_project(client, admin, "Old")
    assert client.patch(f"/api/projects/{archived}", json={"status": "ARCHIVED"},
                        headers=admin.headers).status_code == 200
    wait_until(lambda: unprocessed(services, admin.organization["id"]) == 0, 10,
               what="setup events")
    expected = {p: client.get(f"/api/projects/{p}", headers=admin.headers).json for p in active}
    assert client.delete("/api/admin/cache", headers=admin.headers).status_code == 202

    answer = client.post("/api/admin/cache/warm", headers=admin.headers)
    assert answer.status_code == 202 and answer.json["task_id"]
    wait_until(lambda: services.redis.get("warmup:last:admin"), 10, what="the warm-up")
    _promised_keys_are_cached(client, admin, active, [archived], expected)


def test_flask_warm_command_fills_the_organization_keys(app, client, admin):
    active = [new_project(client, admin, f"P{i}") for i in range(2)]
    assert client.delete("/api/admin/cache", headers=admin.headers).status_code == 202

    result = app.test_cli_runner().invoke(args=["warm", "--org", admin.organization["id"]])
    assert result.exit_code == 0, result.output
    assert "warmed 1 organizations, 2 projects" in result.output
    _promised_keys_are_cached(client, admin, active, [])

    unknown = app.test_cli_runner().invoke(args=["warm", "--org", "nope"])
    assert unknown.exit_code != 0


def test_flower_lists_the_worker_with_auth_and_refuses_without(broker, worker,  # noqa: F811
                                                               tmp_path):
    port = free_port()
    flower = spawn("flower", ["flower", f"--port={port}", "--address=127.0.0.1",
                              "--basic-auth=ops:s3cret"], worker.env, tmp_path)
    hostname = worker.process.args[worker.process.args.index("-n") + 1].split("@")[0]

    def get(auth: str | None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1")
        if auth:
            request.add_header("Authorization",
                               "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except (urllib.error.URLError, ConnectionError):
            return None, ""
    try:
        wait_until(lambda: get(None)[0] is not None, 30, 0.2, "Flower to listen")
        listed = wait_until(lambda: (lambda s, b: s == 200 and hostname in b)(*get("ops:s3cret")),
                            30, 0.5, "Flower to list the worker")
        assert listed
        assert get(None)[0] == 401
        assert get("ops:wrong")[0] == 401
    finally:
        flower.stop()
    assert flower.process.returncode is not None


def test_the_events_the_web_finished_are_stamped_processed_together(admin, client, services,
                                                                     monkeypatch):
    """One statement stamps the outbox rows of many finished writes (services/stamps.py), within
    the interval; until then they are pending in the process, not lost."""
    from services.stamps import ProcessedStamps
    from services.uow import UnitOfWork
    from tests.cache_helpers import count_sql

    org_id = admin.organization["id"]
    project_id = new_project(client, admin)
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="setup events")
    stamps = ProcessedStamps(services.db, interval=3600)  # this test flushes by itself
    monkeypatch.setattr(services, "stamps", stamps)
    for _ in range(5):
        with UnitOfWork(services) as uow:
            uow.emit(PROJECT_UPDATED, org_id, project_id=project_id)
            uow.commit()
    assert unprocessed(services, org_id) == 5 and stamps.pending() == 5
    with count_sql(services) as sql:
        stamps.flush()
    assert len([q for q in sql.statements if q.split()[0].upper() == "UPDATE"]) == 1
    assert unprocessed(services, org_id) == 0 and stamps.pending() == 0
    stamps.stop()


def test_a_change_to_statistics_nobody_cached_has_the_web_schedule_their_recount(
        client, admin, services, worker):
    """Nothing cached is stale, so the event needs no worker pass: the web schedules the
    coalesced recount itself, finishes the event, and the worker only counts."""
    org_id = admin.organization["id"]
    project_id = new_project(client, admin)
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="setup events")
    services.cache.purge_organization(org_id)  # no statistics of the project in the cache
    assert services.aggregates.read(PROJECT_STATS, org_id, project_id) is None
    by_web, to_worker = handed("finished_by_web"), handed("sent_to_worker")
    passes = worker.metric(PROCESSED)

    made = client.post(f"/api/projects/{project_id}/tasks", json={"title": "counted"},
                       headers=admin.headers)
    assert made.status_code == 201
    assert (handed("finished_by_web") - by_web, handed("sent_to_worker") - to_worker) == (1, 0)
    stats = wait_until(lambda: services.aggregates.read(PROJECT_STATS, org_id, project_id),
                       COLD_BOUND, what="the recount the web scheduled")
    assert stats.stats["total_tasks"] == 1
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="the stamp")
    assert worker.metric(PROCESSED) == passes  # no worker pass for the event


def test_a_members_statistics_nobody_cached_are_left_to_their_first_read(client, admin,
                                                                          services, worker):
    """A change to a member's statistics that nobody cached schedules no recount (most are never
    read): the web finishes the event, the first read counts them, and from then on the change's
    delta keeps them."""
    org_id, me = admin.organization["id"], admin.user["id"]
    project_id = new_project(client, admin)
    wait_until(lambda: unprocessed(services, org_id) == 0, 10, what="setup events")
    services.cache.purge_organization(org_id)  # nobody's statistics are cached
    by_web, to_worker = handed("finished_by_web"), handed("sent_to_worker")

    made = client.post(f"/api/projects/{project_id}/tasks", headers=admin.headers,
                       json={"title": "mine", "assignee_id": me})
    assert made.status_code == 201
    assert (handed("finished_by_web") - by_web, handed("sent_to_worker") - to_worker) == (1, 0)
    assert not services.redis.exists(f"pending:recount:user:{me}")
    # The project's recount (scheduled, 0.2 s countdown) runs; none counts the member's.
    wait_until(lambda: services.aggregates.read(PROJECT_STATS, org_id, project_id), COLD_BOUND,
               what="the project's recount")
    time.sleep(0.5)
    assert services.aggregates.read(USER_STATS, org_id, me) is None

    first = client.get(f"/api/users/{me}/stats", headers=admin.headers)
    assert first.headers["X-Cache"] not in CACHED and first.json["assigned_tasks"] == 1
    done = client.patch(f"/api/tasks/{made.json['id']}", json={"status": "COMPLETED"},
                        headers=admin.headers)
    assert done.status_code == 200
    after = client.get(f"/api/users/{me}/stats", headers=admin.headers)
    assert after.headers["X-Cache"] in CACHED
    assert (after.json["assigned_tasks"], after.json["completed_tasks"]) == (1, 1)
