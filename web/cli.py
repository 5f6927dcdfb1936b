"""`flask --app web cache-size`: recommend Redis's maxmemory from live entry sizes (ops/sizing.py)."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("cache-size")
@click.option("--sample", default=100, show_default=True,
              help="Ids sampled per kind (organizations, projects, tasks, users, sessions).")
@click.option("--growth", default=1.0, show_default=True,
              help="Growth headroom on top of today's need (1.0: +100 %).")
@with_appcontext
def cache_size_command(sample: int, growth: float) -> None:
    """Sample cached entries per key family (Redis MEMORY USAGE on names built from database ids,
    no SCAN), apply size x count x 1.3 and recommend maxmemory with growth headroom."""
    from ops import sizing
    from tasks.audit import plan

    services = current_app.extensions["taskcache"]
    checks, stats = plan(services, sample)
    with click.progressbar(length=len(checks) + len(stats), label="sampling",
                           show_pos=True) as bar:
        result = sizing.measure(services, sample, progress=bar.update, growth=growth,
                                planned=(checks, stats))
    click.echo(sizing.table(result))
