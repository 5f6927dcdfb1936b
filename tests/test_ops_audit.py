"""The staleness auditor, the per-organization figures and the Redis figures of /metrics, on a
real Redis and database (no worker: the audit runs in this process, as its task would)."""

from __future__ import annotations

from sqlalchemy import update

from aggregates import PROJECT_STATS
from cache import keys
from cache.tenants import OTHER, TenantTally
from models import Project
from tasks import audit as auditor
from tests.worker_fixtures import new_project


def _fill(client, account) -> tuple[str, str]:
    """A project with a task, and everything an ordinary client reads of them, cached."""
    pid = new_project(client, account)
    tid = client.post(f"/api/projects/{pid}/tasks", json={"title": "t"},
                      headers=account.headers).json["id"]
    for url in ["/api/orgs/current", "/api/users", "/api/projects", f"/api/projects/{pid}",
                f"/api/projects/{pid}/tasks", f"/api/projects/{pid}/tasks?limit=20",
                f"/api/projects/{pid}/stats", f"/api/tasks/{tid}",
                f"/api/tasks/{tid}/comments", f"/api/users/{account.user['id']}",
                "/api/me/notifications/unread-count"]:
        assert client.get(url, headers=account.headers).status_code == 200, url
    return pid, tid


def test_a_consistent_cache_audits_clean(client, admin, services):
    _fill(client, admin)
    # The session's database outlives a test: sample all of it, so that this test's keys are in.
    report = auditor.audit(services, sample=100_000, grace=0.05)
    for family in ("organization", "project_list", "member_list", "project", "task_list", "task",
                   "comment_list", "user", "unread_count", "session", "project_stats"):
        assert report.checked.get(family, 0) >= 1, (family, report.checked)
    assert report.stale == {} and report.in_flight == {}


def test_a_stale_value_is_counted_and_retired(client, admin, services):
    org = admin.organization["id"]
    pid, _ = _fill(client, admin)
    # A write whose invalidation never happened: the database moved, the cache did not.
    with services.db.writers() as db:
        db.execute(update(Project).where(Project.id == pid).values(name="renamed behind"))
        db.commit()
    assert client.get(f"/api/projects/{pid}", headers=admin.headers).json["name"] == "Project"
    # Drift in the statistics at the same sequence number.
    services.redis.hincrby(PROJECT_STATS.name(org, pid), "TODO", 5)

    report = auditor.audit(services, sample=100_000, grace=0.05)
    assert report.stale.get("project") == 1 and report.stale.get("project_stats") == 1, report
    # Repaired: the API now answers what the database holds.
    assert client.get(f"/api/projects/{pid}", headers=admin.headers).json["name"] == \
        "renamed behind"
    assert client.get(f"/api/projects/{pid}/stats",
                      headers=admin.headers).json["open_tasks"] == 1
    again = auditor.audit(services, sample=100_000, grace=0.05)
    assert again.stale == {}


def test_a_write_in_flight_is_not_counted_stale(client, admin, services):
    org = admin.organization["id"]
    pid, _ = _fill(client, admin)
    check = auditor.Check(keys.project(org, pid), auditor.projects.load_project(org, pid))
    auditor._read_cached(services, [check])
    # Committed after the cached read, its invalidation landing during the grace period.
    with services.db.writers() as db:
        db.execute(update(Project).where(Project.id == pid).values(name="in flight"))
        db.commit()
    assert not auditor._same(check.cached, auditor._truth(services, [check])[0])
    services.cache.invalidate([keys.project_version(org, pid)], org_ids=[org], family="project")
    report = auditor.Report({}, {}, {})

    def count(table, family, metric):
        table[family] = table.get(family, 0) + 1

    auditor._recheck(services, [check], report, count)
    assert report.in_flight == {"project": 1} and report.stale == {}


def test_tenant_memory_names_the_biggest_organizations(client, sign_up, services):
    big, small = sign_up("Big"), sign_up("Small")
    for _ in range(6):
        _fill(client, big)
    _fill(client, small)
    report = auditor.tenant_memory(services, sample=2000, top=1)
    sizes = report["bytes"]
    assert report["keys"] > 0 and report["sampled"] > 0
    assert set(sizes) == {big.organization["id"], "other", "shared"}
    assert sizes[big.organization["id"]] > sizes["other"] > 0


def test_tenant_tally_is_bounded_and_promotes_the_busy():
    now = [0.0]
    tally = TenantTally(slots=2, max_series=3, window=10, clock=lambda: now[0])
    assert [tally.label_for(o) for o in ("a", "b", "c")] == ["a", "b", OTHER]
    for _ in range(50):
        tally.label_for("c")
    tally.label_for("a")
    now[0] = 11  # the window closes: c (50) is far busier than b (0 since)
    assert tally.label_for("c") == "c" and tally.label_for("b") == OTHER
    for _ in range(50):
        tally.label_for("d")
    now[0] = 22
    # max_series reached (a, b, c): d stays in other however busy it is.
    assert tally.label_for("d") == OTHER and len(tally.ever) == 3


def test_metrics_show_tenants_and_redis(client, admin, monkeypatch):
    from cache import tenants

    # A fresh tally: earlier tests' organizations used up this process's labels.
    monkeypatch.setattr(tenants, "_tally", TenantTally())
    _fill(client, admin)
    text = client.get("/metrics").get_data(as_text=True)
    org = admin.organization["id"]
    assert f'cache_tenant_lookups_total{{org="{org}",result="hit"}}' in text
    for name in ("redis_up 1.0", "redis_memory_used_bytes", "redis_evicted_keys_total",
                 "redis_expired_keys_total", "cache_breaker_open"):
        assert name in text, name
