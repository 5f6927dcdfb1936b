"""`python -m bench [--quick] [--keep]`: seed, start the stack twice (cache on, cache off), load it
with wrk, and publish every number as a ratio to a baseline measured in the same run."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt
import redis
from sqlalchemy import create_engine, func, select, text

from bench import cpu, probes, report
from bench.load import Load, LoadFailed, Result, wrk
from bench.progress import log
from bench.seed import FULL, QUICK, Dataset, seed
from bench.stack import Stack, StackFailed, workers_available
from bench.tools import ToolMissing, ensure_redis_server, ensure_wrk, machine
from stack.redis_server import RedisServer, free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT_ROOT / "bench" / "results"
LOG_DIR = PROJECT_ROOT / "var" / "bench"  # the stacks' logs of the last run
# The cheapest read that touches the cache: one per-process copy, no token to check.
FLOOR_PATH = "/api/public/feature-flags"
# The cheapest authenticated read: the token, the session and one copy, all in the process.
AUTH_FLOOR_PATH = "/api/orgs/current"
MARIADB_ADMIN_URL = os.environ.get("BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306")
TOKEN_TTL = 86_400
ZIPF_S = 1.1
WRITE_SHARE = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small dataset and short runs (under 2 minutes on 2 cores)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the benchmark's database (dropped by default)")
    parser.add_argument("--seconds", type=float, help="length of each measurement")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--no-workers", action="store_true",
                        help="start the API without the Celery worker, beat and Flower")
    parser.add_argument("--no-topology", action="store_true",
                        help="skip the `make up-cluster` phase")
    parser.add_argument("--topology-only", action="store_true",
                        help="only the `make up-cluster` phase (bench/results/topology.json; "
                             "BENCHMARKS.md untouched)")
    parser.add_argument("--no-markdown", action="store_true",
                        help="write bench/results/latest.json only, leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def make_token(secret: str, org) -> str:
    now = int(time.time())
    claims = {"sub": org.admin_id, "sid": org.session_id, "org": org.id, "iat": now,
              "exp": now + TOKEN_TTL}
    return jwt.encode(claims, secret, algorithm="HS256")


def write_plans(work: Path, data: Dataset,
                tokens: dict[str, str]) -> tuple[Path, list[tuple[str, str]]]:
    """The mixed workload's plan (projects in a shuffled popularity order) and the warm-up list."""
    import random

    rng = random.Random(11)
    ranked = list(data.projects)
    rng.shuffle(ranked)
    plan = work / "mixed.plan"
    with open(plan, "w") as fh:
        fh.write(f"zipf {ZIPF_S}\nwrite {WRITE_SHARE}\n")
        for p in ranked:
            fh.write(f"P {tokens[p.org_id]} {p.id} {','.join(p.sample_task_ids)}\n")
    sweep = []
    for p in ranked:
        tok = tokens[p.org_id]
        sweep += [(tok, f"/api/projects/{p.id}/stats"), (tok, f"/api/projects/{p.id}"),
                  (tok, f"/api/projects/{p.id}/tasks")]
        sweep += [(tok, f"/api/tasks/{t}") for t in p.sample_task_ids]
    # The freshness probe reads its project's stats and task too: warmed like the rest, or its
    # first read would be the run's only cold miss (an inline computation after the warm-up).
    probe_token = tokens[data.probe.org_id]
    sweep += [(probe_token, f"/api/projects/{data.probe.id}/stats"),
              (probe_token, f"/api/tasks/{data.probe.sample_task_ids[0]}")]
    return plan, sweep


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = QUICK if args.quick else FULL
        seconds = args.seconds or (3.0 if args.quick else 10.0)
        self.load = Load(ensure_wrk(), args.threads, args.connections, seconds)
        ensure_redis_server()
        self.run_id = f"{dt.datetime.now():%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
        self.db_name = f"taskcache_bench_{self.run_id}"
        self.work = Path(tempfile.mkdtemp(prefix="taskcache-bench-"))
        self.secret = secrets.token_urlsafe(32)
        self.flower_auth = f"bench:{secrets.token_urlsafe(12)}"
        self.results: dict = {"mode": "quick" if args.quick else "full", "run_id": self.run_id,
                              "started_at": dt.datetime.now(dt.timezone.utc).isoformat(
                                  timespec="seconds"), "notes": []}
        self.admin = create_engine(MARIADB_ADMIN_URL)
        self.redis_server: RedisServer | None = None
        self.stack: Stack | None = None

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from db.migrations import upgrade
        from services.auth import hash_password

        with self.admin.connect() as conn:
            version = conn.execute(text("SELECT VERSION()")).scalar()
            conn.execute(text(f"CREATE DATABASE `{self.db_name}` CHARACTER SET utf8mb4"))
        log(f"database {self.db_name} created (MariaDB {version})")
        self.results["machine"] = machine(version)
        self.redis_server = RedisServer.start(maxmemory_policy="noeviction")
        log(f"private redis-server on port {self.redis_server.port}")
        self.db_url = f"{MARIADB_ADMIN_URL}/{self.db_name}"
        upgrade(self.db_url)
        self.engine = create_engine(self.db_url)
        data = seed(self.engine, self.size, hash_password(secrets.token_urlsafe(12)))
        self.data = data
        log(f"seeded {sum(data.rows.values()):,} rows in {data.seconds:.1f} s: "
            + ", ".join(f"{k} {v:,}" for k, v in data.rows.items()))
        self.results["dataset"] = {"rows": data.rows, "seed_seconds": round(data.seconds, 1),
                                   "projects": len(data.projects) + 1,
                                   "tasks_per_project": self.size.tasks_per_project,
                                   "big_project_tasks": data.big.tasks,
                                   "big_project_comments": self.size.big_comments,
                                   "orgs": len(data.orgs)}
        self.tokens = {o.id: make_token(self.secret, o) for o in data.orgs}
        self.token0 = self.tokens[data.orgs[0].id]
        self.plan, self.sweep = write_plans(self.work, data, self.tokens)

    def env(self, cache: bool, name: str) -> dict[str, str]:
        return {"DATABASE_URL": self.db_url, "REDIS_URL": self.redis_server.url_for(0),
                "CELERY_BROKER_URL": self.redis_server.url_for(1), "SECRET_KEY": self.secret,
                "WEB_PORT": str(free_port()), "FLOWER_PORT": str(free_port()),
                "FLOWER_BASIC_AUTH": self.flower_auth, "CACHE_ENABLED": "1" if cache else "0",
                "ACCESS_TOKEN_TTL": str(TOKEN_TTL), "STACK_VAR_DIR": str(self.work / name),
                "PASSWORD_HASH_MEMORY_KIB": "8192", "WORKER_METRICS_PORT": str(free_port()),
                "WORKER_PROMETHEUS_DIR": str(self.work / name / "worker-metrics")}

    def start_stack(self, name: str, cache: bool, with_workers: bool) -> Stack:
        stack = Stack(name, self.env(cache, name), with_workers=with_workers,
                      log_path=LOG_DIR / f"{name}.log")
        self.stack = stack
        try:
            return stack.start()
        except StackFailed as exc:
            if not with_workers:
                raise
            log(f"{name}: the full stack did not start ({str(exc).splitlines()[0]}); "
                "falling back to --no-workers")
            self.results["notes"].append(f"{name}: the stack with workers failed to start; "
                                         "measured without workers")
            return self.start_stack(name, cache, False)

    # -- helpers ------------------------------------------------------------------------------------
    def measure(self, label: str, path: str, token: str | None = None, **kw) -> dict:
        url = self.stack.base + path
        result = wrk(self.load, url, "auth.lua", token or "", **kw)
        log(f"  {label:<34} {result.rps:9.1f} req/s  p50 {result.p50_ms:8.2f} ms  "
            f"p99 {result.p99_ms:8.2f} ms  errors {result.errors}")
        if result.errors:
            self.results["notes"].append(f"{self.stack.name} {label}: {result.errors} errors")
        return result.as_dict()

    @property
    def half_seconds(self) -> float:
        """Half a measurement, for runs taken in turns (wrk takes whole seconds only)."""
        return max(1.0, math.ceil(self.load.seconds / 2))

    def measure_against_health(self, label: str, path: str, token: str | None = None) -> dict:
        """The endpoint with /health around it, in halves: /health, the endpoint, the endpoint,
        /health. This machine's speed drifts during a run (/health itself has halved from one
        end of a run to the other); taken in this order, a drift moves both sides alike and their
        ratio holds. The endpoint's result, with the paired /health under `paired_health`."""
        half = self.half_seconds
        health = self.stack.base + "/health"
        runs = [wrk(self.load, health, "auth.lua", "", seconds=half)]
        runs += [wrk(self.load, self.stack.base + path, "auth.lua", token or "", seconds=half)
                 for _ in range(2)]
        runs.append(wrk(self.load, health, "auth.lua", "", seconds=half))
        result = Result.combined(runs[1:3])
        paired = Result.combined([runs[0], runs[3]])
        log(f"  {label:<34} {result.rps:9.1f} req/s  p50 {result.p50_ms:8.2f} ms  "
            f"p99 {result.p99_ms:8.2f} ms  errors {result.errors}  (/health around it: "
            f"{paired.rps:,.1f} req/s, ratio {result.rps / paired.rps:.2f}x)")
        if result.errors:
            self.results["notes"].append(f"{self.stack.name} {label}: {result.errors} errors")
        return {**result.as_dict(), "paired_health": paired.as_dict()}

    def warm(self, path: str, token: str) -> dict:
        """One request that fills the cache (the cold cost, reported too)."""
        client = probes.Client(self.stack.base, token)
        try:
            started = time.perf_counter()
            status, _, headers = client.get(path)
            cold = time.perf_counter() - started
            client.get(path)
            _, _, headers2 = client.get(path)
        finally:
            client.close()
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
        return {"cold_ms": round(cold * 1000, 2), "x_cache_first": headers.get("X-Cache"),
                "x_cache_warm": headers2.get("X-Cache")}

    def paths(self, project) -> dict[str, str]:
        return {"stats": f"/api/projects/{project.id}/stats",
                "project": f"/api/projects/{project.id}",
                "task": f"/api/tasks/{project.sample_task_ids[0]}",
                "list": f"/api/projects/{project.id}/tasks"}

    # -- phases -------------------------------------------------------------------------------------
    def cached_phase(self) -> dict:
        with_workers = workers_available() and not self.args.no_workers
        if not with_workers:
            why = "--no-workers" if self.args.no_workers else "worker/ or celeryconfig.py missing"
            self.results["notes"].append(f"worker pipeline not started ({why}): worker-side "
                                         "measurements are reported as unavailable")
        stack = self.start_stack("cached", True, with_workers)
        out: dict = {"workers": stack.with_workers}
        try:
            waited = self.settle(stack)
            if waited:
                log(f"cached stack: worker queues empty after {waited:.1f} s")
            small, big = self.data.small, self.data.big
            sp, bp = self.paths(small), self.paths(big)
            out["cold"] = {"stats_small": self.warm(sp["stats"], self.token0),
                           "stats_big": self.warm(bp["stats"], self.token0),
                           "task": self.warm(sp["task"], self.token0),
                           "list": self.warm(sp["list"], self.token0)}
            log("cached stack: warm single-endpoint runs")
            out["health"] = self.measure("/health", "/health")
            paired = self.measure_against_health
            out["stats_small"] = paired("stats, ~1k-task project", sp["stats"], self.token0)
            out["stats_big"] = paired("stats, big project", bp["stats"], self.token0)
            out["task"] = paired("task GET", sp["task"], self.token0)
            out["list"] = paired("task list (default page)", sp["list"], self.token0)
            # The floor of any cached read: one value from the process's own memory, no token.
            self.warm(FLOOR_PATH, "")
            out["floor"] = paired("floor: feature flags (no token)", FLOOR_PATH)
            # ... and of an authenticated one, which every read above pays on top of its own.
            self.warm(AUTH_FLOOR_PATH, self.token0)
            out["floor_authenticated"] = paired("floor: the caller's organization",
                                                AUTH_FLOOR_PATH, self.token0)
            out["health_after"] = self.measure("/health (again)", "/health")
            out["mixed"] = self.mixed()
            out["staleness"] = self.staleness(stack)
            out["burst"] = self.burst(stack)
            out["health_cache"] = probes.Client(stack.base).get("/health/cache")[1]
            out["memory"] = probes.memory_per_entry(
                redis.Redis.from_url(self.redis_server.url_for(0)))
            out["sizing"] = self.sizing()
        finally:
            stack.stop()
        return out

    def mixed(self) -> dict:
        log("cached stack: mixed workload (warm-up sweep, warm-up run, measured run + probe)")
        sweep = probes.sweep(self.stack.base, self.sweep)
        log(f"  warm-up sweep: {sweep['requests']} requests in {sweep['seconds']:.1f} s "
            f"({sweep['failed']} failed)")
        wrk(self.load, self.stack.base + "/", "mixed.lua", str(self.plan), "1",
            seconds=max(3.0, self.load.seconds / 2))
        probe_task = self.data.probe.sample_task_ids[0]
        count = 40 if self.args.quick else 150
        probe = probes.FreshnessProbe(self.stack.base, self.token0, self.data.probe.id,
                                      probe_task, count=count,
                                      interval=max(0.02, self.load.seconds * 2 / count - 0.01))
        health = self.stack.base + "/health"
        ports = {self.redis_server.port: "redis"}  # the cache's and the broker's
        commands = probes.RedisCommands(self.redis_server.url_for(0))
        with cpu.Window(ports) as health_cpu:
            health_before = wrk(self.load, health, "auth.lua", "")
        before = probes.scrape(self.stack.base)
        before_w = self.worker_metrics(self.stack)
        probe.start()
        with cpu.Window(ports) as mixed_cpu, commands.counting("mixed"):
            result = wrk(self.load, self.stack.base + "/", "mixed.lua", str(self.plan), "2",
                         seconds=self.load.seconds * 2)
        after = probes.scrape(self.stack.base)
        after_w = self.worker_metrics(self.stack)
        probe.stop_flag.set()
        probe.join(timeout=30)
        fresh = probe.report()
        rates = probes.hit_rates(before, after)
        log(f"  mixed: {result.rps:.1f} req/s  p50 {result.p50_ms:.2f} ms  p99 "
            f"{result.p99_ms:.2f} ms  hit rate {rates['overall']['hit_rate']}  "
            f"freshness p50 {fresh['p50_ms']} ms p99 {fresh['p99_ms']} ms "
            f"({fresh['samples']} probes)")
        # The same reads without the writes: what the 5% of writes cost the mixed throughput.
        reads_only = self.plan.with_name("mixed-reads.plan")
        reads_only.write_text(self.plan.read_text().replace(f"write {WRITE_SHARE}\n", "write 0\n"))
        with cpu.Window(ports) as reads_cpu, commands.counting("reads_only"):
            without_writes = wrk(self.load, self.stack.base + "/", "mixed.lua", str(reads_only),
                                 "4", seconds=self.load.seconds)
        # /health before and after both mixed runs: their ratios hold through a drifting machine.
        paired = Result.combined([health_before, wrk(self.load, health, "auth.lua", "")])
        log(f"  mixed without writes: {without_writes.rps:.1f} req/s  p99 "
            f"{without_writes.p99_ms:.2f} ms; /health around both mixed runs "
            f"{paired.rps:,.1f} req/s (mixed {result.rps / paired.rps:.2f}x, without writes "
            f"{without_writes.rps / paired.rps:.2f}x)")
        # The same probe with nothing else running: what the mechanism takes, apart from the
        # queue a write waits in on a saturated machine.
        at_rest = probes.FreshnessProbe(self.stack.base, self.token0, self.data.probe.id,
                                        probe_task, count=count, interval=0.02)
        at_rest.start()
        at_rest.join(timeout=120)
        rest = at_rest.report()
        log(f"  freshness at rest: p50 {rest['p50_ms']} ms p99 {rest['p99_ms']} ms (the write's "
            f"answer p99 {rest['answer_p99_ms']} ms; under the mixed load "
            f"{fresh['answer_p99_ms']} ms)")
        # The writes alone: what a write costs each process by itself, apart from what it costs
        # the reads around it in the mix (their near copies dropped and fetched again).
        writes_only = self.plan.with_name("mixed-writes.plan")
        writes_only.write_text(self.plan.read_text().replace(f"write {WRITE_SHARE}\n",
                                                             "write 1\n"))
        with cpu.Window(ports) as writes_cpu, commands.counting("writes_only"):
            writes = wrk(self.load, self.stack.base + "/", "mixed.lua", str(writes_only), "6",
                         seconds=self.load.seconds)
            settled = self.settle(self.stack)  # the worker's share, queued or not
        log(f"  writes alone: {writes.rps:.1f} req/s p50 {writes.p50_ms:.2f} ms p99 "
            f"{writes.p99_ms:.2f} ms; the worker's queue empty {settled:.1f} s later")
        inline = probes.summed(before, after, "stats_inline_computations_total")
        seconds = result.as_dict().get("seconds") or self.load.seconds * 2
        recounts = {"web": probes.summed(before, after, "stats_recomputes_total", by="reason"),
                    "worker": probes.summed(before_w, after_w, "stats_recomputes_total",
                                            by="reason") if before_w else None}
        log(f"  inline stats computations (cold misses): {inline:g} in {seconds:g} s "
            f"({inline * 3600 / seconds:,.0f} per hour); recounts by reason {recounts}")
        # What the web left to the worker, and why: each event not finished in the web is a
        # broker message, a worker pass and often a recount (tasks/events.py NEEDS_RECOUNT).
        outbox = probes.summed(before, after, "outbox_events_total", by="outcome")
        deltas = {kind: probes.summed(before, after, "stats_deltas_total", by="outcome",
                                      where={"aggregate": kind, "source": "web"})
                  for kind in ("project", "user")}
        log(f"  events after commit: {outbox}; the web's deltas by outcome: {deltas}")
        redis_per_write = commands.per_write(result.requests, without_writes.requests,
                                             WRITE_SHARE)
        redis_alone = commands.per_request("writes_only", writes.requests)
        log(f"  Redis commands per write (cache and broker): in the mix {redis_per_write}; "
            f"alone {redis_alone}")
        cpu_per_request = cpu.per_request(
            {"health": (health_cpu.spent, health_before.requests),
             "mixed": (mixed_cpu.spent, result.requests),
             "reads_only": (reads_cpu.spent, without_writes.requests),
             "writes_only": (writes_cpu.spent, writes.requests)}, WRITE_SHARE)
        log("  CPU per request by role (us): " + "; ".join(
            f"{run}: " + ", ".join(f"{k} {v:g}" for k, v in roles.items())
            for run, roles in cpu_per_request.items()))
        return {"load": result.as_dict(), "hit_rates": rates, "freshness": fresh,
                "cpu_us_per_request": cpu_per_request, "outbox": outbox, "web_deltas": deltas,
                "redis_commands_per_write": {"in_the_mix": redis_per_write,
                                             "alone": redis_alone},
                "writes_only": writes.as_dict(),
                "freshness_at_rest": rest,
                "reads_only": without_writes.as_dict(), "paired_health": paired.as_dict(),
                "inline_computations": inline, "inline_seconds": seconds,
                "inline_per_hour": round(inline * 3600 / seconds, 1),
                "recounts_by_reason": recounts,
                "stale_served": probes.summed(before, after, "cache_stale_served_total"),
                "errors": probes.summed(before, after, "cache_errors_total", by="operation"),
                "zipf_s": ZIPF_S, "write_share": WRITE_SHARE,
                "sweep": sweep}

    def services(self):
        """The application's services in this process, on the stack's database and Redis (for the
        auditor and the sizing, which read them as the workers and the CLI do)."""
        from config import Settings
        from services.context import build_services

        return build_services(Settings(
            database_url=self.db_url, redis_url=self.redis_server.url_for(0),
            celery_broker_url=self.redis_server.url_for(1), secret_key=self.secret),
            subscribe_l1=False)

    def staleness(self, stack: Stack) -> dict:
        """The auditor's stale ratio under the mixed load (a run of its own, so the measured run
        above is not slowed by it), then at steady state (no load, queues empty)."""
        services = self.services()
        try:
            seconds = max(10.0, self.load.seconds * 3)
            log(f"cached stack: staleness audit under the mixed load ({seconds:g} s), then at rest")
            loop = probes.AuditLoop(services)
            loop.start()
            wrk(self.load, self.stack.base + "/", "mixed.lua", str(self.plan), "3",
                seconds=seconds)
            loop.stop_flag.set()
            loop.join(timeout=120)
            self.settle(stack)
            rest = probes.AuditLoop(services, rounds=5)
            rest.start()
            rest.join(timeout=300)
            out = {"under_load": loop.report(), "steady": rest.report()}
        finally:
            services.close()
        for name, found in out.items():
            log(f"  audit {name}: {found['checked']} checked in {found['rounds']} rounds, "
                f"{found['stale']} stale {found['stale_by_family']}, {found['in_flight']} in "
                f"flight")
        return out

    def sizing(self) -> dict:
        """`flask --app web cache-size` on the benchmark's data, after its load."""
        from ops import sizing

        services = self.services()
        try:
            result = sizing.measure(services, sample=200)
        finally:
            services.close()
        table = sizing.table(result)
        log("  cache-size:\n" + table)
        return {"table": table, "total_bytes": round(result.total),
                "recommended_bytes": result.recommended}

    def worker_metrics(self, stack: Stack) -> dict:
        if not stack.with_workers:
            return {}
        return probes.scrape(f"http://127.0.0.1:{stack.env['WORKER_METRICS_PORT']}")

    def settle(self, stack: Stack, limit: float = 60.0) -> float:
        """Wait until the worker's queues are empty (its start-up warm-up, a burst's recounts)."""
        if not stack.with_workers:
            return 0.0
        started = time.monotonic()
        quiet = 0
        while time.monotonic() - started < limit:
            m = self.worker_metrics(stack)
            if not m:
                break
            queued = sum(v for (name, _), v in m.items()
                         if name in ("celery_queue_length", "celery_unacked_messages"))
            quiet = quiet + 1 if queued == 0 else 0
            if quiet >= 2:
                break
            time.sleep(0.5)
        return time.monotonic() - started

    def burst(self, stack: Stack) -> dict:
        """1,000 status changes on one project; how many full recounts they cost."""
        project = self.data.small
        # Quick mode: a shorter burst (writes run at a few dozen per second on 2 busy cores);
        # the count is reported with the burst's size and scaled to 1,000 writes.
        writes = 300 if self.args.quick else 1000
        self.settle(stack)
        before, before_w = probes.scrape(stack.base), self.worker_metrics(stack)
        since = time.time()
        sent = probes.write_burst(stack.base, self.token0, project.sample_task_ids, writes,
                                  connections=8)
        time.sleep(1.0)
        settled = self.settle(stack)
        after, after_w = probes.scrape(stack.base), self.worker_metrics(stack)
        # The project's statistics; the assignees' (user) statistics the burst also moves are
        # reported beside them.
        project_only = {"aggregate": "project"}
        web = probes.summed(before, after, "stats_recomputes_total", by="reason",
                            where=project_only)
        worker = probes.summed(before_w, after_w, "stats_recomputes_total", by="reason",
                               where=project_only)
        worker_users = probes.summed(before_w, after_w, "stats_recomputes_total", by="reason",
                                     where={"aggregate": "user"})
        flower = (probes.flower_recomputes(int(stack.env["FLOWER_PORT"]), self.flower_auth,
                                           since) if stack.with_workers else None)
        # The stats after the burst against a count in the database: exact, or not.
        client = probes.Client(stack.base, self.token0)
        try:
            _, api_stats, _ = client.get(f"/api/projects/{project.id}/stats")
        finally:
            client.close()
        from models import Task

        with self.engine.connect() as conn:
            rows = conn.execute(select(Task.status, func.count()).where(
                Task.project_id == project.id).group_by(Task.status)).all()
        db_counts = {status: n for status, n in rows}
        exact = all(api_stats["tasks_by_status"].get(s, 0) == db_counts.get(s, 0)
                    for s in ("TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED"))
        # What the burst caused: coalesced recounts (worker) and cold misses (web); warm-ups and
        # drift audits that happened to run meanwhile are reported, not counted.
        caused = (sum(v for reason, v in worker.items() if reason not in ("warmup", "audit"))
                  + web.get("cold_miss", 0))
        available = stack.with_workers and bool(after_w)
        out = {**sent, "settle_seconds": round(settled, 2), "web_recomputes": web,
               "worker_recomputes": worker if available else None,
               "worker_user_stats_recomputes": worker_users if available else None,
               "flower_recompute_tasks": flower,
               "recomputes": caused if available else None,
               "recomputes_per_1000": round(caused * 1000 / writes, 1) if available else None,
               "stats_exact_after": exact}
        if not available:
            out["note"] = ("worker metrics unavailable: deltas are folded in by the web after "
                           f"commit; web-side full recounts during the burst: {sum(web.values()):g}")
        log(f"  burst: {sent['writes']} writes at {sent['writes_per_s']} /s; recounts: worker "
            f"{worker or 0}, web {web or 0}, Flower recount tasks {flower}; stats exact "
            f"afterwards: {exact}")
        return out

    def uncached_phase(self) -> dict:
        stack = self.start_stack("uncached", False, False)
        out: dict = {}
        try:
            sp, bp = self.paths(self.data.small), self.paths(self.data.big)
            log("uncached stack (CACHE_ENABLED=0)")
            out["health"] = self.measure("/health", "/health")
            out["stats_small"] = self.measure("stats, ~1k-task project", sp["stats"], self.token0)
            out["stats_big"] = self.measure("stats, big project", bp["stats"], self.token0)
            out["task"] = self.measure("task GET", sp["task"], self.token0)
            out["list"] = self.measure("task list (20)", sp["list"], self.token0)
        finally:
            stack.stop()
        return out

    def dispatch_phase(self) -> dict:
        """What the hot path (web/hot.py) buys: `/health` and the warm task GET on two cached
        stacks without workers, one with WEB_HOT_PATH=0 (Flask's dispatch for every request),
        measured in turns (the order reversed halfway) so that a drift of the machine moves both
        alike. The web CPU per request counts both stacks' API processes: the idle one's
        heartbeats are in both sides."""
        stacks: dict[str, Stack] = {}
        runs: dict[tuple[str, str], list[tuple[Result, float]]] = {}
        task = self.paths(self.data.small)["task"]
        paths = (("health", "/health", ""), ("task", task, self.token0))
        try:
            for name, hot in (("hot", "1"), ("flask", "0")):
                env = {**self.env(True, f"dispatch-{name}"), "WEB_HOT_PATH": hot}
                stacks[name] = self.stack = Stack(f"dispatch-{name}", env, with_workers=False,
                                                  log_path=LOG_DIR / f"dispatch-{name}.log")
                stacks[name].start()
                self.warm(task, self.token0)
            log("the hot path against Flask's dispatch (WEB_HOT_PATH=0), in turns")
            for order in (("hot", "flask"), ("flask", "hot")):
                for name in order:
                    for label, path, token in paths:
                        with cpu.Window({self.redis_server.port: "redis"}) as spent:
                            result = wrk(self.load, stacks[name].base + path, "auth.lua", token,
                                         seconds=self.half_seconds)
                        runs.setdefault((name, label), []).append(
                            (result, spent.spent.get("web", 0.0)))
        finally:
            for stack in stacks.values():
                stack.stop()
        out: dict = {}
        for (name, label), measured in runs.items():
            result = Result.combined([run for run, _ in measured])
            web_us = sum(web for _, web in measured) * 1e6 / max(result.requests, 1)
            out.setdefault(name, {})[label] = {**result.as_dict(), "web_cpu_us": round(web_us, 1)}
            log(f"  {name:<5} {label:<6} {result.rps:9.1f} req/s  p99 {result.p99_ms:8.2f} ms  "
                f"web CPU {web_us:6.0f} us per request")
        return out

    def naive_phase(self) -> dict:
        """The floors: the simplest app doing each kind of request (bench/naive.py) on the same
        gunicorn settings, database and Redis. A read or a write there is what this machine
        allows any implementation; each is paired with that app's own /health."""
        from bench import naive

        cache = redis.Redis.from_url(self.redis_server.url_for(0))
        naive.prepare(self.engine, cache, json.dumps(
            {"project_id": "p" * 36, "tasks_by_status": {"TODO": 250, "IN_PROGRESS": 250,
             "BLOCKED": 250, "COMPLETED": 250}, "total": 1000, "overdue": 12}).encode())
        env = {"NAIVE_DATABASE_URL": self.db_url, "NAIVE_REDIS_URL": self.redis_server.url_for(0),
               "NAIVE_SECRET": self.secret,
               "WEB_PORT": str(free_port())}
        stack = Stack("naive", env, with_workers=False, log_path=LOG_DIR / "naive.log",
                      command=("bench.naive",))
        self.stack = stack
        out: dict = {}
        try:
            stack.start()
            log("naive app (bench/naive.py): the floors of a read, a write and the mix")
            out["health"] = self.measure("/health", "/health")
            out["read"] = self.measure_against_health("one Redis GET", "/read")
            out["read_held"] = self.measure_against_health("a value held, a token verified",
                                                           "/read-held", self.token0)
            out["write"] = self.measure_against_health("one UPDATE, committed", "/write")
            out["write_promised"] = self.measure_against_health(
                "a write with its promises", "/write-promised")
            out["write_warmed"] = self.measure_against_health(
                "the promised write, warming its task and list", "/write-warmed")
            out["mix"] = self.measure_against_health("the mix (5% promised writes)", "/mix")
            out["mix_warmed"] = self.measure_against_health("the mix (5% warmed writes)",
                                                            "/mix-warmed")
            # How soon a write is visible (it is once answered) on a machine this busy, whatever
            # the implementation: a probe of promised writes through one more run of the mix.
            probe = probes.AnswerProbe(stack.base, "/write-promised", interval=0.02)
            probe.start()
            self.measure("the mix, with a write probe", "/mix")
            probe.stop_flag.set()
            probe.join(timeout=30)
            answers = out["write_answer_in_mix"] = probe.report()
            log(f"  a promised write's answer under that mix: p50 {answers['p50_ms']} ms "
                f"p99 {answers['p99_ms']} ms ({answers['samples']} probes)")
        finally:
            stack.stop()
            naive.drop(self.engine, cache)
            cache.close()
        return out

    def topology_phase(self) -> dict:
        """`make up-cluster` (nginx, two API instances, workers, beats) twice: the cache on the
        Redis Cluster, then on one redis-server. Warm stats through the balancer against /health
        through the balancer, and what the cluster costs a warm read against a single Redis."""
        out: dict = {}
        for cache in ("cluster", "single"):
            name = f"topology-{cache}"
            env = {k: v for k, v in self.env(True, name).items()
                   if k not in ("REDIS_URL", "CELERY_BROKER_URL", "WORKER_METRICS_PORT")}
            env["STACK_USER"] = "root"  # its run directory lies in the bench's private tempdir
            stack = Stack(name, env, with_workers=True, log_path=LOG_DIR / f"{name}.log",
                          command=("stack.cluster", "--cache", cache))
            self.stack = stack
            stack.start()
            try:
                self.both_instances_answer(stack)
                sp = self.paths(self.data.small)
                log(f"{name}: through nginx, two API instances")
                out[cache] = {"warm": self.warm(sp["stats"], self.token0),
                              "health": self.measure("/health via nginx", "/health"),
                              "stats_small": self.measure("stats via nginx", sp["stats"],
                                                          self.token0)}
            finally:
                stack.stop()
        return out

    def both_instances_answer(self, stack: Stack, timeout: float = 120.0) -> None:
        client = probes.Client(stack.base)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                seen = {client.get("/health")[2].get("X-Instance") for _ in range(4)}
                if len(seen - {None}) >= 2:
                    return
                time.sleep(0.5)
        finally:
            client.close()
        raise StackFailed(f"{stack.name}: nginx did not reach two instances in {timeout:.0f} s")

    # -- the whole run ------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        try:
            self.setup()
            if not self.args.topology_only:
                self.results["cached"] = self.cached_phase()
                self.results["uncached"] = self.uncached_phase()
                self.results["dispatch"] = self.dispatch_phase()
                self.results["naive"] = self.naive_phase()
            if not self.args.no_topology:
                self.results["topology"] = self.topology_phase()
        finally:
            self.cleanup()
        self.results["load"] = {"tool": "wrk", "threads": self.load.threads,
                                "connections": self.load.connections,
                                "seconds_per_measurement": self.load.seconds}
        self.results["duration_seconds"] = round(time.monotonic() - started, 1)
        self.results["ratios"] = report.ratios(self.results)
        RESULTS.mkdir(parents=True, exist_ok=True)
        if self.args.topology_only:
            (RESULTS / "topology.json").write_text(json.dumps(self.results, indent=2) + "\n")
            print("\n".join(report.topology_rows(self.results)))
            log(f"wrote {RESULTS / 'topology.json'}")
            return 0
        (RESULTS / "latest.json").write_text(json.dumps(self.results, indent=2) + "\n")
        log(f"wrote {RESULTS / 'latest.json'}")
        table = report.markdown(self.results)
        print(table)
        if not self.args.no_markdown:
            report.update_benchmarks_md(PROJECT_ROOT / "BENCHMARKS.md", self.results, table)
            log("updated BENCHMARKS.md")
        log(f"done in {self.results['duration_seconds']:.0f} s")
        return 0

    def cleanup(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        if self.redis_server is not None:
            self.redis_server.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.dispose()
        if self.args.keep:
            log(f"kept database {self.db_name} (--keep)")
        else:
            try:
                with self.admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS `{self.db_name}`"))
                log(f"dropped database {self.db_name}")
            except Exception as exc:
                log(f"could not drop {self.db_name}: {exc}")
        self.admin.dispose()
        shutil.rmtree(self.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        bench = Bench(args)
    except ToolMissing as exc:
        log(str(exc))
        return 2
    try:
        return bench.run()
    except (LoadFailed, StackFailed) as exc:
        log(f"failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


__all__ = ["main", "Result"]

if __name__ == "__main__":
    sys.exit(main())
