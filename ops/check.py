"""`python -m ops.check` (`make ops-check`): the Grafana dashboard and the alert rules against a
real Prometheus scraping a running stack.

Starts two private redis-servers (the cache with a maxmemory, the broker), the stack as `make up`
does (`python -m stack.up`: API, worker, beat, Flower) on free ports and a fresh SQLite database
(or --database, e.g. an empty MariaDB database), Debian's Prometheus scraping the API's /metrics
and the worker's metrics port every second with ops/prometheus/taskcache.rules.yml loaded, and
drives traffic (two organizations reading and writing). Then every expression of every panel in
ops/grafana/dashboards/taskcache.json must return data, and every rule must evaluate without
error. Prints a table; exits non-zero on any failure. Stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from ops.tools import ToolMissing, ensure_binary
from stack.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "taskcache.json"
RULES = ROOT / "ops" / "prometheus" / "taskcache.rules.yml"
PROMETHEUS_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"


def log(message: str) -> None:
    print(f"[ops-check] {message}", flush=True)


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, rows included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


class Prometheus:
    def __init__(self, binary: str, work: Path, api_port: int, worker_port: int) -> None:
        self.port = free_port()
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        targets = {"taskcache-api": api_port, "taskcache-worker": worker_port}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
        path = work / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = work / "prometheus.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [binary, f"--config.file={path}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["data"]["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + self.log_path.read_text()[-2000:])
            try:
                self.api("status/buildinfo")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prometheus did not answer in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Traffic(threading.Thread):
    """Two organizations reading what clients read and writing now and then (5 % writes)."""

    def __init__(self, base: str) -> None:
        super().__init__(name="ops-traffic", daemon=True)
        self.base = base
        self.stop_flag = threading.Event()
        self.requests = 0
        self.errors: list[str] = []

    def run(self) -> None:
        from bench.probes import Client

        try:
            actors = [self._organization(Client(self.base), f"Ops {i}") for i in range(2)]
            n = 0
            while not self.stop_flag.is_set():
                for client, projects, tasks in actors:
                    n += 1
                    project, task = projects[n % len(projects)], tasks[n % len(tasks)]
                    if n % 20 == 0:
                        self._ok(client.request("PATCH", f"/api/tasks/{task}", {
                            "status": ["TODO", "IN_PROGRESS", "COMPLETED"][n % 3]}))
                        continue
                    for path in (f"/api/projects/{project}", f"/api/projects/{project}/stats",
                                 f"/api/projects/{project}/tasks?limit=20", f"/api/tasks/{task}",
                                 "/api/orgs/current", "/api/users", "/api/projects",
                                 "/api/me/notifications/unread-count",
                                 "/api/public/feature-flags"):
                        self._ok(client.get(path))
                time.sleep(0.02)  # a steady trickle, not a benchmark: the machine is shared
        except Exception as exc:
            self.errors.append(repr(exc))

    def _ok(self, answer) -> dict:
        status, body, _ = answer
        self.requests += 1
        if status >= 400:
            self.errors.append(f"{status}: {str(body)[:200]}")
        return body

    def _organization(self, client, name: str):
        signed = self._ok(client.request("POST", "/api/orgs", {
            "organization_name": name, "email": f"{secrets.token_hex(6)}@example.com",
            "password": "correct horse battery", "display_name": "Ops"}))
        client.headers = {"Authorization": f"Bearer {signed['access_token']}"}
        projects, tasks = [], []
        for p in range(3):
            project = self._ok(client.request("POST", "/api/projects", {"name": f"P{p}"}))["id"]
            projects.append(project)
            for t in range(4):
                tasks.append(self._ok(client.request(
                    "POST", f"/api/projects/{project}/tasks",
                    {"title": f"t{t}", "assignee_id": signed["user"]["id"]}))["id"])
        return client, projects, tasks


def check(prom: Prometheus, queries: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    return [(title, expr, len(prom.query(expr))) for title, expr in queries]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.check", description=__doc__.split("\n")[0])
    parser.add_argument("--database", help="an empty database URL (default: a fresh SQLite file)")
    parser.add_argument("--seconds", type=float, default=30.0, help="traffic before checking")
    parser.add_argument("--wait", type=float, default=90.0,
                        help="how long every panel may take to have data after that")
    args = parser.parse_args(argv)
    from bench.stack import Stack, StackFailed

    try:
        binary = ensure_binary("prometheus", "prometheus")
    except ToolMissing as exc:
        log(str(exc))
        return 2
    work = Path(tempfile.mkdtemp(prefix="taskcache-ops-check-"))
    cache = RedisServer.start(maxmemory_policy="allkeys-lru", extra_args=("--maxmemory", "64mb"))
    broker = RedisServer.start(maxmemory_policy="noeviction")
    stack = prom = traffic = None
    try:
        worker_port = free_port()
        env = {"DATABASE_URL": args.database or f"sqlite:///{work / 'ops.db'}",
               "REDIS_URL": cache.url_for(0), "CELERY_BROKER_URL": broker.url_for(0),
               "SECRET_KEY": secrets.token_urlsafe(32), "WEB_PORT": str(free_port()),
               "FLOWER_PORT": str(free_port()), "FLOWER_BASIC_AUTH": f"ops:{secrets.token_hex(8)}",
               "WORKER_METRICS_PORT": str(worker_port), "STACK_VAR_DIR": str(work / "var"),
               "WORKER_PROMETHEUS_DIR": str(work / "worker-metrics"),
               "PASSWORD_HASH_MEMORY_KIB": "8192", "WEB_CONCURRENCY": "2",
               # Beat's jobs often enough to be seen within the check.
               "CACHE_AUDIT_INTERVAL": "3", "TENANT_MEMORY_INTERVAL": "3",
               "OUTBOX_SWEEP_INTERVAL": "2", "WARMUP_INTERVAL": "10",
               # Refreshes ahead of expiry within seconds of a value's storing, not in the last
               # quarter of a TTL that outlasts the check.
               "CACHE_REFRESH_AHEAD": "0.95"}
        stack = Stack("ops-check", env, with_workers=True, log_path=work / "stack.log").start()
        prom = Prometheus(binary, work, stack.port, worker_port)
        prom.wait_ready()
        log(f"stack on {stack.base}, worker metrics :{worker_port}, prometheus :{prom.port}")
        traffic = Traffic(stack.base)
        traffic.start()
        time.sleep(args.seconds)
        queries = panel_queries(json.loads(DASHBOARD.read_text()))
        deadline = time.monotonic() + args.wait
        while True:
            results = check(prom, queries)
            empty = [r for r in results if r[2] == 0]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(3)
        traffic.stop_flag.set()
        traffic.join(timeout=30)
        rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        firing = sorted({r["name"] for r in rules if r.get("state") in ("firing", "pending")})
        width = max(len(t) for t, _, _ in results)
        print(f"\n{'panel':<{width}}  series  expression")
        for title, expr, n in results:
            print(f"{title:<{width}}  {n:>6}  {expr[:90]}")
        print(f"\n{len(results) - len(empty)}/{len(results)} panel expressions return data; "
              f"{len(rules) - len(broken)}/{len(rules)} rules evaluate; traffic "
              f"{traffic.requests} requests, {len(traffic.errors)} errors; alerts pending or "
              f"firing: {', '.join(firing) or 'none'}")
        for name, error in broken:
            print(f"rule {name}: {error}")
        if traffic.errors:
            print("traffic errors:", traffic.errors[:5])
        return 0 if not empty and not broken and not traffic.errors else 1
    except StackFailed as exc:
        log(f"the stack did not start: {exc}")
        return 1
    finally:
        if traffic is not None:
            traffic.stop_flag.set()
        if prom is not None:
            prom.stop()
        if stack is not None:
            stack.stop()
        broker.stop()
        cache.stop()
        if os.environ.get("OPS_CHECK_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
