"""Projects, tasks, comments and notifications."""

from __future__ import annotations

from flask import Blueprint

from cache import keys
from services import notifications, projects, tasks
from services.stats import project_stats, project_stats_reads
from web import schemas as s
from web.endpoint import endpoint

bp = Blueprint("work", __name__)


@endpoint(bp, "GET", "/api/projects", summary="Projects of the organization",
          query=s.ProjectQuery, response=s.page_of(s.Project))
def list_projects(services, actor, query: s.ProjectQuery):
    return projects.list_projects(services, actor, status=query.status, limit=query.limit,
                                  cursor=query.cursor)


@endpoint(bp, "POST", "/api/projects", summary="Create a project", body=s.ProjectCreate,
          response=s.Project, status=201)
def create_project(services, actor, body: s.ProjectCreate):
    return projects.create_project(services, actor, **body.model_dump())


def _project_key(services, org_id: str, path: dict) -> list:
    return [keys.project(org_id, path["project_id"])]


def _stats_reads(services, org_id: str, path: dict) -> list:
    return project_stats_reads(services, org_id, path["project_id"])


def _task_key(services, org_id: str, path: dict) -> list:
    return [keys.task(org_id, path["task_id"])]


@endpoint(bp, "GET", "/api/projects/<uuid:project_id>", summary="A project", response=s.Project,
          errors=(404,), prefetch=_project_key)
def get_project(services, actor, project_id: str, lookups):
    return projects.get_project(services, actor, project_id, lookups[0])


@endpoint(bp, "PATCH", "/api/projects/<uuid:project_id>", summary="Edit a project",
          body=s.ProjectPatch, response=s.Project, errors=(404,))
def update_project(services, actor, project_id: str, body: s.ProjectPatch):
    return projects.update_project(services, actor, project_id,
                                   body.model_dump(include=body.model_fields_set))


@endpoint(bp, "DELETE", "/api/projects/<uuid:project_id>", summary="Delete a project with its "
          "tasks, comments and notifications (its owner or an admin)", status=204,
          errors=(403, 404))
def delete_project(services, actor, project_id: str):
    projects.delete_project(services, actor, project_id)


@endpoint(bp, "GET", "/api/projects/<uuid:project_id>/stats", summary="Project statistics",
          response=s.ProjectStats, errors=(404,), prefetch=_stats_reads)
def get_project_stats(services, actor, project_id: str, lookups):
    return project_stats(services, actor, project_id, *lookups)


@endpoint(bp, "GET", "/api/projects/<uuid:project_id>/tasks", summary="Tasks of a project",
          query=s.TaskQuery, response=s.page_of(s.Task), errors=(404,), prefetch=_project_key)
def list_tasks(services, actor, project_id: str, query: s.TaskQuery, lookups):
    return tasks.list_project_tasks(services, actor, project_id, status=query.status,
                                    assignee_id=query.assignee_id, limit=query.limit,
                                    cursor=query.cursor, project_lookup=lookups[0])


@endpoint(bp, "POST", "/api/projects/<uuid:project_id>/tasks", summary="Create a task",
          body=s.TaskCreate, response=s.Task, status=201, errors=(404,))
def create_task(services, actor, project_id: str, body: s.TaskCreate):
    return tasks.create_task(services, actor, project_id, body.model_dump())


@endpoint(bp, "GET", "/api/tasks/<uuid:task_id>", summary="A task", response=s.Task,
          errors=(404,), prefetch=_task_key)
def get_task(services, actor, task_id: str, lookups):
    return tasks.get_task(services, actor, task_id, lookups[0])


@endpoint(bp, "PATCH", "/api/tasks/<uuid:task_id>", summary="Edit a task", body=s.TaskPatch,
          response=s.Task, errors=(404,))
def update_task(services, actor, task_id: str, body: s.TaskPatch):
    return tasks.update_task(services, actor, task_id,
                             body.model_dump(include=body.model_fields_set))


@endpoint(bp, "DELETE", "/api/tasks/<uuid:task_id>", summary="Delete a task", status=204,
          errors=(404,))
def delete_task(services, actor, task_id: str):
    tasks.delete_task(services, actor, task_id)


@endpoint(bp, "GET", "/api/tasks/<uuid:task_id>/comments", summary="Comments, oldest first",
          query=s.Page, response=s.page_of(s.Comment), errors=(404,))
def list_comments(services, actor, task_id: str, query: s.Page):
    return tasks.list_comments(services, actor, task_id, limit=query.limit, cursor=query.cursor)


@endpoint(bp, "POST", "/api/tasks/<uuid:task_id>/comments", summary="Comment on a task",
          body=s.CommentCreate, response=s.Comment, status=201, errors=(404,))
def create_comment(services, actor, task_id: str, body: s.CommentCreate):
    return tasks.create_comment(services, actor, task_id, body=body.body)


@endpoint(bp, "GET", "/api/me/notifications", summary="The caller's notifications",
          query=s.NotificationQuery, response=s.page_of(s.Notification))
def list_notifications(services, actor, query: s.NotificationQuery):
    return notifications.list_notifications(services, actor, unread=query.unread,
                                            limit=query.limit, cursor=query.cursor)


@endpoint(bp, "GET", "/api/me/notifications/unread-count", summary="Unread notifications",
          response=s.UnreadCount)
def unread_count(services, actor):
    return notifications.unread_count(services, actor)


@endpoint(bp, "POST", "/api/me/notifications/<uuid:notification_id>/read",
          summary="Mark a notification read", status=204, errors=(404,))
def mark_read(services, actor, notification_id: str):
    notifications.mark_read(services, actor, notification_id)


@endpoint(bp, "POST", "/api/me/notifications/read-all", summary="Mark all notifications read",
          status=204)
def mark_all_read(services, actor):
    notifications.mark_all_read(services, actor)
