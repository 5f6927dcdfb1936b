"""The hot path (web/hot.py) answers a declared endpoint's GET as Flask's dispatch does: the same
status, headers and body, for answers, 304s and every refusal; everything else still goes to
Flask."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder, run_wsgi_app

from api_support import PASSWORD, bearer, new_email
from web.endpoint import OPERATIONS
from web.hot import HotPath
from web.views import accounts, operations, work  # noqa: F401  (they declare the endpoints)

GETS = sorted(op.rule for op in OPERATIONS if op.method == "GET")


@pytest.fixture
def site(app):
    """An organization with a member, a project, a task and a comment, as the rules name them."""
    client = app.test_client()
    signed = client.post("/api/orgs", json={"organization_name": "Hot", "email": new_email(),
                                            "password": PASSWORD, "display_name": "Admin"}).json
    headers = bearer(signed["access_token"])
    project = client.post("/api/projects", headers=headers, json={"name": "P"}).json
    task = client.post(f"/api/projects/{project['id']}/tasks", headers=headers,
                       json={"title": "T"}).json
    client.post(f"/api/tasks/{task['id']}/comments", headers=headers, json={"body": "c"})
    ids = {"project_id": project["id"], "task_id": task["id"], "user_id": signed["user"]["id"]}
    return headers, ids


def url(rule: str, ids: dict) -> str:
    for name, value in ids.items():
        rule = rule.replace(f"<uuid:{name}>", value)
    assert "<" not in rule, rule
    return rule


def answers(app, path: str, headers: dict | None = None) -> tuple[tuple, tuple]:
    """The hot path's answer and Flask's to the same request: (status, sorted headers, body)."""
    environ = EnvironBuilder(path=path, headers=headers or {}).get_environ()
    hot, flask = (run_wsgi_app(wsgi, dict(environ), buffered=True)
                  for wsgi in (app.wsgi_app, app.wsgi_app.flask_wsgi))
    return tuple((status, sorted(head.to_wsgi_list()), b"".join(body))
                 for body, status, head in (hot, flask))


@pytest.fixture
def flask_calls(app):
    """How many requests reached Flask's own dispatch."""
    calls = []
    dispatch = app.wsgi_app.flask_wsgi

    def counted(environ, start_response):
        calls.append(environ["PATH_INFO"])
        return dispatch(environ, start_response)

    app.wsgi_app.flask_wsgi = counted
    return calls


def test_every_declared_get_is_on_the_hot_path(app):
    assert isinstance(app.wsgi_app, HotPath)
    assert sorted(op.rule for _, op in app.wsgi_app.routes) == GETS


@pytest.mark.parametrize("rule", GETS)
def test_an_answer_is_the_one_flask_gives(app, site, rule):
    headers, ids = site
    path = url(rule, ids)
    for _ in range(2):  # stored, then copied into the process: both answers below are near hits
        app.test_client().get(path, headers=headers)
    hot, flask = answers(app, path, headers)
    assert hot[0] == "200 OK"
    assert hot == flask


@pytest.mark.parametrize("rule", [r for r in GETS if "<" in r])
def test_an_unknown_id_is_the_404_flask_gives(app, site, rule):
    headers, ids = site
    hot, flask = answers(app, url(rule, {name: str(uuid.uuid4()) for name in ids}), headers)
    assert hot[0] == "404 NOT FOUND"
    assert hot == flask


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_a_missing_or_bad_token_is_the_401_flask_gives(app, site, token):
    _, ids = site
    hot, flask = answers(app, url("/api/tasks/<uuid:task_id>", ids),
                         bearer(token) if token else None)
    assert hot[0] == "401 UNAUTHORIZED"
    assert hot == flask


def test_a_bad_query_is_the_422_flask_gives(app, site):
    headers, ids = site
    hot, flask = answers(app, url("/api/projects/<uuid:project_id>/tasks", ids) + "?limit=0",
                         headers)
    assert hot[0] == "422 UNPROCESSABLE ENTITY"
    assert hot == flask


def test_a_revalidation_is_the_304_flask_gives(app, site):
    headers, ids = site
    path = url("/api/tasks/<uuid:task_id>", ids)
    etag = app.test_client().get(path, headers=headers).headers["ETag"]
    hot, flask = answers(app, path, {**headers, "If-None-Match": etag})
    assert hot[0] == "304 NOT MODIFIED"
    assert hot == flask


# Whatever a client sends to a declared GET's path, both paths answer it alike.
_SEGMENTS = st.one_of(st.sampled_from(["real", "REAL", "unknown"]),
                      st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF,
                                            exclude_characters="/?#"), max_size=40))
_QUERIES = st.sampled_from(["", "?limit=0", "?limit=5", "?limit=x", "?limit=2&limit=3",
                            "?status=TODO", "?status=done", "?cursor=abc", "?unread=true",
                            "?%ff=1", "?limit=%00"])
_TOKENS = st.sampled_from(["admin", None, "Bearer", "Bearer  ", "Basic x", "bearer admin"])


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rule=st.sampled_from(GETS), segment=_SEGMENTS, query=_QUERIES, token=_TOKENS,
       if_none_match=st.sampled_from([None, "*", '"x"', "W/\"x\""]))
def test_any_request_to_a_declared_get_is_answered_as_flask_answers_it(
        app, site, rule, segment, query, token, if_none_match):
    headers, ids = site
    value = {"real": None, "REAL": None, "unknown": str(uuid.uuid4())}.get(segment, segment)
    path = url(rule, {name: (real.upper() if segment == "REAL" else real) if value is None
                      else value for name, real in ids.items()}) + query
    sent = {}
    if token is not None:
        sent["Authorization"] = headers["Authorization"] if token == "admin" else (
            token.replace("admin", headers["Authorization"].split()[1]))
    if if_none_match is not None:
        sent["If-None-Match"] = if_none_match
    for _ in range(2):  # what both answers read is cached and copied into the process first
        answers(app, path, sent)
    hot, flask = answers(app, path, sent)
    assert hot == flask, path


def test_declared_gets_never_reach_flask(app, site, flask_calls):
    headers, ids = site
    client = app.test_client()
    for rule in GETS:
        assert client.get(url(rule, ids), headers=headers).status_code == 200
    # An id in upper case is the same id.
    assert client.get(f"/api/tasks/{ids['task_id'].upper()}", headers=headers).status_code == 200
    assert flask_calls == []


def test_everything_else_goes_to_flask(app, site, flask_calls):
    headers, ids = site
    client = app.test_client()
    task = url("/api/tasks/<uuid:task_id>", ids)
    assert client.head(task, headers=headers).status_code == 200
    assert client.patch(task, headers=headers, json={"title": "U"}).status_code == 200
    assert client.get(task, headers=headers, data=b"{}",
                      content_type="application/json").status_code == 200
    assert client.get(task + "/", headers=headers).status_code == 404
    assert client.get("/health/ready").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert flask_calls == [task, task, task, task + "/", "/health/ready", "/openapi.json"]


def test_the_setting_turns_it_off(settings, services):
    from web import create_app

    assert not isinstance(create_app(settings.with_overrides(web_hot_path=False),
                                     services).wsgi_app, HotPath)
