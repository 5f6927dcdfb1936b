"""Whatever a client sends, the answer is a clear problem+json 4xx (never a 500), and a rejected
write leaves nothing behind in the database."""

from __future__ import annotations

import json

import pytest

from api_support import assert_problem, make_project, make_task, org_footprint, random_id


@pytest.fixture
def world(client, admin):
    project = make_project(client, admin.headers)
    task = make_task(client, admin.headers, project["id"])
    return {"project": project, "task": task}


def _writes(world) -> list[tuple[str, str, dict]]:
    """(method, path, a valid body) for every write that takes a body."""
    p, t = world["project"]["id"], world["task"]["id"]
    return [
        ("PATCH", "/api/orgs/current", {"name": "Renamed"}),
        ("POST", "/api/users", {"email": "new@example.com", "password": "long enough pw",
                                "display_name": "New"}),
        ("POST", "/api/projects", {"name": "New"}),
        ("PATCH", f"/api/projects/{p}", {"name": "New"}),
        ("POST", f"/api/projects/{p}/tasks", {"title": "New"}),
        ("PATCH", f"/api/tasks/{t}", {"title": "New"}),
        ("POST", f"/api/tasks/{t}/comments", {"body": "New"}),
    ]


WRITE_NAMES = ["PATCH org", "POST users", "POST projects", "PATCH project", "POST tasks",
               "PATCH task", "POST comments"]


def _check_rejected(client, services, admin, world, method, path, *, status, **request):
    before = org_footprint(services, admin.organization["id"])
    answer = client.open(path, method=method, headers={**admin.headers,
                                                       **request.pop("headers", {})}, **request)
    problem = assert_problem(answer, status)
    assert org_footprint(services, admin.organization["id"]) == before
    assert client.get("/api/orgs/current", headers=admin.headers).json["name"] == "Acme"
    assert client.get(f"/api/tasks/{world['task']['id']}", headers=admin.headers).json == \
        world["task"]
    assert client.get(f"/api/projects/{world['project']['id']}", headers=admin.headers).json == \
        world["project"]
    return problem


@pytest.mark.parametrize("index", range(7), ids=WRITE_NAMES)
@pytest.mark.parametrize("raw", [b"{", b"{'name': 1}", b"", b"\xff\xfe"])
def test_malformed_json_is_400(client, services, admin, world, index, raw):
    method, path, _ = _writes(world)[index]
    _check_rejected(client, services, admin, world, method, path, status=400, data=raw,
                    content_type="application/json")


def test_a_duplicated_key_takes_its_last_value(client, admin, world):
    answer = client.post(f"/api/projects/{world['project']['id']}/tasks", headers=admin.headers,
                         data='{"title": "first", "title": "last"}',
                         content_type="application/json")
    assert answer.status_code == 201 and answer.json["title"] == "last"


@pytest.mark.parametrize("index", range(7), ids=WRITE_NAMES)
@pytest.mark.parametrize("content_type", [None, "text/plain",
                                          "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_application_json_is_415(client, services, admin, world, index,
                                                    content_type):
    method, path, body = _writes(world)[index]
    request = {"data": json.dumps(body)}
    if content_type:
        request["content_type"] = content_type
    _check_rejected(client, services, admin, world, method, path, status=415, **request)


def test_json_with_a_charset_parameter_is_accepted(client, admin):
    answer = client.post("/api/projects", headers=admin.headers, data=json.dumps({"name": "x"}),
                         content_type="application/json; charset=utf-8")
    assert answer.status_code == 201


@pytest.mark.parametrize("index", range(7), ids=WRITE_NAMES)
@pytest.mark.parametrize("case", ["unknown field", "wrong type", "array body", "null body",
                                  "string body", "over-long string"])
def test_invalid_bodies_are_422_with_field_errors(client, services, admin, world, index, case):
    method, path, body = _writes(world)[index]
    first = next(iter(body))
    payload = {"unknown field": {**body, "surprise": 1},
               "wrong type": {**body, first: 12345},
               "array body": [body], "null body": None, "string body": "text",
               "over-long string": {**body, first: "x" * 20_000}}[case]
    problem = _check_rejected(client, services, admin, world, method, path, status=422,
                              data=json.dumps(payload), content_type="application/json")
    if case in ("unknown field", "wrong type", "over-long string"):
        field = "surprise" if case == "unknown field" else first
        assert any(e["field"] == field for e in problem["errors"]), problem


@pytest.mark.parametrize("index", range(7), ids=WRITE_NAMES)
def test_a_body_over_one_mib_is_413(client, services, admin, world, index):
    method, path, body = _writes(world)[index]
    first = next(iter(body))
    payload = json.dumps({**body, first: "x" * (1024 * 1024)})
    _check_rejected(client, services, admin, world, method, path, status=413, data=payload,
                    content_type="application/json")


def test_sign_up_over_one_mib_is_413_and_creates_nothing(client):
    payload = json.dumps({"organization_name": "x" * (1024 * 1024), "email": "a@example.com",
                          "password": "long enough", "display_name": "x"})
    assert_problem(client.post("/api/orgs", data=payload, content_type="application/json"), 413)
    assert client.post("/api/auth/login", json={"email": "a@example.com",
                                                "password": "long enough"}).status_code == 401


@pytest.mark.parametrize("value", ["\u0000", "\ud800", "\udfff x", "a\u0000b", "\U0001f680",
                                   "\u202e", "<script>", "'; DROP TABLE tasks; --"])
def test_odd_strings_are_stored_or_rejected_never_a_500(client, admin, world, value):
    answer = client.post(f"/api/projects/{world['project']['id']}/tasks", headers=admin.headers,
                         data=json.dumps({"title": value, "description": value}),
                         content_type="application/json")
    # A lone surrogate is not Unicode: the body is not valid UTF-8 JSON text (400); NUL is a
    # control character (422).
    expected = (400 if any(0xD800 <= ord(c) <= 0xDFFF for c in value)
                else 422 if "\u0000" in value else 201)
    assert answer.status_code == expected, answer.get_data(as_text=True)
    if answer.status_code == 201:
        stored = client.get(f"/api/tasks/{answer.json['id']}", headers=admin.headers).json
        assert stored["description"] == value
    else:
        assert_problem(answer, expected)


def _text_fields(world) -> list[tuple[str, str, dict, str, bool]]:
    """(method, path, valid body, text field, tabs and newlines allowed) for every stored text."""
    p, t = world["project"]["id"], world["task"]["id"]
    user = {"email": "new@example.com", "password": "long enough pw", "display_name": "New"}
    return [
        ("PATCH", "/api/orgs/current", {"name": "R"}, "name", False),
        ("POST", "/api/users", user, "display_name", False),
        ("POST", "/api/users", user, "password", False),
        ("POST", "/api/users", user, "email", False),
        ("POST", "/api/projects", {"name": "N"}, "name", False),
        ("POST", "/api/projects", {"name": "N"}, "description", True),
        ("PATCH", f"/api/projects/{p}", {"name": "N"}, "name", False),
        ("PATCH", f"/api/projects/{p}", {"description": "D"}, "description", True),
        ("POST", f"/api/projects/{p}/tasks", {"title": "T"}, "title", False),
        ("POST", f"/api/projects/{p}/tasks", {"title": "T"}, "description", True),
        ("PATCH", f"/api/tasks/{t}", {"title": "T"}, "title", False),
        ("PATCH", f"/api/tasks/{t}", {"description": "D"}, "description", True),
        ("POST", f"/api/tasks/{t}/comments", {"body": "B"}, "body", True),
    ]


TEXT_FIELD_NAMES = ["org name", "user display_name", "user password", "user email",
                    "project name", "project description", "PATCH project name",
                    "PATCH project description", "task title", "task description",
                    "PATCH task title", "PATCH task description", "comment body"]


@pytest.mark.parametrize("index", range(13), ids=TEXT_FIELD_NAMES)
def test_control_characters_in_text_are_422_tabs_and_newlines_only_in_long_text(
        client, services, admin, world, index):
    method, path, body, field, multiline = _text_fields(world)[index]
    before = org_footprint(services, admin.organization["id"])

    def send(char: str):
        value = f"x{char}y" + ("long enough" if field == "password" else "")
        if field == "email":
            value = f"a{char}b@example.com"
        return value, client.open(path, method=method, headers=admin.headers,
                                  data=json.dumps({**body, field: value}),
                                  content_type="application/json")

    for char in ("\x00", "\x07", "\x1b", "\r", "\x7f", "\x85", "\x9f") + (
            () if multiline else ("\t", "\n")):
        _, answer = send(char)
        problem = assert_problem(answer, 422)
        assert [e["field"] for e in problem["errors"]] == [field], (repr(char), problem)
        if field != "email":  # an email's own validator names the character first
            assert "control characters" in problem["errors"][0]["message"]
    assert org_footprint(services, admin.organization["id"]) == before
    if multiline:
        for char in ("\t", "\n"):
            value, answer = send(char)
            assert answer.status_code in (200, 201), answer.json
            assert answer.json[field] == value


@pytest.mark.parametrize("payload", [
    '{"title": "t", "due_date": "0000-01-01"}', '{"title": "t", "due_date": "99999-01-01"}',
    '{"title": "t", "due_date": 20300101}', '{"title": "t", "priority": 1e400}',
    '{"title": "t", "status": {"$ne": null}}',
    '[' * 5000 + ']' * 5000, '{"title": 1' + '0' * 5000 + '}',
])
def test_hostile_json_is_a_4xx_never_a_500(client, admin, world, payload):
    answer = client.post(f"/api/projects/{world['project']['id']}/tasks", headers=admin.headers,
                         data=payload, content_type="application/json")
    assert 400 <= answer.status_code < 500, answer.get_data(as_text=True)
    assert answer.status_code == 201 or answer.mimetype == "application/problem+json"


@pytest.mark.parametrize("path", [
    "/api/projects/not-a-uuid", "/api/projects/123", "/api/tasks/xyz/comments",
    "/api/users/00000000-0000-0000-0000-00000000000g", "/api/projects/%00",
    "/api/me/notifications/abc/read",
])
def test_bad_uuids_in_paths_are_404(client, admin, path):
    method = "POST" if path.endswith("/read") else "GET"
    assert_problem(client.open(path, method=method, headers=admin.headers), 404)


def test_an_unknown_route_is_404_problem_json(client, admin):
    for path in ("/api/nothing", "/nothing", "/api/projects/" + random_id() + "/nothing"):
        assert_problem(client.get(path, headers=admin.headers), 404)


@pytest.mark.parametrize("method,path", [
    ("PUT", "/api/projects"), ("DELETE", "/api/me"), ("POST", "/api/orgs/current"),
    ("GET", "/api/auth/login"), ("PUT", "/api/tasks/{id}"), ("PATCH", "/health"),
    ("DELETE", "/api/me/notifications/read-all"),
])
def test_a_wrong_method_is_405_with_allow(client, admin, method, path):
    answer = client.open(path.replace("{id}", random_id()), method=method,
                         headers=admin.headers)
    assert_problem(answer, 405)
    assert answer.headers["Allow"]


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=1.5", "limit=", "limit=1e3",
                                   "cursor=%00", "cursor=" + "A" * 600, "cursor=eyJhIjoxfQ",
                                   "cursor=WyJub3QgYSBkYXRlIiwgIngiXQ"])
def test_out_of_range_or_invalid_paging_is_422(client, admin, world, query):
    for path in ("/api/projects", f"/api/projects/{world['project']['id']}/tasks",
                 f"/api/tasks/{world['task']['id']}/comments", "/api/users",
                 "/api/me/notifications"):
        assert_problem(client.get(f"{path}?{query}", headers=admin.headers), 422)


def test_limits_at_the_bounds_are_accepted(client, admin):
    for limit in (1, 200):
        assert client.get(f"/api/projects?limit={limit}", headers=admin.headers).status_code == 200


def test_a_cursor_from_another_list_never_fails_with_a_500(client, admin, world):
    for _ in range(2):
        make_project(client, admin.headers)
    cursor = client.get("/api/projects?limit=1", headers=admin.headers).json["next_cursor"]
    answer = client.get(f"/api/tasks/{world['task']['id']}/comments?cursor={cursor}",
                        headers=admin.headers)
    assert answer.status_code in (200, 422)
