"""Helpers for the contract tests (tests/test_api_*.py): acting as a client, and counting rows in
the real database to prove that a rejected write left nothing behind."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

PROBLEM = "application/problem+json"
PASSWORD = "correct horse battery"


def assert_problem(response, status: int, *, field_errors: bool | None = None) -> dict:
    """An RFC 9457 answer with this status; `errors` only on 422."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    assert response.mimetype == PROBLEM, response.headers
    body = response.get_json(force=True)
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= set(body)
    if status == 422 or field_errors:
        assert body["errors"], body
        for error in body["errors"]:
            assert set(error) == {"field", "message"} and error["field"] and error["message"]
    else:
        assert "errors" not in body
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    return body


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def random_id() -> str:
    return str(uuid.uuid4())


def new_email() -> str:
    return f"{uuid.uuid4().hex[:12]}@example.com"


def add_member(client, admin, *, roles=("member",), display_name="Member") -> dict:
    """A member created by the admin, logged in: {user, email, headers}."""
    email = new_email()
    created = client.post("/api/users", headers=admin.headers, json={
        "email": email, "password": PASSWORD, "display_name": display_name,
        "roles": list(roles)})
    assert created.status_code == 201, created.json
    login = client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.json
    return {"user": created.json, "email": email, "headers": bearer(login.json["access_token"])}


def make_project(client, headers, **fields) -> dict:
    answer = client.post("/api/projects", headers=headers, json={"name": "Project", **fields})
    assert answer.status_code == 201, answer.json
    return answer.json


def make_task(client, headers, project_id: str, **fields) -> dict:
    answer = client.post(f"/api/projects/{project_id}/tasks", headers=headers,
                         json={"title": "Task", **fields})
    assert answer.status_code == 201, answer.json
    return answer.json


def make_comment(client, headers, task_id: str, body: str = "a comment") -> dict:
    answer = client.post(f"/api/tasks/{task_id}/comments", headers=headers, json={"body": body})
    assert answer.status_code == 201, answer.json
    return answer.json


def walk(client, url: str, headers: dict, limit: int) -> list[dict]:
    """Every item of a list, following next_cursor page by page."""
    items, cursor = [], None
    for _ in range(1000):
        sep = "&" if "?" in url else "?"
        page_url = f"{url}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(page_url, headers=headers)
        assert page.status_code == 200, page.json
        assert len(page.json["items"]) <= limit
        items += page.json["items"]
        cursor = page.json["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination never ended")


def count(services, model, **where) -> int:
    """Rows of `model` matching column == value for each keyword, read from the database."""
    query = select(func.count()).select_from(model)
    for column, value in where.items():
        query = query.where(getattr(model, column) == value)
    with services.db.session() as db:
        return int(db.scalar(query))


def org_footprint(services, org_id: str) -> dict:
    """Row counts of everything an organization owns: unchanged after every rejected write."""
    from models import Comment, Notification, Organization, Project, Task, User

    with services.db.session() as db:
        project_ids = select(Project.id).where(Project.organization_id == org_id)
        return {
            "organizations": count(services, Organization, id=org_id),
            "users": count(services, User, organization_id=org_id),
            "projects": count(services, Project, organization_id=org_id),
            "tasks": count(services, Task, organization_id=org_id),
            "comments": int(db.scalar(select(func.count()).select_from(Comment).where(
                Comment.project_id.in_(project_ids)))),
            "notifications": count(services, Notification, organization_id=org_id),
        }
