"""The demo organization `make up` creates on an empty database, so the README's examples work."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select

from config import Settings

DEMO_EMAIL = "demo@example.com"


def seed_demo_if_empty(settings: Settings) -> dict | None:
    """Create a demo organization, admin, project and a few tasks when there is no organization
    yet. Returns the credentials it created, or None when the database already had data."""
    from models import Organization
    from services import auth, projects, tasks
    from services.context import build_services

    services = build_services(settings, subscribe_l1=False)
    try:
        with services.db.session() as db:
            if db.scalar(select(func.count()).select_from(Organization)):
                return None
        password = secrets.token_urlsafe(12)
        created = auth.sign_up(services, organization_name="Demo Org", email=DEMO_EMAIL,
                               password=password, display_name="Demo Admin")
        actor = auth.Actor(created["user"]["id"], created["organization"]["id"], "seed",
                           ("admin",), DEMO_EMAIL)
        project = projects.create_project(services, actor, name="Website relaunch",
                                          description="A project to try the API with.")
        for title, status in [("Write the brief", "COMPLETED"), ("Design the pages", "IN_PROGRESS"),
                              ("Review copy", "TODO"), ("Launch", "TODO")]:
            tasks.create_task(services, actor, project["id"], {"title": title, "status": status})
        return {"email": DEMO_EMAIL, "password": password,
                "organization": created["organization"]["name"], "project_id": project["id"]}
    finally:
        services.close()
