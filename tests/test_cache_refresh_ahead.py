"""Refresh ahead of expiry: a value still being read in the last quarter of its TTL is loaded
again from the database and stored with a whole TTL before it expires, off the reader's thread,
so that its readers never meet the expiry as a miss. Once per version across processes, and
never over a write that retired the version it was read under."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update

from api_support import make_project, make_task
from cache import keys
from conftest import topology_mode
from models import Task
from services.pagination import DEFAULT_LIMIT
from tests.cache_helpers import count_sql, current_blob, raw

pytestmark = pytest.mark.skipif(topology_mode() == "cluster",
                                reason="reaches into this process (its cache and metrics)")


def refreshed(family: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("cache_refreshed_ahead_total",
                                     {"entity_type": family, "outcome": outcome}) or 0.0


def first_page(account, project_id: str) -> keys.Key:
    return keys.project_tasks(account.organization["id"], project_id, status=None,
                              assignee_id=None, limit=DEFAULT_LIMIT, cursor=None)


def near_expiry(services, key: keys.Key, ms_left: int) -> None:
    """Leave `key`'s value `ms_left` to live, as if stored that long ago (the expiry reaches
    every process's near copy: Redis tracking counts EXPIRE as a change)."""
    assert raw(services).pexpire(key.name, ms_left)


def counting_load(value, calls: list):
    def load():
        calls.append(value)
        return value
    return load


@pytest.fixture
def listed(client, admin):
    """A project whose first task-list page is cached."""
    project = make_project(client, admin.headers)
    task = make_task(client, admin.headers, project["id"], title="Before")
    url = f"/api/projects/{project['id']}/tasks"
    assert client.get(url, headers=admin.headers).status_code == 200
    return project, task, url


def test_a_page_read_in_the_last_quarter_of_its_ttl_is_served_and_then_loaded_again_for_a_whole_ttl(
        client, admin, services, listed):
    project, task, url = listed
    key = first_page(admin, project["id"])
    # Changed behind the cache's back: only a load from the database can bring this title in.
    with services.db.session() as db:
        db.execute(update(Task).where(Task.id == task["id"]).values(title="Behind"))
        db.commit()
    near_expiry(services, key, 5_000)
    before = refreshed("task_list", "stored")

    answer = client.get(url, headers=admin.headers)

    assert answer.headers["X-Cache"].startswith("HIT")
    assert answer.json["items"][0]["title"] == "Before"  # the reader is not held up by the load
    assert services.cache.refreshes.wait()
    assert refreshed("task_list", "stored") == before + 1
    assert raw(services).pttl(key.name) > (key.ttl - 5) * 1000
    again = client.get(url, headers=admin.headers)
    assert again.headers["X-Cache"].startswith("HIT")
    assert again.json["items"][0]["title"] == "Behind"


def test_a_page_read_early_in_its_ttl_is_not_loaded_again(client, admin, services, listed):
    project, _, url = listed
    before = refreshed("task_list", "stored")
    with count_sql(services) as sql:
        for _ in range(3):
            assert client.get(url, headers=admin.headers).headers["X-Cache"].startswith("HIT")
        assert services.cache.refreshes.wait()
    assert not any("FROM tasks" in statement for statement in sql.statements)
    assert refreshed("task_list", "stored") == before
    assert raw(services).pttl(first_page(admin, project["id"]).name) <= keys.TASK_LIST_TTL * 1000


def test_processes_reading_the_same_expiring_value_load_it_once(services, settings):
    from services.context import build_services

    other = build_services(settings, subscribe_l1=False)  # a second API process
    try:
        key = keys.task("org-refresh", "task-once")
        caches = (services.cache, other.cache)
        lookup = caches[0].lookup_many([key], counted=False)[0]
        assert caches[0].store(lookup, {"title": "cached"})
        near_expiry(services, key, 3_000)
        calls: list = []
        # Both read the expiring value; the first one's refresh may well be done before the
        # second asks for its own.
        found = [cache.lookup_many([key], counted=False)[0] for cache in caches]
        for cache, lookup in zip(caches, found):
            value, source = cache.read_through(key, counting_load({"title": "loaded"}, calls),
                                               lookup)
            assert (value, source) == ({"title": "cached"}, "HIT-L2")
        assert all(cache.refreshes.wait() for cache in caches)
        assert len(calls) == 1
        assert raw(services).pttl(key.name) > (key.ttl - 5) * 1000
    finally:
        other.close()


def test_a_refresh_never_stores_over_a_write_that_retired_the_version_it_was_read_under(
        services):
    cache = services.cache
    key = keys.task("org-refresh", "task-raced")
    lookup = cache.lookup_many([key], counted=False)[0]
    assert cache.store(lookup, {"title": "old"})
    near_expiry(services, key, 3_000)
    before = refreshed("task", "superseded")

    def load_while_a_write_commits_and_bumps():
        value = {"title": "old"}  # what the load read: the write had not committed yet
        cache.invalidate(key.versions, org_ids=["org-refresh"], family="task")
        return value

    found = cache.lookup_many([key], counted=False)[0]
    assert cache.read_through(key, load_while_a_write_commits_and_bumps, found)[1] == "HIT-L2"
    assert cache.refreshes.wait()
    assert refreshed("task", "superseded") == before + 1
    assert current_blob(raw(services), key) is None  # the next reader loads the write's value
    assert not cache.lookup_many([key], counted=False)[0].hit


def test_a_refresh_off_stores_nothing_ahead(services):
    cache = services.cache
    cache.refresh_ahead = 0
    key = keys.task("org-refresh", "task-off")
    lookup = cache.lookup_many([key], counted=False)[0]
    assert cache.store(lookup, {"title": "cached"})
    near_expiry(services, key, 3_000)
    calls: list = []
    found = cache.lookup_many([key], counted=False)[0]
    assert cache.read_through(key, counting_load({"title": "loaded"}, calls), found)[1] == "HIT-L2"
    assert cache.refreshes.wait()
    assert calls == []

