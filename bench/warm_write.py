"""What warm after write costs a write: N task PATCHes through the Flask test client with
CACHE_WARM_AFTER_WRITE on and off (alternating rounds on the same app, database and Redis), on a
temporary SQLite database and a private redis-server; and what the next reader of the task and of
the project's first task-list page gets afterwards.

    .venv/bin/python -m bench.warm_write [-n 400] [--tasks 60] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid

os.environ.setdefault("PASSWORD_HASH_MEMORY_KIB", "1024")

from config import Settings  # noqa: E402
from db.migrations import upgrade  # noqa: E402
from services.context import build_services  # noqa: E402
from stack.redis_server import RedisServer  # noqa: E402
from web import create_app  # noqa: E402


def ms(samples: list[float], q: float | None = None) -> float:
    if q is None:
        return statistics.mean(samples) * 1000
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=400, help="PATCHes per setting")
    parser.add_argument("--tasks", type=int, default=60, help="tasks in the project")
    parser.add_argument("--rounds", type=int, default=8, help="alternating on/off rounds")
    args = parser.parse_args()
    url = f"sqlite:///{tempfile.mkdtemp()}/warm.db"
    upgrade(url)
    with RedisServer.start() as server:
        settings = Settings(database_url=url, redis_url=server.url_for(0),
                            celery_broker_url=server.url_for(1), secret_key="w" * 40)
        services = build_services(settings)
        client = create_app(settings, services).test_client()
        made = client.post("/api/orgs", json={
            "organization_name": "Warm", "email": f"{uuid.uuid4().hex[:10]}@example.com",
            "password": "correct horse battery", "display_name": "W"}).json
        headers = {"Authorization": f"Bearer {made['access_token']}"}
        project = client.post("/api/projects", json={"name": "P"}, headers=headers).json["id"]
        tasks = [client.post(f"/api/projects/{project}/tasks", json={"title": f"T{i}"},
                             headers=headers).json["id"] for i in range(args.tasks)]
        rng = random.Random(7)
        writes = {True: [], False: []}
        reads = {True: [], False: []}
        sources = {True: {}, False: {}}
        per_round = max(1, args.n // args.rounds)
        for i in range(args.rounds * 2 + 2):
            warm = i % 2 == 0
            services.settings = settings.with_overrides(warm_after_write=warm)
            for j in range(per_round):
                task = rng.choice(tasks)
                body = {"title": f"t{i}-{j}", "status": rng.choice(["TODO", "IN_PROGRESS"])}
                started = time.perf_counter()
                answer = client.patch(f"/api/tasks/{task}", json=body, headers=headers)
                took = time.perf_counter() - started
                assert answer.status_code == 200, answer.json
                started = time.perf_counter()
                got = [client.get(f"/api/tasks/{task}", headers=headers),
                       client.get(f"/api/projects/{project}/tasks", headers=headers)]
                read_took = time.perf_counter() - started
                if i < 2:
                    continue  # the first pair of rounds warms up the process
                writes[warm].append(took)
                reads[warm].append(read_took)
                for g in got:
                    sources[warm][g.headers["X-Cache"]] = sources[warm].get(g.headers["X-Cache"],
                                                                            0) + 1
        services.close()
    for warm in (False, True):
        w, r = writes[warm], reads[warm]
        print(f"warm {'on ' if warm else 'off'}: PATCH mean {ms(w):.2f} ms, p50 {ms(w, .5):.2f} "
              f"ms, p99 {ms(w, .99):.2f} ms (n={len(w)}); next GET task + GET list "
              f"mean {ms(r):.2f} ms, X-Cache {sources[warm]}")
    print(f"write cost on/off: mean x{ms(writes[True]) / ms(writes[False]):.2f}, p50 "
          f"x{ms(writes[True], .5) / ms(writes[False], .5):.2f}; write + next two reads: mean "
          f"x{(ms(writes[True]) + ms(reads[True])) / (ms(writes[False]) + ms(reads[False])):.2f}")


if __name__ == "__main__":
    main()
