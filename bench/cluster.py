"""The cache on a Redis Cluster against a single Redis, on the benchmark's data, in one run.

    python -m bench.cluster [--full] [--rounds N]

Seeds the benchmark's dataset (QUICK by default, `--full` for the full one) into a uniquely named
MariaDB database of its own, starts a private Redis Cluster (3 masters, 1 replica each) and a
private redis-server, and for each:
- warms every organization (the warm-up task's code: organizations, member and project pages,
  projects, every project's stats), then reads every sampled task, each project's first task page
  and each user's stats through the API, and counts the keys each master holds (the spread);
- times warm reads through the API (Flask test client, in-process: the app and its Redis round
  trips, no HTTP server), single and cluster in turn, the order swapped every round, so that load
  from other processes on the machine falls on both alike; reports medians and the ratio.
Drops the database and stops the servers at the end. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time
import uuid
from collections import Counter

from sqlalchemy import create_engine, text

from bench.run import MARIADB_ADMIN_URL, make_token
from bench.seed import FULL, QUICK, seed
from config import Settings
from stack.redis_cluster import RedisCluster
from stack.redis_server import RedisServer


def build(database_url: str, secret: str, **redis):
    from services.context import build_services
    from web import create_app

    settings = Settings(database_url=database_url, secret_key=secret, **redis)
    services = build_services(settings)
    return services, create_app(settings, services).test_client()


def fill(services, client, data, tokens) -> int:
    """Warm as the warm-up does, then read what the load generator reads. Returns requests."""
    from tasks.warmup import CacheWarmer

    warmer = CacheWarmer(services)
    for org in data.orgs:
        warmer.warm_organization(org.id, trigger="bench")
    requests = 0
    for project in [*data.projects, data.small, data.big]:
        headers = {"Authorization": f"Bearer {tokens[project.org_id]}"}
        for url in [f"/api/projects/{project.id}/tasks",
                    *(f"/api/tasks/{t}" for t in project.sample_task_ids)]:
            assert client.get(url, headers=headers).status_code == 200, url
            requests += 1
    for org in data.orgs:
        headers = {"Authorization": f"Bearer {tokens[org.id]}"}
        for user_id in org.user_ids:
            assert client.get(f"/api/users/{user_id}/stats", headers=headers).status_code == 200
            requests += 1
    return requests


def spread(cluster: RedisCluster) -> dict:
    per_master = {}
    for node in cluster.current_masters():
        info = node.client()
        per_master[node.address] = {"keys": info.dbsize(),
                                    "used_memory_mb": round(info.info("memory")["used_memory"]
                                                            / 2**20, 2)}
    counts = [m["keys"] for m in per_master.values()]
    return {"per_master": per_master, "total_keys": sum(counts),
            "max_over_mean": round(max(counts) / statistics.mean(counts), 3)}


def families(cluster: RedisCluster) -> dict:
    """Keys per family per master: which families the biggest master holds."""
    out: dict[str, Counter] = {}
    for node in cluster.current_masters():
        c = Counter()
        for name in node.client().scan_iter(count=1000):
            name = name.decode()
            c[name.split(":", 1)[0] + ":" + name.partition("}:")[2].split(":")[0]] += 1
        out[node.address] = dict(c.most_common(8))
    return out


def time_reads(client, urls: list[tuple[str, dict]], n: int) -> float:
    """Median seconds per warm GET over `n` passes of `urls`."""
    samples = []
    for url, headers in urls:  # a short-lived list may have expired since the last round
        client.get(url, headers=headers)
    for _ in range(n):
        for url, headers in urls:
            started = time.perf_counter()
            answer = client.get(url, headers=headers)
            samples.append(time.perf_counter() - started)
            assert answer.status_code == 200 and answer.headers.get("X-Cache", "HIT-L2") in (
                "HIT-L2", "HIT-L1"), (url, answer.headers.get("X-Cache"))  # /health: none
    return statistics.median(samples)


def time_lookups(services, lookup_keys, n: int) -> float:
    """Median seconds of the cache's part of a warm read: one lookup of the session and the
    entity (`RedisCache.lookup_many`, one pipeline), without the app around it."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        found = services.cache.lookup_many(lookup_keys)
        samples.append(time.perf_counter() - started)
        assert all(lk.hit for lk in found)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full dataset (slow to seed)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--timings-only", action="store_true",
                        help="skip the fill and the spread; time warm reads only")
    args = parser.parse_args(argv)
    from db.migrations import upgrade
    from services.auth import hash_password

    name = f"taskcache_cluster_{uuid.uuid4().hex[:10]}"
    admin = create_engine(MARIADB_ADMIN_URL)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    cluster = single = None
    built = []
    try:
        url = f"{MARIADB_ADMIN_URL}/{name}"
        upgrade(url)
        engine = create_engine(url)
        data = seed(engine, FULL if args.full else QUICK, hash_password(secrets.token_urlsafe(8)),
                    session_ttl=86_400)
        engine.dispose()
        secret = secrets.token_urlsafe(32)
        tokens = {o.id: make_token(secret, o) for o in data.orgs}
        cluster = RedisCluster.start()
        single = RedisServer.start()
        on_cluster = build(url, secret, redis_cluster_url=cluster.url)
        on_single = build(url, secret, redis_url=single.url)
        built = [on_cluster[0], on_single[0]]
        result = {"dataset": {"orgs": len(data.orgs), "projects": len(data.projects) + 1,
                              "rows": data.rows}}
        if not args.timings_only:
            result["requests_to_fill"] = fill(*on_cluster, data, tokens)
            fill(*on_single, data, tokens)
            result["single_keys"] = redis_client_keys(single)
            result["spread"] = spread(cluster)
            result["families_per_master"] = families(cluster)
            print(json.dumps(result, indent=2), flush=True)  # the spread, before the timings

        project, org = data.small, data.org(data.small.org_id)
        headers = {"Authorization": f"Bearer {tokens[org.id]}"}
        cases = {
            "project_get": [(f"/api/projects/{project.id}", headers)],
            "project_stats": [(f"/api/projects/{project.id}/stats", headers)],
            "task_list": [(f"/api/projects/{project.id}/tasks", headers)],
            "health": [("/health", {})],
        }
        timings: dict[str, dict[str, list[float]]] = {k: {"single": [], "cluster": []}
                                                     for k in cases}
        from cache import keys

        lookup_keys = [keys.session(org.id, org.admin_id, org.session_id),
                       keys.project(org.id, project.id)]
        for services, client in (on_single, on_cluster):
            client.get("/api/me", headers=headers)  # caches the session
            assert all(lk.hit for lk in services.cache.lookup_many(lookup_keys))
        timings["lookup_session_and_project"] = {"single": [], "cluster": []}
        order = [("single", on_single), ("cluster", on_cluster)]
        for n in range(args.rounds):
            for case, urls in cases.items():
                for label, (_, client) in (order if n % 2 == 0 else order[::-1]):
                    timings[case][label].append(time_reads(client, urls, 50))
            for label, (services, _) in (order if n % 2 == 0 else order[::-1]):
                timings["lookup_session_and_project"][label].append(
                    time_lookups(services, lookup_keys, 200))
        result["warm_read_median_ms"] = {
            case: {"single": round(statistics.median(t["single"]) * 1000, 3),
                   "cluster": round(statistics.median(t["cluster"]) * 1000, 3),
                   "cluster_over_single": round(statistics.median(t["cluster"])
                                                / statistics.median(t["single"]), 3)}
            for case, t in timings.items()}
        result["note"] = ("in-process Flask test client, 2-core machine shared with other "
                          "sessions; single and cluster alternate round by round")
        print(json.dumps(result, indent=2))
    finally:
        for services in built:
            services.close()
        if cluster:
            cluster.stop()
        if single:
            single.stop()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


def redis_client_keys(server: RedisServer) -> int:
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        return client.dbsize()
    finally:
        client.close()


if __name__ == "__main__":
    main()
