"""The caller's notifications and its unread badge."""

from __future__ import annotations

from sqlalchemy import func, select, update

from cache import keys
from events import NOTIFICATION_READ
from models import Notification
from services import present
from services.auth import Actor
from services.context import Services
from services.errors import NotFound
from services.pagination import page
from services.reads import cached
from services.uow import UnitOfWork


def list_notifications(services: Services, actor: Actor, *, unread: bool, limit: int,
                       cursor: str | None):
    def load(db):
        query = select(Notification).where(Notification.user_id == actor.user_id)
        if unread:
            query = query.where(Notification.read.is_(False))
        return page(db, query, Notification, limit=limit, cursor=cursor,
                    present=present.notification)
    key = keys.notifications(actor.org_id, actor.user_id, unread=unread, limit=limit,
                             cursor=cursor)
    return cached(services, key, load)


def load_unread_count(user_id: str):
    def load(db):
        count = db.scalar(select(func.count()).select_from(Notification).where(
            Notification.user_id == user_id, Notification.read.is_(False)))
        return {"unread": int(count)}
    return load


def unread_count(services: Services, actor: Actor) -> tuple[dict, str]:
    return cached(services, keys.unread_count(actor.org_id, actor.user_id),
                  load_unread_count(actor.user_id))


def mark_read(services: Services, actor: Actor, notification_id: str) -> None:
    with UnitOfWork(services) as uow:
        row = uow.session.get(Notification, notification_id)
        if row is None or row.user_id != actor.user_id:
            raise NotFound("no such notification")
        row.read = True
        uow.emit(NOTIFICATION_READ, actor.org_id, user_ids=[actor.user_id])
        uow.commit()


def mark_all_read(services: Services, actor: Actor) -> None:
    with UnitOfWork(services) as uow:
        uow.session.execute(update(Notification).where(
            Notification.user_id == actor.user_id, Notification.read.is_(False)
        ).values(read=True))
        uow.emit(NOTIFICATION_READ, actor.org_id, user_ids=[actor.user_id])
        uow.commit()
