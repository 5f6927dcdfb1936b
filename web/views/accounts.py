"""Sign-up, sessions, the organization and its members."""

from __future__ import annotations

from flask import Blueprint, request

from cache import keys
from services import auth, directory, tasks
from services.stats import user_stats
from web import schemas as s
from web.client import client_address
from web.endpoint import endpoint

bp = Blueprint("accounts", __name__)


@endpoint(bp, "POST", "/api/orgs", summary="Create an organization and its first admin",
          body=s.SignUp, response=s.SignUpResult, status=201, authenticated=False,
          errors=(409,))
def sign_up(services, body: s.SignUp):
    return auth.sign_up(services, **body.model_dump())


@endpoint(bp, "POST", "/api/auth/login", summary="Log in", body=s.Login, response=s.Token,
          authenticated=False, errors=(401, 429))
def login(services, body: s.Login):
    address = client_address(request.environ, services.settings.trusted_proxies)
    return auth.login(services, email=body.email, password=body.password, address=address)


@endpoint(bp, "POST", "/api/auth/refresh", summary="Exchange a token for a new one; the old one "
          "is revoked", response=s.Token)
def refresh(services, actor):
    return auth.end_session(services, actor, replace=True)


@endpoint(bp, "POST", "/api/auth/logout", summary="Revoke this token", status=204)
def logout(services, actor):
    auth.end_session(services, actor, replace=False)


@endpoint(bp, "GET", "/api/me", summary="The caller, with its organization", response=s.Me)
def me(services, actor):
    return directory.me(services, actor)


def _organization_key(services, org_id: str, path: dict) -> list:
    return [keys.organization(org_id)]


@endpoint(bp, "GET", "/api/orgs/current", summary="The caller's organization",
          response=s.Organization, prefetch=_organization_key)
def current_org(services, actor, lookups):
    return directory.get_organization(services, actor, lookups[0])


@endpoint(bp, "PATCH", "/api/orgs/current", summary="Rename the organization (admin)",
          body=s.OrganizationPatch, response=s.Organization, errors=(403,))
def update_org(services, actor, body: s.OrganizationPatch):
    return directory.update_organization(services, actor, name=body.name)


@endpoint(bp, "GET", "/api/users", summary="Members of the organization", query=s.Page,
          response=s.page_of(s.User))
def list_users(services, actor, query: s.Page):
    return directory.list_users(services, actor, limit=query.limit, cursor=query.cursor)


@endpoint(bp, "POST", "/api/users", summary="Add a member (admin)", body=s.UserCreate,
          response=s.User, status=201, errors=(403, 409))
def create_user(services, actor, body: s.UserCreate):
    return directory.create_user(services, actor, **body.model_dump())


@endpoint(bp, "GET", "/api/users/<uuid:user_id>", summary="A member", response=s.User,
          errors=(404,))
def get_user(services, actor, user_id: str):
    return directory.get_user(services, actor, user_id)


@endpoint(bp, "PATCH", "/api/users/<uuid:user_id>", summary="Edit a member (self or admin; roles: "
          "admin only)", body=s.UserPatch, response=s.User, errors=(403, 404))
def update_user(services, actor, user_id: str, body: s.UserPatch):
    return directory.update_user(services, actor, user_id, body.model_dump(
        include=body.model_fields_set))


@endpoint(bp, "GET", "/api/users/<uuid:user_id>/tasks", summary="Tasks assigned to a member",
          query=s.StatusQuery, response=s.page_of(s.Task), errors=(404,))
def user_tasks(services, actor, user_id: str, query: s.StatusQuery):
    return tasks.list_user_tasks(services, actor, user_id, status=query.status,
                                 limit=query.limit, cursor=query.cursor)


@endpoint(bp, "GET", "/api/users/<uuid:user_id>/stats", summary="A member's task statistics",
          response=s.UserStats, errors=(404,))
def get_user_stats(services, actor, user_id: str):
    return user_stats(services, actor, user_id)
