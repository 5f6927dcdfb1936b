"""Measure the worker pipeline on private servers: `python -m worker.measure [--database URL]`.

Starts a private redis-server (cache and broker) and one Celery worker, on a fresh SQLite file
unless --database names a MariaDB/MySQL server database (it must exist and be empty of data).
Prints: stats freshness from commit to visible through the API (p50/p99, warm stats, and cold
stats that only the worker's recount fills), coalesced recomputes per 1,000-write burst, and the
warm-up time for 500 projects. Stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time

os.environ.setdefault("PASSWORD_HASH_MEMORY_KIB", "1024")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(values: list[float]) -> str:
    return (f"p50 {_percentile(values, 0.5) * 1000:.1f} ms, p99 {_percentile(values, 0.99) * 1000:.1f}"
            f" ms, max {max(values) * 1000:.1f} ms (n={len(values)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default=None)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--projects", type=int, default=500)
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from sqlalchemy import event, insert

    from aggregates import PROJECT_STATS
    from config import Settings
    from db.migrations import upgrade
    from models import Project, Task, new_id, utcnow
    from services import auth
    from services import tasks as task_service
    from stack.redis_server import RedisServer
    from tasks.warmup import CacheWarmer
    from web import create_app
    from worker_fixtures import exact, start_worker, unprocessed, wait_until

    workdir = tempfile.mkdtemp(prefix="taskcache-measure-")
    database = args.database or f"sqlite:///{workdir}/measure.db"
    upgrade(database)
    redis_server = RedisServer.start(maxmemory_policy="noeviction")
    worker = None
    try:
        settings = Settings(database_url=database, redis_url=redis_server.url_for(0),
                            celery_broker_url=redis_server.url_for(1),
                            secret_key="measure-" + "x" * 32)
        worker = start_worker(database, settings.redis_url, settings.celery_broker_url,
                              __import__("pathlib").Path(workdir))
        app = create_app(settings)
        services = app.extensions["taskcache"]
        client = app.test_client()
        signed = auth.sign_up(services, organization_name="Measure", email="m@example.com",
                              password="correct horse battery", display_name="M")
        org_id = signed["organization"]["id"]
        headers = {"Authorization": f"Bearer {signed['access_token']}"}
        actor = auth.Actor(signed["user"]["id"], org_id, "m", ("admin",), "m@example.com")

        # Commit time: the writer session's after_commit, per thread.
        committed = threading.local()

        @event.listens_for(services.db.writers, "after_commit")
        def _stamp(_session) -> None:
            committed.at = time.perf_counter()

        def project() -> str:
            return client.post("/api/projects", json={"name": "p"}, headers=headers).json["id"]

        def stats(pid: str) -> dict:
            return client.get(f"/api/projects/{pid}/stats", headers=headers).json

        # 1. Warm stats: each write is read back through the API until it shows.
        pid = project()
        stats(pid)
        warm = []
        for i in range(args.writes):
            task_service.create_task(services, actor, pid, {"title": "t"})
            while stats(pid)["total_tasks"] != i + 1:
                pass
            warm.append(time.perf_counter() - committed.at)
        # 2. Cold stats: dropped before each write, only the worker's recount brings them back.
        cold = []
        pid2 = project()
        for i in range(min(args.writes, 50)):
            services.redis.delete(PROJECT_STATS.name(org_id, pid2))
            task_service.create_task(services, actor, pid2, {"title": "t"})
            while True:
                snap = services.aggregates.read(PROJECT_STATS, org_id, pid2)
                if snap and snap.stats["total_tasks"] == i + 1:
                    break
                time.sleep(0.001)
            cold.append(time.perf_counter() - committed.at)
        print(f"freshness, stats cached (web applies the delta): {_ms(warm)}")
        print(f"freshness, stats not cached (worker recount):    {_ms(cold)}")

        # 3. A burst on one project, stats not cached at the start.
        name = 'stats_recomputes_total{aggregate="project",reason="coalesced"}'
        for cached in (False, True):
            pid3 = project()
            if cached:
                stats(pid3)
            before = worker.metric(name)
            rng = random.Random(1)
            ids: list[str] = []
            lock = threading.Lock()

            def writer(n: int) -> None:
                for _ in range(n):
                    with lock:
                        target = rng.choice(ids) if ids and rng.random() < 0.4 else None
                    if target:
                        task_service.update_task(services, actor, target, {
                            "status": rng.choice(["TODO", "IN_PROGRESS", "COMPLETED"])})
                    else:
                        created = task_service.create_task(services, actor, pid3, {"title": "t"})
                        with lock:
                            ids.append(created["id"])
            started = time.perf_counter()
            threads = [threading.Thread(target=writer, args=(args.burst // 8,)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            wait_until(lambda: unprocessed(services, org_id) == 0, 300, 0.2, "outbox drained")
            wait_until(lambda: exact(services, PROJECT_STATS, org_id, pid3), 30, 0.1, "exact")
            time.sleep(1)
            print(f"burst of {args.burst} writes ({elapsed:.1f} s, stats "
                  f"{'cached' if cached else 'not cached'} at the start): exact, "
                  f"{worker.metric(name) - before:.0f} coalesced recomputes")

        # 4. Warm-up of 500 projects (10 tasks each), cold cache.
        now = utcnow()
        rows = [dict(id=new_id(), organization_id=org_id, name=f"w{i}", description="",
                     status="ACTIVE", owner_id=actor.user_id, stats_seq=10, created_at=now,
                     updated_at=now) for i in range(args.projects)]
        with services.db.writers() as db:
            db.execute(insert(Project), rows)
            db.execute(insert(Task), [dict(id=new_id(), organization_id=org_id,
                                           project_id=r["id"], title="t", description="",
                                           status="TODO", priority="MEDIUM", created_at=now,
                                           updated_at=now) for r in rows for _ in range(10)])
            db.commit()
        for label, run in (("warm_organization (500 projects + their stats)",
                            lambda w: w.warm_organization(org_id)),
                           ("warm_all (500 projects + 50 hottest stats)",
                            lambda w: w.warm_all("measure"))):
            services.cache.purge_organization(org_id)
            for r in rows[:50]:
                client.get(f"/api/projects/{r['id']}/stats", headers=headers)  # make them hot
            services.cache.purge_organization(org_id)
            report = run(CacheWarmer(services))
            again = run(CacheWarmer(services))
            print(f"warm-up {label}: cold {report.seconds:.2f} s "
                  f"({report.projects_loaded} projects loaded, {report.stats_recounted} stats "
                  f"recounted); already warm {again.seconds:.2f} s")
        services.close()
    finally:
        if worker:
            worker.stop()
        redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
