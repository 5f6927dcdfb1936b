"""Unauthenticated surface: public configuration, OpenAPI and /docs, static files, health,
metrics; and the X-Cache/ETag promise on every cacheable GET."""

from __future__ import annotations

import pytest

from api_support import add_member, make_comment, make_project, make_task

X_CACHE = {"HIT-L1", "HIT-L2", "MISS", "STALE", "BYPASS"}
PUBLIC = "public, max-age=60, s-maxage=120"


@pytest.mark.parametrize("path,key", [("/api/public/feature-flags", "flags"),
                                      ("/api/public/rate-limits", "limits")])
def test_public_configuration_needs_no_token_and_may_be_cached_by_a_cdn(client, path, key):
    answer = client.get(path)
    assert answer.status_code == 200
    assert set(answer.json) == {key} and isinstance(answer.json[key], dict)
    assert answer.headers["Cache-Control"] == PUBLIC
    assert answer.headers["ETag"] and answer.headers["X-Cache"] in X_CACHE
    again = client.get(path, headers={"If-None-Match": answer.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    assert again.headers["Cache-Control"] == PUBLIC


def test_public_configuration_is_served_from_the_process_cache_on_repeat(client):
    client.get("/api/public/feature-flags")
    assert client.get("/api/public/feature-flags").headers["X-Cache"] == "HIT-L1"


def test_feature_flags_are_booleans_and_rate_limits_publish_the_login_limit(client):
    flags = client.get("/api/public/feature-flags").json["flags"]
    assert flags and all(isinstance(v, bool) for v in flags.values())
    limits = client.get("/api/public/rate-limits").json["limits"]
    assert limits["login_failures_per_minute_per_email"] == 10
    assert limits["max_page_size"] == 200


def test_openapi_is_3_1_and_describes_every_endpoint_of_the_contract(client):
    answer = client.get("/openapi.json")
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    doc = answer.json
    assert doc["openapi"].startswith("3.1")
    expected = {
        ("post", "/api/orgs"), ("post", "/api/auth/login"), ("post", "/api/auth/refresh"),
        ("post", "/api/auth/logout"), ("get", "/api/me"), ("get", "/api/orgs/current"),
        ("patch", "/api/orgs/current"), ("get", "/api/users"), ("post", "/api/users"),
        ("get", "/api/users/{user_id}"), ("patch", "/api/users/{user_id}"),
        ("get", "/api/users/{user_id}/tasks"), ("get", "/api/users/{user_id}/stats"),
        ("get", "/api/projects"), ("post", "/api/projects"),
        ("get", "/api/projects/{project_id}"), ("patch", "/api/projects/{project_id}"),
        ("delete", "/api/projects/{project_id}"), ("get", "/api/projects/{project_id}/stats"),
        ("get", "/api/projects/{project_id}/tasks"), ("post", "/api/projects/{project_id}/tasks"),
        ("get", "/api/tasks/{task_id}"), ("patch", "/api/tasks/{task_id}"),
        ("delete", "/api/tasks/{task_id}"), ("get", "/api/tasks/{task_id}/comments"),
        ("post", "/api/tasks/{task_id}/comments"), ("get", "/api/me/notifications"),
        ("get", "/api/me/notifications/unread-count"),
        ("post", "/api/me/notifications/{notification_id}/read"),
        ("post", "/api/me/notifications/read-all"), ("get", "/api/public/feature-flags"),
        ("get", "/api/public/rate-limits"), ("post", "/api/admin/cache/warm"),
        ("delete", "/api/admin/cache"), ("get", "/health"), ("get", "/health/ready"),
        ("get", "/health/cache"), ("get", "/metrics"),
    }
    described = {(m, p) for p, methods in doc["paths"].items() for m in methods}
    assert expected <= described, expected - described
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    login = doc["paths"]["/api/auth/login"]["post"]
    assert {"200", "401", "422", "429"} <= set(login["responses"])
    assert "security" not in login


def test_openapi_has_an_etag_and_answers_304(client):
    answer = client.get("/openapi.json")
    assert answer.headers["ETag"]
    again = client.get("/openapi.json", headers={"If-None-Match": answer.headers["ETag"]})
    assert again.status_code == 304


def test_docs_is_a_rendered_page_listing_the_endpoints(client):
    answer = client.get("/docs")
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    page = answer.get_data(as_text=True)
    assert "/openapi.json" in page and "/api/projects/{project_id}/tasks" in page
    assert "/static/docs.css" in page


def test_static_files_are_public_immutable_with_an_etag(client):
    answer = client.get("/static/docs.css")
    assert answer.status_code == 200
    assert answer.headers["Cache-Control"] == "public, max-age=3600, immutable"
    etag = answer.headers["ETag"]
    again = client.get("/static/docs.css", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.headers["Cache-Control"] == "public, max-age=3600, immutable"
    answer.close()
    again.close()


def test_a_missing_static_file_is_a_404_problem(client):
    answer = client.get("/static/nothing.css")
    assert answer.status_code == 404 and answer.mimetype == "application/problem+json"


def test_liveness_is_ok_without_dependencies(client):
    answer = client.get("/health")
    assert answer.status_code == 200 and answer.json == {"status": "ok"}


def test_readiness_is_ok_while_the_database_answers(client):
    answer = client.get("/health/ready")
    assert answer.status_code == 200 and answer.json["status"] == "ok"


def test_readiness_is_503_when_the_database_is_unreachable(settings, tmp_path):
    from services.context import build_services
    from web import create_app

    broken = settings.with_overrides(
        database_url="mysql+pymysql://root@127.0.0.1:1/nowhere")
    built = build_services(broken, subscribe_l1=False)
    try:
        answer = create_app(broken, built).test_client().get("/health/ready")
        assert answer.status_code == 503 and answer.json["status"] != "ok"
    finally:
        built.close()


def test_readiness_stays_ok_and_cache_health_is_unhealthy_when_redis_is_down(settings):
    from services.context import build_services
    from stack.redis_server import free_port
    from web import create_app

    dead = f"redis://127.0.0.1:{free_port()}/0"
    broken = settings.with_overrides(redis_url=dead, redis_cluster_url=None)
    built = build_services(broken, subscribe_l1=False)
    try:
        client = create_app(broken, built).test_client()
        assert client.get("/health/ready").status_code == 200
        cache = client.get("/health/cache")
        assert cache.status_code == 200 and cache.json["status"] == "unhealthy"
    finally:
        built.close()


def test_cache_health_reports_hit_rate_memory_and_clients(client, admin):
    project = make_project(client, admin.headers)
    for _ in range(5):
        client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    body = client.get("/health/cache").json
    assert body["status"] in {"healthy", "degraded"}
    assert 0 <= body["hit_rate"] <= 1
    assert body["memory_used_mb"] > 0 and body["connected_clients"] >= 1
    assert body["status"] == ("degraded" if body["hit_rate"] < 0.6 else "healthy")


def test_metrics_expose_the_cache_counters_in_prometheus_text(client, admin):
    project = make_project(client, admin.headers)
    client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    client.get(f"/api/projects/{project['id']}", headers=admin.headers)
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    text = answer.get_data(as_text=True)
    for name in ("cache_hits_total", "cache_misses_total", "cache_operation_duration_seconds"):
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name}" in text
    assert 'cache_layer="' in text and 'entity_type="' in text


def test_every_authenticated_get_has_an_etag_private_no_cache_and_x_cache(client, admin):
    member = add_member(client, admin)
    project = make_project(client, admin.headers)
    task = make_task(client, admin.headers, project["id"], assignee_id=member["user"]["id"])
    make_comment(client, admin.headers, task["id"])
    uid, pid, tid = member["user"]["id"], project["id"], task["id"]
    for path in ("/api/me", "/api/orgs/current", "/api/users", f"/api/users/{uid}",
                 f"/api/users/{uid}/tasks", f"/api/users/{uid}/stats", "/api/projects",
                 f"/api/projects/{pid}", f"/api/projects/{pid}/stats",
                 f"/api/projects/{pid}/tasks", f"/api/tasks/{tid}", f"/api/tasks/{tid}/comments",
                 "/api/me/notifications", "/api/me/notifications/unread-count"):
        for _ in range(2):
            answer = client.get(path, headers=member["headers"])
            assert answer.status_code == 200, (path, answer.json)
            assert answer.headers["Cache-Control"] == "private, no-cache", path
            assert answer.headers["ETag"], path
            assert answer.headers.get("X-Cache") in X_CACHE, path
        again = client.get(path, headers={**member["headers"],
                                          "If-None-Match": answer.headers["ETag"]})
        assert again.status_code == 304, path


def test_writes_are_never_cacheable(client, admin):
    answer = client.post("/api/projects", headers=admin.headers, json={"name": "x"})
    assert "ETag" not in answer.headers
    assert "public" not in answer.headers.get("Cache-Control", "")
