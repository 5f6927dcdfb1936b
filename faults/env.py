"""What a fault run stands on: its own database (a uniquely named MariaDB database, dropped at the
end, or a SQLite file), a cache redis-server (allkeys-lru under a maxmemory, as a cache should
run) and a broker redis-server (noeviction), both on free ports, a small seeded dataset, and the
stack started by `python -m stack.up` (bench/stack.py) with several API processes."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from sqlalchemy import Engine, create_engine, text

from bench.run import make_token
from bench.seed import Dataset, Size, seed
from bench.stack import Stack
from stack.redis_server import RedisServer, free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = PROJECT_ROOT / "var" / "faults"
MARIADB_ADMIN_URL = os.environ.get("FAULTS_MARIADB_URL",
                                   os.environ.get("TEST_MARIADB_URL",
                                                  "mysql+pymysql://root@127.0.0.1:3306"))
TOKEN_TTL = 86_400
CACHE_MAXMEMORY = "64mb"
WEB_PROCESSES = 3
WORKER_POOL = 2  # stack/up.py starts the Celery worker with --concurrency 2
PROCESS_TREE_TIMEOUT = 90.0

# Small enough to read back whole through every API process after each fault.
FAULTS_SIZE = Size(orgs=2, users=12, projects=6, tasks_per_project=40, comments_per_task=0.5,
                   big_tasks=0, big_comments=0)


@dataclass
class Proc:
    role: str
    pid: int


@dataclass
class Tree:
    """The stack's processes by role, as psutil sees them under the supervisor."""

    supervisor_alive: bool
    procs: list[Proc] = field(default_factory=list)

    def pids(self, role: str) -> list[int]:
        return sorted(p.pid for p in self.procs if p.role == role)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.procs:
            out[p.role] = out.get(p.role, 0) + 1
        return out


def expected_roles(with_workers: bool = True) -> dict[str, int]:
    roles = {"web": 1, "web-worker": WEB_PROCESSES}
    if with_workers:
        roles.update({"worker": 1, "worker-pool": WORKER_POOL, "beat": 1, "flower": 1})
    return roles


def _role(cmdline: list[str]) -> str:
    joined = " ".join(cmdline)
    if "gunicorn" in joined:
        return "web"
    if " flower" in joined or "worker.flower" in joined:  # `celery flower`, `-m worker.flower`
        return "flower"
    if " beat" in joined:
        return "beat"
    if " worker" in joined:
        return "worker"
    return "other"


def process_tree(supervisor_pid: int) -> Tree:
    try:
        sup = psutil.Process(supervisor_pid)
        if sup.status() == psutil.STATUS_ZOMBIE:
            return Tree(False)
        children = sup.children()
    except psutil.NoSuchProcess:
        return Tree(False)
    procs: list[Proc] = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            role = _role(child.cmdline())
            procs.append(Proc(role, child.pid))
            sub = "web-worker" if role == "web" else f"{role}-pool"
            procs += [Proc(sub, g.pid) for g in child.children(recursive=True)
                      if g.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            continue
    return Tree(True, procs)


def tree_complete(tree: Tree, with_workers: bool = True) -> bool:
    counts = tree.counts()
    return tree.supervisor_alive and all(counts.get(role, 0) >= n
                                         for role, n in expected_roles(with_workers).items())


def missing_roles(tree: Tree, with_workers: bool = True) -> list[str]:
    if not tree.supervisor_alive:
        return ["supervisor"]
    counts = tree.counts()
    return [f"{role} ({counts.get(role, 0)}/{n})" for role, n in
            expected_roles(with_workers).items() if counts.get(role, 0) < n]


def processes_of_run(marker: str) -> list[int]:
    """Every live process whose environment carries this run's STACK_VAR_DIR: what is left of a
    stack after it stopped (orphans) shows up here."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("STACK_VAR_DIR") == marker and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Environment:
    """Database, two Redis servers, the seeded dataset; stacks are started on it on demand."""

    def __init__(self, backend: str = "mariadb", size: Size = FAULTS_SIZE,
                 log=print, cache_maxmemory: str = CACHE_MAXMEMORY) -> None:
        self.backend = backend
        self.size = size
        self.log = log
        self.cache_maxmemory = cache_maxmemory
        self.run_id = f"{dt.datetime.now():%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
        self.work = Path(tempfile.mkdtemp(prefix="taskcache-faults-"))
        self.secret = secrets.token_urlsafe(32)
        self.flower_auth = f"faults:{secrets.token_urlsafe(12)}"
        self.db_name = f"taskcache_faults_{self.run_id}"
        self.cache: RedisServer | None = None
        self.broker: RedisServer | None = None
        self.engine: Engine | None = None
        self.admin: Engine | None = None
        self.data: Dataset | None = None
        self.tokens: dict[str, str] = {}
        self.db_version = "SQLite"
        self.stacks = 0

    # -- set up and tear down ---------------------------------------------------------------------
    def setup(self) -> "Environment":
        from db.migrations import upgrade
        from services.auth import hash_password

        if self.backend == "mariadb":
            self.admin = create_engine(MARIADB_ADMIN_URL)
            with self.admin.connect() as conn:
                self.db_version = conn.execute(text("SELECT VERSION()")).scalar()
                conn.execute(text(f"CREATE DATABASE `{self.db_name}` CHARACTER SET utf8mb4"))
            self.db_url = f"{MARIADB_ADMIN_URL}/{self.db_name}"
            self.log(f"database {self.db_name} created (MariaDB {self.db_version})")
        else:
            self.db_url = f"sqlite:///{self.work / 'faults.db'}"
            self.log(f"database {self.db_url}")
        self.cache = RedisServer.start(maxmemory_policy="allkeys-lru",
                                       extra_args=["--maxmemory", self.cache_maxmemory])
        self.broker = RedisServer.start(maxmemory_policy="noeviction")
        self.log(f"cache redis-server on port {self.cache.port} (allkeys-lru, maxmemory "
                 f"{self.cache_maxmemory}), broker redis-server on port {self.broker.port}")
        upgrade(self.db_url)
        # pre-ping: the MariaDB fault kills this database's connections, the harness's idle ones too
        self.engine = create_engine(self.db_url, pool_pre_ping=True)
        self.data = seed(self.engine, self.size, hash_password(secrets.token_urlsafe(12)),
                         session_ttl=TOKEN_TTL)
        self.tokens = {o.id: make_token(self.secret, o) for o in self.data.orgs}
        return self

    def close(self) -> None:
        if self.cache is not None:
            self.cache.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.engine is not None:
            self.engine.dispose()
        if self.admin is not None:
            try:
                with self.admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS `{self.db_name}`"))
                self.log(f"dropped database {self.db_name}")
            except Exception as exc:  # reported: a leftover database is worth a line
                self.log(f"could not drop {self.db_name}: {exc}")
            self.admin.dispose()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> "Environment":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the stack --------------------------------------------------------------------------------
    def stack_env(self, var_dir: Path) -> dict[str, str]:
        return {"DATABASE_URL": self.db_url, "REDIS_URL": self.cache.url_for(0),
                "CELERY_BROKER_URL": self.broker.url_for(0), "SECRET_KEY": self.secret,
                "WEB_PORT": str(free_port()), "FLOWER_PORT": str(free_port()),
                "FLOWER_BASIC_AUTH": self.flower_auth, "ACCESS_TOKEN_TTL": str(TOKEN_TTL),
                "STACK_VAR_DIR": str(var_dir), "PASSWORD_HASH_MEMORY_KIB": "8192",
                "WORKER_METRICS_PORT": str(free_port()), "WEB_CONCURRENCY": str(WEB_PROCESSES),
                "WORKER_PROMETHEUS_DIR": str(var_dir / "worker-metrics")}

    def start_stack(self, name: str) -> Stack:
        """`python -m stack.up`, then wait until every process of the stack runs."""
        self.stacks += 1
        var_dir = self.work / f"stack-{self.stacks}"
        stack = Stack(f"{name} stack", self.stack_env(var_dir), with_workers=True,
                      log_path=LOG_DIR / f"{name}.log")
        stack.start()
        deadline = time.monotonic() + PROCESS_TREE_TIMEOUT
        while not tree_complete(process_tree(stack.process.pid)):
            if time.monotonic() > deadline or not stack.alive():
                missing = missing_roles(process_tree(stack.process.pid))
                stack.stop()
                raise RuntimeError(f"{name}: stack incomplete ({', '.join(missing)}):\n"
                                   f"{stack.log_tail()}")
            time.sleep(0.25)
        return stack

    def stop_stack(self, stack: Stack) -> list[int]:
        """Stop it; return the pids of its processes still alive 10 s later (orphans)."""
        stack.stop()
        marker = stack.env["STACK_VAR_DIR"]
        deadline = time.monotonic() + 10
        left = processes_of_run(marker)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = processes_of_run(marker)
        for pid in left:  # ours: the run's own marker is in their environment
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        return left
