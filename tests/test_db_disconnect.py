"""A MariaDB connection killed under a request (KILL CONNECTION, a server restart) costs a retry on
a fresh connection, not a 500: a read runs again, a write runs again when the connection was lost
before COMMIT (the server rolled it back)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select, text

from cache.keys import project as project_key
from events import PROJECT_CREATED
from models import Project
from services.reads import cached
from services.uow import UnitOfWork, retry_on_deadlock


def _kill(database_url: str, connection_id: int) -> None:
    admin = create_engine(database_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"KILL CONNECTION {int(connection_id)}"))
    finally:
        admin.dispose()


@pytest.fixture
def mariadb_only(database_url):
    if not database_url.startswith("mysql"):
        pytest.skip("KILL CONNECTION is MariaDB's")
    return database_url


def test_a_write_whose_connection_is_killed_before_commit_runs_again(services, admin,
                                                                     mariadb_only):
    attempts = []

    @retry_on_deadlock
    def write() -> str:
        attempts.append(1)
        with UnitOfWork(services) as uow:
            own = uow.session.execute(text("SELECT CONNECTION_ID()")).scalar()
            project = Project(organization_id=admin.organization["id"], name="Killed",
                              owner_id=admin.user["id"])
            uow.session.add(project)
            uow.session.flush()
            if len(attempts) == 1:
                _kill(mariadb_only, own)  # mid-transaction: the insert is rolled back
                uow.session.execute(text("SELECT 1"))  # the next statement finds it gone
            uow.commit()
            return project.id

    project_id = write()
    assert len(attempts) == 2
    with services.db.session() as session:
        names = session.execute(select(Project.name).where(
            Project.organization_id == admin.organization["id"], Project.name == "Killed")).all()
    assert len(names) == 1 and project_id


def test_a_read_whose_connection_is_killed_runs_again(services, admin, mariadb_only):
    attempts = []

    def load(session) -> int:
        attempts.append(1)
        own = session.execute(text("SELECT CONNECTION_ID()")).scalar()
        if len(attempts) == 1:
            _kill(mariadb_only, own)
        return session.execute(text("SELECT 42")).scalar()

    value, _ = cached(services, project_key(admin.organization["id"], "no-such-project"), load)
    assert value == 42 and len(attempts) == 2


def _lose_connection_at_commit(uow: UnitOfWork, *, after_commit: bool) -> None:
    """The connection drops at COMMIT: after the server committed (the answer is lost), or before
    the COMMIT reached it (the server rolls the transaction back once it sees the socket close).
    The client sees the same error, 2013, either way."""
    import pymysql

    raw = uow.session.connection().connection.dbapi_connection
    real_commit = raw.commit

    def commit() -> None:
        if after_commit:
            real_commit()
        raw._sock.close()
        raise pymysql.err.OperationalError(2013, "Lost connection to server during query")

    raw.commit = commit


@pytest.mark.parametrize("after_commit", [True, False], ids=["committed", "rolled-back"])
def test_a_write_whose_connection_drops_at_commit_happens_exactly_once(services, admin,
                                                                       mariadb_only,
                                                                       after_commit):
    attempts = []

    @retry_on_deadlock
    def write() -> str:
        attempts.append(1)
        with UnitOfWork(services) as uow:
            project = Project(organization_id=admin.organization["id"], name="At commit",
                              owner_id=admin.user["id"])
            uow.session.add(project)
            uow.session.flush()
            uow.emit(PROJECT_CREATED, admin.organization["id"], project_id=project.id)
            if len(attempts) == 1:
                _lose_connection_at_commit(uow, after_commit=after_commit)
            uow.commit()
            return project.id

    project_id = write()

    assert len(attempts) == (1 if after_commit else 2)
    with services.db.session() as session:
        ids = session.execute(select(Project.id).where(
            Project.organization_id == admin.organization["id"],
            Project.name == "At commit")).scalars().all()
    assert ids == [project_id]
