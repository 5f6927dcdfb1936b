"""Real Celery processes for the worker tests: `celery -A worker.celery_app worker` (and Flower) as
subprocesses, on the test database and the test cache Redis, with a broker Redis of their own
(the cache Redis is flushed between tests; a broker's queues must not be, and some tests kill it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import func, select

from models import OutboxEvent
from services.auth import Actor
from stack.redis_server import RedisServer, free_port, preexec_for_this_thread

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).parent / "celery")
QUEUES = "invalidate,recompute,warmup,celery"
START_TIMEOUT = 45.0


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def parse_metrics(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


@dataclass
class CeleryProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    env: dict = field(repr=False)
    metrics_port: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> None:
        def seen():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.process.returncode}):\n"
                                     + self.log()[-3000:])
            return re.search(pattern, self.log())
        wait_until(seen, timeout, 0.1, f"{self.name} to log {pattern!r}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as answer:
            return parse_metrics(answer.read().decode())

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # pool processes left behind, if any
        except ProcessLookupError:
            pass
        self.process.wait()


def celery_env(database_url: str, redis_url: str, broker_url: str, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, CELERY_BROKER_URL=broker_url,
               SECRET_KEY="test-secret-" + "x" * 32, WARMUP_ON_START="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                        env.get("PYTHONPATH")])))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn(name: str, args: list[str], env: dict, log_dir: Path) -> CeleryProcess:
    log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([CELERY, "-A", "worker.celery_app", *args], cwd=PROJECT_ROOT,
                                   env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=preexec_for_this_thread())
    return CeleryProcess(name, process, log_path, env)


def start_worker(database_url: str, redis_url: str, broker_url: str, log_dir: Path, *,
                 beat: bool = False, concurrency: int = 2, **extra: str) -> CeleryProcess:
    port = free_port()
    env = celery_env(database_url, redis_url, broker_url, WORKER_METRICS_PORT=port, **extra)
    args = ["worker", "-Q", QUEUES, "-c", str(concurrency), "-P", "prefork", "-E",
            "--without-mingle", "--without-gossip", "-l", "INFO",
            "-n", f"test-{uuid.uuid4().hex[:8]}@%h"]
    if beat:
        args += ["-B", "-s", str(log_dir / f"beat-{uuid.uuid4().hex[:6]}")]
    worker = spawn("worker", args, env, log_dir)
    worker.metrics_port = port
    try:
        worker.wait_for_log(r"@\S+ ready\.")
    except BaseException:
        worker.stop()
        raise
    return worker


@pytest.fixture(scope="session")
def broker():
    """A broker Redis of the worker tests' own (`noeviction`, never flushed by the fixtures)."""
    server = RedisServer.start(maxmemory_policy="noeviction")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(request, database_url, redis_server, broker, tmp_path_factory):
    """One worker for a test module and a database backend (on the tests' Redis Cluster with
    TEST_REDIS=cluster)."""
    from conftest import redis_mode

    extra = {}
    if redis_mode() == "cluster":
        extra["REDIS_CLUSTER_URL"] = request.getfixturevalue("redis_cluster").url
    started = start_worker(database_url, redis_server.url_for(0), broker.url_for(0),
                           tmp_path_factory.mktemp("celery"), **extra)
    yield started
    started.stop()


# -- helpers shared by the worker tests -----------------------------------------------------------
def actor_of(account) -> Actor:
    return Actor(account.user["id"], account.organization["id"], "test", ("admin",),
                 account.email)


def new_project(client, account, name="Project") -> str:
    answer = client.post("/api/projects", json={"name": name}, headers=account.headers)
    assert answer.status_code == 201, answer.json
    return answer.json["id"]


def unprocessed(services, org_id: str) -> int:
    with services.db.session() as db:
        return db.scalar(select(func.count()).select_from(OutboxEvent).where(
            OutboxEvent.organization_id == org_id, OutboxEvent.processed_at.is_(None)))


def outbox_count(services, org_id: str) -> int:
    with services.db.session() as db:
        return db.scalar(select(func.count()).select_from(OutboxEvent).where(
            OutboxEvent.organization_id == org_id))


def exact(services, agg, org_id: str, owner_id: str) -> bool:
    """The cached aggregate equals a database count at the same sequence number."""
    snap = services.aggregates.read(agg, org_id, owner_id)
    with services.db.session() as db:
        seq, counts = agg.count(db, owner_id)
    return snap is not None and snap.seq == seq and snap.stats == agg.present(owner_id, counts)


def read_stats(client, account, project_id):
    answer = client.get(f"/api/projects/{project_id}/stats", headers=account.headers)
    assert answer.status_code == 200, answer.json
    return answer
