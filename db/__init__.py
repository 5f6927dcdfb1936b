"""Engines and sessions. Nothing is built at import time: callers hold a `Database`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_recycle", 3600)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    # READ COMMITTED: each statement sees what committed before it, as the cache assumes.
    kwargs.setdefault("isolation_level", "READ COMMITTED")
    return create_engine(url, **kwargs)


def _sqlite_engine(url: str, **kwargs) -> Engine:
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        # WAL lets readers run beside the single writer; foreign keys give ON DELETE CASCADE.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead so two
    # writers queue on busy_timeout rather than failing on lock upgrade.
    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        write = conn.get_execution_options().get("sqlite_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


@dataclass
class Database:
    engine: Engine
    sessions: sessionmaker[Session]
    writers: sessionmaker[Session]

    @classmethod
    def connect(cls, url: str, **engine_kwargs) -> "Database":
        engine = make_engine(url, **engine_kwargs)
        # On SQLite a writer takes the write lock at BEGIN; elsewhere the option means nothing.
        writer_engine = engine.execution_options(sqlite_write=True)
        return cls(engine, sessionmaker(engine, expire_on_commit=False),
                   sessionmaker(writer_engine, expire_on_commit=False))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"
