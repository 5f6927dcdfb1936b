"""`flask --app web warm [--org ID]`: warm the cache now, in this process, with a progress bar."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("warm")
@click.option("--org", "org_id", default=None,
              help="Warm one organization (all its active projects and their stats); "
                   "default: what the beat warm-up covers.")
@with_appcontext
def warm_command(org_id: str | None) -> None:
    """Warm the cache: organizations, members, active projects and project statistics."""
    from tasks.warmup import PROJECT_LIMIT, CacheWarmer

    services = current_app.extensions["taskcache"]
    with click.progressbar(length=PROJECT_LIMIT, label="warming",
                           show_pos=True) as bar:
        warmer = CacheWarmer(services, progress=bar.update)
        if org_id:
            with services.db.session() as db:
                from models import Organization, Project, ProjectStatus
                from sqlalchemy import func, select

                if db.get(Organization, org_id) is None:
                    raise click.BadParameter(f"no organization {org_id}", param_hint="--org")
                bar.length = min(PROJECT_LIMIT, db.scalar(
                    select(func.count()).select_from(Project).where(
                        Project.organization_id == org_id,
                        Project.status == ProjectStatus.ACTIVE.value))) or 1
            report = warmer.warm_organization(org_id, trigger="cli")
        else:
            _, per_org, _ = warmer.plan()
            bar.length = sum(len(p) for p in per_org.values()) or 1
            report = warmer.warm_all(trigger="cli")
    click.echo(f"warmed {report.organizations} organizations, {report.projects} projects "
               f"({report.projects_loaded} loaded), {report.stats} project stats "
               f"({report.stats_recounted} recounted) in {report.seconds:.2f} s")
