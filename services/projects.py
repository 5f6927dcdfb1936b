"""Projects."""

from __future__ import annotations

from sqlalchemy import delete, func, select

from aggregates import Delta
from cache import keys
from events import PROJECT_CREATED, PROJECT_DELETED, PROJECT_UPDATED
from models import Comment, Notification, Project, Task, User, new_id, utcnow
from services import present
from services.auth import Actor
from services.context import Services
from services.errors import Forbidden, NotFound
from services.numbering import Numbering, lock_numbered
from services.pagination import page
from services.reads import cached
from services.uow import UnitOfWork, retry_on_deadlock


def load_project(org_id: str, project_id: str):
    def load(db) -> dict | None:
        project = db.get(Project, project_id)
        return present.project(project) if project and project.organization_id == org_id else None
    return load


def project_key(actor: Actor, project_id: str) -> keys.Key:
    return keys.project(actor.org_id, project_id)


def get_project(services: Services, actor: Actor, project_id: str, lookup=None) -> tuple[dict, str]:
    found, source = cached(services, project_key(actor, project_id),
                           load_project(actor.org_id, project_id), lookup)
    if found is None:
        raise NotFound("no such project")
    return found, source


def load_projects_page(org_id: str, status: str | None, limit: int, cursor: str | None):
    """A page of the organization's projects as the API presents it (also the auditor's truth)."""
    def load(db):
        query = select(Project).where(Project.organization_id == org_id)
        if status:
            query = query.where(Project.status == status)
        return page(db, query, Project, limit=limit, cursor=cursor, present=present.project)
    return load


def list_projects(services: Services, actor: Actor, *, status: str | None, limit: int,
                  cursor: str | None):
    key = keys.project_list(actor.org_id, status=status, limit=limit, cursor=cursor)
    return cached(services, key, load_projects_page(actor.org_id, status, limit, cursor))


def create_project(services: Services, actor: Actor, *, name: str, description: str) -> dict:
    with UnitOfWork(services) as uow:
        now = utcnow()
        project = Project(id=new_id(), organization_id=actor.org_id, name=name,
                          description=description, owner_id=actor.user_id, created_at=now,
                          updated_at=now)
        uow.session.add(project)
        uow.emit(PROJECT_CREATED, actor.org_id, project_id=project.id)
        uow.commit()
        return present.project(project)


def locked_project(uow: UnitOfWork, actor: Actor, project_id: str) -> Project:
    """The project, row-locked for the rest of the transaction (its changes are numbered)."""
    project = uow.session.get(Project, project_id, with_for_update=True)
    if project is None or project.organization_id != actor.org_id:
        raise NotFound("no such project")
    return project


@retry_on_deadlock
def update_project(services: Services, actor: Actor, project_id: str, changes: dict) -> dict:
    with UnitOfWork(services) as uow:
        project = locked_project(uow, actor, project_id)
        for field, value in changes.items():
            setattr(project, field, value)
        project.updated_at = utcnow()
        uow.emit(PROJECT_UPDATED, actor.org_id, project_id=project.id)
        uow.commit()
        return present.project(project)


def _assignee_deltas(uow: UnitOfWork, actor: Actor, project_id: str) -> list[Delta]:
    """The project's tasks leave their assignees' statistics with it."""
    rows = uow.session.execute(
        select(Task.assignee_id, Task.status, func.count()).where(
            Task.project_id == project_id, Task.assignee_id.is_not(None))
        .group_by(Task.assignee_id, Task.status)).all()
    per_user: dict[str, dict[str, int]] = {}
    for user_id, status, count in rows:
        per_user.setdefault(user_id, {})[status] = -int(count)
    numbering = Numbering(uow, actor.org_id)
    for user_id in sorted(per_user):
        numbering.number(lock_numbered(uow, User, user_id, actor.org_id), per_user[user_id])
    return numbering.deltas


@retry_on_deadlock
def delete_project(services: Services, actor: Actor, project_id: str) -> None:
    with UnitOfWork(services) as uow:
        project = locked_project(uow, actor, project_id)
        if not actor.is_admin and project.owner_id != actor.user_id:
            raise Forbidden("only the project's owner or an admin may delete it")
        deltas = _assignee_deltas(uow, actor, project.id)
        # Explicit deletes, children first: the same on every backend, cascades or not.
        for model in (Notification, Comment, Task):
            uow.session.execute(delete(model).where(model.project_id == project.id))
        uow.session.delete(project)
        uow.emit(PROJECT_DELETED, actor.org_id, deltas, project_id=project.id)
        uow.commit()
