"""The domain schema: SQLAlchemy 2.x typed mappings, portable between MySQL/MariaDB and SQLite.

Ids are canonical lower-case UUID strings: they travel as-is through JSON, cache keys and URLs.
`stats_seq` on projects and users numbers every committed change to their aggregates, so a cached
aggregate knows exactly which changes it already contains (see aggregates/).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> dt.datetime:
    """Naive UTC with microseconds: both backends store it as-is, and ordering by it is stable."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# MySQL's DATETIME drops fractions unless asked; cursors and "newest first" need them.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = String(36)
# Auto-increment needs INTEGER on SQLite and BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class OrgStatus(str, enum.Enum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"


class ProjectStatus(str, enum.Enum):
    ACTIVE = "ACTIVE"
    ARCHIVED = "ARCHIVED"


class TaskStatus(str, enum.Enum):
    TODO = "TODO"
    IN_PROGRESS = "IN_PROGRESS"
    BLOCKED = "BLOCKED"
    COMPLETED = "COMPLETED"


class Priority(str, enum.Enum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    URGENT = "URGENT"


class NotificationKind(str, enum.Enum):
    TASK_ASSIGNED = "TASK_ASSIGNED"
    TASK_COMMENTED = "TASK_COMMENTED"


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(220), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=OrgStatus.ACTIVE.value)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (Index("ix_users_org_created", "organization_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    organization_id: Mapped[str] = mapped_column(
        Id, ForeignKey("organizations.id", ondelete="CASCADE")
    )
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(100))
    avatar_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    roles: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["member"])
    stats_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class AuthSession(Base):
    """A login. A token is valid only while its session row is unrevoked and unexpired."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(Id)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class LoginThrottle(Base):
    """Failed-login counts per email or client address, used only while Redis is unreachable:
    one conditional UPDATE counts an attempt or refuses it, atomically on both backends."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_ends: Mapped[dt.datetime] = mapped_column(Timestamp)


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (
        Index("ix_projects_org_status_created", "organization_id", "status", "created_at", "id"),
        Index("ix_projects_org_created", "organization_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    organization_id: Mapped[str] = mapped_column(
        Id, ForeignKey("organizations.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=ProjectStatus.ACTIVE.value)
    owner_id: Mapped[str] = mapped_column(Id, ForeignKey("users.id"))
    stats_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_project_status", "project_id", "status"),
        Index("ix_tasks_assignee_status", "assignee_id", "status"),
        Index("ix_tasks_project_created", "project_id", "created_at", "id"),
        Index("ix_tasks_assignee_created", "assignee_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    organization_id: Mapped[str] = mapped_column(Id)
    project_id: Mapped[str] = mapped_column(Id, ForeignKey("projects.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.TODO.value)
    priority: Mapped[str] = mapped_column(String(16), default=Priority.MEDIUM.value)
    assignee_id: Mapped[str | None] = mapped_column(
        Id, ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    due_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Comment(Base):
    __tablename__ = "comments"
    __table_args__ = (Index("ix_comments_task_created", "task_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    task_id: Mapped[str] = mapped_column(Id, ForeignKey("tasks.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(
        Id, ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    author_id: Mapped[str] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_user_read", "user_id", "read"),
        Index("ix_notifications_user_created", "user_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    organization_id: Mapped[str] = mapped_column(Id)
    kind: Mapped[str] = mapped_column(String(32))
    task_id: Mapped[str] = mapped_column(
        Id, ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    project_id: Mapped[str] = mapped_column(
        Id, ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    read: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class OutboxEvent(Base):
    """A domain event, written in the transaction of the change it describes.

    The web process hands it to Celery after commit; the worker stamps `processed_at` once it has
    applied it; a beat sweep re-sends what stayed unprocessed (broker down, process crash)."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_processed", "processed_at", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(Id, unique=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(64))
    organization_id: Mapped[str] = mapped_column(Id)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    processed_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class ConfigEntry(Base):
    """Process-wide configuration (feature flags, public rate limits, role definitions).

    Read on nearly every request, changed rarely: the L1 cache's source."""

    __tablename__ = "config_entries"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
