"""The organization and its members: /api/orgs/current, /api/users, a member's tasks and stats."""

from __future__ import annotations

import time

import pytest

from api_support import (PASSWORD, add_member, assert_problem, make_project, make_task,
                         new_email, random_id, walk)


def test_current_organization_is_the_callers(client, admin):
    answer = client.get("/api/orgs/current", headers=admin.headers)
    assert answer.status_code == 200 and answer.json == admin.organization
    assert answer.headers["Cache-Control"] == "private, no-cache"
    assert answer.headers["ETag"] and answer.headers["X-Cache"]


def test_an_admin_renames_the_organization_and_every_read_sees_it(client, admin):
    renamed = client.patch("/api/orgs/current", headers=admin.headers, json={"name": "New Name"})
    assert renamed.status_code == 200 and renamed.json["name"] == "New Name"
    assert renamed.json["id"] == admin.organization["id"]
    assert client.get("/api/orgs/current", headers=admin.headers).json["name"] == "New Name"
    assert client.get("/api/me", headers=admin.headers).json["organization"]["name"] == "New Name"


def test_a_member_may_not_rename_the_organization(client, admin):
    member = add_member(client, admin)
    assert_problem(client.patch("/api/orgs/current", headers=member["headers"],
                                json={"name": "Mine"}), 403)
    assert client.get("/api/orgs/current", headers=admin.headers).json["name"] == "Acme"


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "x" * 201}, {"name": None},
                                  {"name": "ok", "slug": "mine"}, {"status": "SUSPENDED"}])
def test_organization_patch_rejects_invalid_bodies(client, admin, body):
    assert_problem(client.patch("/api/orgs/current", headers=admin.headers, json=body), 422)
    assert client.get("/api/orgs/current", headers=admin.headers).json == admin.organization


def test_an_admin_adds_a_member_who_can_log_in(client, admin):
    email = new_email()
    created = client.post("/api/users", headers=admin.headers, json={
        "email": email, "password": PASSWORD, "display_name": "Bob"})
    assert created.status_code == 201
    assert created.json["roles"] == ["member"]  # the default role
    assert created.json["organization_id"] == admin.organization["id"]
    assert created.json["email"] == email and created.json["display_name"] == "Bob"
    login = client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200


def test_an_admin_can_add_another_admin(client, admin):
    member = add_member(client, admin, roles=["admin"])
    assert member["user"]["roles"] == ["admin"]
    assert client.patch("/api/orgs/current", headers=member["headers"],
                        json={"name": "Ok"}).status_code == 200


def test_adding_a_member_with_a_taken_email_is_a_conflict(client, admin, sign_up):
    other = sign_up("Other")
    for email in (admin.email, other.email, other.email.upper()):
        assert_problem(client.post("/api/users", headers=admin.headers, json={
            "email": email, "password": PASSWORD, "display_name": "Dup"}), 409)
    assert len(walk(client, "/api/users", admin.headers, 50)) == 1


@pytest.mark.parametrize("change", [{"roles": []}, {"roles": ["owner"]}, {"password": "short"},
                                    {"email": "nope"}, {"display_name": ""}, {"extra": 1},
                                    {"roles": "admin"}])
def test_adding_a_member_rejects_invalid_fields(client, admin, change):
    body = {"email": new_email(), "password": PASSWORD, "display_name": "Bob", **change}
    assert_problem(client.post("/api/users", headers=admin.headers, json=body), 422)
    assert len(walk(client, "/api/users", admin.headers, 50)) == 1


def test_members_are_listed_newest_first_and_paginate_exactly_once(client, admin):
    added = [add_member(client, admin, display_name=f"M{i}")["user"] for i in range(4)]
    members = walk(client, "/api/users", admin.headers, limit=2)
    assert [m["id"] for m in members] == [u["id"] for u in reversed(added)] + [admin.user["id"]]


def test_a_member_reads_another_member(client, admin):
    member = add_member(client, admin)
    answer = client.get(f"/api/users/{admin.user['id']}", headers=member["headers"])
    assert answer.status_code == 200 and answer.json == admin.user


def test_a_member_edits_its_own_profile(client, admin):
    member = add_member(client, admin)
    url = f"/api/users/{member['user']['id']}"
    answer = client.patch(url, headers=member["headers"], json={
        "display_name": "Renamed", "avatar_url": "https://example.com/a.png"})
    assert answer.status_code == 200
    assert answer.json["display_name"] == "Renamed"
    assert answer.json["avatar_url"] == "https://example.com/a.png"
    assert client.get(url, headers=admin.headers).json == answer.json
    cleared = client.patch(url, headers=member["headers"], json={"avatar_url": None})
    assert cleared.json["avatar_url"] is None and cleared.json["display_name"] == "Renamed"


def test_a_member_may_not_edit_someone_else_or_its_own_roles(client, admin):
    member = add_member(client, admin)
    assert_problem(client.patch(f"/api/users/{admin.user['id']}", headers=member["headers"],
                                json={"display_name": "Hacked"}), 403)
    assert_problem(client.patch(f"/api/users/{member['user']['id']}", headers=member["headers"],
                                json={"roles": ["admin"]}), 403)
    assert client.get(f"/api/users/{admin.user['id']}",
                      headers=admin.headers).json["display_name"] == "Admin"
    assert client.get(f"/api/users/{member['user']['id']}",
                      headers=admin.headers).json["roles"] == ["member"]


def test_an_admin_changes_a_members_roles_and_the_new_rights_apply(client, admin):
    member = add_member(client, admin)
    promoted = client.patch(f"/api/users/{member['user']['id']}", headers=admin.headers,
                            json={"roles": ["member", "admin"]})
    assert promoted.status_code == 200 and promoted.json["roles"] == ["admin", "member"]
    # the member's existing token carries the new role
    assert client.patch("/api/orgs/current", headers=member["headers"],
                        json={"name": "Ok"}).status_code == 200


@pytest.mark.parametrize("body", [{"avatar_url": "javascript:alert(1)"}, {"display_name": None},
                                  {"display_name": "x" * 101}, {"email": "x@example.com"},
                                  {"roles": None}, {"avatar_url": "https://" + "a" * 2048}])
def test_user_patch_rejects_invalid_fields(client, admin, body):
    url = f"/api/users/{admin.user['id']}"
    assert_problem(client.patch(url, headers=admin.headers, json=body), 422)
    assert client.get(url, headers=admin.headers).json == admin.user


def test_unknown_user_ids_are_404(client, admin):
    member = add_member(client, admin)
    for headers in (admin.headers, member["headers"]):
        url = f"/api/users/{random_id()}"
        assert_problem(client.get(url, headers=headers), 404)
        assert_problem(client.patch(url, headers=headers, json={"display_name": "X"}), 404)
        assert_problem(client.get(url + "/tasks", headers=headers), 404)
        assert_problem(client.get(url + "/stats", headers=headers), 404)


def test_a_users_tasks_are_the_tasks_assigned_to_them_filtered_by_status(client, admin):
    member = add_member(client, admin)
    uid = member["user"]["id"]
    project = make_project(client, admin.headers)
    mine = [make_task(client, admin.headers, project["id"], assignee_id=uid, status=s)
            for s in ("TODO", "COMPLETED", "TODO")]
    make_task(client, admin.headers, project["id"])  # unassigned
    listed = walk(client, f"/api/users/{uid}/tasks", admin.headers, limit=2)
    assert [t["id"] for t in listed] == [t["id"] for t in reversed(mine)]
    todo = client.get(f"/api/users/{uid}/tasks?status=TODO", headers=member["headers"]).json
    assert [t["id"] for t in todo["items"]] == [mine[2]["id"], mine[0]["id"]]
    assert_problem(client.get(f"/api/users/{uid}/tasks?status=DONE", headers=admin.headers), 422)


def _eventually(fetch, predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_user_stats_count_assigned_completed_and_open_tasks(client, admin):
    member = add_member(client, admin)
    uid = member["user"]["id"]
    project = make_project(client, admin.headers)
    for status in ("TODO", "TODO", "IN_PROGRESS", "COMPLETED"):
        make_task(client, admin.headers, project["id"], assignee_id=uid, status=status)
    stats = _eventually(lambda: client.get(f"/api/users/{uid}/stats", headers=admin.headers),
                        lambda r: r.json.get("assigned_tasks") == 4)
    assert stats.status_code == 200
    body = stats.json
    assert set(body) == {"user_id", "assigned_tasks", "completed_tasks", "open_tasks",
                         "computed_at", "stale"}
    assert body["user_id"] == uid
    assert (body["assigned_tasks"], body["completed_tasks"], body["open_tasks"]) == (4, 1, 2)
    assert body["computed_at"].endswith("Z") and isinstance(body["stale"], bool)
    assert stats.headers["X-Cache"] in {"HIT-L1", "HIT-L2", "MISS", "STALE", "BYPASS"}


def test_the_last_admin_cannot_drop_the_admin_role_but_one_of_two_can(client, admin):
    alone = client.patch(f"/api/users/{admin.user['id']}", json={"roles": ["member"]},
                         headers=admin.headers)
    assert alone.status_code == 409
    assert alone.mimetype == "application/problem+json"
    assert client.get("/api/me", headers=admin.headers).json["roles"] == ["admin"]

    second = client.post("/api/users", headers=admin.headers, json={
        "email": new_email(), "password": PASSWORD,
        "display_name": "Second", "roles": ["admin"]})
    assert second.status_code == 201
    stepped_down = client.patch(f"/api/users/{admin.user['id']}", json={"roles": ["member"]},
                                headers=admin.headers)
    assert stepped_down.status_code == 200
    assert stepped_down.json["roles"] == ["member"]
