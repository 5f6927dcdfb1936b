"""The benchmark's dataset, bulk-inserted into the benchmark's own database.

Rows go in with Core `insert()` executemany in large batches (SQLAlchemy sends them as multi-row
VALUES), one transaction per batch, foreign-key and unique checks off for this session only.
Ids are valid lower-case UUID strings with an increasing prefix, so InnoDB appends to its
clustered index instead of splitting random pages: the same shape as the API's ids for every
reader, an order of magnitude faster to load.

`stats_seq` is 0 on every project and user: no numbered change has happened yet, so the first
recount (the counts and `stats_seq` read in one statement) is exact, and every delta the
benchmark's writes carry is numbered from 1 on.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine, insert, text

from bench.progress import Progress
from models import AuthSession, Comment, Organization, Project, Task, User

STATUSES = (("TODO", 0.40), ("IN_PROGRESS", 0.20), ("BLOCKED", 0.05), ("COMPLETED", 0.35))
PRIORITIES = ("LOW", "MEDIUM", "HIGH", "URGENT")
BATCH = 5_000
# Table codes keep the ids of different tables apart.
ORG, USER, SESSION, PROJECT, TASK, COMMENT = 1, 2, 3, 4, 5, 6
SAMPLE_TASKS = 32  # tasks per project the load generator reads and writes


@dataclass(frozen=True)
class Size:
    orgs: int
    users: int
    projects: int
    tasks_per_project: int
    comments_per_task: float
    big_tasks: int
    big_comments: int

    @property
    def total_tasks(self) -> int:
        # +1: the freshness probe's project, the same size as the others
        return (self.projects + 1) * self.tasks_per_project + self.big_tasks

    @property
    def total_comments(self) -> int:
        small = int((self.projects + 1) * self.tasks_per_project * self.comments_per_task)
        return small + self.big_comments


FULL = Size(orgs=10, users=3_000, projects=500, tasks_per_project=1_000, comments_per_task=0.5,
            big_tasks=200_000, big_comments=400_000)
QUICK = Size(orgs=4, users=400, projects=60, tasks_per_project=200, comments_per_task=0.5,
             big_tasks=20_000, big_comments=40_000)


@dataclass
class OrgInfo:
    id: str
    admin_id: str
    session_id: str
    user_ids: list[str] = field(default_factory=list)


@dataclass
class ProjectInfo:
    id: str
    org_id: str
    tasks: int
    sample_task_ids: list[str]


@dataclass
class Dataset:
    orgs: list[OrgInfo]
    projects: list[ProjectInfo]  # the Zipf population: every project but the probe's
    small: ProjectInfo  # a ~typical project, for the side-by-side stats measurements
    big: ProjectInfo
    probe: ProjectInfo  # written only by the freshness probe
    rows: dict[str, int]
    seconds: float

    def org(self, org_id: str) -> OrgInfo:
        return next(o for o in self.orgs if o.id == org_id)


def make_id(table: int, n: int) -> str:
    return f"{table:02x}{(n >> 48) & 0xFFFFFF:06x}-0000-4000-8000-{n & 0xFFFFFFFFFFFF:012x}"


class _Writer:
    """Batches rows per table and inserts them; reports progress on one line."""

    def __init__(self, engine: Engine, progress: Progress) -> None:
        self.engine = engine
        self.progress = progress
        self.pending: dict[object, list[dict]] = {}
        self.counts: dict[str, int] = {}

    def add(self, model, row: dict) -> None:
        rows = self.pending.setdefault(model, [])
        rows.append(row)
        if len(rows) >= BATCH:
            self.flush(model)

    def flush(self, model=None) -> None:
        for m in ([model] if model is not None else list(self.pending)):
            rows = self.pending.get(m)
            if not rows:
                continue
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "mysql":
                    conn.exec_driver_sql("SET SESSION foreign_key_checks=0")
                    conn.exec_driver_sql("SET SESSION unique_checks=0")
                conn.execute(insert(m.__table__), rows)
            name = m.__tablename__
            self.counts[name] = self.counts.get(name, 0) + len(rows)
            self.progress.advance(len(rows))
            self.pending[m] = []


def seed(engine: Engine, size: Size, password_hash: str, *, seed_value: int = 5,
         session_ttl: int = 86_400) -> Dataset:
    rng = random.Random(seed_value)
    started = time.monotonic()
    total = (size.orgs * 2 + size.users + size.projects + 2 + size.total_tasks
             + size.total_comments)
    progress = Progress("seeding", total)
    writer = _Writer(engine, progress)
    base = dt.datetime(2025, 1, 1)
    clock = [0]

    def stamp() -> dt.datetime:
        clock[0] += 1
        return base + dt.timedelta(microseconds=clock[0] * 37)

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    orgs: list[OrgInfo] = []
    for i in range(size.orgs):
        org_id = make_id(ORG, i)
        writer.add(Organization, {"id": org_id, "name": f"Bench Org {i}",
                                  "slug": f"bench-org-{i}", "status": "ACTIVE",
                                  "created_at": stamp()})
        orgs.append(OrgInfo(org_id, admin_id="", session_id=make_id(SESSION, i)))
    writer.flush()
    for n in range(size.users):
        org = orgs[n % size.orgs]
        user_id = make_id(USER, n)
        admin = not org.user_ids
        writer.add(User, {"id": user_id, "organization_id": org.id,
                          "email": f"user{n}@bench.example", "password_hash": password_hash,
                          "display_name": f"User {n}", "avatar_url": None,
                          "roles": ["admin"] if admin else ["member"], "stats_seq": 0,
                          "created_at": stamp()})
        if admin:
            org.admin_id = user_id
        org.user_ids.append(user_id)
    writer.flush()
    for org in orgs:
        writer.add(AuthSession, {"id": org.session_id, "user_id": org.admin_id,
                                 "organization_id": org.id, "created_at": now,
                                 "expires_at": now + dt.timedelta(seconds=session_ttl),
                                 "revoked_at": None})
    writer.flush()

    counters = {"project": 0, "task": 0, "comment": 0}

    def project(org: OrgInfo, tasks: int, comments: int) -> ProjectInfo:
        pid = make_id(PROJECT, counters["project"])
        counters["project"] += 1
        at = stamp()
        writer.add(Project, {"id": pid, "organization_id": org.id,
                             "name": f"Project {counters['project']}",
                             "description": "A benchmark project.", "status": "ACTIVE",
                             "owner_id": org.admin_id, "stats_seq": 0, "created_at": at,
                             "updated_at": at})
        writer.flush(Project)
        first_task = counters["task"]
        for _ in range(tasks):
            tid = make_id(TASK, counters["task"])
            counters["task"] += 1
            at = stamp()
            status = rng.choices([s for s, _ in STATUSES], [w for _, w in STATUSES])[0]
            writer.add(Task, {
                "id": tid, "organization_id": org.id, "project_id": pid,
                "title": f"Task {counters['task']}",
                "description": "Benchmark task: steps, acceptance criteria and a few notes.",
                "status": status, "priority": rng.choice(PRIORITIES),
                "assignee_id": rng.choice(org.user_ids) if rng.random() < 0.7 else None,
                "due_date": (base + dt.timedelta(days=rng.randrange(365))).date()
                if rng.random() < 0.3 else None,
                "created_at": at, "updated_at": at})
        for _ in range(comments):
            cid = make_id(COMMENT, counters["comment"])
            counters["comment"] += 1
            task_n = first_task + rng.randrange(tasks)
            writer.add(Comment, {"id": cid, "task_id": make_id(TASK, task_n), "project_id": pid,
                                 "author_id": rng.choice(org.user_ids),
                                 "body": "Looks good; one question about the edge cases.",
                                 "created_at": stamp()})
        sample = sorted(rng.sample(range(first_task, first_task + tasks),
                                   min(SAMPLE_TASKS, tasks)))
        return ProjectInfo(pid, org.id, tasks, [make_id(TASK, n) for n in sample])

    per_project_comments = int(size.tasks_per_project * size.comments_per_task)
    projects = []
    big = project(orgs[0], size.big_tasks, size.big_comments)
    projects.append(big)
    for i in range(size.projects):
        projects.append(project(orgs[i % size.orgs], size.tasks_per_project,
                                per_project_comments))
    probe = project(orgs[0], size.tasks_per_project, per_project_comments)
    writer.flush()
    progress.done()
    with engine.begin() as conn:
        for table in ("organizations", "users", "sessions", "projects", "tasks", "comments"):
            # SQLite (the fault suite's second backend) spells it without TABLE
            keyword = "ANALYZE TABLE" if engine.dialect.name == "mysql" else "ANALYZE"
            conn.execute(text(f"{keyword} {table}"))
    small = next(p for p in projects[1:] if p.org_id == orgs[0].id)
    return Dataset(orgs, projects, small, big, probe, dict(writer.counts),
                   time.monotonic() - started)
