"""`make up` itself (`python -m stack.up`), on real processes: its own private redis-servers (no
REDIS_URL or CELERY_BROKER_URL set), a database of the test's own, free ports.

- a child that dies is restarted and the API stays up; Flower's /metrics and /healthcheck ask for
  credentials; the API and Flower listen on loopback only;
- SIGKILL of the supervisor leaves no process of the stack behind;
- (marker faults) the cache and broker Redis restarted three times during writes: every process
  alive afterwards, every acknowledged write readable, lists and stats exact.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stack.redis_server import free_port, preexec_for_this_thread
from worker_fixtures import PROJECT_ROOT, wait_until

pytestmark = pytest.mark.slow
START_TIMEOUT = 180.0  # migrations, seeding and four children on a loaded 2-core machine
FLOWER_AUTH = "flower:test-password"


@dataclass
class Stack:
    process: subprocess.Popen
    log_path: Path
    web_port: int
    flower_port: int
    database_url: str = ""
    password: str = ""
    pids: dict[str, int] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        def seen():
            if self.process.poll() is not None:
                raise AssertionError(f"make up exited ({self.process.returncode}):\n"
                                     + self.log()[-4000:])
            return re.search(pattern, self.log())
        return wait_until(seen, timeout, 0.2, f"make up to log {pattern!r}")

    def child_pid(self, name: str) -> int:
        """The pid of the latest start of child `name`."""
        found = re.findall(rf"\[up\] started {re.escape(name)}(?: \(restart \d+\))? "
                           rf"\(pid (\d+)\)", self.log())
        assert found, f"{name} never started:\n{self.log()[-3000:]}"
        return int(found[-1])

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_stack(tmp_path: Path, database_url: str, **extra: str) -> Stack:
    env = dict(os.environ)
    for name in ("REDIS_URL", "CELERY_BROKER_URL", "PROMETHEUS_MULTIPROC_DIR", "BIND_ADDRESS"):
        env.pop(name, None)  # the default configuration: make up starts its own Redis servers
    web_port, flower_port = free_port(), free_port()
    env.update(DATABASE_URL=database_url, WEB_PORT=str(web_port), FLOWER_PORT=str(flower_port),
               WORKER_METRICS_PORT=str(free_port()), STACK_VAR_DIR=str(tmp_path / "var"),
               FLOWER_BASIC_AUTH=FLOWER_AUTH, SECRET_KEY="test-secret-" + "x" * 32,
               PYTHONPATH=str(PROJECT_ROOT), **extra)
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "stack.up"], cwd=PROJECT_ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   preexec_fn=preexec_for_this_thread())
    stack = Stack(process, log_path, web_port, flower_port, database_url)
    try:
        stack.password = stack.wait_for_log(r"log in as demo@example.com / (\S+)").group(1)
        stack.wait_for_log(r"Ctrl-C stops everything")
        for name in ("cache-redis", "broker-redis", "web", "worker", "beat", "flower"):
            stack.pids[name] = stack.child_pid(name)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture
def sqlite_stack(tmp_path):
    stack = start_stack(tmp_path, f"sqlite:///{tmp_path / 'up.db'}")
    yield stack
    stack.stop()


# -- processes ------------------------------------------------------------------------------------
def process_tree(root: int) -> set[int]:
    """`root` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to read its status)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def flower_status(stack: Stack, path: str, auth: str | None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth \
        else {}
    request = urllib.request.Request(f"http://127.0.0.1:{stack.flower_port}{path}",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def flower_answers(stack: Stack) -> bool:
    try:
        return flower_status(stack, "/healthcheck", FLOWER_AUTH) == 200
    except OSError:
        return False


def test_make_up_restarts_a_dead_child_and_leaves_nothing_when_killed(sqlite_stack):
    stack = sqlite_stack
    # Safe defaults: loopback only, and Flower's /metrics and /healthcheck ask for credentials.
    assert listening_addresses(stack.web_port) == {"127.0.0.1"}
    wait_until(lambda: flower_answers(stack), 120, 0.5, "Flower to answer")
    assert listening_addresses(stack.flower_port) == {"127.0.0.1"}
    for path in ("/metrics", "/healthcheck", "/"):
        assert flower_status(stack, path, None) == 401, path
        assert flower_status(stack, path, "flower:wrong") == 401, path
    assert flower_status(stack, "/metrics", FLOWER_AUTH) == 200

    # A child that dies is restarted; the API never goes down with it.
    os.kill(stack.pids["worker"], signal.SIGKILL)
    stack.wait_for_log(r"worker exited unexpectedly \(signal SIGKILL\).*restart 1 in")
    stack.wait_for_log(r"started worker \(restart 1\)")
    assert stack.api("GET", "/health")[0] == 200
    assert stack.child_pid("web") == stack.pids["web"]
    restarted = stack.child_pid("worker")
    assert restarted != stack.pids["worker"]
    stack.wait_for_log(r"(?s)started worker \(restart 1\).*celery@\S+ ready\.")

    # SIGKILL of the supervisor: every process of the stack goes (gunicorn and pool workers,
    # beat, Flower, both redis-servers), none keeps consuming a broker.
    tree = process_tree(stack.process.pid)
    assert len(tree) >= 10, tree  # supervisor, 2 redis, gunicorn + workers, celery + pool, ...
    stack.process.kill()
    stack.process.wait()
    wait_until(lambda: not any(alive(pid) for pid in tree), 120, 0.5,
               "every process of the stack to exit")


# -- done when (issue 9): the default make up survives restarts of its Redis during writes --------
@pytest.fixture(params=["sqlite", "mariadb"])
def backend_stack(request, tmp_path):
    from conftest import _backends, fresh_database

    if request.param not in _backends():
        pytest.skip(f"{request.param} not in TEST_DATABASES")
    with fresh_database(request.param, tmp_path) as url:
        stack = start_stack(tmp_path, url)
        yield stack
        stack.stop()


class Writer(threading.Thread):
    """Creates tasks through the API until stopped; keeps what was acknowledged and every 5xx."""

    def __init__(self, stack: Stack, token: str, project_id: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.token, self.project_id = stack, token, project_id
        self.acknowledged: dict[str, str] = {}
        self.server_errors: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            title = f"write {n}"
            try:
                status, body = self.stack.api("POST", f"/api/projects/{self.project_id}/tasks",
                                              {"title": title, "status": "COMPLETED" if n % 3
                                               else "TODO"}, self.token)
            except OSError:
                continue  # no answer: not acknowledged, not counted
            if status == 201:
                self.acknowledged[body["id"]] = title
            elif status >= 500:
                self.server_errors.append(status)


def all_task_ids(stack: Stack, token: str, project_id: str) -> set[str]:
    ids, cursor = set(), None
    while True:
        path = f"/api/projects/{project_id}/tasks?limit=200" + (f"&cursor={cursor}" if cursor
                                                                else "")
        status, body = stack.api("GET", path, token=token)
        assert status == 200, (status, body)
        ids |= {item["id"] for item in body["items"]}
        cursor = body["next_cursor"]
        if not cursor:
            return ids


@pytest.mark.faults
def test_the_default_make_up_survives_three_restarts_of_its_redis_during_writes(backend_stack):
    stack = backend_stack
    status, login = stack.api("POST", "/api/auth/login",
                              {"email": "demo@example.com", "password": stack.password})
    assert status == 200, login
    token = login["access_token"]
    status, project = stack.api("POST", "/api/projects", {"name": "Restarts"}, token)
    assert status == 201
    project_id = project["id"]
    stack.api("GET", f"/api/projects/{project_id}/stats", token=token)  # cached: deltas apply

    writer = Writer(stack, token, project_id)
    writer.start()
    try:
        for round_ in range(1, 4):
            wait_until(lambda: len(writer.acknowledged) >= 20 * round_, 120, 0.1,
                       "writes before the restart")
            os.kill(stack.child_pid("cache-redis"), signal.SIGKILL)
            os.kill(stack.child_pid("broker-redis"), signal.SIGKILL)
            for name in ("cache-redis", "broker-redis"):
                stack.wait_for_log(rf"started {name} \(restart {round_}\)", 60)
            before = len(writer.acknowledged)
            wait_until(lambda: len(writer.acknowledged) >= before + 20, 120, 0.1,
                       "writes after the restart")
    finally:
        writer.halt.set()
        writer.join(60)

    assert writer.server_errors == []
    # Every process of the application is the one that started: nothing died or was restarted.
    for name in ("web", "worker", "beat", "flower"):
        assert stack.child_pid(name) == stack.pids[name], name
        assert alive(stack.pids[name]), name
    assert "exited unexpectedly" not in re.sub(r".*(cache|broker)-redis exited unexpectedly.*",
                                               "", stack.log())
    # Nothing lost: every acknowledged write reads back, in the list and in the stats.
    written = writer.acknowledged
    for task_id, title in written.items():
        for _ in range(3):  # more than one API process
            status, body = stack.api("GET", f"/api/tasks/{task_id}", token=token)
            assert status == 200 and body["title"] == title, (task_id, status, body)
    assert set(written) <= all_task_ids(stack, token, project_id)

    # Stats exact against the database (a write whose answer was lost may exist too).
    from sqlalchemy import create_engine, text

    engine = create_engine(stack.database_url)
    with engine.connect() as db:
        total, completed = db.execute(text(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'COMPLETED' THEN 1 ELSE 0 END), 0)"
            " FROM tasks WHERE project_id = :p"), {"p": project_id}).one()
    engine.dispose()
    assert total >= len(written)

    def stats_exact() -> bool:
        status, stats = stack.api("GET", f"/api/projects/{project_id}/stats", token=token)
        return (status == 200 and stats["total_tasks"] == total and not stats.get("stale")
                and stats["completed_tasks"] == completed)
    # The outbox sweep (every 5 s, events older than 10 s) redelivers what the restarts dropped.
    wait_until(stats_exact, 180, 0.5, "the stats to match the database")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands files to another user")
def test_the_files_the_children_write_are_handed_to_their_user_and_nothing_else(tmp_path,
                                                                               monkeypatch):
    import pwd

    from config import Settings
    from stack import up

    nobody = pwd.getpwnam("nobody").pw_uid
    var = tmp_path / "var"
    (var / "prometheus-multiproc").mkdir(parents=True)
    (var / "secret_key").write_text("k")
    private, shared = tmp_path / "private", tmp_path / "shared"
    for folder, mode in ((private, 0o755), (shared, 0o1777)):
        folder.mkdir()
        folder.chmod(mode)
        (folder / "app.db").write_text("")
        (folder / "unrelated").write_text("")
    monkeypatch.setattr(up, "VAR_DIR", var)
    for folder in (private, shared):
        up.hand_files_to("nobody", Settings(database_url=f"sqlite:///{folder / 'app.db'}"))
        assert (folder / "app.db").stat().st_uid == nobody
        assert (folder / "unrelated").stat().st_uid == 0
    assert private.stat().st_uid == nobody  # SQLite creates its journal there
    assert shared.stat().st_uid == 0  # anyone may create files in it already
    assert {p.stat().st_uid for p in [var, *var.rglob("*")]} == {nobody}
