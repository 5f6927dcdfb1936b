"""Concurrency: the stale-set race, stampedes, ordered aggregate deltas racing recounts, and the
per-process L1 kept coherent across API instances. Interleavings are forced with events and hooks
around the real loaders, so each test is deterministic."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from prometheus_client import REGISTRY

from cache_helpers import CACHED
from aggregates import PROJECT_STATS, Delta
from cache import keys
from cache.l1 import L1Cache, read_through_l1
from cache.near import MISSING
from services.projects import load_project
from services.settings_store import DEFAULTS, get_config, set_config
from tests.cache_helpers import count_sql


@pytest.fixture
def project(client, admin):
    return client.post("/api/projects", json={"name": "Old name"}, headers=admin.headers).json


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the stale-set race ----------------------------------------------------------------------------
def test_a_reader_that_loaded_before_a_write_cannot_store_its_old_value_after_it(
        client, admin, project, services):
    """Reader misses and loads the old row; the writer commits and invalidates; only then does
    the reader store. The old value must never be served afterwards."""
    org, pid = admin.organization["id"], project["id"]
    loaded, stored = threading.Event(), threading.Event()
    write_done = threading.Event()
    load_old = load_project(org, pid)
    result = {}

    def slow_loader():
        with services.db.session() as db:
            value = load_old(db)
        loaded.set()
        assert write_done.wait(10)
        return value

    def reader():
        result["value"], result["source"] = services.cache.read_through(
            keys.project(org, pid), slow_loader)
        stored.set()

    t = threading.Thread(target=reader)
    t.start()
    assert loaded.wait(10)
    patched = client.patch(f"/api/projects/{pid}", json={"name": "New name"},
                           headers=admin.headers)
    assert patched.status_code == 200
    write_done.set()
    t.join(10)
    assert stored.is_set()
    assert (result["value"]["name"], result["source"]) == ("Old name", "MISS")  # it raced

    after = client.get(f"/api/projects/{pid}", headers=admin.headers)
    assert after.json["name"] == "New name"
    again = client.get(f"/api/projects/{pid}", headers=admin.headers)
    assert again.json["name"] == "New name" and again.headers["X-Cache"] in CACHED


def test_the_stale_set_race_step_by_step(client, admin, project, services):
    org, pid = admin.organization["id"], project["id"]
    key = keys.project(org, pid)
    lookup = services.cache.lookup(key)  # 1. reader misses
    assert not lookup.hit
    with services.db.session() as db:  # 2. reader loads the old row
        old = load_project(org, pid)(db)
    client.patch(f"/api/projects/{pid}", json={"name": "New name"}, headers=admin.headers)  # 3.
    services.cache.store(lookup, old)  # 4. reader stores what it loaded
    assert services.cache.lookup(key).value is not old and not services.cache.lookup(key).hit
    assert client.get(f"/api/projects/{pid}", headers=admin.headers).json["name"] == "New name"


# -- stampedes ---------------------------------------------------------------------------------------
def run_together(n: int, fn) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i):
        try:
            barrier.wait(10)
            results[i] = fn()
        except Exception as exc:  # reported below, with the thread's result
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    return results


def test_50_concurrent_cold_reads_of_one_key_load_once(admin, project, services):
    org, pid = admin.organization["id"], project["id"]
    loads = []
    load = load_project(org, pid)

    def loader():
        loads.append(1)
        with services.db.session() as db:
            value = load(db)
        time.sleep(0.05)  # a slow query widens the window a stampede needs
        return value

    results = run_together(50, lambda: services.cache.read_through(keys.project(org, pid),
                                                                    loader))
    assert len(loads) == 1
    assert all(value["name"] == "Old name" for value, _ in results)
    sources = [source for _, source in results]
    assert sources.count("MISS") == 1
    # The others waited for the loader's value, or (a late start, seen on a Redis Cluster) found
    # it already copied into this process's near cache.
    assert set(sources) - {"MISS"} <= {"HIT-L2", "HIT-L1"}, sources


def test_50_concurrent_cold_project_gets_run_one_project_query(app, admin, project, services):
    url = f"/api/projects/{project['id']}"
    assert app.test_client().get("/api/me", headers=admin.headers).status_code == 200
    with count_sql(services) as sql:
        answers = run_together(50, lambda: app.test_client().get(url, headers=admin.headers))
    assert all(a.status_code == 200 and a.json["name"] == "Old name" for a in answers)
    project_queries = [s for s in sql.statements if "FROM projects" in s]
    assert len(project_queries) == 1, sql.statements
    assert [a.headers["X-Cache"] for a in answers].count("MISS") == 1


def test_50_concurrent_cold_stats_reads_compute_once(app, client, admin, project, services):
    for title in ("a", "b", "c"):
        client.post(f"/api/projects/{project['id']}/tasks", json={"title": title},
                    headers=admin.headers)
    url = f"/api/projects/{project['id']}/stats"
    assert client.get(f"/api/projects/{project['id']}", headers=admin.headers).status_code == 200
    before = sample("stats_inline_computations_total", aggregate="project")
    answers = run_together(50, lambda: app.test_client().get(url, headers=admin.headers))
    assert all(a.status_code == 200 and a.json["total_tasks"] == 3 for a in answers)
    assert sample("stats_inline_computations_total", aggregate="project") - before == 1
    assert [a.headers["X-Cache"] for a in answers].count("MISS") == 1


# -- ordered deltas ------------------------------------------------------------------------------------
def test_deltas_applied_out_of_order_end_exact(client, admin, project, services):
    org, pid = admin.organization["id"], project["id"]
    store = services.aggregates
    with services.db.session() as db:
        store.recount(db, PROJECT_STATS, org, pid, reason="test")
    seq = store.read(PROJECT_STATS, org, pid).seq

    def delta(n, **changes):
        return Delta("project", org, pid, seq + n, changes)

    assert store.apply(delta(2, TODO=-1, COMPLETED=1), "test") == "buffered"
    gap = store.read(PROJECT_STATS, org, pid)
    assert gap.stale and gap.stats["total_tasks"] == 0  # n+2 waits for n+1
    assert store.apply(delta(1, TODO=1), "test") == "applied"
    assert store.apply(delta(3, comments=1), "test") == "applied"
    assert store.apply(delta(1, TODO=1), "test") == "duplicate"  # the worker's replay
    final = store.read(PROJECT_STATS, org, pid)
    assert not final.stale and final.seq == seq + 3
    assert final.stats["tasks_by_status"] == {"TODO": 0, "IN_PROGRESS": 0, "BLOCKED": 0,
                                              "COMPLETED": 1}
    assert final.stats["total_comments"] == 1


def test_deltas_ride_on_the_bumps_and_survive_a_redis_that_lost_its_scripts(client, admin,
                                                                             project, services):
    """An event's deltas go to Redis with its bumps. A Redis restarted (or a replica promoted)
    has none of the scripts: both are loaded again and the round trip retried, and each delta
    still counts once."""
    org, pid = admin.organization["id"], project["id"]
    store = services.aggregates
    with services.db.session() as db:
        store.recount(db, PROJECT_STATS, org, pid, reason="test")
    seq = store.read(PROJECT_STATS, org, pid).seq
    version = keys.project_version(org, pid)
    before = services.redis.get(version)
    services.cache.client.script_flush()
    writes = [store.delta_write(Delta("project", org, pid, seq + n, {"TODO": 1}), "test")
              for n in (1, 2)]
    assert services.cache.invalidate([version], org_ids=[org], family="project", side=writes)
    assert [w.outcome() for w in writes] == ["applied", "applied"]
    assert services.redis.get(version) != before
    after = store.read(PROJECT_STATS, org, pid)
    assert after.seq == seq + 2 and after.stats["tasks_by_status"]["TODO"] == 2


def test_a_delta_that_fails_leaves_its_reply_missing_and_fails_no_bump(admin, project, services):
    """A command riding on the bumps' round trip that Redis refuses (here a wrong type) is
    that command's failure only: the versions are bumped, nothing is owed."""
    org, pid = admin.organization["id"], project["id"]
    version = keys.project_version(org, pid)
    before = services.redis.get(version)
    services.redis.hset(f"wrong-type:{{{org}}}", "f", "v")

    class Refused:
        reply = MISSING

        def queue(self, pipe):
            pipe.execute_command("INCR", f"wrong-type:{{{org}}}")
            return 1

        def load_scripts(self, client):
            raise AssertionError("no script to load")

    refused = Refused()
    assert services.cache.invalidate([version], org_ids=[org], family="project", side=[refused])
    assert refused.reply is MISSING
    assert services.redis.get(version) != before
    assert not services.cache._owed_purges


def test_concurrent_comments_edits_and_deletes_on_one_project_leave_no_gap(
        app, client, admin, project, services):
    """Writers of one project at once (comments and deletes take the change's number with the
    project's lock, edits after it): every change is numbered once, in order, and the cached
    statistics end exact and fresh."""
    org, pid = admin.organization["id"], project["id"]
    tasks = [client.post(f"/api/projects/{pid}/tasks", json={"title": f"t{n}"},
                         headers=admin.headers).json["id"] for n in range(9)]
    url = f"/api/projects/{pid}/stats"
    assert client.get(url, headers=admin.headers).status_code == 200  # cached: deltas fold in
    statuses = ("IN_PROGRESS", "COMPLETED", "BLOCKED")
    writes = iter(range(24))

    def write():
        n = next(writes)
        task_id, api = tasks[n % 8], app.test_client()
        if n % 3 == 0:
            return api.post(f"/api/tasks/{task_id}/comments", json={"body": "x"},
                            headers=admin.headers).status_code
        if n == 23:  # the ninth task, written by no one else
            return api.delete(f"/api/tasks/{tasks[8]}", headers=admin.headers).status_code
        return api.patch(f"/api/tasks/{task_id}", json={"status": statuses[n % 3]},
                         headers=admin.headers).status_code

    assert set(run_together(24, write)) <= {200, 201, 204}
    with services.db.session() as db:
        seq, counts = PROJECT_STATS.count(db, pid)
    cached = services.aggregates.read(PROJECT_STATS, org, pid)
    assert cached.seq == seq and not cached.stale
    stats = client.get(url, headers=admin.headers).json
    assert stats["tasks_by_status"] == {s: counts[s] for s in stats["tasks_by_status"]}
    assert (stats["total_tasks"], stats["total_comments"]) == (8, 8)
    assert stats["total_comments"] == counts["comments"] and not stats["stale"]


def test_a_gap_asks_for_a_recount_only_once_it_has_stalled(client, admin, project, services):
    """An out-of-order delta normally finds its predecessor within milliseconds: reads serve the
    stats marked stale without asking for a recount; a gap that made no progress for
    GAP_PATIENCE seconds does ask for one, once per read, coalesced by the worker."""
    from services.stats import GAP_PATIENCE, needs_recount

    org, pid = admin.organization["id"], project["id"]
    store = services.aggregates
    asked = []
    services.extras["schedule_recount"] = lambda *args: asked.append(args)
    client.get(f"/api/projects/{pid}/stats", headers=admin.headers)  # cold: computed, cached
    seq = store.read(PROJECT_STATS, org, pid).seq
    assert store.apply(Delta("project", org, pid, seq + 2, {"TODO": 1}), "test") == "buffered"

    young = client.get(f"/api/projects/{pid}/stats", headers=admin.headers)
    assert young.json["stale"] is True and asked == []
    assert not needs_recount(store.read(PROJECT_STATS, org, pid))

    name = PROJECT_STATS.name(org, pid)
    services.redis.hincrby(name, "gap_since", -int(GAP_PATIENCE) - 1)  # as if long ago
    stalled = client.get(f"/api/projects/{pid}/stats", headers=admin.headers)
    assert stalled.json["stale"] is True
    assert asked == [("project", org, pid, "stalled_gap")]

    assert store.apply(Delta("project", org, pid, seq + 1, {"TODO": 1}), "test") == "applied"
    healed = store.read(PROJECT_STATS, org, pid)
    assert not healed.stale and healed.stalled == 0 and not needs_recount(healed)
    assert b"gap_since" not in services.redis.hgetall(name)


def hooked(agg, after_count):
    """The aggregate with a hook run between the recount's database read and its store."""
    def count(session, owner_id):
        counted = agg.count(session, owner_id)
        after_count()
        return counted
    return dataclasses.replace(agg, count=count)


def truth(services, pid) -> int:
    with services.db.session() as db:
        return PROJECT_STATS.count(db, pid)[1]["TODO"]


def test_a_cold_recount_racing_a_write_does_not_drop_its_delta(client, admin, project, services):
    """Recount reads seq n; a write commits n+1 and applies its delta (nothing cached yet);
    then the recount stores seq n. The write must still be counted."""
    org, pid = admin.organization["id"], project["id"]
    client.post(f"/api/projects/{pid}/tasks", json={"title": "before"}, headers=admin.headers)

    def write():
        made = client.post(f"/api/projects/{pid}/tasks", json={"title": "during"},
                           headers=admin.headers)
        assert made.status_code == 201

    with services.db.session() as db:
        services.aggregates.recount(db, hooked(PROJECT_STATS, write), org, pid, reason="test")
    assert truth(services, pid) == 2
    stats = client.get(f"/api/projects/{pid}/stats", headers=admin.headers).json
    assert (stats["total_tasks"], stats["open_tasks"], stats["stale"]) == (2, 2, False)


def test_a_warm_recount_racing_a_write_neither_drops_nor_doubles(client, admin, project,
                                                                services):
    org, pid = admin.organization["id"], project["id"]
    url = f"/api/projects/{pid}/stats"
    client.post(f"/api/projects/{pid}/tasks", json={"title": "before"}, headers=admin.headers)
    assert client.get(url, headers=admin.headers).json["total_tasks"] == 1  # cached at seq n

    def write():
        client.post(f"/api/projects/{pid}/tasks", json={"title": "during"}, headers=admin.headers)

    with services.db.session() as db:  # counts n, the write lands n+1, the recount stores n
        services.aggregates.recount(db, hooked(PROJECT_STATS, write), org, pid, reason="drift")
    assert client.get(url, headers=admin.headers).json["total_tasks"] == 2

    # A recount that read after a commit whose delta is applied later: the delta is a duplicate.
    with services.db.session() as db:
        seq, counts = PROJECT_STATS.count(db, pid)
    late = Delta("project", org, pid, seq + 1, {"TODO": 1})
    counts["TODO"] += 1
    assert services.aggregates.replace(PROJECT_STATS, org, pid, seq + 1, counts) == "replaced"
    assert services.aggregates.apply(late, "test") == "duplicate"
    assert client.get(url, headers=admin.headers).json["total_tasks"] == 3


# -- L1 ----------------------------------------------------------------------------------------------
def test_feature_flags_are_served_from_l1_on_the_second_read(client, services):
    assert services.l1_subscriber.ready.wait(5)  # subscribing clears the L1 (missed messages)
    first = client.get("/api/public/feature-flags")
    second = client.get("/api/public/feature-flags")
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT-L1"
    assert second.json == first.json
    assert second.headers["Cache-Control"] == "public, max-age=60, s-maxage=120"


def test_a_config_change_in_one_instance_reaches_the_l1_of_another_within_a_bound(
        client, services, settings):
    from services.context import build_services
    from web import create_app

    other_services = build_services(settings)
    try:
        assert other_services.l1_subscriber.ready.wait(5)
        assert services.l1_subscriber.ready.wait(5)
        other = create_app(settings, other_services).test_client()
        other.get("/api/public/feature-flags")
        assert other.get("/api/public/feature-flags").headers["X-Cache"] == "HIT-L1"

        set_config(services, "feature_flags", {"new_ui_enabled": False})
        assert client.get("/api/public/feature-flags").json == {  # the writer: at once
            "flags": {"new_ui_enabled": False}}
        started = time.monotonic()
        while other.get("/api/public/feature-flags").json != {"flags": {"new_ui_enabled": False}}:
            assert time.monotonic() - started < 2.0, "the other instance kept its old L1 value"
            time.sleep(0.01)
        answer = other.get("/api/public/feature-flags")
        assert answer.headers["X-Cache"] == "HIT-L1"
    finally:
        set_config(services, "feature_flags", DEFAULTS["feature_flags"])
        other_services.close()


def test_an_l1_load_that_raced_an_invalidation_is_not_kept():
    """A process loads the old value, the invalidation message arrives, then the load returns:
    keeping what it loaded would serve the old value for the whole L1 TTL."""
    l1 = L1Cache(ttl=30)
    name = keys.config("feature_flags").name

    def load_old_then_invalidation_arrives():
        l1.invalidate(name)  # delivered by the subscriber thread while the load runs
        return {"old": True}

    value, from_l1 = read_through_l1(l1, name, "config", load_old_then_invalidation_arrives)
    assert value == {"old": True} and not from_l1  # this request may answer what it loaded
    value, from_l1 = read_through_l1(l1, name, "config", lambda: {"new": True})
    assert (value, from_l1) == ({"new": True}, False)


def test_the_l1_is_bounded_and_expires_on_the_monotonic_clock():
    l1 = L1Cache(maxsize=3, ttl=0.05)
    for i in range(10):
        l1.set(f"k{i}", i)
    assert len(l1) == 3
    time.sleep(0.08)
    assert len(l1) == 0


def test_config_reads_see_the_database_default_then_the_stored_value(services):
    assert services.l1_subscriber.ready.wait(5)
    assert get_config(services, "rate_limits")[0]["max_page_size"] == 200
    try:
        set_config(services, "rate_limits", {"max_page_size": 100})
        assert get_config(services, "rate_limits") == ({"max_page_size": 100}, "MISS")
        assert get_config(services, "rate_limits") == ({"max_page_size": 100}, "HIT-L1")
    finally:  # the database outlives this test
        set_config(services, "rate_limits", DEFAULTS["rate_limits"])
