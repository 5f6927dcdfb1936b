"""Warm after write: a task write stores the new value of the task and of its project's first
task-list page (read from the database after its bump) so that the next reader hits instead of
missing; a concurrent write's later bump wins, and Redis trouble never fails the write."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

import services.tasks as task_service
from api_support import make_project, make_task
from cache_helpers import CACHED
from cache import codec, keys, metrics
from cache.store import Bumped
from conftest import redis_mode, topology_mode
from services.auth import Actor
from services.tasks import update_task, warm_after_write
from services.uow import UnitOfWork
from tests.cache_helpers import count_sql, current_blob, raw


# These reach into this process (its settings, loaders, metrics or Redis server): not through
# nginx to `make up-cluster` (TEST_TOPOLOGY=cluster).
in_process = pytest.mark.skipif(topology_mode() == "cluster", reason="reaches into this process")


def single_redis(test):
    """Kills and restarts the session's redis-server (marked slow, as the outage tests are)."""
    return pytest.mark.slow(pytest.mark.skipif(
        redis_mode() == "cluster", reason="takes the single redis-server down")(test))


@pytest.fixture
def project(client, admin):
    return make_project(client, admin.headers)


@pytest.fixture
def task(client, admin, project):
    return make_task(client, admin.headers, project["id"], title="Before")


def as_admin(account) -> Actor:
    return Actor(account.user["id"], account.organization["id"], "test", ("admin",),
                 account.email)


def warmed(entity_type: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("cache_warmed_total",
                                     {"entity_type": entity_type, "outcome": outcome}) or 0.0


def in_database(services, task_id: str) -> dict | None:
    from models import Task
    from services import present

    with services.db.session() as db:
        row = db.get(Task, task_id)
        return present.task(row) if row else None


def test_after_a_patch_the_next_get_of_the_task_is_a_redis_hit_with_the_new_value(
        client, admin, task):
    url = f"/api/tasks/{task['id']}"
    patched = client.patch(url, json={"title": "After", "status": "IN_PROGRESS"},
                           headers=admin.headers)
    assert patched.status_code == 200
    answer = client.get(url, headers=admin.headers)
    assert answer.headers["X-Cache"] in CACHED
    assert answer.json == patched.json
    assert (answer.json["title"], answer.json["status"]) == ("After", "IN_PROGRESS")


def test_after_creating_a_task_the_first_page_of_the_project_list_is_a_hit_and_holds_it(
        client, admin, project):
    url = f"/api/projects/{project['id']}/tasks"
    older = make_task(client, admin.headers, project["id"], title="Older")
    assert client.get(url, headers=admin.headers).headers["X-Cache"] in ("MISS", *CACHED)
    made = make_task(client, admin.headers, project["id"], title="Newest")
    answer = client.get(url, headers=admin.headers)
    assert answer.headers["X-Cache"] in CACHED
    assert [t["id"] for t in answer.json["items"]] == [made["id"], older["id"]]
    # the page a read without parameters gets is the page of the default limit
    explicit = client.get(f"{url}?limit=50", headers=admin.headers)
    assert explicit.headers["X-Cache"] in CACHED and explicit.json == answer.json
    task = client.get(f"/api/tasks/{made['id']}", headers=admin.headers)
    assert task.headers["X-Cache"] in CACHED and task.json == made


def test_after_deleting_a_task_the_first_page_of_the_project_list_is_a_hit_without_it(
        client, admin, project):
    url = f"/api/projects/{project['id']}/tasks"
    kept = make_task(client, admin.headers, project["id"], title="Kept")
    gone = make_task(client, admin.headers, project["id"], title="Gone")
    assert client.delete(f"/api/tasks/{gone['id']}", headers=admin.headers).status_code == 204
    answer = client.get(url, headers=admin.headers)
    assert answer.headers["X-Cache"] in CACHED
    assert [t["id"] for t in answer.json["items"]] == [kept["id"]]
    assert client.get(f"/api/tasks/{gone['id']}", headers=admin.headers).status_code == 404


@in_process
def test_with_the_setting_off_the_next_reader_misses_as_before(client, admin, task, services,
                                                              monkeypatch):
    monkeypatch.setattr(services, "settings",
                        services.settings.with_overrides(warm_after_write=False))
    url = f"/api/tasks/{task['id']}"
    client.patch(url, json={"title": "After"}, headers=admin.headers)
    answer = client.get(url, headers=admin.headers)
    assert (answer.headers["X-Cache"], answer.json["title"]) == ("MISS", "After")


@in_process
@pytest.mark.parametrize("second_writer_warms", [True, False], ids=["B warms", "B does not"])
def test_a_warm_up_that_loaded_before_a_concurrent_write_never_leaves_its_older_value(
        client, admin, task, services, monkeypatch, second_writer_warms):
    """Writer A's warm-up looks up its tokens and takes its value (its own row), and A commits;
    writer B then commits and bumps; only then does A bump. A's value must go nowhere: A loads
    again after its bump, and what is cached and served afterwards is B's value, the
    database's."""
    actor, tid = as_admin(admin), task["id"]
    real_warm = task_service.warm_after_write
    real_invalidate = services.cache.invalidate
    b: dict = {}

    def run_writer_b() -> None:
        if not second_writer_warms:
            monkeypatch.setattr(services, "settings",
                                services.settings.with_overrides(warm_after_write=False))
        b["answer"] = update_task(services, actor, tid, {"title": "B", "priority": "LOW"})

    def warm_after_write(uow, org_id, project_id, task=None, **kwargs):
        b.setdefault("loaded_by_a", task)
        return real_warm(uow, org_id, project_id, task, **kwargs)

    def invalidate(*args, **kwargs):
        if "running" not in b:  # A committed: B writes before A's bump stores
            b["running"] = True
            run_writer_b()
        return real_invalidate(*args, **kwargs)

    monkeypatch.setattr(services.cache, "invalidate", invalidate)
    monkeypatch.setattr(task_service, "warm_after_write", warm_after_write)
    reloaded = warmed("task", "reloaded")
    a = update_task(services, actor, tid, {"title": "A"})
    assert a["title"] == "A" and b["loaded_by_a"]["title"] == "A"  # it raced as intended
    assert b["answer"]["title"] == "B"

    truth = in_database(services, tid)
    assert (truth["title"], truth["priority"]) == ("B", "LOW")
    blob = current_blob(raw(services), keys.task(admin.organization["id"], tid))
    assert blob is None or codec.decode(blob) == truth  # nothing older under current tokens
    for _ in range(2):
        answer = client.get(f"/api/tasks/{tid}", headers=admin.headers)
        assert answer.json == truth
    assert answer.headers["X-Cache"] in CACHED
    assert warmed("task", "reloaded") == reloaded + 1  # A's first value was refused
    # A's page, revised with A's row, was refused the same way: the page served is B's.
    page = client.get(f"/api/projects/{task['project_id']}/tasks", headers=admin.headers)
    assert [t for t in page.json["items"] if t["id"] == tid] == [truth]


@in_process
def test_a_reader_right_after_the_writes_bump_hits_the_new_values(
        client, admin, task, services, monkeypatch):
    """The page and the task are made from committed data (the write's own row) before the bump
    and stored by the bump's own script: no reader finds them retired and not yet stored again,
    not even one whose lookup comes right after the bump (here: before the bump's caller goes
    on)."""
    order, seen = [], {}
    org_id, project_id = admin.organization["id"], task["project_id"]
    page_key = keys.project_tasks(org_id, project_id, status=None, assignee_id=None,
                                  limit=task_service.DEFAULT_LIMIT, cursor=None)
    real_warm = task_service.warm_after_write
    invalidate = services.cache.invalidate

    def warm_after_write(*args, **kwargs):  # the task's row: its value, and its page's revision
        order.append("warm")
        return real_warm(*args, **kwargs)

    def bump_then_read(*args, **kwargs):
        order.append("bump")
        done = invalidate(*args, **kwargs)
        seen["page"], seen["task"] = services.cache.lookup_many(
            [page_key, keys.task(org_id, task["id"])], counted=False)
        return done

    monkeypatch.setattr(task_service, "warm_after_write", warm_after_write)
    monkeypatch.setattr(services.cache, "invalidate", bump_then_read)
    update_task(services, as_admin(admin), task["id"], {"title": "After"})
    assert order[:2] == ["warm", "bump"], order
    assert seen["page"].hit and seen["task"].hit
    assert [t["title"] for t in seen["page"].value["items"] if t["id"] == task["id"]] == ["After"]
    assert seen["task"].value == in_database(services, task["id"])
    page = client.get(f"/api/projects/{project_id}/tasks", headers=admin.headers)
    assert page.headers["X-Cache"] in CACHED and page.json == seen["page"].value


def page_loads(sql) -> int:
    """Statements that load a page of tasks (ordered), among those counted."""
    return sum(1 for s in sql.statements if "FROM tasks" in s and "ORDER BY" in s)


@in_process
@pytest.mark.parametrize("on_the_page", [True, False], ids=["on the page", "past the page"])
def test_an_update_revises_the_cached_first_page_instead_of_loading_it(
        client, admin, project, services, on_the_page):
    """A status change moves no task in the list's order (by creation): the cached first page
    is stored again with the task's new row, or unchanged when the task is past it, and that is
    exactly the page a load would give."""
    org_id = admin.organization["id"]
    limit = task_service.DEFAULT_LIMIT
    made = [make_task(client, admin.headers, project["id"], title=f"T{i}")
            for i in range(limit + 2)]
    url = f"/api/projects/{project['id']}/tasks"
    # the last create stored the page (it moved every task down one)
    assert client.get(url, headers=admin.headers).headers["X-Cache"] in CACHED
    target = made[-1] if on_the_page else made[0]  # newest first: the oldest is past the page
    with count_sql(services) as sql:
        update_task(services, as_admin(admin), target["id"], {"status": "BLOCKED"})
    assert page_loads(sql) == 0, sql.statements
    page = client.get(url, headers=admin.headers)
    assert page.headers["X-Cache"] in CACHED
    with services.db.session() as db:
        assert page.json == task_service.load_tasks_page(project["id"], None, None, limit,
                                                         None)(db)
    statuses = {t["id"]: t["status"] for t in page.json["items"]}
    assert statuses.get(target["id"]) == ("BLOCKED" if on_the_page else None)
    key = keys.project_tasks(org_id, project["id"], status=None, assignee_id=None, limit=limit,
                             cursor=None)
    assert codec.decode(current_blob(raw(services), key)) == page.json


@in_process
def test_an_update_loads_the_first_page_when_none_is_cached(client, admin, task, services):
    org_id, project_id = admin.organization["id"], task["project_id"]
    key = keys.project_tasks(org_id, project_id, status=None, assignee_id=None,
                             limit=task_service.DEFAULT_LIMIT, cursor=None)
    services.cache.invalidate([keys.project_tasks_version(org_id, project_id)],
                              org_ids=[org_id], family="task_list")  # no page cached now
    assert not services.cache.lookup_many([key], counted=False)[0].hit
    with count_sql(services) as sql:
        update_task(services, as_admin(admin), task["id"], {"status": "BLOCKED"})
    assert page_loads(sql) == 1
    page = client.get(f"/api/projects/{project_id}/tasks", headers=admin.headers)
    assert page.headers["X-Cache"] in CACHED
    assert [t["status"] for t in page.json["items"]] == ["BLOCKED"]


def test_bumped_tokens_replace_only_what_the_warm_up_read_before_loading():
    """cache.store.Bumped: the tokens a warmed value is stored under."""
    bumped = Bumped()
    bumped.record("v:a", "a1", "a2")
    bumped.record("v:b", "b1", "b2")
    bumped.record("v:b", "b2", "b3")  # the same write bumped it twice: from b1 to b3
    named = {"v:a", "v:b", "v:n"}
    assert bumped.replace(["v:o", "v:a", "v:b"], "o1.a1.b1", named) == "o1.a2.b3"
    assert bumped.replace(["v:a"], "a0", named) is None  # another write bumped before ours
    assert bumped.replace(["v:n"], "n1", named) is None  # named, but Redis failed its bump
    bumped.record("v:a", "x9", "a4")  # another writer bumped between two of ours
    assert bumped.replace(["v:a"], "a1", named) is None


@in_process
@single_redis
def test_the_warm_up_does_nothing_while_redis_is_unreachable(admin, task, services,
                                                             redis_server):
    redis_server.kill()
    try:
        with UnitOfWork(services) as uow, count_sql(services) as sql:
            warm_after_write(uow, admin.organization["id"], task["project_id"], task)
            assert uow._load_to_warm() == []
        assert sql.count == 0  # no load whose value could not be stored
    finally:
        redis_server.restart()


@in_process
@single_redis
def test_a_write_whose_redis_dies_after_the_bump_still_answers_and_is_kept(
        client, admin, task, services, redis_server, monkeypatch):
    """Redis answers the write's invalidation, then dies before the warm-up."""
    invalidate = services.cache.invalidate

    def invalidate_then_die(*args, **kwargs):
        done = invalidate(*args, **kwargs)
        redis_server.kill()
        return done

    monkeypatch.setattr(services.cache, "invalidate", invalidate_then_die)
    url = f"/api/tasks/{task['id']}"
    try:
        patched = client.patch(url, json={"title": "After"}, headers=admin.headers)
        assert patched.status_code == 200 and patched.json["title"] == "After"
    finally:
        monkeypatch.undo()
        redis_server.restart()
    assert in_database(services, task["id"])["title"] == "After"


@in_process
def test_the_warm_up_is_counted_apart_from_the_readers_misses(client, admin, task):
    """Hit rates stay the readers': the warm-up's own lookups are left out of them, and what it
    stored is counted in cache_warmed_total."""
    def misses(family):
        metrics.lookups.flush()  # counted in the process, added to the series once a second
        return REGISTRY.get_sample_value("cache_misses_total",
                                         {"cache_layer": "redis", "entity_type": family}) or 0.0
    before = misses("task"), misses("task_list")
    stored = warmed("task", "stored"), warmed("task_list", "stored")
    client.patch(f"/api/tasks/{task['id']}", json={"title": "After"}, headers=admin.headers)
    assert (misses("task"), misses("task_list")) == before
    assert (warmed("task", "stored"), warmed("task_list", "stored")) == (stored[0] + 1,
                                                                         stored[1] + 1)
    assert client.get(f"/api/tasks/{task['id']}",
                      headers=admin.headers).headers["X-Cache"] in CACHED


@in_process
def test_a_warm_up_that_fails_leaves_the_write_committed_and_its_key_to_the_next_reader(
        client, admin, task, monkeypatch):
    def broken(task):
        def revise(page, db):
            raise RuntimeError("a reviser's bug")
        return revise

    monkeypatch.setattr(task_service, "_page_revised", broken)
    url = f"/api/tasks/{task['id']}"
    answer = client.patch(url, json={"title": "After"}, headers=admin.headers)
    assert answer.status_code == 200 and answer.json["title"] == "After"
    monkeypatch.undo()
    read = client.get(url, headers=admin.headers)
    assert (read.headers["X-Cache"], read.json["title"]) == ("MISS", "After")


@in_process
def test_a_connection_lost_in_the_warm_up_runs_the_whole_write_again_once(
        client, admin, project, services, monkeypatch):
    """The warm-up loads in the write's transaction: a lost connection there is the write's
    own fault, rolled back and retried whole, never committed half or twice."""
    from sqlalchemy.exc import OperationalError

    real_warm, real_load_page = task_service.warm_after_write, task_service.load_tasks_page
    failures, warmed_tasks = [], []

    def warm_after_write(uow, org_id, project_id, task=None, **kwargs):
        warmed_tasks.append(task["id"])
        return real_warm(uow, org_id, project_id, task, **kwargs)

    def once_lost(*args):
        load = real_load_page(*args)

        def loading(db):
            if not failures:
                failures.append(warmed_tasks[-1])
                raise OperationalError("SELECT", {}, Exception("lost"),
                                       connection_invalidated=True)
            return load(db)
        return loading

    monkeypatch.setattr(task_service, "warm_after_write", warm_after_write)
    monkeypatch.setattr(task_service, "load_tasks_page", once_lost)
    made = make_task(client, admin.headers, project["id"], title="Once")
    assert len(failures) == 1 and failures[0] != made["id"]  # the first attempt's task id
    page = client.get(f"/api/projects/{project['id']}/tasks", headers=admin.headers).json
    assert [t["title"] for t in page["items"]] == ["Once"]
    stats = client.get(f"/api/projects/{project['id']}/stats", headers=admin.headers).json
    assert stats["total_tasks"] == 1
    assert in_database(services, failures[0]) is None
