"""Login throttling under real concurrency, against a real gunicorn (2 processes, 4 threads each):
parallel wrong guesses for one account, or over many accounts from one client address, get at
most the limit of password checks, with Redis up and with Redis unreachable (the database counts
then). Password checks are read from the server's own metric, summed over its processes."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gunicorn_server import start_gunicorn
from stack.redis_server import RedisServer

PASSWORD = "correct horse battery"
CHECKS = "login_password_checks_total"
FALLBACKS = "login_limiter_database_total"
PARALLEL = 60


@pytest.fixture(scope="module")
def login_redis(database_url):
    """The server's own Redis (one per backend's server), which the tests stop to see the limit
    hold without it."""
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(database_url, login_redis, tmp_path_factory):
    started = start_gunicorn(database_url, login_redis.url_for(0),
                             tmp_path_factory.mktemp("login"), TRUSTED_PROXIES="127.0.0.1")
    yield started
    started.stop()


@pytest.fixture(scope="module", params=["redis up", "redis down"])
def redis_state(request, login_redis, server) -> str:
    """Module-scoped, so every "up" test runs before Redis is stopped for the "down" ones (each
    store counts on its own: while the server switches between them a window may let up to twice
    the limit through; README, Security)."""
    if request.param == "redis down" and login_redis.is_running():
        login_redis.kill()
    if request.param == "redis up":
        assert login_redis.is_running(), "an earlier backend's server left Redis down"
    return request.param


def client_address() -> str:
    """A TEST-NET address of this test's own, sent through the trusted proxy (127.0.0.1)."""
    n = uuid.uuid4().int
    return f"198.{18 + n % 2}.{n >> 8 & 255}.{n >> 16 & 255}"


def sign_up(server) -> str:
    email = f"{uuid.uuid4().hex[:12]}@example.com"
    answer = requests.post(f"{server.base}/api/orgs", timeout=60, json={
        "organization_name": "Throttled", "email": email, "password": PASSWORD,
        "display_name": "Admin"})
    assert answer.status_code == 201, answer.text
    return email


def all_at_once(server, logins: list[dict], address: str) -> list[requests.Response]:
    """Each login on its own connection, released together."""
    start = threading.Barrier(len(logins))

    def attempt(body: dict) -> requests.Response:
        with requests.Session() as session:
            start.wait(timeout=60)
            return session.post(f"{server.base}/api/auth/login", json=body, timeout=120,
                                headers={"X-Forwarded-For": address})
    with ThreadPoolExecutor(len(logins)) as pool:
        return list(pool.map(attempt, logins))


def test_parallel_wrong_passwords_for_one_account_get_at_most_ten_checks(server, redis_state,
                                                                       settings):
    email = sign_up(server)
    address = client_address()
    before = server.metrics().get(CHECKS, 0.0)
    fallbacks = server.metrics().get(FALLBACKS, 0.0)

    answers = all_at_once(server, [{"email": email, "password": f"wrong-{i}"}
                                   for i in range(PARALLEL)], address)

    statuses = [a.status_code for a in answers]
    checks = server.metrics()[CHECKS] - before
    assert set(statuses) <= {401, 429}, statuses
    assert checks == statuses.count(401) <= settings.login_failures_per_minute, (checks, statuses)
    assert statuses.count(429) >= PARALLEL - settings.login_failures_per_minute
    for answer in answers:
        if answer.status_code == 429:
            assert answer.headers["Content-Type"] == "application/problem+json"
            assert 1 <= int(answer.headers["Retry-After"]) <= 60

    # the account is locked: the right password is refused without being checked
    locked = requests.post(f"{server.base}/api/auth/login", timeout=60,
                           json={"email": email, "password": PASSWORD},
                           headers={"X-Forwarded-For": client_address()})
    assert locked.status_code == 429
    assert server.metrics()[CHECKS] - before == checks
    if redis_state == "redis down":  # the database counted every attempt
        assert server.metrics()[FALLBACKS] - fallbacks >= PARALLEL


def test_parallel_wrong_logins_over_many_emails_from_one_address_are_limited(server, redis_state,
                                                                           settings):
    address = client_address()
    limit = settings.login_failures_per_address
    before = server.metrics().get(CHECKS, 0.0)

    answers = all_at_once(server, [{"email": f"{uuid.uuid4().hex[:12]}@example.com",
                                    "password": "wrong-pass"} for _ in range(limit + 20)],
                          address)

    statuses = [a.status_code for a in answers]
    checks = server.metrics()[CHECKS] - before
    assert checks == statuses.count(401) <= limit, (checks, statuses)
    assert statuses.count(429) >= 20
    # another address is not held back by this one
    other = requests.post(f"{server.base}/api/auth/login", timeout=60,
                          json={"email": f"{uuid.uuid4().hex[:12]}@example.com",
                                "password": "wrong-pass"},
                          headers={"X-Forwarded-For": client_address()})
    assert other.status_code == 401
