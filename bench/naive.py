"""The floors the targets are measured against: the simplest Flask app that does each kind of
request, served by the project's own gunicorn settings on the same machine, database and Redis.

- `/health`: a constant, as the API's /health;
- `/read`: one Redis GET of a cached value, returned as it is (the issue's naive prototype);
- `/read-held`: the same value held by the process, for a bearer token verified once (pyjwt, as
  the API): an authenticated read with no round trip, the floor of every warm read of the API;
- `/write`: one row UPDATE in MariaDB, committed (what any durable write pays, before an outbox,
  a cache or a worker);
- `/write-promised`: the least a write of this API does to keep its promises (no lost write or
  invalidation, counts that add up, read-your-writes): in one transaction it locks the project's
  row, updates the task's, numbers the change on the project and inserts its outbox row; after the
  commit and before the answer, one pipeline bumps the task's and the list's versions and adds the
  change to the cached statistics. Its outbox rows are never marked done (this API batches those
  stamps, a few per hundred writes);
- `/write-warmed`: the promised write, plus what issue 11 asks of a write so that the next reader
  hits: in its transaction it reads the task's row and the first page (50) of its project's
  list, and the pipeline after the commit stores both, encoded, beside the bumps;
- `/mix`: the benchmark's mix at these floors: every twentieth request of a process is a promised
  write, the others the read (the mixed workload's 5% of writes); `/mix-warmed` the same with the
  warmed write.

`gunicorn -c web/gunicorn_conf.py "bench.naive:create_app()"` with NAIVE_DATABASE_URL,
NAIVE_REDIS_URL and NAIVE_SECRET (the key the benchmark's tokens are signed with). Its tables
(`bench_naive_*`) are created by `prepare` and dropped by `drop`.
"""

from __future__ import annotations

import itertools
import json
import os
import time

from flask import Flask, Response, request
from sqlalchemy import create_engine, text

TABLE = "bench_naive_floor"
PROJECTS_TABLE = "bench_naive_project"
OUTBOX_TABLE = "bench_naive_outbox"
ROWS = 1000
PROJECTS = 20
MIX_EVERY = 20  # one write in twenty requests: the mixed workload's 5%
READ_KEY = "bench:naive:value"


def create_app() -> Flask:
    import jwt
    import redis

    app = Flask(__name__)
    engine = create_engine(os.environ["NAIVE_DATABASE_URL"], pool_size=8, pool_pre_ping=False)
    cache = redis.Redis.from_url(os.environ["NAIVE_REDIS_URL"])
    rows = itertools.count()
    requests = itertools.count()
    secret = os.environ["NAIVE_SECRET"]
    verified: dict[str, dict] = {}
    held = cache.get(READ_KEY)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/read")
    def read():
        return Response(cache.get(READ_KEY), mimetype="application/json")

    @app.get("/read-held")
    def read_held():
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        claims = verified.get(token)
        if claims is None:
            try:
                claims = verified[token] = jwt.decode(token, secret, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                return {"title": "Unauthorized"}, 401
        if claims["exp"] <= time.time():
            return {"title": "Unauthorized"}, 401
        return Response(held, mimetype="application/json")

    @app.get("/write")
    def write():
        row = next(rows) % ROWS + 1
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {TABLE} SET v = v + 1 WHERE id = :id"), {"id": row})
        return {"id": row}

    def promised_write(warm: bool) -> dict:
        row = next(rows) % ROWS + 1
        project = row % PROJECTS + 1
        with engine.begin() as conn:
            conn.execute(text(f"SELECT seq FROM {PROJECTS_TABLE} WHERE id = :p FOR UPDATE"),
                         {"p": project})
            conn.execute(text(f"UPDATE {TABLE} SET v = v + 1 WHERE id = :id"), {"id": row})
            conn.execute(text(f"UPDATE {PROJECTS_TABLE} SET seq = seq + 1 WHERE id = :p"),
                         {"p": project})
            conn.execute(text(f"INSERT INTO {OUTBOX_TABLE} (payload) VALUES (:payload)"),
                         {"payload": json.dumps({"task": row, "project": project,
                                                 "deltas": [{"TODO": -1, "COMPLETED": 1}]})})
            if warm:
                task = conn.execute(text(f"SELECT id, project, v, title FROM {TABLE} "
                                         "WHERE id = :id"), {"id": row}).mappings().one()
                page = conn.execute(text(f"SELECT id, project, v, title FROM {TABLE} "
                                         "WHERE project = :p ORDER BY id LIMIT 50"),
                                    {"p": project}).mappings().all()
        pipe = cache.pipeline(transaction=False)
        pipe.incr(f"bench:naive:v:task:{row}")
        pipe.incr(f"bench:naive:v:list:{project}")
        pipe.hincrby(f"bench:naive:stats:{project}", "COMPLETED", 1)
        if warm:
            pipe.set(f"bench:naive:task:{row}", json.dumps(dict(task)), ex=300)
            pipe.set(f"bench:naive:list:{project}", json.dumps([dict(t) for t in page]), ex=60)
        pipe.execute()
        return {"id": row}

    @app.get("/write-promised")
    def write_promised():
        return promised_write(warm=False)

    @app.get("/write-warmed")
    def write_warmed():
        return promised_write(warm=True)

    @app.get("/mix")
    def mix():
        return write_promised() if next(requests) % MIX_EVERY == 0 else read()

    @app.get("/mix-warmed")
    def mix_warmed():
        return write_warmed() if next(requests) % MIX_EVERY == 0 else read()

    return app


def prepare(engine, cache, value: bytes) -> None:
    """The tables the writes update and the value the reads return."""
    with engine.begin() as conn:
        # A project's tasks are its first page (ROWS / PROJECTS = 50), titled like the
        # benchmark's own tasks.
        conn.execute(text(f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, project INT NOT NULL, "
                          "v INT NOT NULL, title VARCHAR(200) NOT NULL, KEY (project, id)) "
                          "ENGINE=InnoDB"))
        conn.execute(text(f"INSERT INTO {TABLE} (id, project, v, title) "
                          "VALUES (:id, :project, 0, :title)"),
                     [{"id": i, "project": i % PROJECTS + 1, "title": f"Task {i} of the floor"}
                      for i in range(1, ROWS + 1)])
        conn.execute(text(f"CREATE TABLE {PROJECTS_TABLE} (id INT PRIMARY KEY, "
                          "seq BIGINT NOT NULL) ENGINE=InnoDB"))
        conn.execute(text(f"INSERT INTO {PROJECTS_TABLE} (id, seq) VALUES (:id, 0)"),
                     [{"id": i} for i in range(1, PROJECTS + 1)])
        conn.execute(text(f"CREATE TABLE {OUTBOX_TABLE} (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
                          "payload JSON NOT NULL, processed_at DATETIME NULL) ENGINE=InnoDB"))
    cache.set(READ_KEY, value)


def drop(engine, cache) -> None:
    with engine.begin() as conn:
        for table in (TABLE, PROJECTS_TABLE, OUTBOX_TABLE):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    cache.delete(READ_KEY)
    for name in cache.scan_iter("bench:naive:*", count=1000):
        cache.delete(name)


def main() -> None:
    """Serve the app as `make up` serves the API (`python -m bench.naive`; WEB_PORT). Arguments
    (the benchmark's `--no-workers`) are ignored: there is nothing else to start."""
    from stack.up import BIN_DIR, GUNICORN_CONF

    port = os.environ["WEB_PORT"]
    os.execv(BIN_DIR / "gunicorn", [str(BIN_DIR / "gunicorn"), "-c", str(GUNICORN_CONF),
                                    "bench.naive:create_app()", "--bind", f"127.0.0.1:{port}"])


if __name__ == "__main__":
    main()
