"""Fixtures: real servers only. A private redis-server per test session (flushed between tests:
it is ours), and each database backend of TEST_DATABASES (default: sqlite,mariadb) migrated once
per session; a MariaDB database is uniquely named, created and dropped by the session."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import pytest

os.environ.setdefault("PASSWORD_HASH_MEMORY_KIB", "1024")  # argon2 stays argon2, only cheaper

from config import Settings  # noqa: E402
from db.migrations import upgrade  # noqa: E402
from stack.redis_cluster import RedisCluster  # noqa: E402
from stack.redis_server import RedisServer  # noqa: E402

MARIADB_ADMIN_URL = os.environ.get("TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306")


def _backends() -> list[str]:
    wanted = os.environ.get("TEST_DATABASES", "sqlite,mariadb")
    return [b.strip() for b in wanted.split(",") if b.strip()]


@pytest.fixture(scope="session")
def redis_server():
    """The cache Redis, bounded and evicting as `make up`'s is (/health/cache reports one that
    cannot evict as degraded)."""
    server = RedisServer.start(extra_args=["--maxmemory", "256mb"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def broker_server():
    """The broker the app publishes to, a server of its own as in `make up` (no worker reads it
    unless a test starts one; its queues are flushed with the cache)."""
    server = RedisServer.start(maxmemory_policy="noeviction")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster():
    """A private Redis Cluster (3 masters, 1 replica each) for the session."""
    cluster = RedisCluster.start()
    yield cluster
    cluster.stop()


@contextmanager
def fresh_database(backend: str, folder) -> Iterator[str]:
    """A migrated database of its own: a file under `folder` for SQLite, a uniquely named
    database (created, then dropped) on MariaDB. Yields its URL."""
    if backend == "sqlite":
        url = f"sqlite:///{folder / 'test.db'}"
        upgrade(url)
        yield url
        return
    from sqlalchemy import create_engine, text

    name = f"taskcache_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(MARIADB_ADMIN_URL)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        url = f"{MARIADB_ADMIN_URL}/{name}"
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(scope="session", params=_backends())
def database_url(request, tmp_path_factory):
    with fresh_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


def redis_mode() -> str:
    """TEST_REDIS=cluster runs the cache on a private Redis Cluster (the broker stays on the
    private redis-server); the default is the single private redis-server."""
    return os.environ.get("TEST_REDIS", "single").strip().lower() or "single"


def topology_mode() -> str:
    """TEST_TOPOLOGY=cluster sends the HTTP-level tests' requests (the `client` fixture) through
    nginx to `make up-cluster` (two API instances, its Redis Cluster, workers and beats) started
    once per database backend; `settings` and `services` then reach the same database and cache.
    Tests that reach into one process (hooks, injected faults) do not hold there."""
    return os.environ.get("TEST_TOPOLOGY", "").strip().lower()


@pytest.fixture(scope="session")
def topology_stack(database_url, tmp_path_factory):
    from topology_support import RunningTopology

    running = RunningTopology.start(database_url, tmp_path_factory.mktemp("topology"),
                                    COUNTER_FLUSH_INTERVAL=0)
    yield running
    running.stop()


@pytest.fixture
def settings(request, database_url, redis_server, broker_server) -> Settings:
    import redis

    redis.Redis.from_url(redis_server.url_for(0)).flushall()
    redis.Redis.from_url(broker_server.url_for(0)).flushall()
    cluster_url = None
    if topology_mode() == "cluster":
        topology = request.getfixturevalue("topology_stack")
        cluster_url = topology.state()["redis_cluster_url"]
        cache = topology.cache()
        cache.flushall(target_nodes=cache.PRIMARIES)
        cache.close()
    elif redis_mode() == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        cluster_url = cluster.url
    # Counters flushed on every request: a test reads them right after (their batching has
    # tests of its own).
    return Settings(database_url=database_url, redis_url=redis_server.url_for(0),
                    celery_broker_url=broker_server.url_for(0),
                    secret_key="test-secret-" + "x" * 32,
                    breaker_cooldown=0.5, redis_cluster_url=cluster_url, counter_flush_interval=0)


@pytest.fixture
def services(settings):
    from services.context import build_services

    built = build_services(settings)
    yield built
    built.close()


@pytest.fixture
def app(settings, services):
    from web import create_app

    return create_app(settings, services)


@pytest.fixture
def client(request, app):
    if topology_mode() == "cluster":
        return request.getfixturevalue("topology_stack").client()
    return app.test_client()


@dataclass
class Account:
    """A signed-up organization admin, as a client sees it."""

    token: str
    user: dict
    organization: dict
    email: str
    password: str = "correct horse battery"
    headers: dict = field(init=False)

    def __post_init__(self) -> None:
        self.headers = {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def sign_up(client):
    def _sign_up(name: str = "Acme") -> Account:
        email = f"{uuid.uuid4().hex[:10]}@example.com"
        answer = client.post("/api/orgs", json={
            "organization_name": name, "email": email, "password": "correct horse battery",
            "display_name": "Admin"})
        assert answer.status_code == 201, answer.json
        body = answer.json
        return Account(body["access_token"], body["user"], body["organization"], email)
    return _sign_up


@pytest.fixture
def admin(sign_up) -> Account:
    return sign_up()
