"""`flask --app web cache-size` on real data: a private Redis filled through the API."""

from __future__ import annotations

import re

from cache import keys
from ops import sizing
from tests.test_ops_audit import _fill


def test_cache_size_measures_entries_and_recommends_maxmemory(app, client, sign_up, services):
    accounts = [sign_up(f"Org {i}") for i in range(3)]
    filled = [_fill(client, a) for a in accounts]
    result = sizing.measure(services, sample=50)
    by_name = {f.name: f for f in result.families}
    # MEMORY USAGE of the very entries the API cached.
    org = accounts[0].organization["id"]
    pid = filled[0][0]
    usage = services.redis.memory_usage(keys.project(org, pid).name, samples=0)
    counts = sizing.database_counts(services)  # the session's database outlives a test
    project = by_name["project"]
    assert project.count == counts["projects"] >= 3 and usage in project.found
    assert by_name["task"].count == counts["tasks"] and by_name["session"].count == counts[
        "sessions"] >= 3
    assert by_name["task_list"].count == 2 * counts["projects"]
    assert by_name["project_stats"].found and by_name["version keys"].found
    # The strategy's formula, then the headroom.
    expected = sum(f.entry_bytes(result.key_overhead) * f.count * 1.3
                   for f in result.families if f.entry_bytes(result.key_overhead))
    assert abs(result.total - expected) < 1e-6
    assert result.recommended >= 2 * result.total and result.recommended % (64 * 2 ** 20) == 0

    answer = app.test_cli_runner().invoke(args=["cache-size", "--sample", "50"])
    assert answer.exit_code == 0, answer.output
    row = re.search(r"^project\s+(\d+)\s+(\d+)/(\d+)\s+[\d.,]+ [KM]?i?B\s+([\d,]+)\s",
                    answer.output, re.M)
    assert row and int(row[2]) >= 3 and int(row[4].replace(",", "")) == counts["projects"], \
        answer.output
    assert "Recommended maxmemory:" in answer.output and "total" in answer.output


def test_an_uncached_family_is_sized_from_what_would_be_stored(client, admin, services):
    _fill(client, admin)
    services.redis.delete(*[n for n in services.redis.scan_iter("t:*:task:*")])
    result = sizing.measure(services, sample=50)
    task = next(f for f in result.families if f.name == "task")
    assert not task.found and task.encoded and task.estimated
    assert task.entry_bytes(result.key_overhead) > result.key_overhead
