"""Sign-up, login, refresh, logout, /api/me, and every way a bearer token can be wrong."""

from __future__ import annotations

import time

import jwt
import pytest

from api_support import PASSWORD, add_member, assert_problem, bearer, count, new_email, random_id

UUID_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
TS_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


# -- sign-up ------------------------------------------------------------------------------------
def test_sign_up_creates_an_organization_whose_first_user_is_its_admin(client):
    email = new_email()
    answer = client.post("/api/orgs", json={"organization_name": "Acme Corp", "email": email,
                                            "password": PASSWORD, "display_name": "Ada"})
    assert answer.status_code == 201
    body = answer.json
    assert set(body) == {"organization", "user", "access_token", "token_type", "expires_in"}
    org, user = body["organization"], body["user"]
    assert org["name"] == "Acme Corp" and org["status"] == "ACTIVE" and org["slug"]
    assert set(org) == {"id", "name", "slug", "status", "created_at"}
    assert set(user) == {"id", "organization_id", "email", "display_name", "avatar_url",
                         "roles", "created_at"}
    assert user["organization_id"] == org["id"]
    assert user["email"] == email and user["display_name"] == "Ada" and user["roles"] == ["admin"]
    assert user["avatar_url"] is None
    import re
    for value in (org["id"], user["id"]):
        assert re.match(UUID_RE, value)
    for value in (org["created_at"], user["created_at"]):
        assert re.match(TS_RE, value)
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert "password" not in str(body).lower().replace("password_", "")


def test_sign_up_token_is_hs256_with_exp_sub_and_sid(client, admin):
    header = jwt.get_unverified_header(admin.token)
    claims = _claims(admin.token)
    assert header["alg"] == "HS256"
    assert claims["sub"] == admin.user["id"]
    assert claims["sid"] and claims["exp"] > time.time()


def test_sign_up_with_an_email_already_taken_is_a_conflict_and_creates_nothing(client, admin,
                                                                               services):
    from models import Organization

    before = services.db.session().__enter__().query(Organization).count()
    answer = client.post("/api/orgs", json={"organization_name": "Other", "email":
                                            admin.email.upper(), "password": PASSWORD,
                                            "display_name": "X"})
    assert_problem(answer, 409)
    with services.db.session() as db:
        assert db.query(Organization).count() == before


@pytest.mark.parametrize("field,value", [
    ("email", "not-an-email"), ("password", "short"), ("password", "x" * 129),
    ("organization_name", ""), ("organization_name", "x" * 201), ("display_name", "x" * 101),
    ("email", "a" * 250 + "@example.com"), ("display_name", 5),
])
def test_sign_up_rejects_invalid_fields_with_422_naming_the_field(client, field, value):
    body = {"organization_name": "Acme", "email": new_email(), "password": PASSWORD,
            "display_name": "Ada", field: value}
    problem = assert_problem(client.post("/api/orgs", json=body), 422)
    assert any(e["field"] == field for e in problem["errors"])


# -- login --------------------------------------------------------------------------------------
def test_login_with_the_right_password_returns_a_working_bearer_token(client, admin):
    answer = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
    assert answer.status_code == 200
    assert set(answer.json) == {"access_token", "token_type", "expires_in"}
    assert answer.json["token_type"] == "Bearer"
    me = client.get("/api/me", headers=bearer(answer.json["access_token"]))
    assert me.status_code == 200 and me.json["id"] == admin.user["id"]


def test_login_email_is_case_insensitive(client, admin):
    answer = client.post("/api/auth/login", json={"email": admin.email.upper(),
                                                  "password": PASSWORD})
    assert answer.status_code == 200


def test_login_failure_is_the_same_answer_for_unknown_email_and_wrong_password(client, admin):
    wrong = client.post("/api/auth/login", json={"email": admin.email, "password": "wrong-pass"})
    unknown = client.post("/api/auth/login", json={"email": new_email(), "password": PASSWORD})
    assert_problem(wrong, 401)
    assert_problem(unknown, 401)
    assert wrong.json == unknown.json
    assert wrong.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]


def test_ten_failed_logins_per_email_per_minute_answer_429_with_retry_after(client, admin):
    for _ in range(10):
        assert client.post("/api/auth/login", json={"email": admin.email,
                                                    "password": "wrong-pass"}).status_code == 401
    blocked = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
    assert_problem(blocked, 429)
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60


def test_the_login_rate_limit_is_per_email(client, admin, sign_up):
    other = sign_up("Other")
    for _ in range(10):
        client.post("/api/auth/login", json={"email": admin.email, "password": "wrong-pass"})
    assert client.post("/api/auth/login", json={"email": admin.email.upper(),
                                                "password": PASSWORD}).status_code == 429
    assert client.post("/api/auth/login", json={"email": other.email,
                                                "password": PASSWORD}).status_code == 200


def test_nine_failures_do_not_block_the_right_password(client, admin):
    for _ in range(9):
        client.post("/api/auth/login", json={"email": admin.email, "password": "wrong-pass"})
    assert client.post("/api/auth/login", json={"email": admin.email,
                                                "password": PASSWORD}).status_code == 200


def test_failures_for_an_unknown_email_are_rate_limited_too(client):
    email = new_email()
    for _ in range(10):
        client.post("/api/auth/login", json={"email": email, "password": "wrong-pass"})
    assert_problem(client.post("/api/auth/login", json={"email": email, "password": "x" * 8}), 429)


@pytest.fixture
def app_without_redis(settings):
    """A second app whose Redis is a port nothing listens on (the private Redis stays up)."""
    from services.context import build_services
    from stack.redis_server import free_port
    from web import create_app

    dead = f"redis://127.0.0.1:{free_port()}/0"
    broken = settings.with_overrides(redis_url=dead, celery_broker_url=dead[:-1] + "1",
                                     redis_cluster_url=None)
    built = build_services(broken, subscribe_l1=False)
    yield create_app(broken, built)
    built.close()


def test_login_rate_limiter_counts_in_the_database_when_redis_is_down(app_without_redis, admin,
                                                                     services):
    from models import LoginThrottle

    client = app_without_redis.test_client()
    ok = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
    assert ok.status_code == 200  # a success gives its slot back: it is not a failure
    for _ in range(10):
        assert_problem(client.post("/api/auth/login", json={"email": admin.email,
                                                            "password": "wrong-pass"}), 401)
    blocked = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
    assert_problem(blocked, 429)
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    assert count(services, LoginThrottle) >= 1
    # and the API keeps answering from the database
    me = client.get("/api/me", headers=bearer(ok.json["access_token"]))
    assert me.status_code == 200 and me.headers["X-Cache"] == "BYPASS"


def test_a_successful_login_does_not_use_up_the_limit(client, admin):
    for _ in range(12):
        assert client.post("/api/auth/login", json={"email": admin.email,
                                                    "password": PASSWORD}).status_code == 200
    for _ in range(9):
        client.post("/api/auth/login", json={"email": admin.email, "password": "wrong-pass"})
    assert client.post("/api/auth/login", json={"email": admin.email,
                                                "password": PASSWORD}).status_code == 200


def test_failures_over_many_emails_from_one_address_are_limited(client, settings):
    limit = settings.login_failures_per_address
    spray = {"REMOTE_ADDR": "203.0.113.7"}
    answers = [client.post("/api/auth/login", environ_base=spray,
                           json={"email": new_email(), "password": "wrong-pass"}).status_code
               for _ in range(limit + 5)]
    assert answers == [401] * limit + [429] * 5
    blocked = client.post("/api/auth/login", environ_base=spray,
                          json={"email": new_email(), "password": "wrong-pass"})
    assert "client address" in assert_problem(blocked, 429)["detail"]
    other = client.post("/api/auth/login", environ_base={"REMOTE_ADDR": "203.0.113.8"},
                        json={"email": new_email(), "password": "wrong-pass"})
    assert other.status_code == 401


# -- /api/me ------------------------------------------------------------------------------------
def test_me_is_the_caller_with_its_organization(client, admin):
    me = client.get("/api/me", headers=admin.headers)
    assert me.status_code == 200
    assert me.json["id"] == admin.user["id"] and me.json["email"] == admin.email
    assert me.json["organization"] == admin.organization
    assert me.headers["Cache-Control"] == "private, no-cache"


# -- refresh and logout -------------------------------------------------------------------------
def test_refresh_returns_a_new_token_and_revokes_the_old_one(client, admin):
    refreshed = client.post("/api/auth/refresh", headers=admin.headers)
    assert refreshed.status_code == 200
    assert set(refreshed.json) == {"access_token", "token_type", "expires_in"}
    new = refreshed.json["access_token"]
    assert new != admin.token and _claims(new)["sid"] != _claims(admin.token)["sid"]
    assert_problem(client.get("/api/me", headers=admin.headers), 401)
    assert client.get("/api/me", headers=bearer(new)).status_code == 200


def test_refresh_with_an_already_replaced_token_is_401(client, admin):
    assert client.post("/api/auth/refresh", headers=admin.headers).status_code == 200
    assert_problem(client.post("/api/auth/refresh", headers=admin.headers), 401)


def test_logout_revokes_the_token_at_once(client, admin):
    assert client.get("/api/me", headers=admin.headers).status_code == 200  # session now cached
    answer = client.post("/api/auth/logout", headers=admin.headers)
    assert answer.status_code == 204 and answer.data == b""
    assert_problem(client.get("/api/me", headers=admin.headers), 401)
    assert_problem(client.post("/api/auth/refresh", headers=admin.headers), 401)
    assert_problem(client.post("/api/auth/logout", headers=admin.headers), 401)


def test_logout_ends_only_its_own_session(client, admin):
    second = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
    client.post("/api/auth/logout", headers=admin.headers)
    assert client.get("/api/me", headers=bearer(second.json["access_token"])).status_code == 200


def test_a_revoked_token_stays_revoked_after_redis_loses_its_data(client, admin, redis_server):
    import redis

    client.get("/api/me", headers=admin.headers)
    client.post("/api/auth/logout", headers=admin.headers)
    redis.Redis.from_url(redis_server.url_for(0)).flushdb()
    assert_problem(client.get("/api/me", headers=admin.headers), 401)


# -- bad tokens ---------------------------------------------------------------------------------
def _forge(admin, settings, **changes) -> dict:
    claims = {**_claims(admin.token), **changes}
    return claims


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer not.a.jwt",
    "Bearer a.b.c", "Bearer " + "x" * 5000,
])
def test_missing_or_malformed_authorization_is_401_with_www_authenticate(client, header):
    headers = {} if header is None else {"Authorization": header}
    assert_problem(client.get("/api/me", headers=headers), 401)


def test_an_expired_token_is_401(client, admin, settings):
    claims = _forge(admin, settings, exp=int(time.time()) - 5, iat=int(time.time()) - 1000)
    token = jwt.encode(claims, settings.secret_key, algorithm="HS256")
    problem = assert_problem(client.get("/api/me", headers=bearer(token)), 401)
    assert "expired" in problem["detail"]


def test_a_token_with_a_tampered_signature_is_401(client, admin):
    head, payload, signature = admin.token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert_problem(client.get("/api/me", headers=bearer(f"{head}.{payload}.{flipped}")), 401)


def test_a_token_with_tampered_claims_is_401(client, admin, sign_up):
    import base64
    import json

    other = sign_up("Other")
    head, payload, signature = admin.token.split(".")
    claims = _claims(admin.token)
    claims["sub"] = other.user["id"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert_problem(client.get("/api/me", headers=bearer(f"{head}.{forged}.{signature}")), 401)


def test_a_token_signed_with_another_secret_is_401(client, admin):
    token = jwt.encode(_claims(admin.token), "another-secret-" + "y" * 32, algorithm="HS256")
    assert_problem(client.get("/api/me", headers=bearer(token)), 401)


def test_an_unsigned_alg_none_token_is_401(client, admin):
    token = jwt.encode(_claims(admin.token), None, algorithm="none")
    assert_problem(client.get("/api/me", headers=bearer(token)), 401)
    assert_problem(client.get("/api/me", headers=bearer(token.rstrip(".") + ".")), 401)


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_a_token_with_another_algorithm_is_401_even_with_the_right_secret(client, admin,
                                                                          settings, algorithm):
    token = jwt.encode(_claims(admin.token), settings.secret_key, algorithm=algorithm)
    assert_problem(client.get("/api/me", headers=bearer(token)), 401)


@pytest.mark.parametrize("missing", ["exp", "sub", "sid"])
def test_a_correctly_signed_token_without_a_required_claim_is_401(client, admin, settings,
                                                                  missing):
    claims = _claims(admin.token)
    del claims[missing]
    token = jwt.encode(claims, settings.secret_key, algorithm="HS256")
    assert_problem(client.get("/api/me", headers=bearer(token)), 401)


@pytest.mark.parametrize("change", [{"sid": "unknown-session"}, {"sub": 12},
                                    {"sid": None}, {"sub": "not-the-session-user"}])
def test_a_correctly_signed_token_naming_no_live_session_is_401(client, admin, settings, change):
    claims = {**_claims(admin.token), **change}
    if change.get("sid") == "unknown-session":
        claims["sid"] = random_id()
    token = jwt.encode(claims, settings.secret_key, algorithm="HS256")
    assert_problem(client.get("/api/me", headers=bearer(token)), 401)


def test_every_authenticated_route_requires_a_token(client, admin):
    from web.endpoint import OPERATIONS

    for op in OPERATIONS:
        if not op.authenticated:
            continue
        path = op.path
        for name in op.path_params:
            path = path.replace("{" + name + "}", random_id())
        answer = client.open(path, method=op.method, json={} if op.body else None)
        assert_problem(answer, 401)


def test_a_member_token_gets_member_rights_only(client, admin):
    member = add_member(client, admin)
    assert_problem(client.patch("/api/orgs/current", headers=member["headers"],
                                json={"name": "Mine"}), 403)
    assert_problem(client.post("/api/users", headers=member["headers"], json={
        "email": new_email(), "password": PASSWORD, "display_name": "X"}), 403)


def test_parallel_first_logins_of_a_process_never_fail_on_the_unknown_email_hash():
    """The first use makes the hasher and the hash an unknown email is verified against: a
    parallel first login must never find one without the other (it answered 500)."""
    import threading

    from services import auth

    for _ in range(5):
        auth._hashing = None
        start, failures = threading.Barrier(8), []

        def first_login() -> None:
            start.wait()
            try:
                assert auth.verify_password(None, "guess") is False
            except Exception as exc:  # noqa: BLE001 - any error is the failure under test
                failures.append(exc)
        threads = [threading.Thread(target=first_login) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
