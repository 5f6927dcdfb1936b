"""The near cache (cache/near.py): hot reads served by the process itself, kept coherent by Redis.

Two API instances here are two apps with their own services (own connections, own near cache)
on the same Redis and database, as two servers behind a balancer are."""

from __future__ import annotations

import threading
import time
import tracemalloc
import uuid

import pytest
import redis

from cache import codec, keys
from cache.near import NearCache
from cache.store import MISSING, Lookup
from services.context import Memo, build_services
from tests.cache_helpers import count_sql, raw
from web import create_app

pytestmark = pytest.mark.usefixtures("services")


@pytest.fixture
def project(client, admin):
    return client.post("/api/projects", json={"name": "Launch"}, headers=admin.headers).json


@pytest.fixture
def other(settings):
    """A second API instance."""
    built = build_services(settings)
    yield create_app(settings, built).test_client()
    built.close()


def warm(client, url, headers) -> None:
    """Read until this instance serves `url` itself."""
    for _ in range(20):
        if client.get(url, headers=headers).headers["X-Cache"] == "HIT-L1":
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} never came from the near cache")


def wait_until(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_write_through_one_instance_is_read_at_once_through_another(client, other, admin,
                                                                      project):
    url = f"/api/projects/{project['id']}"
    for n in range(30):
        warm(other, url, admin.headers)
        name = f"Name {n}"
        assert client.patch(url, json={"name": name}, headers=admin.headers).status_code == 200
        # no wait: the invalidation reached `other` before the write's answer reached us
        assert other.get(url, headers=admin.headers).json["name"] == name


def test_new_tasks_and_stats_are_read_at_once_through_another_instance(client, other, admin,
                                                                       project):
    url = f"/api/projects/{project['id']}"
    for n in range(1, 11):
        warm(other, f"{url}/tasks", admin.headers)
        warm(other, f"{url}/stats", admin.headers)
        created = client.post(f"{url}/tasks", json={"title": f"T{n}"}, headers=admin.headers)
        assert created.status_code == 201
        titles = [t["title"] for t in other.get(f"{url}/tasks", headers=admin.headers)
                  .json["items"]]
        assert f"T{n}" in titles and len(titles) == n
        assert other.get(f"{url}/stats", headers=admin.headers).json["total_tasks"] == n


def test_a_logout_through_one_instance_ends_the_token_in_another_at_once(client, other, admin):
    warm(other, "/api/me", admin.headers)
    assert client.post("/api/auth/logout", headers=admin.headers).status_code == 204
    assert other.get("/api/me", headers=admin.headers).status_code == 401


def test_a_copy_read_before_an_invalidation_is_never_served(services):
    """The stale-set race, per process: a value read from Redis, then changed there before the
    copy is kept, must not be served from the copy."""
    near, r = services.cache.near, raw(services)
    key = keys.project("org", str(uuid.uuid4()))
    r.set(key.versions[-1], "v1")
    ticket = near.begin()
    assert ticket is not None
    r.set(key.versions[-1], "v2")  # a write between the read and keeping its copy,
    assert near.begin() is not None  # whose invalidation another request applies meanwhile
    near.put(key.name, "old value", (*key.versions, key.name), ticket, max_age=60)
    assert near.get(key.name, near.begin()) is MISSING

    ticket = near.begin()
    near.put(key.name, "current value", (*key.versions, key.name), ticket, max_age=60)
    assert near.get(key.name, near.begin()) == "current value"


def test_a_read_waits_for_an_invalidation_another_thread_has_read_but_not_yet_applied(
        services):
    """Reads take no lock when nothing has arrived; an empty socket is not enough, though: a
    drain in another thread may have read the message and not applied it yet."""
    near, r = NearCache(services.redis, trust_window=60), raw(services)
    gate, applying, release = threading.Event(), threading.Event(), threading.Event()
    apply = near._on_invalidate

    def slow_apply(message):
        if gate.is_set():
            applying.set()
            release.wait(10)
        return apply(message)

    near._on_invalidate = slow_apply
    near.connect()  # no tracking thread: the threads below drain
    try:
        key = keys.project("org", str(uuid.uuid4()))
        r.set(key.versions[-1], "v1")
        assert near.put(key.name, "copy", (*key.versions, key.name), near.begin(), max_age=60)
        gate.set()
        r.set(key.versions[-1], "v2")
        threading.Thread(target=near.begin, daemon=True).start()
        assert applying.wait(5)  # the message is out of the socket, not applied

        served = []
        reader = threading.Thread(target=lambda: served.append(near.get(key.name, near.begin())))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), f"served {served} while the invalidation was being applied"
        release.set()
        reader.join(5)
        assert served == [MISSING]
    finally:
        release.set()
        near.clear()
        for tracker in near._trackers:
            tracker.close()


def test_a_lost_tracking_connection_clears_every_copy(client, admin, project, services):
    url = f"/api/projects/{project['id']}"
    warm(client, url, admin.headers)
    assert services.cache.near.stats()["entries"] > 0
    control = raw(services)
    tracking = [c for c in control.client_list() if "t" in c["flags"]]
    assert tracking, "no tracking connection"
    for connection in tracking:
        control.client_kill_filter(_id=connection["id"])
    assert wait_until(lambda: services.cache.near.stats()["entries"] == 0
                      or not services.cache.near.stats()["connected"])
    answer = client.get(url, headers=admin.headers)
    assert answer.headers["X-Cache"] != "HIT-L1" and answer.json["name"] == "Launch"
    warm(client, url, admin.headers)  # tracking is back


def test_a_paused_redis_turns_the_near_cache_off(client, admin, project, services):
    """A write whose invalidation cannot reach a paused Redis must not leave other processes
    serving their copies: they stop trusting them once the heartbeat goes unanswered."""
    url = f"/api/projects/{project['id']}"
    warm(client, url, admin.headers)
    near = services.cache.near
    control = raw(services)
    control.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    try:
        time.sleep(near.trust_window * 2)
        assert near.begin() is None
        answer = client.get(url, headers=admin.headers)
        assert answer.status_code == 200 and answer.headers["X-Cache"] != "HIT-L1"
    finally:
        control.execute_command("CLIENT", "UNPAUSE")
    warm(client, url, admin.headers)


def test_a_flush_clears_every_copy(client, admin, project, services):
    warm(client, f"/api/projects/{project['id']}", admin.headers)
    raw(services).flushall()
    assert wait_until(lambda: services.cache.near.begin() is not None
                      and services.cache.near.stats()["entries"] == 0)


def test_a_session_is_extended_at_most_once_per_slide_step(client, admin, services):
    """A session's sliding TTL without a Redis write per request."""
    from cache.store import SLIDE_STEP

    client.get("/api/me", headers=admin.headers)
    r = raw(services)
    session = next(k.decode() for k in r.scan_iter("t:*:session:*"))
    services.cache.near.clear()
    r.expire(session, keys.SESSION_TTL - SLIDE_STEP + 5)  # used a moment ago: not yet due
    client.get("/api/me", headers=admin.headers)
    assert r.ttl(session) <= keys.SESSION_TTL - SLIDE_STEP + 5
    services.cache.near.clear()
    r.expire(session, keys.SESSION_TTL - SLIDE_STEP - 5)  # due
    client.get("/api/me", headers=admin.headers)
    assert r.ttl(session) > keys.SESSION_TTL - SLIDE_STEP


def test_memory_is_bounded_by_entries_and_bytes_and_the_estimate_is_an_upper_bound():
    task = {"id": str(uuid.uuid4()), "title": "Write the quarterly report", "status": "TODO",
            "description": "x" * 120, "assignee_id": str(uuid.uuid4()), "version": 3}
    blob = codec.encode({"items": [dict(task) for _ in range(20)], "next_cursor": None})

    def fill(near: NearCache, n: int) -> None:
        for _ in range(n):
            key = keys.task("org", str(uuid.uuid4()))
            near.put(key.name, Lookup(key, "a1.b2", codec.decode(blob)),
                     (*key.versions, key.name), 0, max_age=60)

    counted = NearCache(None, max_entries=10**6, max_bytes=1 << 40)
    counted._connected = True
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fill(counted, 500)
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    print(f"\nnear cache: {used / 500:,.0f} B per 20-task page, {counted.stats()['bytes'] / 500:,.0f}"
          " B counted")
    assert counted.stats()["bytes"] >= used  # the budget bounds the real memory

    by_entries = NearCache(None, max_entries=100)
    by_entries._connected = True
    fill(by_entries, 300)
    assert by_entries.stats()["entries"] == 100

    by_bytes = NearCache(None, max_bytes=1 << 20)
    by_bytes._connected = True
    fill(by_bytes, 300)
    assert 0 < by_bytes.stats()["bytes"] <= 1 << 20 and by_bytes.stats()["entries"] < 300


def test_no_copies_are_kept_when_tracking_is_unavailable(settings):
    """A Redis that cannot track (here: none at all) leaves the near cache off, never wrong."""
    dead = settings.with_overrides(redis_url="redis://127.0.0.1:1/0", redis_cluster_url=None)
    built = build_services(dead)
    try:
        assert built.cache.near.begin() is None
        assert built.cache.near.stats()["connected"] is False
    finally:
        built.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(dead.redis_url, socket_connect_timeout=0.5).ping()


def test_a_request_pings_itself_when_the_heartbeat_is_late_and_then_trusts_its_copies(services):
    """A busy process's heartbeat thread may not run for a while: a request then makes the
    round trip itself, and its PONG comes after every invalidation sent before it."""
    from cache import metrics

    near, r = NearCache(services.redis), raw(services)  # no tracking thread: nobody pings
    near.connect()
    try:
        key = keys.project("org", str(uuid.uuid4()))
        r.set(key.versions[-1], "v1")
        ticket = near.begin()
        assert near.put(key.name, "copy", (*key.versions, key.name), ticket, max_age=60)
        time.sleep(near.trust_window * 2)
        probes = metrics.near_probes._value.get()
        assert near.get(key.name, near.begin()) == "copy"  # trusted again after its own ping
        assert metrics.near_probes._value.get() == probes + 1

        r.set(key.versions[-1], "v2")
        time.sleep(near.trust_window * 2)
        assert near.get(key.name, near.begin()) is MISSING  # the barrier brought the change
    finally:
        near.clear()
        for tracker in near._trackers:
            tracker.close()


def test_a_request_asks_redis_only_for_what_its_process_holds_no_copy_of(
        client, admin, project, services, monkeypatch):
    """The session stays near when the project it is read with was retired: the round trip
    fetches (and keeps again) the project alone."""
    url = f"/api/projects/{project['id']}"
    warm(client, url, admin.headers)
    org_id = admin.organization["id"]
    assert services.cache.invalidate([keys.project_version(org_id, project["id"])],
                                     org_ids=[org_id], family="project")
    assert client.get(url, headers=admin.headers).headers["X-Cache"] == "MISS"  # stored again
    kept = []
    put = services.cache.near.put
    monkeypatch.setattr(services.cache.near, "put",
                        lambda name, *args, **kw: kept.append(name) or put(name, *args, **kw))
    answer = client.get(url, headers=admin.headers)
    assert answer.status_code == 200 and answer.json == project
    assert kept == [keys.project(org_id, project["id"]).name]
    assert client.get(url, headers=admin.headers).headers["X-Cache"] == "HIT-L1"


def test_a_write_to_a_task_its_process_holds_or_wrote_finds_the_project_without_a_query(
        client, admin, project, services):
    """A task never changes project: the writer's near copy, or its memo of the tasks it wrote,
    names the project it locks."""
    task = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "T"},
                       headers=admin.headers).json
    url = f"/api/tasks/{task['id']}"

    def project_queries(status: str) -> list[str]:
        with count_sql(services) as sql:
            answer = client.patch(url, json={"status": status}, headers=admin.headers)
        assert answer.status_code == 200 and answer.json["status"] == status
        return [s for s in sql.statements if s.lstrip().startswith("SELECT tasks.project_id")]

    services.cache.near.clear()
    services.task_projects.clear()
    assert len(project_queries("IN_PROGRESS")) == 1
    warm(client, url, admin.headers)
    assert project_queries("COMPLETED") == []  # the near copy
    services.cache.near.clear()
    assert project_queries("IN_PROGRESS") == []  # the memo of the first write
    services.task_projects.clear()
    assert len(project_queries("COMPLETED")) == 1
    stats = client.get(f"/api/projects/{project['id']}/stats", headers=admin.headers).json
    assert stats["completed_tasks"] == 1 and stats["total_tasks"] == 1


def test_the_memo_of_a_tasks_project_is_bounded_and_kept_per_organization(
        client, admin, sign_up, project, services):
    """Another organization naming a task this process wrote locks none of its rows (the memo is
    by organization), and the memo forgets its oldest entries past its bound."""
    task = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "T"},
                       headers=admin.headers).json
    assert services.task_projects.get((admin.organization["id"], task["id"])) == project["id"]
    services.cache.near.clear()
    stranger = sign_up("Stranger")
    with count_sql(services) as sql:
        answer = client.patch(f"/api/tasks/{task['id']}", json={"status": "COMPLETED"},
                              headers=stranger.headers)
    assert answer.status_code == 404
    assert not [s for s in sql.statements if "FOR UPDATE" in s], sql.statements
    org_id = admin.organization["id"]
    memo = Memo(maxsize=2)
    for n in range(3):
        memo.put((org_id, f"task-{n}"), f"project-{n}")
    assert len(memo) == 2 and memo.get((org_id, "task-0")) is None
    assert memo.get((org_id, "task-2")) == "project-2"


def test_a_near_copy_naming_another_project_is_caught_by_the_task_lock(
        client, admin, project, services):
    """Whatever a copy says, the write checks the locked task belongs to the locked project, and
    a mismatch writes nothing."""
    task = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "T"},
                       headers=admin.headers).json
    elsewhere = client.post("/api/projects", json={"name": "Other"}, headers=admin.headers).json
    url = f"/api/tasks/{task['id']}"
    warm(client, url, admin.headers)
    near, key = services.cache.near, keys.task(admin.organization["id"], task["id"])
    ticket = near.begin()
    held = near.get(key.name, ticket)
    forged = Lookup(key, held.tokens, {**held.value, "project_id": elsewhere["id"]}, "l1")
    assert near.put(key.name, forged, (*key.versions, key.name), ticket, max_age=60)
    answer = client.patch(url, json={"status": "COMPLETED"}, headers=admin.headers)
    assert answer.status_code == 404
    near.clear()
    assert client.get(url, headers=admin.headers).json["status"] == "TODO"
    for pid in (project["id"], elsewhere["id"]):
        stats = client.get(f"/api/projects/{pid}/stats", headers=admin.headers).json
        assert stats["completed_tasks"] == 0
