"""Domain events: what changed, written to the outbox in the transaction of the change.

Each event says which cached versions it retires (`versions_for`) and which aggregate deltas it
carries. The web process applies both right after commit (read-your-writes); the worker applies
them again from the outbox, which changes nothing when the web process already did (an
idempotency marker per event for versions, sequence numbers for deltas) and repairs everything
when it did not (crash after commit, Redis or broker down).
"""

from __future__ import annotations

from cache import keys

TASK_CREATED = "task.created"
TASK_UPDATED = "task.updated"
TASK_DELETED = "task.deleted"
COMMENT_CREATED = "comment.created"
PROJECT_CREATED = "project.created"
PROJECT_UPDATED = "project.updated"
PROJECT_DELETED = "project.deleted"
USER_CREATED = "user.created"
USER_UPDATED = "user.updated"
ORGANIZATION_CREATED = "organization.created"
ORGANIZATION_UPDATED = "organization.updated"
NOTIFICATION_CREATED = "notification.created"
NOTIFICATION_READ = "notification.read"
SESSION_ENDED = "session.ended"
CONFIG_CHANGED = "config.changed"


def _task_versions(org_id: str, p: dict) -> list[str]:
    found = [keys.task_version(org_id, p["task_id"]),
             keys.project_tasks_version(org_id, p["project_id"])]
    found += [keys.user_tasks_version(org_id, u) for u in p.get("assignees", []) if u]
    return found


def versions_for(kind: str, org_id: str, p: dict) -> list[str]:
    """Every cached version an event retires: the entity and every list that contains it."""
    if kind in (TASK_CREATED, TASK_UPDATED):
        return _task_versions(org_id, p)
    if kind == TASK_DELETED:
        return _task_versions(org_id, p) + [keys.task_comments_version(org_id, p["task_id"])] + [
            keys.user_notifications_version(org_id, u) for u in p.get("notified", [])]
    if kind == COMMENT_CREATED:
        return [keys.task_comments_version(org_id, p["task_id"])]
    if kind in (PROJECT_CREATED, PROJECT_UPDATED):
        return [keys.project_version(org_id, p["project_id"]), keys.org_projects_version(org_id)]
    if kind == PROJECT_DELETED:
        # Its tasks sat in any member's lists and notifications: retire the organization.
        return keys.org_generations(org_id)
    if kind in (USER_CREATED, USER_UPDATED):
        return [keys.user_version(org_id, p["user_id"]), keys.org_users_version(org_id)]
    if kind in (ORGANIZATION_CREATED, ORGANIZATION_UPDATED):
        return [keys.organization_version(org_id)]
    if kind in (NOTIFICATION_CREATED, NOTIFICATION_READ):
        return [keys.user_notifications_version(org_id, u) for u in p["user_ids"]]
    if kind == SESSION_ENDED:
        return [keys.session_version(org_id, p["user_id"], p["session_id"])]
    if kind == CONFIG_CHANGED:
        return [keys.config_version(p["name"])]
    raise ValueError(f"unknown event kind {kind!r}")
