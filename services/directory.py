"""Organizations and their members."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from cache import keys
from cache.store import Lookup
from events import ORGANIZATION_UPDATED, USER_CREATED, USER_UPDATED
from models import Organization, User, new_id
from services import present
from services.auth import Actor, hash_password
from services.context import Services
from services.errors import Conflict, Forbidden, NotFound
from services.pagination import page
from services.reads import cached
from services.uow import UnitOfWork


def load_organization(org_id: str):
    def load(db):
        return present.organization(db.get(Organization, org_id))
    return load


def get_organization(services: Services, actor: Actor,
                     lookup: Lookup | None = None) -> tuple[dict, str]:
    return cached(services, keys.organization(actor.org_id), load_organization(actor.org_id),
                  lookup)


def update_organization(services: Services, actor: Actor, *, name: str) -> dict:
    require_admin(actor)
    with UnitOfWork(services) as uow:
        org = uow.session.get(Organization, actor.org_id, with_for_update=True)
        org.name = name
        uow.emit(ORGANIZATION_UPDATED, org.id)
        uow.commit()
        return present.organization(org)


def require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise Forbidden("this action needs the admin role")


def load_user(org_id: str, user_id: str):
    def load(db) -> dict | None:
        user = db.get(User, user_id)
        return present.user(user) if user and user.organization_id == org_id else None
    return load


def get_user(services: Services, actor: Actor, user_id: str) -> tuple[dict, str]:
    found, source = cached(services, keys.user(actor.org_id, user_id),
                           load_user(actor.org_id, user_id))
    if found is None:
        raise NotFound("no such user")
    return found, source


def me(services: Services, actor: Actor) -> tuple[dict, str]:
    user, source = get_user(services, actor, actor.user_id)
    org, _ = get_organization(services, actor)
    return {**user, "organization": org}, source


def load_members_page(org_id: str, limit: int, cursor: str | None):
    def load(db):
        query = select(User).where(User.organization_id == org_id)
        return page(db, query, User, limit=limit, cursor=cursor, present=present.user)
    return load


def list_users(services: Services, actor: Actor, *, limit: int, cursor: str | None):
    return cached(services, keys.member_list(actor.org_id, limit=limit, cursor=cursor),
                  load_members_page(actor.org_id, limit, cursor))


def create_user(services: Services, actor: Actor, *, email: str, password: str,
                display_name: str, roles: list[str]) -> dict:
    require_admin(actor)
    password_hash = hash_password(password)
    with UnitOfWork(services) as uow:
        user = User(id=new_id(), organization_id=actor.org_id, email=email.lower(),
                    password_hash=password_hash, display_name=display_name,
                    roles=sorted(set(roles)))
        uow.session.add(user)
        try:
            uow.session.flush()
        except IntegrityError:
            raise Conflict("a user with this email already exists") from None
        uow.emit(USER_CREATED, actor.org_id, user_id=user.id)
        uow.commit()
        return present.user(user)


def _keep_an_admin(uow: UnitOfWork, org_id: str) -> None:
    """An organization always keeps an admin: nobody could manage it (or its cache) otherwise."""
    admins = [u for u in uow.session.scalars(
        select(User).where(User.organization_id == org_id).with_for_update()) if "admin" in u.roles]
    if len(admins) <= 1:
        raise Conflict("the organization's last admin cannot give up the admin role")


def update_user(services: Services, actor: Actor, user_id: str, changes: dict) -> dict:
    with UnitOfWork(services) as uow:
        user = uow.session.get(User, user_id, with_for_update=True)
        # 404 before 403: whether an id exists (in another organization) is never confirmed.
        if user is None or user.organization_id != actor.org_id:
            raise NotFound("no such user")
        if user_id != actor.user_id or "roles" in changes:
            require_admin(actor)
        if "admin" in user.roles and "admin" not in changes.get("roles", ["admin"]):
            _keep_an_admin(uow, actor.org_id)
        for field, value in changes.items():
            setattr(user, field, sorted(set(value)) if field == "roles" else value)
        uow.emit(USER_UPDATED, actor.org_id, user_id=user.id)
        uow.commit()
        return present.user(user)
