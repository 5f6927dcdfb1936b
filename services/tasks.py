"""Tasks and comments. Every change that moves a count is numbered on the project (and assignee)
row it belongs to, under that row's lock, and carried as a delta by its event."""

from __future__ import annotations

import functools
from types import SimpleNamespace

from sqlalchemy import Executable, Row, bindparam, delete, func, select, update

from cache import keys
from events import COMMENT_CREATED, NOTIFICATION_CREATED, TASK_CREATED, TASK_DELETED, TASK_UPDATED
from models import Comment, Notification, NotificationKind, Project, Task, User, new_id, utcnow
from services import present
from services.auth import Actor
from services.context import Services
from services.directory import get_user
from services.errors import Invalid, NotFound
from services.numbering import Numbered, Numbering, lock_numbered
from services.pagination import DEFAULT_LIMIT, page
from services.projects import get_project
from services.reads import cached
from services.uow import UnitOfWork, retry_on_deadlock


# -- reads --------------------------------------------------------------------------------------
def load_task(org_id: str, task_id: str):
    def load(db) -> dict | None:
        task = db.get(Task, task_id)
        return present.task(task) if task and task.organization_id == org_id else None
    return load


def get_task(services: Services, actor: Actor, task_id: str, lookup=None) -> tuple[dict, str]:
    found, source = cached(services, keys.task(actor.org_id, task_id),
                           load_task(actor.org_id, task_id), lookup)
    if found is None:
        raise NotFound("no such task")
    return found, source


def list_project_tasks(services: Services, actor: Actor, project_id: str, *, status: str | None,
                       assignee_id: str | None, limit: int, cursor: str | None,
                       project_lookup=None):
    get_project(services, actor, project_id, project_lookup)
    key = keys.project_tasks(actor.org_id, project_id, status=status, assignee_id=assignee_id,
                             limit=limit, cursor=cursor)
    return cached(services, key, load_tasks_page(project_id, status, assignee_id, limit, cursor))


def load_tasks_page(project_id: str, status: str | None, assignee_id: str | None, limit: int,
                    cursor: str | None):
    """A page of a project's tasks as the API presents it (also the auditor's truth)."""
    def load(db):
        query = select(Task).where(Task.project_id == project_id)
        if status:
            query = query.where(Task.status == status)
        if assignee_id:
            query = query.where(Task.assignee_id == assignee_id)
        return page(db, query, Task, limit=limit, cursor=cursor, present=present.task)
    return load


def list_user_tasks(services: Services, actor: Actor, user_id: str, *, status: str | None,
                    limit: int, cursor: str | None):
    get_user(services, actor, user_id)

    def load(db):
        query = select(Task).where(Task.assignee_id == user_id,
                                   Task.organization_id == actor.org_id)
        if status:
            query = query.where(Task.status == status)
        return page(db, query, Task, limit=limit, cursor=cursor, present=present.task)
    key = keys.user_tasks(actor.org_id, user_id, status=status, limit=limit, cursor=cursor)
    return cached(services, key, load)


def list_comments(services: Services, actor: Actor, task_id: str, *, limit: int,
                  cursor: str | None):
    get_task(services, actor, task_id)
    return cached(services, keys.task_comments(actor.org_id, task_id, limit=limit, cursor=cursor),
                  load_comments_page(task_id, limit, cursor))


def load_comments_page(task_id: str, limit: int, cursor: str | None):
    def load(db):
        query = select(Comment).where(Comment.task_id == task_id)
        return page(db, query, Comment, limit=limit, cursor=cursor, present=present.comment,
                    newest_first=False)
    return load


# -- after a write ------------------------------------------------------------------------------
def warm_after_write(uow: UnitOfWork, org_id: str, project_id: str,
                     task: dict | None = None, *, moved: bool = True) -> None:
    """Have the write store, once committed, the new values of what it retires and readers read
    most: the task (`task`, presented as the write leaves it; None after a delete) and the first
    page of its project's task list as a read without query parameters gets it. Call it before
    the commit.

    The values are loaded as the write commits them (in its transaction, under its locks: see
    UnitOfWork._load_to_warm) and stored by the bumps' own script, only if no other write
    bumped in between (UnitOfWork.warm, cache.store._BUMP): a reader never finds the key
    retired and not yet stored again, and a value stored under current tokens was loaded after
    every write whose bump came before. No single-flight lock: a reader loading the same key at
    once stores the same committed data. With Redis unavailable it does nothing; no error of
    its own fails the write, save the database's.

    `moved=False` says the write left the task where it was in its project's order (an update:
    the order is by creation): a cached first page is then revised with the task's new row
    instead of loaded again, which was most of a status change's warm-up.
    """
    if not uow.services.cache.enabled:
        return
    page_key = keys.project_tasks(org_id, project_id, status=None, assignee_id=None,
                                  limit=DEFAULT_LIMIT, cursor=None)
    load_page = load_tasks_page(project_id, None, None, DEFAULT_LIMIT, None)
    if task is None:
        uow.warm(page_key, load_page)
        return
    uow.warm(keys.task(org_id, task["id"]), load_task(org_id, task["id"]), known=task)
    uow.warm(page_key, load_page, None if moved else _page_revised(task))


def _page_revised(task: dict):
    """A cached page with the task's new row in place of its old one. The task kept its place,
    so a page without it is unchanged."""
    def revise(page: dict, db) -> dict:
        if not any(item["id"] == task["id"] for item in page["items"]):
            return page
        # A new page: cached values are shared by readers and never changed in place.
        return {**page, "items": [task if item["id"] == task["id"] else item
                                  for item in page["items"]]}
    return revise


# -- writes -------------------------------------------------------------------------------------
# The hot writes (a task's edit, a comment) run Core statements, not the ORM: see
# services/numbering.py for what the ORM cost on this path.
def _lock_members(uow: UnitOfWork, actor: Actor, *user_ids: str | None) -> dict[str, Numbered]:
    """Row-lock the users whose statistics this transaction numbers, in id order, before any
    insert or update references them: InnoDB's foreign-key checks take shared locks on them, and
    upgrading those later is how two writers deadlock. Returns them by id.

    Each is numbered exactly once by the write that locks it (a reassignment numbers the old and
    the new assignee once each, a status change the assignee once): the lock takes the number."""
    locked = {}
    for user_id in sorted({u for u in user_ids if u}):
        user = lock_numbered(uow, User, user_id, actor.org_id, take=True)
        if user is None:
            raise Invalid("assignee_id", "must be a member of this organization")
        locked[user_id] = user
    return locked


def _notify(uow: UnitOfWork, actor: Actor, task, user_id: str | None,
            kind: NotificationKind) -> None:
    if not user_id or user_id == actor.user_id:
        return
    uow.insert(Notification, {
        "id": new_id(), "user_id": user_id, "organization_id": actor.org_id, "kind": kind.value,
        "task_id": task.id, "project_id": task.project_id})
    uow.emit(NOTIFICATION_CREATED, actor.org_id, user_ids=[user_id])


@retry_on_deadlock
def create_task(services: Services, actor: Actor, project_id: str, fields: dict) -> dict:
    with UnitOfWork(services) as uow:
        project = lock_numbered(uow, Project, project_id, actor.org_id, take=True)
        if project is None:
            raise NotFound("no such project")
        members = _lock_members(uow, actor, fields.get("assignee_id"))
        now = utcnow()
        task = Task(id=new_id(), organization_id=actor.org_id, project_id=project.id,
                    created_at=now, updated_at=now, **fields)
        task.status = task.status or "TODO"
        task.priority = task.priority or "MEDIUM"
        numbering = Numbering(uow, actor.org_id)
        numbering.number(project, {task.status: 1})
        numbering.number(members.get(task.assignee_id), {task.status: 1})
        uow.session.add(task)
        uow.session.flush()  # no ORM relationships order the inserts: the task goes first
        services.task_projects.put((actor.org_id, task.id), project.id)
        uow.emit(TASK_CREATED, actor.org_id, numbering.deltas, task_id=task.id,
                 project_id=project.id, assignees=[task.assignee_id])
        _notify(uow, actor, task, task.assignee_id, NotificationKind.TASK_ASSIGNED)
        created = present.task(task)
        warm_after_write(uow, actor.org_id, project.id, created)
        uow.commit()
    return created


@functools.cache
def _task_statements() -> tuple[Executable, Executable, Executable]:
    """The task's project, the task row-locked, the task changed (SET from the parameters)."""
    t = Task.__table__
    return (select(t.c.project_id).where(t.c.id == bindparam("task_id"),
                                         t.c.organization_id == bindparam("org_id")),
            select(t).where(t.c.id == bindparam("task_id")).with_for_update(),
            update(t).where(t.c.id == bindparam("task_id")))


def _locked_task(uow: UnitOfWork, actor: Actor, task_id: str, *,
                 numbered: bool = False) -> tuple[Row, Numbered]:
    """The task's row and its project, locked project first: every write to a project's tasks
    takes the project's lock first, so writers of one project queue instead of deadlocking.
    `numbered`: the write numbers a change of the project's counts (an empty one if it turns
    out to change none), and its lock takes the number (`lock_numbered(take=True)`).

    The task's own lock checks the project it was found in (`_project_of`)."""
    project_id = _project_of(uow, actor, task_id)
    project = project_id and lock_numbered(uow, Project, project_id, actor.org_id,
                                           take=numbered)
    if not project:
        raise NotFound("no such task")
    task = uow.execute(_task_statements()[1], {"task_id": task_id}).first()
    if task is None or task.organization_id != actor.org_id or task.project_id != project.id:
        raise NotFound("no such task")
    uow.services.task_projects.put((actor.org_id, task_id), project.id)
    return task, project


def _project_of(uow: UnitOfWork, actor: Actor, task_id: str) -> str | None:
    """The project of the task, by a query only when this process knows it from nowhere else.

    A task never changes project: this process's near copy of the task, or its memo of the tasks
    it wrote (`Services.task_projects`, by organization and task), names the project to lock
    without a query (a tenth of a write's CPU in the API; the near copy alone missed 90% of the
    writes of the benchmark's writes-only run, dropped by the write before: BENCHMARKS.md). A
    deleted task is then not found by its lock."""
    held = uow.services.cache.held(keys.task(actor.org_id, task_id))  # MISSING, None or a task
    if isinstance(held, dict):
        return held["project_id"]
    return uow.services.task_projects.get((actor.org_id, task_id)) or uow.execute(
        _task_statements()[0], {"task_id": task_id, "org_id": actor.org_id}).scalar()


@retry_on_deadlock
def update_task(services: Services, actor: Actor, task_id: str, changes: dict) -> dict:
    with UnitOfWork(services) as uow:
        # A status change is counted on the project: its lock takes the number at once. A status
        # set to the one the task has (a quarter of the benchmark's) then tells an empty change,
        # so that the numbers keep no gap.
        task, project = _locked_task(uow, actor, task_id, numbered="status" in changes)
        old_status, old_assignee = task.status, task.assignee_id
        new_status = changes.get("status", old_status)
        new_assignee = changes.get("assignee_id", old_assignee)
        # A write that changes neither counts no one: no user's row to lock (a quarter of the
        # benchmark's status changes set the status the task has).
        counted = new_status != old_status or new_assignee != old_assignee
        members = _lock_members(uow, actor, old_assignee, new_assignee) if counted else {}
        numbering = Numbering(uow, actor.org_id)
        if new_status != old_status:
            numbering.number(project, {old_status: -1, new_status: 1})
        elif project.taken:
            numbering.number(project, {})
        if new_assignee != old_assignee:
            numbering.number(members.get(old_assignee), {old_status: -1})
            numbering.number(members.get(new_assignee), {new_status: 1})
        elif new_status != old_status:
            numbering.number(members.get(new_assignee), {old_status: -1, new_status: 1})
        values = {**changes, "updated_at": utcnow()}
        uow.execute(_task_statements()[2], {"task_id": task_id, **values})
        updated = present.task(SimpleNamespace(**{**task._mapping, **values}))
        uow.emit(TASK_UPDATED, actor.org_id, numbering.deltas, task_id=task_id,
                 project_id=project.id,
                 assignees=sorted({a for a in (old_assignee, new_assignee) if a}))
        if new_assignee != old_assignee:
            _notify(uow, actor, task, new_assignee, NotificationKind.TASK_ASSIGNED)
        warm_after_write(uow, actor.org_id, project.id, updated, moved=False)
        uow.commit()
    return updated


@retry_on_deadlock
def delete_task(services: Services, actor: Actor, task_id: str) -> None:
    with UnitOfWork(services) as uow:
        task, project = _locked_task(uow, actor, task_id, numbered=True)
        members = _lock_members(uow, actor, task.assignee_id)
        comments = uow.session.scalar(
            select(func.count()).select_from(Comment).where(Comment.task_id == task.id))
        notified = sorted(set(uow.session.scalars(
            select(Notification.user_id).where(Notification.task_id == task.id))))
        numbering = Numbering(uow, actor.org_id)
        numbering.number(project, {task.status: -1, "comments": -comments})
        numbering.number(members.get(task.assignee_id), {task.status: -1})
        # Children first: the same on every backend, cascades or not.
        for model, column in ((Notification, "task_id"), (Comment, "task_id"), (Task, "id")):
            table = model.__table__
            uow.execute(delete(table).where(table.c[column] == task.id))
        uow.emit(TASK_DELETED, actor.org_id, numbering.deltas, task_id=task.id,
                 project_id=project.id, assignees=[task.assignee_id], notified=notified)
        warm_after_write(uow, actor.org_id, project.id)
        uow.commit()


@retry_on_deadlock
def create_comment(services: Services, actor: Actor, task_id: str, *, body: str) -> dict:
    with UnitOfWork(services) as uow:
        task, project = _locked_task(uow, actor, task_id, numbered=True)
        comment = {"id": new_id(), "task_id": task.id, "project_id": project.id,
                   "author_id": actor.user_id, "body": body, "created_at": utcnow()}
        uow.insert(Comment, comment)
        numbering = Numbering(uow, actor.org_id)
        numbering.number(project, {"comments": 1})
        uow.emit(COMMENT_CREATED, actor.org_id, numbering.deltas, task_id=task.id,
                 project_id=project.id)
        _notify(uow, actor, task, task.assignee_id, NotificationKind.TASK_COMMENTED)
        uow.commit()
    return present.comment(SimpleNamespace(**comment))
