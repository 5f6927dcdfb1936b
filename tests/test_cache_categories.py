"""Every category of the caching strategy's table, through the HTTP API: a miss is followed by an
L2 hit, the stored key carries the category's TTL, and each write that should invalidate it is
visible on the very next read (read-your-writes), for the entity and every list containing it."""

from __future__ import annotations

import jwt
import pytest

from cache_helpers import CACHED
from aggregates import PROJECT_STATS, USER_STATS
from cache import keys
from tests.cache_helpers import (count_sql, current_blob, current_value_name, raw, stored_names,
                                 ttl_of)


def claims(account) -> dict:
    return jwt.decode(account.token, options={"verify_signature": False})


def add_member(client, admin, name="Member") -> tuple[dict, dict]:
    """A member of the admin's organization and that member's auth headers."""
    email = f"{name.lower()}-{admin.email}"
    made = client.post("/api/users", json={"email": email, "password": "correct horse battery",
                                           "display_name": name, "roles": ["member"]},
                       headers=admin.headers)
    assert made.status_code == 201, made.json
    login = client.post("/api/auth/login", json={"email": email,
                                                 "password": "correct horse battery"})
    assert login.status_code == 200, login.json
    return made.json, {"Authorization": f"Bearer {login.json['access_token']}"}


def miss_then_hit(client, url, headers):
    first = client.get(url, headers=headers)
    second = client.get(url, headers=headers)
    assert first.status_code == second.status_code == 200, (first.json, second.json)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT-L2"), url
    # (stats carry computed_at: the miss reports its own computation time, to the microsecond)
    assert {**first.json, "computed_at": None} == {**second.json, "computed_at": None}
    return second.json


def assert_ttl(r, key, expected):
    ttl = ttl_of(r, key)
    assert expected - 5 <= ttl <= expected, f"{key.name}: TTL {ttl}, want {expected}"


def ids(page) -> list[str]:
    return [item["id"] for item in page["items"]]


@pytest.fixture
def r(services):
    client = raw(services)
    yield client
    client.close()


@pytest.fixture
def project(client, admin):
    made = client.post("/api/projects", json={"name": "Launch"}, headers=admin.headers)
    assert made.status_code == 201
    return made.json


# -- sessions: 15 minutes, sliding; logout and refresh end them at once -------------------------
def test_a_session_is_cached_for_15_minutes_and_a_cached_session_needs_no_database(
        client, admin, services, r):
    c = claims(admin)
    key = keys.session(c["org"], c["sub"], c["sid"])
    client.get("/api/orgs/current", headers=admin.headers)  # caches the session and the org
    assert_ttl(r, key, 900)
    with count_sql(services) as sql:
        answer = client.get("/api/orgs/current", headers=admin.headers)
    assert answer.status_code == 200 and answer.headers["X-Cache"] in CACHED
    assert sql.count == 0, sql.statements


def test_each_use_of_a_session_slides_its_expiry(client, admin, r):
    c = claims(admin)
    key = keys.session(c["org"], c["sub"], c["sid"])
    client.get("/api/me", headers=admin.headers)
    r.expire(current_value_name(r, key), 100)
    assert ttl_of(r, key) <= 100
    client.get("/api/me", headers=admin.headers)
    assert_ttl(r, key, 900)


def test_logout_ends_a_cached_session_at_once(client, admin):
    assert client.get("/api/me", headers=admin.headers).status_code == 200  # now cached
    assert client.post("/api/auth/logout", headers=admin.headers).status_code == 204
    after = client.get("/api/me", headers=admin.headers)
    assert after.status_code == 401
    assert after.headers["WWW-Authenticate"].startswith("Bearer")


def test_refresh_ends_the_old_cached_session_at_once_and_the_new_one_works(client, admin):
    assert client.get("/api/me", headers=admin.headers).status_code == 200
    refreshed = client.post("/api/auth/refresh", headers=admin.headers)
    assert refreshed.status_code == 200
    assert client.get("/api/me", headers=admin.headers).status_code == 401
    new = {"Authorization": f"Bearer {refreshed.json['access_token']}"}
    assert client.get("/api/me", headers=new).status_code == 200


def test_a_role_change_reaches_a_cached_session_at_once(client, admin):
    member, member_headers = add_member(client, admin)
    assert client.get("/api/me", headers=member_headers).status_code == 200  # session cached
    answer = client.post("/api/users", json={"email": "x@example.com", "password": "p" * 10,
                                             "display_name": "X"}, headers=member_headers)
    assert answer.status_code == 403
    promoted = client.patch(f"/api/users/{member['id']}", json={"roles": ["admin"]},
                            headers=admin.headers)
    assert promoted.status_code == 200
    answer = client.post("/api/users", json={"email": "x@example.com", "password": "p" * 10,
                                             "display_name": "X"}, headers=member_headers)
    assert answer.status_code == 201


# -- user profiles: 5 minutes ------------------------------------------------------------------
def test_a_user_profile_is_cached_for_5_minutes(client, admin, r):
    miss_then_hit(client, f"/api/users/{admin.user['id']}", admin.headers)
    assert_ttl(r, keys.user(admin.organization["id"], admin.user["id"]), 300)


def test_a_profile_edit_shows_in_the_profile_the_members_list_and_me(client, admin):
    url = f"/api/users/{admin.user['id']}"
    miss_then_hit(client, url, admin.headers)
    miss_then_hit(client, "/api/users", admin.headers)
    assert client.get("/api/me", headers=admin.headers).headers["X-Cache"] in CACHED
    edit = client.patch(url, json={"display_name": "Renamed", "avatar_url": "https://x.test/a.png"},
                        headers=admin.headers)
    assert edit.status_code == 200
    assert client.get(url, headers=admin.headers).json["display_name"] == "Renamed"
    members = client.get("/api/users", headers=admin.headers).json["items"]
    assert [m["display_name"] for m in members] == ["Renamed"]
    assert client.get("/api/me", headers=admin.headers).json["avatar_url"] == "https://x.test/a.png"


def test_a_new_member_shows_in_the_cached_members_list(client, admin, r):
    miss_then_hit(client, "/api/users", admin.headers)
    assert_ttl(r, keys.member_list(admin.organization["id"], limit=50, cursor=None), 300)
    member, _ = add_member(client, admin)
    assert member["id"] in ids(client.get("/api/users", headers=admin.headers).json)


# -- organization: 10 minutes ------------------------------------------------------------------
def test_the_organization_is_cached_for_10_minutes_and_a_rename_shows_at_once(client, admin, r):
    miss_then_hit(client, "/api/orgs/current", admin.headers)
    assert_ttl(r, keys.organization(admin.organization["id"]), 600)
    assert client.patch("/api/orgs/current", json={"name": "Renamed"},
                        headers=admin.headers).status_code == 200
    assert client.get("/api/orgs/current", headers=admin.headers).json["name"] == "Renamed"
    assert client.get("/api/me", headers=admin.headers).json["organization"]["name"] == "Renamed"


# -- project metadata: 5 minutes ---------------------------------------------------------------
def test_a_project_is_cached_for_5_minutes(client, admin, project, r):
    miss_then_hit(client, f"/api/projects/{project['id']}", admin.headers)
    assert_ttl(r, keys.project(admin.organization["id"], project["id"]), 300)
    miss_then_hit(client, "/api/projects?status=ACTIVE", admin.headers)
    assert_ttl(r, keys.project_list(admin.organization["id"], status="ACTIVE", limit=50,
                                    cursor=None), 300)


def test_a_project_edit_shows_in_the_project_and_every_projects_list(client, admin, project):
    url = f"/api/projects/{project['id']}"
    lists = ["/api/projects", "/api/projects?status=ACTIVE", "/api/projects?status=ARCHIVED"]
    for u in [url, *lists]:
        miss_then_hit(client, u, admin.headers)
    assert client.patch(url, json={"name": "Renamed", "status": "ARCHIVED"},
                        headers=admin.headers).status_code == 200
    assert client.get(url, headers=admin.headers).json["name"] == "Renamed"
    everything, active, archived = (client.get(u, headers=admin.headers).json for u in lists)
    assert [p["name"] for p in everything["items"]] == ["Renamed"]
    assert active["items"] == []
    assert ids(archived) == [project["id"]]


def test_a_created_project_shows_in_the_cached_list_and_a_deleted_one_leaves_it(
        client, admin, project):
    miss_then_hit(client, "/api/projects", admin.headers)
    other = client.post("/api/projects", json={"name": "Second"}, headers=admin.headers).json
    assert ids(client.get("/api/projects", headers=admin.headers).json) == [other["id"],
                                                                             project["id"]]
    miss_then_hit(client, f"/api/projects/{project['id']}", admin.headers)
    assert client.delete(f"/api/projects/{project['id']}",
                         headers=admin.headers).status_code == 204
    assert client.get(f"/api/projects/{project['id']}", headers=admin.headers).status_code == 404
    assert ids(client.get("/api/projects", headers=admin.headers).json) == [other["id"]]


# -- task lists: 1 minute, per filter ------------------------------------------------------------
def test_task_lists_are_cached_for_1_minute_per_filter(client, admin, project, r):
    org = admin.organization["id"]
    base = f"/api/projects/{project['id']}/tasks"
    for status in (None, "TODO"):
        miss_then_hit(client, base + (f"?status={status}" if status else ""), admin.headers)
        assert_ttl(r, keys.project_tasks(org, project["id"], status=status, assignee_id=None,
                                         limit=50, cursor=None), 60)
    miss_then_hit(client, f"/api/users/{admin.user['id']}/tasks", admin.headers)
    assert_ttl(r, keys.user_tasks(org, admin.user["id"], status=None, limit=50, cursor=None), 60)
    # Two filters are two keys: the second filter's first read is a miss of its own.
    assert client.get(base + "?status=COMPLETED", headers=admin.headers).headers["X-Cache"] == "MISS"


def test_task_writes_show_at_once_in_every_list_that_contains_the_task(client, admin, project):
    member, _ = add_member(client, admin, "Mia")
    other, _ = add_member(client, admin, "Otto")
    base = f"/api/projects/{project['id']}/tasks"
    lists = {
        "all": base, "todo": base + "?status=TODO", "done": base + "?status=COMPLETED",
        "mia": base + f"?assignee_id={member['id']}",
        "mia_tasks": f"/api/users/{member['id']}/tasks",
        "otto_tasks": f"/api/users/{other['id']}/tasks",
        "otto_done": f"/api/users/{other['id']}/tasks?status=COMPLETED",
    }

    def read_all() -> dict[str, list[str]]:
        return {name: ids(client.get(u, headers=admin.headers).json) for name, u in lists.items()}

    for u in lists.values():
        miss_then_hit(client, u, admin.headers)

    task = client.post(base, json={"title": "Write", "assignee_id": member["id"]},
                       headers=admin.headers).json
    t = task["id"]
    assert read_all() == {"all": [t], "todo": [t], "done": [], "mia": [t], "mia_tasks": [t],
                          "otto_tasks": [], "otto_done": []}
    # the write stored the new task for its next reader (warm after write)
    assert client.get(f"/api/tasks/{t}", headers=admin.headers).headers["X-Cache"] in CACHED

    changed = client.patch(f"/api/tasks/{t}", json={"status": "COMPLETED",
                                                    "assignee_id": other["id"]},
                           headers=admin.headers)
    assert changed.status_code == 200
    assert read_all() == {"all": [t], "todo": [], "done": [t], "mia": [], "mia_tasks": [],
                          "otto_tasks": [t], "otto_done": [t]}
    assert client.get(f"/api/tasks/{t}", headers=admin.headers).json["status"] == "COMPLETED"

    assert client.patch(f"/api/tasks/{t}", json={"title": "Renamed"},
                        headers=admin.headers).status_code == 200
    assert client.get(base, headers=admin.headers).json["items"][0]["title"] == "Renamed"
    assert client.get(lists["otto_tasks"], headers=admin.headers).json["items"][0]["title"] \
        == "Renamed"

    assert client.delete(f"/api/tasks/{t}", headers=admin.headers).status_code == 204
    assert client.get(f"/api/tasks/{t}", headers=admin.headers).status_code == 404
    assert all(v == [] for v in read_all().values())


def test_a_comment_shows_at_once_in_the_cached_comment_list(client, admin, project, r):
    task = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "T"},
                       headers=admin.headers).json
    url = f"/api/tasks/{task['id']}/comments"
    miss_then_hit(client, url, admin.headers)
    assert_ttl(r, keys.task_comments(admin.organization["id"], task["id"], limit=50,
                                     cursor=None), 60)
    first = client.post(url, json={"body": "one"}, headers=admin.headers).json
    second = client.post(url, json={"body": "two"}, headers=admin.headers).json
    assert ids(client.get(url, headers=admin.headers).json) == [first["id"], second["id"]]


# -- notification counts: 30 seconds -------------------------------------------------------------
def test_unread_counts_are_cached_for_30_seconds_and_follow_every_change(client, admin, project,
                                                                         r):
    member, member_headers = add_member(client, admin)
    count_url, list_url = "/api/me/notifications/unread-count", "/api/me/notifications?unread=true"
    assert miss_then_hit(client, count_url, member_headers) == {"unread": 0}
    assert_ttl(r, keys.unread_count(admin.organization["id"], member["id"]), 30)
    miss_then_hit(client, list_url, member_headers)

    base = f"/api/projects/{project['id']}/tasks"
    task = client.post(base, json={"title": "A", "assignee_id": member["id"]},
                       headers=admin.headers).json
    assert client.get(count_url, headers=member_headers).json == {"unread": 1}
    client.post(f"/api/tasks/{task['id']}/comments", json={"body": "ping"}, headers=admin.headers)
    assert client.get(count_url, headers=member_headers).json == {"unread": 2}
    unread = client.get(list_url, headers=member_headers).json["items"]
    assert sorted(n["kind"] for n in unread) == ["TASK_ASSIGNED", "TASK_COMMENTED"]

    assert client.post(f"/api/me/notifications/{unread[0]['id']}/read",
                       headers=member_headers).status_code == 204
    assert client.get(count_url, headers=member_headers).json == {"unread": 1}
    assert len(client.get(list_url, headers=member_headers).json["items"]) == 1
    assert client.post("/api/me/notifications/read-all", headers=member_headers).status_code == 204
    assert client.get(count_url, headers=member_headers).json == {"unread": 0}

    client.post(base, json={"title": "B", "assignee_id": member["id"]}, headers=admin.headers)
    assert client.get(count_url, headers=member_headers).json == {"unread": 1}
    client.delete(f"/api/projects/{project['id']}", headers=admin.headers)
    assert client.get(count_url, headers=member_headers).json == {"unread": 0}
    assert client.get(list_url, headers=member_headers).json["items"] == []


# -- computed aggregates: 5 minutes ---------------------------------------------------------------
def stats_hash(r, agg, org_id, owner_id) -> str:
    return agg.name(org_id, owner_id)


def test_stats_are_cached_for_5_minutes(client, admin, project, r):
    org = admin.organization["id"]
    miss_then_hit(client, f"/api/projects/{project['id']}/stats", admin.headers)
    assert 295 <= r.ttl(stats_hash(r, PROJECT_STATS, org, project["id"])) <= 300
    miss_then_hit(client, f"/api/users/{admin.user['id']}/stats", admin.headers)
    assert 295 <= r.ttl(stats_hash(r, USER_STATS, org, admin.user["id"])) <= 300


def test_stats_follow_every_write_at_once_without_a_worker(client, admin, project, services):
    url = f"/api/projects/{project['id']}/stats"
    user_url = f"/api/users/{admin.user['id']}/stats"
    base = f"/api/projects/{project['id']}/tasks"
    miss_then_hit(client, url, admin.headers)
    miss_then_hit(client, user_url, admin.headers)

    def stats():
        s = client.get(url, headers=admin.headers)
        u = client.get(user_url, headers=admin.headers)
        assert {s.headers["X-Cache"], u.headers["X-Cache"]} <= set(CACHED)  # deltas, not recounts
        assert s.json["stale"] is False
        return ((s.json["total_tasks"], s.json["open_tasks"], s.json["completed_tasks"],
                 s.json["total_comments"]),
                (u.json["assigned_tasks"], u.json["open_tasks"], u.json["completed_tasks"]))

    a = client.post(base, json={"title": "A", "assignee_id": admin.user["id"]},
                    headers=admin.headers).json
    assert stats() == ((1, 1, 0, 0), (1, 1, 0))
    b = client.post(base, json={"title": "B", "status": "IN_PROGRESS"},
                    headers=admin.headers).json
    assert stats() == ((2, 1, 0, 0), (1, 1, 0))
    client.patch(f"/api/tasks/{a['id']}", json={"status": "COMPLETED"}, headers=admin.headers)
    assert stats() == ((2, 0, 1, 0), (1, 0, 1))
    client.post(f"/api/tasks/{b['id']}/comments", json={"body": "x"}, headers=admin.headers)
    client.post(f"/api/tasks/{b['id']}/comments", json={"body": "y"}, headers=admin.headers)
    assert stats() == ((2, 0, 1, 2), (1, 0, 1))
    client.patch(f"/api/tasks/{b['id']}", json={"assignee_id": admin.user["id"]},
                 headers=admin.headers)
    assert stats() == ((2, 0, 1, 2), (2, 0, 1))
    client.delete(f"/api/tasks/{b['id']}", headers=admin.headers)
    assert stats() == ((1, 0, 1, 0), (1, 0, 1))

    # What the deltas built is exactly what a recount from the database says.
    services.cache.purge_organization(admin.organization["id"])
    fresh = client.get(url, headers=admin.headers)
    assert fresh.headers["X-Cache"] == "MISS"
    assert (fresh.json["total_tasks"], fresh.json["completed_tasks"],
            fresh.json["total_comments"]) == (1, 1, 0)


def test_values_are_json_and_compressed_above_1_kib(client, admin, project, r):
    import orjson
    import zlib

    org = admin.organization["id"]
    base = f"/api/projects/{project['id']}/tasks"
    client.post(base, json={"title": "long", "description": "d" * 3000}, headers=admin.headers)
    client.get(base, headers=admin.headers)
    client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    big = current_blob(r, keys.project_tasks(org, project["id"], status=None, assignee_id=None,
                                             limit=50, cursor=None))
    small = current_blob(r, keys.project(org, project["id"]))
    assert big[:1] == b"z" and len(big) < 1024
    assert orjson.loads(zlib.decompress(big[1:]))["items"][0]["description"] == "d" * 3000
    assert small[:1] == b"j" and orjson.loads(small[1:]) == project


def test_every_key_the_app_writes_has_a_ttl(client, admin, project, r):
    member, member_headers = add_member(client, admin)
    base = f"/api/projects/{project['id']}/tasks"
    task = client.post(base, json={"title": "A", "assignee_id": member["id"]},
                       headers=admin.headers).json
    for url in ["/api/me", "/api/users", "/api/orgs/current", "/api/projects", base,
                f"/api/projects/{project['id']}/stats", f"/api/users/{member['id']}/stats",
                f"/api/users/{member['id']}/tasks", f"/api/tasks/{task['id']}/comments",
                "/api/public/feature-flags"]:
        assert client.get(url, headers=admin.headers).status_code == 200
    client.get("/api/me/notifications/unread-count", headers=member_headers)
    client.post("/api/auth/login", json={"email": admin.email, "password": "wrong password"})
    client.patch(f"/api/tasks/{task['id']}", json={"status": "BLOCKED"}, headers=admin.headers)
    client.delete("/api/admin/cache", headers=admin.headers)
    names = list(r.scan_iter(count=1000))  # on a cluster: of every master
    assert len(names) > 20
    forever = [n for n in names if r.ttl(n) == -1]
    assert forever == []
    assert stored_names(r, keys.project(admin.organization["id"], project["id"]))


def test_stats_computed_at_moves_when_a_write_is_folded_in(client, admin, project):
    url = f"/api/projects/{project['id']}/stats"
    before = miss_then_hit(client, url, admin.headers)["computed_at"]
    client.post(f"/api/projects/{project['id']}/tasks", json={"title": "A"},
                headers=admin.headers)
    after = client.get(url, headers=admin.headers).json
    assert after["total_tasks"] == 1
    assert after["computed_at"] > before  # RFC 3339 with fixed digits: ordered as strings
