"""One small typed function per cache key family.

Key names work on a single Redis and on a Redis Cluster alike: every key of an organization carries
the hash tag of one of its slices, `{o:<org>:<slice>}` (the configuration's `{c:<name>}`), so the
scripts that read versions and values together touch one slot, and a tenant spreads over slots.

Every key names the version keys whose current tokens become part of the stored name. A write
replaces a version token after commit, so every value stored under the old token is unreachable
at once (read-your-writes without KEYS/SCAN), and a reader that loaded before the write stores its
old value under the old token, where nobody looks (the stale-set race). Tenant keys carry the
organization's generation first: replacing it purges the whole organization in one step.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from dataclasses import dataclass

SESSION_TTL = 900
USER_TTL = 300
PROJECT_TTL = 300
TASK_TTL = 300
TASK_LIST_TTL = 60
NOTIFICATION_TTL = 30
ORGANIZATION_TTL = 600
AGGREGATE_TTL = 300
CONFIG_TTL = 600


@dataclass(frozen=True, slots=True)
class Key:
    family: str  # the `entity_type` label of the metrics
    name: str
    versions: tuple[str, ...]
    ttl: int
    sliding: bool = False


# Slices per organization: an organization's keys spread over this many hash slots (so over the
# masters, even with few, large tenants), each slice holding a copy of the organization's
# generation. A value, its version keys and that copy always share the value's slice.
ORG_SLICES = 16


def slice_of(anchor: str) -> int:
    """The slice of the entity a key is about (a user, a project, a task; the organization for
    organization-wide lists). Stable across processes and versions: crc32, not hash()."""
    return zlib.crc32(anchor.encode()) % ORG_SLICES


def org_tag(org_id: str, anchor: str | None = None) -> str:
    """The hash tag of an organization's slice `{o:<org>:<slice>}`: a lookup script reads the
    slice's generation, the entity's versions and the value together in one Redis Cluster slot.
    Replacing the generation of every slice purges the tenant (one script per slice)."""
    return "{o:" + org_id + ":" + str(slice_of(anchor or org_id)) + "}"


def config_tag(name: str) -> str:
    return "{c:" + name + "}"


def hash_tag(name: str) -> str:
    """The `{...}` part of a key name that picks its cluster slot ('' when it has none)."""
    start = name.find("{")
    end = name.find("}", start + 1)
    return name[start:end + 1] if start >= 0 and end > start + 1 else ""


# Version keys: what a write bumps. Each carries the tag of its entity's slice.
def org_generation(org_id: str, anchor: str | None = None) -> str:
    """The organization's generation as seen by the slice of `anchor`."""
    return f"v:{org_tag(org_id, anchor)}:org"


def org_generations(org_id: str) -> list[str]:
    """Every slice's copy of the generation: what a purge of the organization replaces."""
    return [f"v:{{o:{org_id}:{n}}}:org" for n in range(ORG_SLICES)]


def organization_version(org_id: str) -> str:
    return f"v:{org_tag(org_id)}:orginfo"


# A user's session, profile, task list, notifications and stats share the user's slice (a
# session's value depends on the user's version: a role change reaches live sessions at once).
def user_version(org_id: str, user_id: str) -> str:
    return f"v:{org_tag(org_id, user_id)}:user:{user_id}"


def session_version(org_id: str, user_id: str, session_id: str) -> str:
    return f"v:{org_tag(org_id, user_id)}:session:{session_id}"


def project_version(org_id: str, project_id: str) -> str:
    return f"v:{org_tag(org_id, project_id)}:project:{project_id}"


def task_version(org_id: str, task_id: str) -> str:
    return f"v:{org_tag(org_id, task_id)}:task:{task_id}"


def org_projects_version(org_id: str) -> str:
    return f"v:{org_tag(org_id)}:org-projects"


def org_users_version(org_id: str) -> str:
    return f"v:{org_tag(org_id)}:org-users"


def project_tasks_version(org_id: str, project_id: str) -> str:
    return f"v:{org_tag(org_id, project_id)}:project-tasks:{project_id}"


def user_tasks_version(org_id: str, user_id: str) -> str:
    return f"v:{org_tag(org_id, user_id)}:user-tasks:{user_id}"


def task_comments_version(org_id: str, task_id: str) -> str:
    return f"v:{org_tag(org_id, task_id)}:task-comments:{task_id}"


def user_notifications_version(org_id: str, user_id: str) -> str:
    return f"v:{org_tag(org_id, user_id)}:user-notifications:{user_id}"


def config_version(name: str) -> str:
    return f"v:{config_tag(name)}:config"


def tenant_name(org_id: str, anchor: str | None, *parts: str) -> str:
    """A tenant's value (or statistics hash) name: `t:{o:<org>:<slice>}:<family>:<ident>`."""
    return ":".join(("t", org_tag(org_id, anchor), *parts))


def _query(**params: object) -> str:
    """A short, stable digest of a list's filters and page, part of the list's key."""
    text = "&".join(f"{k}={'' if v is None else v}" for k, v in sorted(params.items()))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _tenant(org_id: str, anchor: str | None, family: str, ident: str,
            versions: tuple[str, ...], ttl: int, sliding: bool = False) -> Key:
    return Key(family, tenant_name(org_id, anchor, family, ident),
               (org_generation(org_id, anchor), *versions), ttl, sliding)


# A key is built from a dozen string formats and checksums, and a warm read built four: 21 of a
# warm task GET's 146 us (BENCHMARKS.md). So each process keeps the last 1,024 keys of each family
# (about 0.8 KB each: under 11 MB if every family filled). Keys are immutable, and their names are
# stable for given arguments; a key no longer kept is only built again.
_remembered = functools.lru_cache(maxsize=1024)


# Value keys: what a read looks up.
@_remembered
def session(org_id: str, user_id: str, session_id: str) -> Key:
    """Sliding TTL: each use extends it. The user's version is part of it so that a change of
    roles reaches live sessions at once."""
    return _tenant(org_id, user_id, "session", session_id,
                   (session_version(org_id, user_id, session_id), user_version(org_id, user_id)),
                   SESSION_TTL, sliding=True)


@_remembered
def user(org_id: str, user_id: str) -> Key:
    return _tenant(org_id, user_id, "user", user_id, (user_version(org_id, user_id),), USER_TTL)


@_remembered
def organization(org_id: str) -> Key:
    return _tenant(org_id, None, "organization", org_id, (organization_version(org_id),),
                   ORGANIZATION_TTL)


@_remembered
def project(org_id: str, project_id: str) -> Key:
    return _tenant(org_id, project_id, "project", project_id,
                   (project_version(org_id, project_id),), PROJECT_TTL)


@_remembered
def task(org_id: str, task_id: str) -> Key:
    return _tenant(org_id, task_id, "task", task_id, (task_version(org_id, task_id),), TASK_TTL)


@_remembered
def project_list(org_id: str, *, status: str | None, limit: int, cursor: str | None) -> Key:
    return _tenant(org_id, None, "project_list", _query(status=status, limit=limit, cursor=cursor),
                   (org_projects_version(org_id),), PROJECT_TTL)


@_remembered
def member_list(org_id: str, *, limit: int, cursor: str | None) -> Key:
    return _tenant(org_id, None, "member_list", _query(limit=limit, cursor=cursor),
                   (org_users_version(org_id),), USER_TTL)


@_remembered
def project_tasks(org_id: str, project_id: str, *, status: str | None, assignee_id: str | None,
                  limit: int, cursor: str | None) -> Key:
    ident = f"{project_id}:" + _query(status=status, assignee=assignee_id, limit=limit,
                                      cursor=cursor)
    return _tenant(org_id, project_id, "task_list", ident,
                   (project_tasks_version(org_id, project_id),),
                   TASK_LIST_TTL)


@_remembered
def user_tasks(org_id: str, user_id: str, *, status: str | None, limit: int,
               cursor: str | None) -> Key:
    ident = f"{user_id}:" + _query(status=status, limit=limit, cursor=cursor)
    return _tenant(org_id, user_id, "user_task_list", ident,
                   (user_tasks_version(org_id, user_id),), TASK_LIST_TTL)


@_remembered
def task_comments(org_id: str, task_id: str, *, limit: int, cursor: str | None) -> Key:
    ident = f"{task_id}:" + _query(limit=limit, cursor=cursor)
    return _tenant(org_id, task_id, "comment_list", ident,
                   (task_comments_version(org_id, task_id),),
                   TASK_LIST_TTL)


@_remembered
def notifications(org_id: str, user_id: str, *, unread: bool, limit: int,
                  cursor: str | None) -> Key:
    ident = f"{user_id}:" + _query(unread=unread, limit=limit, cursor=cursor)
    return _tenant(org_id, user_id, "notification_list", ident,
                   (user_notifications_version(org_id, user_id),),
                   NOTIFICATION_TTL)


@_remembered
def unread_count(org_id: str, user_id: str) -> Key:
    return _tenant(org_id, user_id, "unread_count", user_id,
                   (user_notifications_version(org_id, user_id),),
                   NOTIFICATION_TTL)


@_remembered
def config(name: str) -> Key:
    """Process-wide configuration: not tenant data, read through L1 first."""
    return Key("config", f"g:{config_tag(name)}:config", (config_version(name),), CONFIG_TTL)
