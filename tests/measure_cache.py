"""Measure the cache on this machine (not collected by pytest): Redis round trips and SQL
statements per hot request, p50/p99 of a warm project GET against an uncached one, and the API's
p99 while Redis is down. Uses a private redis-server and a temporary SQLite database (or
--database-url, e.g. a MariaDB database you created for it).

    .venv/bin/python -m tests.measure_cache [-n 500] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

os.environ.setdefault("PASSWORD_HASH_MEMORY_KIB", "1024")

from config import Settings  # noqa: E402
from db.migrations import upgrade  # noqa: E402
from services.context import build_services  # noqa: E402
from stack.redis_server import RedisServer  # noqa: E402
from tests.cache_helpers import count_round_trips, count_sql, percentile  # noqa: E402
from web import create_app  # noqa: E402


def timings(client, url, headers, n) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        answer = client.get(url, headers=headers)
        out.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.json
    return out


def summary(samples: list[float]) -> str:
    return (f"p50 {percentile(samples, 0.5) * 1000:.2f} ms, p99 {percentile(samples, 0.99) * 1000:.2f}"
            f" ms, mean {statistics.mean(samples) * 1000:.2f} ms (n={len(samples)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp()}/measure.db"
    upgrade(url)
    with RedisServer.start() as server:
        settings = Settings(database_url=url, redis_url=server.url_for(0),
                            celery_broker_url=server.url_for(1), secret_key="m" * 40)
        services = build_services(settings)
        app = create_app(settings, services)
        client = app.test_client()
        email = f"{uuid.uuid4().hex[:10]}@example.com"
        made = client.post("/api/orgs", json={"organization_name": "Measure", "email": email,
                                              "password": "correct horse battery",
                                              "display_name": "M"}).json
        headers = {"Authorization": f"Bearer {made['access_token']}"}
        project = client.post("/api/projects", json={"name": "P"}, headers=headers).json
        for i in range(20):
            client.post(f"/api/projects/{project['id']}/tasks", json={"title": f"t{i}"},
                        headers=headers)
        base = f"/api/projects/{project['id']}"
        print(f"database: {url.split('://')[0]}, requests per measure: {args.n}")
        print("\nper warm request (SQL statements, Redis round trips, X-Cache):")
        for path in (base, f"{base}/stats", f"{base}/tasks", "/api/me",
                     "/api/public/feature-flags"):
            client.get(path, headers=headers)
            with count_sql(services) as sql, count_round_trips(services) as trips:
                answer = client.get(path, headers=headers)
            print(f"  GET {path.replace(project['id'], '{id}')}: {sql.count} SQL, "
                  f"{trips.count} round trips, {answer.headers.get('X-Cache')}")

        print("\nproject GET through the Flask test client:")
        timings(client, base, headers, 50)
        warm = timings(client, base, headers, args.n)
        print(f"  cached (HIT-L2):        {summary(warm)}")
        uncached_services = build_services(settings.with_overrides(cache_enabled=False))
        uncached = create_app(settings, uncached_services).test_client()
        timings(uncached, base, headers, 50)
        cold = timings(uncached, base, headers, args.n)
        print(f"  uncached (CACHE off):   {summary(cold)}")

        server.kill()
        down = []
        for path in (base, f"{base}/tasks", f"{base}/stats"):
            down += timings(client, path, headers, args.n // 3)
        print(f"\nRedis down (project, tasks, stats GETs): {summary(down)}; "
              f"max {max(down) * 1000:.1f} ms")
        server.restart()
        uncached_services.close()
        services.close()


if __name__ == "__main__":
    main()
