"""Tasks and comments: defaults, validation, filters, cursor pages, edits, deletes."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from api_support import (add_member, assert_problem, count, make_comment, make_project,
                         make_task, random_id, walk)
from cache_helpers import count_sql
from conftest import topology_mode


@pytest.fixture
def project(client, admin):
    return make_project(client, admin.headers)


def project_number(services, project_id: str) -> int:
    """The number of the project's last counted change (`stats_seq`)."""
    from models import Project

    with services.db.session() as db:
        return db.scalar(select(Project.stats_seq).where(Project.id == project_id))


def on_table(sql, table: str) -> list[str]:
    """The statements that lock, change or read rows of `table` itself (not a join or a key)."""
    return [s for s in sql.statements if table in s.split("WHERE")[0].split()]


def test_a_task_gets_the_defaults_todo_and_medium(client, admin, project):
    answer = client.post(f"/api/projects/{project['id']}/tasks", headers=admin.headers,
                         json={"title": "Write tests"})
    assert answer.status_code == 201
    task = answer.json
    assert set(task) == {"id", "organization_id", "project_id", "title", "description", "status",
                         "priority", "assignee_id", "due_date", "created_at", "updated_at"}
    assert (task["status"], task["priority"]) == ("TODO", "MEDIUM")
    assert task["assignee_id"] is None and task["due_date"] is None and task["description"] == ""
    assert task["project_id"] == project["id"]
    assert task["organization_id"] == admin.organization["id"]
    assert client.get(f"/api/tasks/{task['id']}", headers=admin.headers).json == task


def test_a_task_takes_every_field(client, admin, project):
    member = add_member(client, admin)
    task = make_task(client, admin.headers, project["id"], title="T", description="D",
                     status="BLOCKED", priority="URGENT", assignee_id=member["user"]["id"],
                     due_date="2030-02-28")
    assert (task["title"], task["description"], task["status"], task["priority"]) == (
        "T", "D", "BLOCKED", "URGENT")
    assert task["assignee_id"] == member["user"]["id"] and task["due_date"] == "2030-02-28"


@pytest.mark.parametrize("body", [
    {}, {"title": ""}, {"title": "x" * 201}, {"title": "t", "status": "DONE"},
    {"title": "t", "priority": "low"}, {"title": "t", "due_date": "tomorrow"},
    {"title": "t", "due_date": "2030-02-30"}, {"title": "t", "assignee_id": "not-a-uuid"},
    {"title": "t", "assignee_id": random_id()}, {"title": "t", "project_id": random_id()},
    {"title": "t", "description": "x" * 10_001}, {"title": ["t"]}, {"title": "t", "status": None},
])
def test_invalid_task_bodies_are_422_and_create_nothing(client, admin, services, project, body):
    from models import Task

    assert_problem(client.post(f"/api/projects/{project['id']}/tasks", headers=admin.headers,
                               json=body), 422)
    assert count(services, Task, project_id=project["id"]) == 0
    assert client.get(f"/api/projects/{project['id']}/tasks",
                      headers=admin.headers).json["items"] == []


def test_project_tasks_are_newest_first_and_every_page_walks_them_once(client, admin, project):
    made = [make_task(client, admin.headers, project["id"], title=f"T{i}") for i in range(9)]
    for limit in (1, 2, 4, 9, 10):
        listed = walk(client, f"/api/projects/{project['id']}/tasks", admin.headers, limit)
        assert [t["id"] for t in listed] == [t["id"] for t in reversed(made)]


def test_a_cursor_stays_valid_when_new_tasks_arrive(client, admin, project):
    made = [make_task(client, admin.headers, project["id"], title=f"T{i}") for i in range(4)]
    first = client.get(f"/api/projects/{project['id']}/tasks?limit=2", headers=admin.headers).json
    make_task(client, admin.headers, project["id"], title="late")
    rest = client.get(f"/api/projects/{project['id']}/tasks?limit=2&cursor="
                      f"{first['next_cursor']}", headers=admin.headers).json
    assert [t["id"] for t in first["items"] + rest["items"]] == [t["id"] for t in
                                                                  reversed(made)]


def test_project_tasks_filter_by_status_and_assignee(client, admin, project):
    member = add_member(client, admin)
    uid = member["user"]["id"]
    a = make_task(client, admin.headers, project["id"], status="TODO", assignee_id=uid)
    b = make_task(client, admin.headers, project["id"], status="COMPLETED", assignee_id=uid)
    c = make_task(client, admin.headers, project["id"], status="TODO")
    url = f"/api/projects/{project['id']}/tasks"

    def ids(query):
        answer = client.get(f"{url}?{query}", headers=admin.headers)
        assert answer.status_code == 200, answer.json
        return [t["id"] for t in answer.json["items"]]

    assert ids("status=TODO") == [c["id"], a["id"]]
    assert ids(f"assignee_id={uid}") == [b["id"], a["id"]]
    assert ids(f"status=TODO&assignee_id={uid}") == [a["id"]]
    assert ids(f"assignee_id={random_id()}") == []
    assert_problem(client.get(f"{url}?assignee_id=nope", headers=admin.headers), 422)
    assert_problem(client.get(f"{url}?status=todo", headers=admin.headers), 422)


def test_a_repeated_query_string_is_parsed_once_and_an_invalid_one_refused_every_time(
        client, admin, project, monkeypatch):
    from web import endpoint, schemas

    monkeypatch.setattr(endpoint, "_queries", {}, raising=False)
    parsed = []
    real = schemas.TaskQuery.model_validate
    monkeypatch.setattr(schemas.TaskQuery, "model_validate",
                        classmethod(lambda cls, data: parsed.append(data) or real(data)))
    made = [make_task(client, admin.headers, project["id"], status="TODO") for _ in range(3)]
    url = f"/api/projects/{project['id']}/tasks"
    first, again = (client.get(f"{url}?status=TODO&limit=2", headers=admin.headers)
                    for _ in range(2))
    assert first.json == again.json and len(first.json["items"]) == 2
    assert parsed == [{"status": "TODO", "limit": "2"}]
    other = client.get(f"{url}?status=TODO&limit=3", headers=admin.headers)
    assert [t["id"] for t in other.json["items"]] == [t["id"] for t in reversed(made)]
    for _ in range(2):
        assert_problem(client.get(f"{url}?limit=0", headers=admin.headers), 422)
    assert len(parsed) == 4


def test_patch_edits_any_task_field_and_lists_reflect_it(client, admin, project):
    member = add_member(client, admin)
    task = make_task(client, admin.headers, project["id"])
    url = f"/api/tasks/{task['id']}"
    client.get(f"/api/projects/{project['id']}/tasks", headers=admin.headers)  # cached
    time.sleep(0.01)
    edited = client.patch(url, headers=admin.headers, json={
        "title": "New", "description": "More", "status": "IN_PROGRESS", "priority": "HIGH",
        "assignee_id": member["user"]["id"], "due_date": "2031-01-01"})
    assert edited.status_code == 200
    body = edited.json
    assert (body["title"], body["description"], body["status"], body["priority"],
            body["assignee_id"], body["due_date"]) == ("New", "More", "IN_PROGRESS", "HIGH",
                                                       member["user"]["id"], "2031-01-01")
    assert body["updated_at"] > task["updated_at"] and body["created_at"] == task["created_at"]
    assert client.get(url, headers=member["headers"]).json == body
    assert client.get(f"/api/projects/{project['id']}/tasks",
                      headers=admin.headers).json["items"] == [body]
    assert client.get(f"/api/users/{member['user']['id']}/tasks",
                      headers=admin.headers).json["items"] == [body]
    cleared = client.patch(url, headers=admin.headers, json={"assignee_id": None,
                                                             "due_date": None}).json
    assert cleared["assignee_id"] is None and cleared["due_date"] is None
    assert client.get(f"/api/users/{member['user']['id']}/tasks",
                      headers=admin.headers).json["items"] == []


@pytest.mark.parametrize("body", [{"title": None}, {"status": "DONE"}, {"priority": None},
                                  {"project_id": random_id()}, {"id": random_id()},
                                  {"organization_id": random_id()}, {"assignee_id": random_id()},
                                  {"created_at": "2020-01-01T00:00:00Z"}, {"title": "x" * 201}])
def test_invalid_task_patches_are_422_and_change_nothing(client, admin, project, body):
    task = make_task(client, admin.headers, project["id"])
    url = f"/api/tasks/{task['id']}"
    assert_problem(client.patch(url, headers=admin.headers, json=body), 422)
    assert client.get(url, headers=admin.headers).json == task


def test_an_empty_patch_changes_nothing_but_is_accepted(client, admin, project):
    task = make_task(client, admin.headers, project["id"])
    answer = client.patch(f"/api/tasks/{task['id']}", headers=admin.headers, json={})
    assert answer.status_code == 200
    assert {k: v for k, v in answer.json.items() if k != "updated_at"} == \
        {k: v for k, v in task.items() if k != "updated_at"}


def test_deleting_a_task_removes_it_and_its_comments(client, admin, services, project):
    from models import Comment, Task

    task = make_task(client, admin.headers, project["id"])
    other = make_task(client, admin.headers, project["id"])
    make_comment(client, admin.headers, task["id"])
    answer = client.delete(f"/api/tasks/{task['id']}", headers=admin.headers)
    assert answer.status_code == 204 and answer.data == b""
    assert_problem(client.get(f"/api/tasks/{task['id']}", headers=admin.headers), 404)
    assert_problem(client.delete(f"/api/tasks/{task['id']}", headers=admin.headers), 404)
    assert [t["id"] for t in client.get(f"/api/projects/{project['id']}/tasks",
                                        headers=admin.headers).json["items"]] == [other["id"]]
    assert count(services, Task, id=task["id"]) == 0
    assert count(services, Comment, task_id=task["id"]) == 0


# -- comments -----------------------------------------------------------------------------------
def test_a_comment_has_the_contract_shape(client, admin, project):
    task = make_task(client, admin.headers, project["id"])
    answer = client.post(f"/api/tasks/{task['id']}/comments", headers=admin.headers,
                         json={"body": "Looks good"})
    assert answer.status_code == 201
    comment = answer.json
    assert set(comment) == {"id", "task_id", "project_id", "author_id", "body", "created_at"}
    assert (comment["task_id"], comment["project_id"], comment["author_id"], comment["body"]) == (
        task["id"], project["id"], admin.user["id"], "Looks good")


def test_comments_are_listed_oldest_first_across_pages(client, admin, project):
    member = add_member(client, admin)
    task = make_task(client, admin.headers, project["id"])
    made = [make_comment(client, (admin.headers, member["headers"])[i % 2], task["id"], f"c{i}")
            for i in range(7)]
    for limit in (1, 3, 7, 50):
        listed = walk(client, f"/api/tasks/{task['id']}/comments", admin.headers, limit)
        assert [c["id"] for c in listed] == [c["id"] for c in made]


@pytest.mark.parametrize("body", [{}, {"body": ""}, {"body": "x" * 10_001}, {"body": None},
                                  {"body": "ok", "author_id": random_id()}, {"text": "ok"}])
def test_invalid_comments_are_422_and_create_nothing(client, admin, services, project, body):
    from models import Comment

    task = make_task(client, admin.headers, project["id"])
    assert_problem(client.post(f"/api/tasks/{task['id']}/comments", headers=admin.headers,
                               json=body), 422)
    assert count(services, Comment, task_id=task["id"]) == 0


def test_a_comment_body_of_exactly_ten_thousand_characters_is_kept_whole(client, admin, project):
    task = make_task(client, admin.headers, project["id"])
    text = "ü" * 9_999 + "!"
    assert make_comment(client, admin.headers, task["id"], text)["body"] == text
    assert client.get(f"/api/tasks/{task['id']}/comments",
                      headers=admin.headers).json["items"][0]["body"] == text


def test_an_id_in_capitals_names_the_same_task_and_its_cached_copy(client, admin, project):
    """A UUID's letters may come in either case: the answer, and the cache key behind it, are
    those of its canonical lowercase form (a write through one spelling is read through both)."""
    task = make_task(client, admin.headers, project["id"], title="Before")
    shouting = f"/api/tasks/{task['id'].upper()}"
    assert client.get(shouting, headers=admin.headers).json == task
    edited = client.patch(shouting, headers=admin.headers, json={"title": "After"})
    assert edited.status_code == 200 and edited.json["id"] == task["id"]
    for path in (shouting, f"/api/tasks/{task['id']}"):
        assert client.get(path, headers=admin.headers).json["title"] == "After"

def test_unknown_task_ids_are_404_on_every_task_route(client, admin):
    url = f"/api/tasks/{random_id()}"
    for method, path, body in [("GET", url, None), ("PATCH", url, {"title": "x"}),
                               ("DELETE", url, None), ("GET", url + "/comments", None),
                               ("POST", url + "/comments", {"body": "x"})]:
        assert_problem(client.open(path, method=method, headers=admin.headers, json=body), 404)


@pytest.mark.skipif(topology_mode() == "cluster", reason="counts this process's SQL")
def test_a_reassignment_locks_each_member_once_and_numbers_both(client, admin, services,
                                                                 project):
    """The old assignee loses the task and the new one gains it: both users' statistics change,
    so both rows are locked once each, by the statement that takes each one's change number."""
    from models import User
    from services.auth import Actor
    from services.tasks import update_task

    old, new = (add_member(client, admin)["user"]["id"] for _ in range(2))
    task = make_task(client, admin.headers, project["id"], assignee_id=old)

    def change_numbers() -> dict:
        with services.db.session() as db:
            return dict(db.execute(select(User.id, User.stats_seq)
                                   .where(User.id.in_([old, new]))).all())
    before = change_numbers()
    actor = Actor(admin.user["id"], admin.organization["id"], "test", ("admin",), admin.email)
    with count_sql(services) as sql:
        update_task(services, actor, task["id"], {"assignee_id": new})
    on_users = on_table(sql, "users")
    assert len(on_users) == 2 and all(s.lstrip().startswith("UPDATE users") for s in on_users), (
        on_users)
    assert change_numbers() == {old: before[old] + 1, new: before[new] + 1}


@pytest.mark.skipif(topology_mode() == "cluster", reason="counts this process's SQL")
def test_an_edit_that_changes_no_count_locks_no_user(client, admin, services, project):
    """A new title, or the status the task already has, changes no one's statistics: the
    assignee's row is neither locked nor numbered, and the counts stay exact."""
    member = add_member(client, admin)["user"]["id"]
    task = make_task(client, admin.headers, project["id"], assignee_id=member)
    url = f"/api/tasks/{task['id']}"
    for change in ({"title": "Renamed"}, {"status": task["status"]},
                   {"assignee_id": member, "priority": "HIGH"}):
        with count_sql(services) as sql:
            answer = client.patch(url, json=change, headers=admin.headers)
        assert answer.status_code == 200, answer.json
        assert not on_table(sql, "users"), (change, sql.statements)
    with count_sql(services) as sql:
        assert client.patch(url, json={"status": "COMPLETED"},
                            headers=admin.headers).status_code == 200
    assert len(on_table(sql, "users")) == 1
    stats = client.get(f"/api/users/{member}/stats", headers=admin.headers).json
    assert (stats["assigned_tasks"], stats["completed_tasks"], stats["open_tasks"]) == (1, 1, 0)


@pytest.mark.skipif(topology_mode() == "cluster", reason="counts this process's SQL")
def test_every_write_that_numbers_the_project_takes_its_number_with_its_lock(
        client, admin, services, project):
    """A task's creation, a status set (even to the status it has: an empty change is told), a
    comment and a delete each lock the project with the one statement that takes the change's
    number; the numbers keep no gap, and the cached statistics stay exact."""
    stats_url = f"/api/projects/{project['id']}/stats"
    assert client.get(stats_url, headers=admin.headers).status_code == 200  # cached
    before = project_number(services, project["id"])
    task_url = None
    writes = [
        lambda: make_task(client, admin.headers, project["id"]),
        lambda: client.patch(task_url, json={"status": "BLOCKED"}, headers=admin.headers),
        lambda: client.patch(task_url, json={"status": "BLOCKED"}, headers=admin.headers),
        lambda: make_comment(client, admin.headers, task_url.rsplit("/", 1)[1]),
        lambda: client.delete(task_url, headers=admin.headers),
    ]
    for done, write in enumerate(writes, start=1):
        with count_sql(services) as sql:
            answer = write()
        task_url = task_url or f"/api/tasks/{answer['id']}"
        on_projects = on_table(sql, "projects")
        assert len(on_projects) == 1 and on_projects[0].lstrip().startswith(
            "UPDATE projects"), sql.statements
        assert project_number(services, project["id"]) == before + done
        stats = client.get(stats_url, headers=admin.headers).json
        assert not stats["stale"], (done, stats)
    assert (stats["total_tasks"], stats["total_comments"]) == (0, 0)


@pytest.mark.skipif(topology_mode() == "cluster", reason="counts this process's SQL")
def test_an_edit_that_sets_no_status_does_not_number_the_project(client, admin, services,
                                                                  project):
    """A title's edit counts nothing: the project is locked (SELECT ... FOR UPDATE on MariaDB)
    and its change number stays."""
    task = make_task(client, admin.headers, project["id"])
    before = project_number(services, project["id"])
    with count_sql(services) as sql:
        assert client.patch(f"/api/tasks/{task['id']}", json={"title": "Renamed"},
                            headers=admin.headers).status_code == 200
    on_projects = on_table(sql, "projects")
    assert len(on_projects) == 1 and on_projects[0].lstrip().startswith("SELECT"), sql.statements
    assert project_number(services, project["id"]) == before


def test_a_comment_on_another_organizations_task_takes_no_number(client, admin, sign_up,
                                                                 services, project):
    from models import Project

    task = make_task(client, admin.headers, project["id"])
    with services.db.session() as db:
        before = db.scalar(select(Project.stats_seq).where(Project.id == project["id"]))
    stranger = sign_up("Stranger")
    assert_problem(client.post(f"/api/tasks/{task['id']}/comments", json={"body": "x"},
                               headers=stranger.headers), 404)
    with services.db.session() as db:
        assert db.scalar(select(Project.stats_seq).where(Project.id == project["id"])) == before
