"""Sign-up, login, token refresh and logout; turning a bearer token into an actor."""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from cache import keys
from cache.store import Lookup, SideCommand
from events import ORGANIZATION_CREATED, SESSION_ENDED, USER_CREATED
from models import AuthSession, Organization, User, new_id, utcnow
from services import login_limit, present
from services.context import Services
from services.errors import Conflict, Unauthorized
from services.reads import cached
from services.uow import UnitOfWork

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
# The hasher and a hash verified against when the email is unknown (so both failures cost the
# same time), made together on first use: a parallel first login must never see one without
# the other.
_hashing: tuple[PasswordHasher, str] | None = None
_hashing_lock = threading.Lock()


def _password_hashing() -> tuple[PasswordHasher, str]:
    global _hashing
    if _hashing is None:
        with _hashing_lock:
            if _hashing is None:
                import os

                # The tests lower the memory cost through this variable; production keeps the
                # default.
                memory = int(os.environ.get("PASSWORD_HASH_MEMORY_KIB", "65536"))
                made = PasswordHasher(memory_cost=memory, time_cost=3 if memory >= 65536 else 2)
                _hashing = (made, made.hash("not-a-password"))
    return _hashing


def hasher() -> PasswordHasher:
    return _password_hashing()[0]


def hash_password(password: str) -> str:
    return hasher().hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        made, dummy = _password_hashing()
        return made.verify(password_hash or dummy, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class Actor:
    user_id: str
    org_id: str
    session_id: str
    roles: tuple[str, ...]
    email: str

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:200] or "org"
    return f"{slug}-{new_id()[:8]}"


def issue_token(services: Services, session: AuthSession) -> dict:
    ttl = services.settings.access_token_ttl
    now = int(time.time())
    claims = {"sub": session.user_id, "sid": session.id, "org": session.organization_id,
              "iat": now, "exp": now + ttl}
    token = jwt.encode(claims, services.settings.secret_key, algorithm=ALGORITHM)
    return {"access_token": token, "token_type": "Bearer", "expires_in": ttl}


def _new_session(uow: UnitOfWork, user: User) -> AuthSession:
    ttl = uow.services.settings.access_token_ttl
    row = AuthSession(id=new_id(), user_id=user.id, organization_id=user.organization_id,
                      expires_at=utcnow() + dt.timedelta(seconds=ttl))
    uow.session.add(row)
    return row


def sign_up(services: Services, *, organization_name: str, email: str, password: str,
            display_name: str) -> dict:
    password_hash = hash_password(password)
    with UnitOfWork(services) as uow:
        org = Organization(id=new_id(), name=organization_name, slug=slugify(organization_name))
        user = User(id=new_id(), organization_id=org.id, email=email.lower(),
                    password_hash=password_hash, display_name=display_name, roles=["admin"])
        uow.session.add_all([org, user])
        try:
            uow.session.flush()
        except IntegrityError:
            raise Conflict("a user with this email already exists") from None
        login = _new_session(uow, user)
        uow.emit(ORGANIZATION_CREATED, org.id)
        uow.emit(USER_CREATED, org.id, user_id=user.id)
        uow.commit()
        return {"organization": present.organization(org), "user": present.user(user),
                **issue_token(services, login)}


def login(services: Services, *, email: str, password: str, address: str | None = None) -> dict:
    """`address` is the client's (behind trusted proxies only: web/client.py); None skips the
    per-address limit."""
    slot = login_limit.take_slot(services, email=email, address=address)
    with UnitOfWork(services) as uow:
        user = uow.session.scalar(select(User).where(User.email == email.lower()))
        login_limit.password_checks.inc()
        if not verify_password(user.password_hash if user else None, password):
            raise Unauthorized("invalid email or password")
        login_limit.give_back(services, slot, uow.session)
        login_session = _new_session(uow, user)
        uow.commit()
        return issue_token(services, login_session)


def end_session(services: Services, actor: Actor, *, replace: bool) -> dict | None:
    """Logout (replace=False) or refresh (replace=True): the old token stops working at once."""
    with UnitOfWork(services) as uow:
        row = uow.session.get(AuthSession, actor.session_id, with_for_update=True)
        if row is None or row.revoked_at is not None:
            raise Unauthorized("session has ended")
        row.revoked_at = utcnow()
        new = None
        if replace:
            user = uow.session.get(User, actor.user_id)
            new = _new_session(uow, user)
        uow.emit(SESSION_ENDED, actor.org_id, session_id=actor.session_id, user_id=actor.user_id)
        uow.commit()
        return issue_token(services, new) if new else None


# Verified tokens, per process: verifying a signature costs more than a warm cached read
# (bench/, BENCHMARKS.md). Keyed by the whole signed token and the key that verified it; expiry is
# still checked on every use, and revocation is the session lookup's business, not this cache's.
# A plain dict emptied when full: an LRU's bookkeeping and lock were 2-3 us of every request, and
# only tokens with a valid signature get in.
_VERIFIED_MAX = 4096
_verified: dict[tuple[str, str], dict] = {}


def _decode(services: Services, token: str) -> dict:
    secret = services.settings.secret_key
    claims = _verified.get((token, secret))
    if claims is not None:
        if claims["exp"] <= time.time():
            raise Unauthorized("token has expired")
        return claims
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["exp", "sub", "sid", "org"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token has expired") from None
    except jwt.InvalidTokenError:
        raise Unauthorized("token is invalid") from None
    if not all(isinstance(claims[c], str) for c in ("sub", "sid", "org")):
        raise Unauthorized("token is invalid")
    if isinstance(claims["exp"], (int, float)):
        if len(_verified) >= _VERIFIED_MAX:
            _verified.clear()
        _verified[(token, secret)] = claims
    return claims


def load_session(session_id: str, user_id: str):
    def load(db) -> dict | None:
        row = db.execute(
            select(AuthSession, User).join(User, User.id == AuthSession.user_id)
            .where(AuthSession.id == session_id, AuthSession.user_id == user_id)
        ).first()
        if row is None or row[0].revoked_at is not None:
            return None
        login_session, user = row
        return {"user_id": user.id, "organization_id": user.organization_id,
                "roles": list(user.roles), "email": user.email,
                "expires_at": login_session.expires_at.replace(tzinfo=dt.timezone.utc).timestamp()}
    return load


def authenticate(services: Services, token: str, *also: keys.Key,
                 prefetch: Callable[[str], Sequence[keys.Key | SideCommand]] | None = None,
                 ) -> tuple[Actor, list[Lookup | SideCommand]]:
    """The actor of a bearer token, with the lookups of `also` (and of `prefetch(org_id)`: keys
    or side reads that need the token's organization) made in the same round trip, returned in
    their order. Their values are only for the caller to use once this returned, i.e. once the
    session is known valid."""
    claims = _decode(services, token)
    org_id, user_id, session_id = claims["org"], claims["sub"], claims["sid"]
    wanted: Sequence[keys.Key | SideCommand] = (*also, *(prefetch(org_id) if prefetch else ()))
    session_key = keys.session(org_id, user_id, session_id)
    plain = [k for k in wanted if isinstance(k, keys.Key)]
    side = [k for k in wanted if not isinstance(k, keys.Key)]
    found = iter(services.cache.lookup_many([session_key, *plain], side))
    session_lookup = next(found)
    data, _ = cached(services, session_key, load_session(session_id, user_id), session_lookup)
    if (data is None or data["organization_id"] != org_id
            or data["expires_at"] <= time.time()):
        raise Unauthorized("session has ended")
    actor = Actor(user_id, org_id, session_id, tuple(data["roles"]), data["email"])
    return actor, [next(found) if isinstance(k, keys.Key) else k for k in wanted]
