"""Tenant isolation: on every route that takes an id, another organization's id answers exactly
like an id that does not exist (404, same body), and nothing of the other organization changes."""

from __future__ import annotations

import pytest

from api_support import (add_member, assert_problem, make_comment, make_project, make_task,
                         org_footprint, random_id, walk)


@pytest.fixture
def two_orgs(client, sign_up):
    """Two organizations, each with a member, a project, an assigned task with a comment, and a
    notification; everything read once so that it sits in the caches."""
    orgs = {}
    for name in ("Mine", "Theirs"):
        acct = sign_up(name)
        member = add_member(client, acct)
        project = make_project(client, acct.headers, name=f"{name} project")
        task = make_task(client, acct.headers, project["id"], assignee_id=member["user"]["id"])
        comment = make_comment(client, acct.headers, task["id"])
        note = client.get("/api/me/notifications", headers=member["headers"]).json["items"][0]
        for url in (f"/api/projects/{project['id']}", f"/api/tasks/{task['id']}",
                    f"/api/users/{member['user']['id']}", f"/api/projects/{project['id']}/tasks",
                    f"/api/tasks/{task['id']}/comments", f"/api/projects/{project['id']}/stats",
                    f"/api/users/{member['user']['id']}/stats",
                    f"/api/users/{member['user']['id']}/tasks"):
            assert client.get(url, headers=acct.headers).status_code == 200
        orgs[name] = {"account": acct, "member": member, "project": project, "task": task,
                      "comment": comment, "notification": note}
    return orgs


def _routes(theirs: dict) -> list[tuple[str, str, str, dict | None]]:
    """(method, url template, id, body): each id-taking route with one of the other org's ids."""
    user, project, task = theirs["member"]["user"]["id"], theirs["project"]["id"], \
        theirs["task"]["id"]
    return [
        ("GET", "/api/users/{}", user, None),
        ("PATCH", "/api/users/{}", user, {"display_name": "Pwned"}),
        ("GET", "/api/users/{}/tasks", user, None),
        ("GET", "/api/users/{}/stats", user, None),
        ("GET", "/api/projects/{}", project, None),
        ("PATCH", "/api/projects/{}", project, {"name": "Pwned"}),
        ("DELETE", "/api/projects/{}", project, None),
        ("GET", "/api/projects/{}/stats", project, None),
        ("GET", "/api/projects/{}/tasks", project, None),
        ("POST", "/api/projects/{}/tasks", project, {"title": "Injected"}),
        ("GET", "/api/tasks/{}", task, None),
        ("PATCH", "/api/tasks/{}", task, {"title": "Pwned", "status": "COMPLETED"}),
        ("DELETE", "/api/tasks/{}", task, None),
        ("GET", "/api/tasks/{}/comments", task, None),
        ("POST", "/api/tasks/{}/comments", task, {"body": "Injected"}),
        ("POST", "/api/me/notifications/{}/read", theirs["notification"]["id"], None),
    ]


ROUTE_NAMES = [f"{m} {u}" for m, u, _, _ in _routes({
    "member": {"user": {"id": "u"}}, "project": {"id": "p"}, "task": {"id": "t"},
    "notification": {"id": "n"}})]


@pytest.mark.parametrize("route", range(len(ROUTE_NAMES)), ids=ROUTE_NAMES)
@pytest.mark.parametrize("who", ["admin", "member"])
def test_another_organizations_id_answers_exactly_like_a_missing_id(client, services, two_orgs,
                                                                    route, who):
    mine, theirs = two_orgs["Mine"], two_orgs["Theirs"]
    headers = mine["account"].headers if who == "admin" else mine["member"]["headers"]
    method, template, foreign_id, body = _routes(theirs)[route]
    before = org_footprint(services, theirs["account"].organization["id"])

    foreign = client.open(template.format(foreign_id), method=method, headers=headers, json=body)
    missing = client.open(template.format(random_id()), method=method, headers=headers, json=body)

    assert_problem(foreign, 404)
    assert foreign.json == assert_problem(missing, 404)
    assert foreign.headers.get("WWW-Authenticate") is None
    assert org_footprint(services, theirs["account"].organization["id"]) == before
    # and the owner still sees its data unchanged
    owner = theirs["account"].headers
    assert client.get(f"/api/tasks/{theirs['task']['id']}", headers=owner).json == theirs["task"]
    assert client.get(f"/api/projects/{theirs['project']['id']}",
                      headers=owner).json == theirs["project"]
    assert client.get(f"/api/users/{theirs['member']['user']['id']}",
                      headers=owner).json == theirs["member"]["user"]
    assert client.get("/api/me/notifications/unread-count",
                      headers=theirs["member"]["headers"]).json == {"unread": 2}


def test_an_assignee_from_another_organization_is_422_on_create_and_patch(client, services,
                                                                          two_orgs):
    mine, theirs = two_orgs["Mine"], two_orgs["Theirs"]
    headers, foreign_user = mine["account"].headers, theirs["member"]["user"]["id"]
    before = org_footprint(services, mine["account"].organization["id"])
    their_notes = client.get("/api/me/notifications", headers=theirs["member"]["headers"]).json
    created = client.post(f"/api/projects/{mine['project']['id']}/tasks", headers=headers,
                          json={"title": "x", "assignee_id": foreign_user})
    problem = assert_problem(created, 422)
    assert [e["field"] for e in problem["errors"]] == ["assignee_id"]
    patched = client.patch(f"/api/tasks/{mine['task']['id']}", headers=headers,
                           json={"assignee_id": foreign_user, "title": "changed"})
    assert_problem(patched, 422)
    # the same answer as a user id that exists nowhere
    nowhere = client.patch(f"/api/tasks/{mine['task']['id']}", headers=headers,
                           json={"assignee_id": random_id(), "title": "changed"})
    assert nowhere.json == patched.json
    assert client.get(f"/api/tasks/{mine['task']['id']}", headers=headers).json == mine["task"]
    assert org_footprint(services, mine["account"].organization["id"]) == before
    assert client.get("/api/me/notifications",
                      headers=theirs["member"]["headers"]).json == their_notes


def test_lists_show_only_the_callers_organization(client, two_orgs):
    mine, theirs = two_orgs["Mine"], two_orgs["Theirs"]
    headers = mine["account"].headers
    users = walk(client, "/api/users", headers, 50)
    assert {u["organization_id"] for u in users} == {mine["account"].organization["id"]}
    assert [p["id"] for p in walk(client, "/api/projects", headers, 50)] == [
        mine["project"]["id"]]
    filtered = client.get(f"/api/projects/{mine['project']['id']}/tasks?assignee_id="
                          f"{theirs['member']['user']['id']}", headers=headers)
    assert filtered.status_code == 200 and filtered.json["items"] == []
    assert client.get("/api/orgs/current", headers=headers).json["id"] == \
        mine["account"].organization["id"]


def test_a_token_cannot_be_pointed_at_another_organization(client, settings, two_orgs):
    import jwt

    mine, theirs = two_orgs["Mine"], two_orgs["Theirs"]
    claims = jwt.decode(mine["account"].token, options={"verify_signature": False})
    claims["org"] = theirs["account"].organization["id"]
    token = jwt.encode(claims, settings.secret_key, algorithm="HS256")
    assert_problem(client.get(f"/api/projects/{theirs['project']['id']}",
                              headers={"Authorization": f"Bearer {token}"}), 401)


def test_cache_administration_touches_only_the_callers_organization(client, two_orgs):
    mine, theirs = two_orgs["Mine"], two_orgs["Theirs"]
    purge = client.delete("/api/admin/cache", headers=mine["account"].headers)
    assert purge.status_code == 202
    assert_problem(client.delete("/api/admin/cache", headers=mine["member"]["headers"]), 403)
    again = client.get(f"/api/projects/{theirs['project']['id']}",
                       headers=theirs["account"].headers)
    assert again.status_code == 200 and again.headers["X-Cache"] != "MISS"
    mine_again = client.get(f"/api/projects/{mine['project']['id']}",
                            headers=mine["account"].headers)
    assert mine_again.status_code == 200 and mine_again.headers["X-Cache"] == "MISS"
