"""Request and response schemas (pydantic v2). Requests are validated with them; the OpenAPI
document is generated from them; responses are described by them (and checked by schemathesis)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints,
                      field_validator)

from services.pagination import DEFAULT_LIMIT

# API.md: text never holds NUL or other control characters (C0, DEL, C1); descriptions and
# bodies may hold tabs and newlines. The pattern is in the OpenAPI document too, so generated
# clients (and schemathesis) know the rule.
NO_CONTROLS = r"^[^\x00-\x1F\x7F-\x9F]*$"
MULTILINE = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*$"


def _text(pattern: str, message: str) -> tuple[AfterValidator, Any]:
    """A validator with its own message (pydantic's names the regex) and the pattern for OpenAPI."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(message)
        return value
    return AfterValidator(check), Field(json_schema_extra={"pattern": pattern})


Line = _text(NO_CONTROLS, "must not contain control characters")
Lines = _text(MULTILINE, "must not contain control characters other than tab and newline")

Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True), *Line]
LongText = Annotated[str, StringConstraints(max_length=10_000), *Lines]
Body = Annotated[str, StringConstraints(min_length=1, max_length=10_000), *Lines]
DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True),
                        *Line]
Password = Annotated[str, StringConstraints(min_length=8, max_length=128), *Line]
Email = Annotated[EmailStr, StringConstraints(max_length=254), *Line]
Url = Annotated[str, StringConstraints(max_length=2048,
                                       pattern=r"^https?://[^\s\x00-\x1F\x7F-\x9F]+$")]
Uuid = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
Role = Literal["admin", "member"]
TaskStatus = Literal["TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED"]
Priority = Literal["LOW", "MEDIUM", "HIGH", "URGENT"]
ProjectStatus = Literal["ACTIVE", "ARCHIVED"]


class Strict(BaseModel):
    """Request bodies: unknown fields and wrong types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    # Frozen: a parsed query string is shared by every request that sends the same one
    # (web.endpoint.parse_query).
    model_config = ConfigDict(extra="ignore", frozen=True)


# -- requests -----------------------------------------------------------------------------------
class SignUp(Strict):
    organization_name: Name
    email: Email
    password: Password
    display_name: DisplayName


class Login(Strict):
    email: Annotated[str, StringConstraints(min_length=1, max_length=254)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class OrganizationPatch(Strict):
    name: Name


class UserCreate(Strict):
    email: Email
    password: Password
    display_name: DisplayName
    roles: Annotated[list[Role], Field(min_length=1, max_length=2)] = ["member"]


class UserPatch(Strict):
    display_name: DisplayName = None
    avatar_url: Url | None = None
    roles: Annotated[list[Role], Field(min_length=1, max_length=2)] = None


class ProjectCreate(Strict):
    name: Name
    description: LongText = ""


class ProjectPatch(Strict):
    name: Name = None
    description: LongText = None
    status: ProjectStatus = None


class TaskCreate(Strict):
    title: Name
    description: LongText = ""
    status: TaskStatus = "TODO"
    priority: Priority = "MEDIUM"
    assignee_id: Uuid | None = None
    due_date: dt.date | None = None


class TaskPatch(Strict):
    title: Name = None
    description: LongText = None
    status: TaskStatus = None
    priority: Priority = None
    assignee_id: Uuid | None = None
    due_date: dt.date | None = None


class CommentCreate(Strict):
    body: Body


class Page(Query):
    limit: Annotated[int, Field(ge=1, le=200)] = DEFAULT_LIMIT
    cursor: Annotated[str, StringConstraints(max_length=512)] | None = None


class ProjectQuery(Page):
    status: ProjectStatus | None = None


class TaskQuery(Page):
    status: TaskStatus | None = None
    assignee_id: Uuid | None = None


class StatusQuery(Page):
    status: TaskStatus | None = None


class NotificationQuery(Page):
    unread: bool = False

    @field_validator("unread", mode="before")
    @classmethod
    def _flag(cls, value):
        if isinstance(value, str) and value.lower() in {"true", "1", "false", "0"}:
            return value.lower() in {"true", "1"}
        return value


# -- responses ----------------------------------------------------------------------------------
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Organization(BaseModel):
    id: str
    name: str
    slug: str
    status: Literal["ACTIVE", "SUSPENDED"]
    created_at: Timestamp


class User(BaseModel):
    id: str
    organization_id: str
    email: str
    display_name: str
    avatar_url: str | None
    roles: list[Role]
    created_at: Timestamp


class Me(User):
    organization: Organization


class Token(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int


class SignUpResult(Token):
    organization: Organization
    user: User


class Project(BaseModel):
    id: str
    organization_id: str
    name: str
    description: str
    status: ProjectStatus
    owner_id: str
    created_at: Timestamp
    updated_at: Timestamp


class Task(BaseModel):
    id: str
    organization_id: str
    project_id: str
    title: str
    description: str
    status: TaskStatus
    priority: Priority
    assignee_id: str | None
    due_date: dt.date | None
    created_at: Timestamp
    updated_at: Timestamp


class Comment(BaseModel):
    id: str
    task_id: str
    project_id: str
    author_id: str
    body: str
    created_at: Timestamp


class Notification(BaseModel):
    id: str
    user_id: str
    kind: Literal["TASK_ASSIGNED", "TASK_COMMENTED"]
    task_id: str
    read: bool
    created_at: Timestamp


class StatusCounts(BaseModel):
    TODO: int
    IN_PROGRESS: int
    BLOCKED: int
    COMPLETED: int


class ProjectStats(BaseModel):
    project_id: str
    total_tasks: int
    completed_tasks: int
    open_tasks: int
    tasks_by_status: StatusCounts
    total_comments: int
    computed_at: Timestamp
    stale: bool


class UserStats(BaseModel):
    user_id: str
    assigned_tasks: int
    completed_tasks: int
    open_tasks: int
    computed_at: Timestamp
    stale: bool


class UnreadCount(BaseModel):
    unread: int


class FeatureFlags(BaseModel):
    flags: dict[str, bool]


class RateLimits(BaseModel):
    limits: dict[str, int]


class TaskAccepted(BaseModel):
    task_id: str


class Status(BaseModel):
    status: str


class CacheHealth(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    hit_rate: float | None
    memory_used_mb: float | None
    connected_clients: int | None
    breaker: str
    error: str | None = None
    # Why the status is degraded: a low hit rate, or a cache Redis that cannot evict.
    reasons: list[str] = []
    maxmemory_policy: str | None = None
    maxmemory_mb: float | None = None
    evicted_keys: int | None = None


def page_of(item: type[BaseModel]) -> type[BaseModel]:
    return type(f"{item.__name__}Page", (BaseModel,),
                {"__annotations__": {"items": list[item], "next_cursor": str | None}})


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = None
