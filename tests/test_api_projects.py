"""Projects: create, read, list (filter, cursor pages), edit, delete with everything under them,
stats; ETag/304 and the caching headers of an authenticated GET."""

from __future__ import annotations

import time

import pytest

from api_support import (add_member, assert_problem, count, make_comment, make_project,
                         make_task, random_id, walk)


def test_a_created_project_has_the_contract_shape_and_defaults(client, admin):
    answer = client.post("/api/projects", headers=admin.headers, json={"name": "Launch"})
    assert answer.status_code == 201
    project = answer.json
    assert set(project) == {"id", "organization_id", "name", "description", "status",
                            "owner_id", "created_at", "updated_at"}
    assert project["name"] == "Launch" and project["description"] == ""
    assert project["status"] == "ACTIVE"
    assert project["owner_id"] == admin.user["id"]
    assert project["organization_id"] == admin.organization["id"]
    assert client.get(f"/api/projects/{project['id']}", headers=admin.headers).json == project


def test_names_are_trimmed_and_limits_are_inclusive(client, admin):
    assert make_project(client, admin.headers, name="  Padded  ")["name"] == "Padded"
    assert make_project(client, admin.headers, name="x" * 200)["name"] == "x" * 200
    long_text = "é" * 10_000
    assert make_project(client, admin.headers, description=long_text)["description"] == long_text
    emoji = "🚀" * 200
    assert make_project(client, admin.headers, name=emoji)["name"] == emoji


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "   "}, {"name": "x" * 201},
                                  {"name": 5}, {"name": "ok", "description": "x" * 10_001},
                                  {"name": "ok", "status": "ACTIVE"}, {"name": "ok", "owner_id":
                                                                       random_id()}])
def test_invalid_project_bodies_are_422_and_create_nothing(client, admin, services, body):
    from models import Project

    assert_problem(client.post("/api/projects", headers=admin.headers, json=body), 422)
    assert count(services, Project, organization_id=admin.organization["id"]) == 0


def test_projects_list_newest_first_and_each_page_once(client, admin):
    made = [make_project(client, admin.headers, name=f"P{i}") for i in range(7)]
    for limit in (1, 3, 7, 200):
        listed = walk(client, "/api/projects", admin.headers, limit)
        assert [p["id"] for p in listed] == [p["id"] for p in reversed(made)]


def test_projects_list_defaults_to_fifty_items(client, admin):
    for i in range(51):
        make_project(client, admin.headers, name=f"P{i}")
    first = client.get("/api/projects", headers=admin.headers).json
    assert len(first["items"]) == 50 and first["next_cursor"]
    rest = client.get(f"/api/projects?cursor={first['next_cursor']}", headers=admin.headers).json
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=-1", "limit=abc",
                                   "cursor=garbage", "status=DELETED", "cursor=WzEsMl0"])
def test_invalid_list_parameters_are_422(client, admin, query):
    assert_problem(client.get(f"/api/projects?{query}", headers=admin.headers), 422)


def test_projects_filter_by_status_and_edits_move_them_between_lists(client, admin):
    keep = make_project(client, admin.headers, name="Keep")
    archive = make_project(client, admin.headers, name="Old")
    assert client.get("/api/projects?status=ACTIVE", headers=admin.headers).json["items"][0][
        "id"] == archive["id"]
    edited = client.patch(f"/api/projects/{archive['id']}", headers=admin.headers,
                          json={"status": "ARCHIVED"})
    assert edited.status_code == 200 and edited.json["status"] == "ARCHIVED"
    active = client.get("/api/projects?status=ACTIVE", headers=admin.headers).json["items"]
    archived = client.get("/api/projects?status=ARCHIVED", headers=admin.headers).json["items"]
    assert [p["id"] for p in active] == [keep["id"]]
    assert [p["id"] for p in archived] == [archive["id"]]


def test_patch_changes_only_the_fields_sent_and_moves_updated_at(client, admin):
    project = make_project(client, admin.headers, name="A", description="first")
    time.sleep(0.01)
    edited = client.patch(f"/api/projects/{project['id']}", headers=admin.headers,
                          json={"name": "B"}).json
    assert edited["name"] == "B" and edited["description"] == "first"
    assert edited["created_at"] == project["created_at"]
    assert edited["updated_at"] > project["updated_at"]
    assert client.get(f"/api/projects/{project['id']}", headers=admin.headers).json == edited
    listed = client.get("/api/projects", headers=admin.headers).json["items"]
    assert listed == [edited]


@pytest.mark.parametrize("body", [{"name": None}, {"status": "DONE"}, {"name": ""},
                                  {"owner_id": random_id()}, {"id": random_id()},
                                  {"description": None}])
def test_invalid_project_patches_are_422_and_change_nothing(client, admin, body):
    project = make_project(client, admin.headers)
    url = f"/api/projects/{project['id']}"
    assert_problem(client.patch(url, headers=admin.headers, json=body), 422)
    assert client.get(url, headers=admin.headers).json == project


def test_any_member_may_create_and_edit_projects(client, admin):
    member = add_member(client, admin)
    project = make_project(client, member["headers"], name="Mine")
    assert project["owner_id"] == member["user"]["id"]
    assert client.patch(f"/api/projects/{project['id']}", headers=admin.headers,
                        json={"name": "Ours"}).status_code == 200


def test_deleting_a_project_removes_its_tasks_comments_and_notifications(client, admin,
                                                                         services):
    from models import Comment, Notification, Project, Task

    member = add_member(client, admin)
    project = make_project(client, admin.headers)
    survivor = make_project(client, admin.headers, name="Survivor")
    kept_task = make_task(client, admin.headers, survivor["id"], assignee_id=member["user"]["id"])
    task = make_task(client, admin.headers, project["id"], assignee_id=member["user"]["id"])
    make_comment(client, admin.headers, task["id"])
    assert client.get("/api/me/notifications/unread-count",
                      headers=member["headers"]).json == {"unread": 3}  # 2 assigned, 1 comment
    # read everything once so that the caches hold it
    client.get(f"/api/tasks/{task['id']}", headers=admin.headers)
    client.get(f"/api/users/{member['user']['id']}/tasks", headers=admin.headers)
    client.get("/api/me/notifications", headers=member["headers"])

    answer = client.delete(f"/api/projects/{project['id']}", headers=admin.headers)
    assert answer.status_code == 204 and answer.data == b""

    assert_problem(client.get(f"/api/projects/{project['id']}", headers=admin.headers), 404)
    assert_problem(client.get(f"/api/tasks/{task['id']}", headers=admin.headers), 404)
    assert_problem(client.get(f"/api/tasks/{task['id']}/comments", headers=admin.headers), 404)
    assert_problem(client.get(f"/api/projects/{project['id']}/tasks", headers=admin.headers), 404)
    assert_problem(client.delete(f"/api/projects/{project['id']}", headers=admin.headers), 404)
    assert [p["id"] for p in client.get("/api/projects", headers=admin.headers).json["items"]] \
        == [survivor["id"]]
    assigned = client.get(f"/api/users/{member['user']['id']}/tasks", headers=admin.headers)
    assert [t["id"] for t in assigned.json["items"]] == [kept_task["id"]]
    notes = client.get("/api/me/notifications", headers=member["headers"]).json["items"]
    assert [n["task_id"] for n in notes] == [kept_task["id"]]
    assert client.get("/api/me/notifications/unread-count",
                      headers=member["headers"]).json == {"unread": 1}
    assert count(services, Project, id=project["id"]) == 0
    assert count(services, Task, project_id=project["id"]) == 0
    assert count(services, Comment, project_id=project["id"]) == 0
    assert count(services, Notification, project_id=project["id"]) == 0


def _stats(client, headers, project_id, predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(f"/api/projects/{project_id}/stats", headers=headers)
        if answer.status_code != 200 or predicate(answer.json) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def test_project_stats_count_tasks_by_status_and_comments(client, admin):
    project = make_project(client, admin.headers)
    empty = client.get(f"/api/projects/{project['id']}/stats", headers=admin.headers)
    assert empty.status_code == 200
    assert set(empty.json) == {"project_id", "total_tasks", "completed_tasks", "open_tasks",
                               "tasks_by_status", "total_comments", "computed_at", "stale"}
    assert empty.json["total_tasks"] == 0 and empty.json["stale"] is False
    tasks = [make_task(client, admin.headers, project["id"], status=s)
             for s in ("TODO", "TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED")]
    make_comment(client, admin.headers, tasks[0]["id"])
    make_comment(client, admin.headers, tasks[1]["id"])
    answer = _stats(client, admin.headers, project["id"],
                    lambda s: s["total_tasks"] == 5 and s["total_comments"] == 2)
    body = answer.json
    assert body["project_id"] == project["id"]
    assert body["tasks_by_status"] == {"TODO": 2, "IN_PROGRESS": 1, "BLOCKED": 1, "COMPLETED": 1}
    assert (body["total_tasks"], body["completed_tasks"], body["open_tasks"]) == (5, 1, 2)
    assert body["total_comments"] == 2
    assert body["computed_at"].endswith("Z")
    assert answer.headers["X-Cache"] in {"HIT-L1", "HIT-L2", "MISS", "STALE", "BYPASS"}


def test_project_stats_follow_status_changes_and_deletes(client, admin):
    project = make_project(client, admin.headers)
    task = make_task(client, admin.headers, project["id"])
    client.get(f"/api/projects/{project['id']}/stats", headers=admin.headers)
    client.patch(f"/api/tasks/{task['id']}", headers=admin.headers, json={"status": "COMPLETED"})
    done = _stats(client, admin.headers, project["id"], lambda s: s["completed_tasks"] == 1).json
    assert done["tasks_by_status"]["COMPLETED"] == 1 and done["open_tasks"] == 0
    client.delete(f"/api/tasks/{task['id']}", headers=admin.headers)
    gone = _stats(client, admin.headers, project["id"], lambda s: s["total_tasks"] == 0).json
    assert gone["total_tasks"] == 0 and gone["tasks_by_status"]["COMPLETED"] == 0


# -- HTTP caching headers -----------------------------------------------------------------------
def test_authenticated_gets_carry_an_etag_private_no_cache_and_x_cache(client, admin):
    project = make_project(client, admin.headers)
    answer = client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    assert answer.headers["Cache-Control"] == "private, no-cache"
    assert answer.headers["ETag"].startswith('"')
    assert answer.headers["X-Cache"] in {"HIT-L1", "HIT-L2", "MISS", "STALE", "BYPASS"}


def test_a_matching_if_none_match_gets_304_without_a_body(client, admin):
    project = make_project(client, admin.headers)
    url = f"/api/projects/{project['id']}"
    etag = client.get(url, headers=admin.headers).headers["ETag"]
    again = client.get(url, headers={**admin.headers, "If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""
    assert again.headers["ETag"] == etag
    listed = client.get("/api/projects", headers=admin.headers)
    assert client.get("/api/projects", headers={
        **admin.headers, "If-None-Match": listed.headers["ETag"]}).status_code == 304


def test_after_a_write_the_old_etag_no_longer_matches(client, admin):
    project = make_project(client, admin.headers)
    url = f"/api/projects/{project['id']}"
    etag = client.get(url, headers=admin.headers).headers["ETag"]
    client.patch(url, headers=admin.headers, json={"name": "Changed"})
    fresh = client.get(url, headers={**admin.headers, "If-None-Match": etag})
    assert fresh.status_code == 200 and fresh.json["name"] == "Changed"
    assert fresh.headers["ETag"] != etag


def test_a_different_etag_gets_the_full_answer(client, admin):
    project = make_project(client, admin.headers)
    answer = client.get(f"/api/projects/{project['id']}",
                        headers={**admin.headers, "If-None-Match": '"something-else"'})
    assert answer.status_code == 200 and answer.json == project


def test_if_none_match_does_not_bypass_authentication(client, admin):
    project = make_project(client, admin.headers)
    url = f"/api/projects/{project['id']}"
    etag = client.get(url, headers=admin.headers).headers["ETag"]
    assert_problem(client.get(url, headers={"If-None-Match": etag}), 401)


def test_unknown_project_ids_are_404_on_every_project_route(client, admin):
    url = f"/api/projects/{random_id()}"
    for method, path, body in [("GET", url, None), ("PATCH", url, {"name": "x"}),
                               ("DELETE", url, None), ("GET", url + "/stats", None),
                               ("GET", url + "/tasks", None),
                               ("POST", url + "/tasks", {"title": "x"})]:
        assert_problem(client.open(path, method=method, headers=admin.headers, json=body), 404)


def test_only_the_owner_or_an_admin_may_delete_a_project(client, services, admin):
    from models import Project

    member = add_member(client, admin)
    other = add_member(client, admin)
    admins_project = make_project(client, admin.headers, name="Admin's")
    members_project = make_project(client, member["headers"], name="Member's")
    make_task(client, admin.headers, admins_project["id"])

    for who, project in ((member, admins_project), (other, members_project)):
        denied = client.delete(f"/api/projects/{project['id']}", headers=who["headers"])
        assert "owner or an admin" in assert_problem(denied, 403)["detail"]
        assert count(services, Project, id=project["id"]) == 1
        assert client.get(f"/api/projects/{project['id']}",
                          headers=who["headers"]).json == project

    assert client.delete(f"/api/projects/{members_project['id']}",
                         headers=member["headers"]).status_code == 204
    assert client.delete(f"/api/projects/{admins_project['id']}",
                         headers=admin.headers).status_code == 204
    assert count(services, Project, organization_id=admin.organization["id"]) == 0


def test_an_admin_may_delete_a_members_project(client, services, admin):
    member = add_member(client, admin)
    project = make_project(client, member["headers"])
    assert client.delete(f"/api/projects/{project['id']}", headers=admin.headers).status_code == 204
    assert_problem(client.get(f"/api/projects/{project['id']}", headers=member["headers"]), 404)
