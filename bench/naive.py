"""The floors the targets are measured against: the simplest Flask app that does each kind of
request, served by the project's own gunicorn settings on the same machine, database and Redis.

- `/health`: a constant, as the API's /health;
- `/read`: one Redis GET of a cached value, returned as it is (the issue's naive prototype);
- `/write`: one row UPDATE in MariaDB, committed (what any durable write pays, before an outbox,
  a cache or a worker).

`gunicorn -c web/gunicorn_conf.py "bench.naive:create_app()"` with NAIVE_DATABASE_URL and
NAIVE_REDIS_URL. Its table (`bench_naive_floor`) is created by `prepare` and dropped by `drop`.
"""

from __future__ import annotations

import itertools
import os

from flask import Flask, Response
from sqlalchemy import create_engine, text

TABLE = "bench_naive_floor"
ROWS = 1000
READ_KEY = "bench:naive:value"


def create_app() -> Flask:
    import redis

    app = Flask(__name__)
    engine = create_engine(os.environ["NAIVE_DATABASE_URL"], pool_size=8, pool_pre_ping=False)
    cache = redis.Redis.from_url(os.environ["NAIVE_REDIS_URL"])
    rows = itertools.count()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/read")
    def read():
        return Response(cache.get(READ_KEY), mimetype="application/json")

    @app.get("/write")
    def write():
        row = next(rows) % ROWS + 1
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {TABLE} SET v = v + 1 WHERE id = :id"), {"id": row})
        return {"id": row}

    return app


def prepare(engine, cache, value: bytes) -> None:
    """The table the writes update and the value the reads return."""
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, v INT NOT NULL) "
                          "ENGINE=InnoDB"))
        conn.execute(text(f"INSERT INTO {TABLE} (id, v) VALUES (:id, 0)"),
                     [{"id": i} for i in range(1, ROWS + 1)])
    cache.set(READ_KEY, value)


def drop(engine, cache) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
    cache.delete(READ_KEY)


def main() -> None:
    """Serve the app as `make up` serves the API (`python -m bench.naive`; WEB_PORT). Arguments
    (the benchmark's `--no-workers`) are ignored: there is nothing else to start."""
    from stack.up import BIN_DIR, GUNICORN_CONF

    port = os.environ["WEB_PORT"]
    os.execv(BIN_DIR / "gunicorn", [str(BIN_DIR / "gunicorn"), "-c", str(GUNICORN_CONF),
                                    "bench.naive:create_app()", "--bind", f"127.0.0.1:{port}"])


if __name__ == "__main__":
    main()
