"""The load a fault lands in: writers whose every acknowledged write is recorded (creates, updates
and deletes of tasks, comments), readers of entities, lists and project stats, and optionally
the benchmark's wrk mixed load beside them. Nothing is retried: a write that got no answer (or a
5xx) is recorded as uncertain, its effect may or may not be in the database."""

from __future__ import annotations

import http.client
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import orjson

from bench.load import Load, Result, parse_wrk, wrk_command
from bench.seed import Dataset, OrgInfo, ProjectInfo

STATUSES = ("TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED")
PRIORITIES = ("LOW", "MEDIUM", "HIGH", "URGENT")
FIELDS = ("title", "status", "priority", "assignee_id")
# A connection idle longer than this is replaced before use: gunicorn closes idle keep-alive
# connections after 2 s, and a request sent as it closes gets no answer (a client-side race that
# would count as an unanswered write).
IDLE_REUSE = 1.0
UNANSWERED_PAUSE = 0.2  # a refused connection answers at once: no spinning while the API is down


class NoAnswer(Exception):
    """The request got no HTTP answer (refused, reset, timed out)."""


class Http:
    """One keep-alive connection; never retries (the caller decides what a lost answer means)."""

    def __init__(self, base_port: int, token: str | None = None, timeout: float = 30.0) -> None:
        self.port = base_port
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.conn: http.client.HTTPConnection | None = None
        self.used = 0.0

    def reusable(self) -> bool:
        return self.conn is not None and time.monotonic() - self.used <= IDLE_REUSE

    def connect(self) -> http.client.HTTPConnection:
        if self.conn is not None and not self.reusable():
            self.close()  # gunicorn may be closing it right now (keep-alive timeout, 2 s)
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.conn.connect()
        return self.conn

    def local_port(self) -> int | None:
        sock = self.conn.sock if self.conn is not None else None
        return sock.getsockname()[1] if sock is not None else None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            conn = self.connect()
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            self.used = time.monotonic()
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            raise NoAnswer(f"{method} {path}: {exc!r}") from exc
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        ctype = resp.getheader("Content-Type", "")
        payload = orjson.loads(raw) if raw and "json" in ctype else raw.decode(errors="replace")
        return resp.status, payload

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class TrackedTask:
    id: str
    project_id: str
    org_id: str
    acked: dict  # the fields as the last acknowledged write left them
    maybe: list[dict] = field(default_factory=list)  # unanswered writes after it
    deleted: bool = False
    maybe_deleted: bool = False
    comments: list[str] = field(default_factory=list)


@dataclass
class Counters:
    writes_sent: int = 0
    writes_acked: int = 0
    writes_unanswered: int = 0
    reads: int = 0
    reads_unanswered: int = 0
    status_5xx: int = 0
    status_4xx: int = 0
    crashed: list[str] = field(default_factory=list)  # load threads that died: a harness bug
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 8:
            self.examples.append(text)


class Ledger:
    """Every write the writers sent, and what each answer proves about the database."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, TrackedTask] = {}
        self.counters = Counters()

    def live_tasks(self) -> list[TrackedTask]:
        with self.lock:
            return [t for t in self.tasks.values() if not t.deleted]

    def answer(self, status: int, what: str, payload: object) -> None:
        with self.lock:
            c = self.counters
            if status >= 500:
                c.status_5xx += 1
                c.note(f"{what}: {status} {str(payload)[:200]}")
            elif status >= 400:
                c.status_4xx += 1
                c.note(f"{what}: {status} {str(payload)[:200]}")


class Writer(threading.Thread):
    """Creates tasks in its organization's projects, then updates, comments on and deletes only
    its own tasks: the last acknowledged state of each is known exactly."""

    def __init__(self, n: int, port: int, token: str, org: OrgInfo,
                 projects: list[ProjectInfo], ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(name=f"writer-{n}", daemon=True)
        self.n = n
        self.http = Http(port, token)
        self.org = org
        self.projects = projects
        self.ledger = ledger
        self.stop_flag = stop
        self.rng = random.Random(1000 + n)
        self.own: list[TrackedTask] = []
        self.seq = 0

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                self.one()
        except Exception as exc:
            with self.ledger.lock:
                self.ledger.counters.crashed.append(f"{self.name}: {exc!r}")
        finally:
            self.http.close()

    def fields(self) -> dict:
        self.seq += 1
        assignee = self.rng.choice(self.org.user_ids) if self.rng.random() < 0.6 else None
        return {"title": f"w{self.n}-{self.seq}", "status": self.rng.choice(STATUSES),
                "priority": self.rng.choice(PRIORITIES), "assignee_id": assignee}

    def send(self, method: str, path: str, body: dict | None) -> tuple[int, object] | None:
        c = self.ledger.counters
        with self.ledger.lock:
            c.writes_sent += 1
        try:
            status, payload = self.http.request(method, path, body)
        except NoAnswer as exc:
            with self.ledger.lock:
                c.writes_unanswered += 1
                c.note(str(exc)[:200])
            time.sleep(UNANSWERED_PAUSE)
            return None
        self.ledger.answer(status, f"{method} {path}", payload)
        if 200 <= status < 300:
            with self.ledger.lock:
                c.writes_acked += 1
        return status, payload

    def one(self) -> None:
        live = [t for t in self.own if not t.deleted and not t.maybe_deleted]
        roll = self.rng.random()
        if len(live) < 3 or roll < 0.3:
            self.create()
        elif roll < 0.7:
            self.update(self.rng.choice(live))
        elif roll < 0.9:
            self.comment(self.rng.choice(live))
        else:
            self.delete(self.rng.choice(live))

    def create(self) -> None:
        project = self.rng.choice(self.projects)
        body = self.fields()
        answer = self.send("POST", f"/api/projects/{project.id}/tasks", body)
        if answer is None or answer[0] >= 500:
            return  # an unanswered create left no id to track; the database decides
        status, payload = answer
        if status == 201:
            task = TrackedTask(payload["id"], project.id, self.org.id, body)
            self.own.append(task)
            with self.ledger.lock:
                self.ledger.tasks[task.id] = task

    def update(self, task: TrackedTask) -> None:
        change = self.fields()
        if self.rng.random() < 0.6:  # most updates leave the assignee alone
            change.pop("assignee_id")
        answer = self.send("PATCH", f"/api/tasks/{task.id}", change)
        with self.ledger.lock:
            if answer is not None and answer[0] == 200:
                task.acked = {**task.acked, **change}
                task.maybe = []
            elif answer is None or answer[0] >= 500:
                task.maybe.append(change)

    def comment(self, task: TrackedTask) -> None:
        answer = self.send("POST", f"/api/tasks/{task.id}/comments",
                           {"body": f"comment by writer {self.n}"})
        if answer is not None and answer[0] == 201:
            with self.ledger.lock:
                task.comments.append(answer[1]["id"])

    def delete(self, task: TrackedTask) -> None:
        answer = self.send("DELETE", f"/api/tasks/{task.id}", None)
        with self.ledger.lock:
            if answer is not None and answer[0] == 204:
                task.deleted = True
            elif answer is None or answer[0] >= 500:
                task.maybe_deleted = True


class Reader(threading.Thread):
    """Reads what the writers wrote and what was seeded: tasks, project task lists, comments and
    project stats. Only the status codes count here; contents are checked after the fault."""

    def __init__(self, n: int, port: int, tokens: dict[str, str], data: Dataset,
                 ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(name=f"reader-{n}", daemon=True)
        self.clients = {org: Http(port, tok) for org, tok in tokens.items()}
        self.projects = [p for p in data.projects if p.sample_task_ids]
        self.ledger = ledger
        self.stop_flag = stop
        self.rng = random.Random(2000 + n)

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                self.one()
        except Exception as exc:
            with self.ledger.lock:
                self.ledger.counters.crashed.append(f"{self.name}: {exc!r}")
        finally:
            for client in self.clients.values():
                client.close()

    def one(self) -> None:
        project = self.rng.choice(self.projects)
        roll = self.rng.random()
        tracked = [t for t in self.ledger.live_tasks() if t.org_id == project.org_id]
        if roll < 0.35:
            path = f"/api/projects/{project.id}/stats"
        elif roll < 0.5:
            path = f"/api/projects/{project.id}/tasks?limit=50"
        elif roll < 0.6:
            path = f"/api/projects/{project.id}"
        elif roll < 0.85 and tracked:
            path = f"/api/tasks/{self.rng.choice(tracked).id}"
        elif tracked:
            path = f"/api/tasks/{self.rng.choice(tracked).id}/comments"
        else:
            path = f"/api/tasks/{self.rng.choice(project.sample_task_ids)}"
        c = self.ledger.counters
        try:
            status, payload = self.clients[project.org_id].request("GET", path)
        except NoAnswer as exc:
            with self.ledger.lock:
                c.reads += 1
                c.reads_unanswered += 1
                c.note(str(exc)[:200])
            time.sleep(UNANSWERED_PAUSE)
            return
        with self.ledger.lock:
            c.reads += 1
        if status != 404:  # a task deleted meanwhile is a right answer
            self.ledger.answer(status, f"GET {path}", payload)


class BackgroundWrk:
    """The benchmark's mixed workload (bench/lua/mixed.lua) until stopped (SIGINT makes wrk
    print its summary)."""

    def __init__(self, load: Load, base: str, plan: str, seed: str = "3") -> None:
        command = wrk_command(load, base + "/", "mixed.lua", plan, seed, seconds=86_400)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True)

    def stop(self) -> Result:
        self.process.send_signal(signal.SIGINT)
        try:
            out, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        return parse_wrk(self.process.returncode, out, err)


class Workload:
    """Writers and readers (and wrk when given) over one stack, started and stopped together."""

    def __init__(self, port: int, data: Dataset, tokens: dict[str, str], *, writers: int = 3,
                 readers: int = 3, wrk_load: Load | None = None, plan: str | None = None) -> None:
        self.ledger = Ledger()
        self.stop_flag = threading.Event()
        self.port = port
        by_org: dict[str, list[ProjectInfo]] = {}
        for p in data.projects:
            if p.tasks:
                by_org.setdefault(p.org_id, []).append(p)
        orgs = [o for o in data.orgs if o.id in by_org]
        self.threads: list[threading.Thread] = [
            Writer(n, port, tokens[orgs[n % len(orgs)].id], orgs[n % len(orgs)],
                   by_org[orgs[n % len(orgs)].id], self.ledger, self.stop_flag)
            for n in range(writers)]
        self.threads += [Reader(n, port, tokens, data, self.ledger, self.stop_flag)
                         for n in range(readers)]
        self.wrk_load, self.plan = wrk_load, plan
        self.wrk: BackgroundWrk | None = None
        self.wrk_result: Result | None = None
        self.wrk_error: str | None = None

    def start(self) -> "Workload":
        for t in self.threads:
            t.start()
        if self.wrk_load is not None and self.plan is not None:
            self.wrk = BackgroundWrk(self.wrk_load, f"http://127.0.0.1:{self.port}", self.plan)
        return self

    def stop(self) -> None:
        """Stop sending; every write in flight gets its answer (or its timeout) first."""
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=60)
        if self.wrk is not None:
            try:
                self.wrk_result = self.wrk.stop()
            except Exception as exc:  # reported in the row: wrk's own failure is not the API's
                self.wrk_error = str(exc)[:300]

    def wrk_5xx(self) -> int:
        return int((self.wrk_result.counters or {}).get("s5xx", 0)) if self.wrk_result else 0
