"""Event markers ("this event's bumps were applied") are kept only as long as a second
application of the same event normally comes: one marker per write event, kept for a day, was
the cache's key count growing all day under steady writes (RELIABILITY.md, the soak)."""

from __future__ import annotations

import redis

from cache.store import EVENT_MARKER_TTL, VERSION_TTL


def test_a_write_leaves_event_markers_that_expire_long_before_the_version_keys(
        client, admin, services, settings):
    project = client.post("/api/projects", json={"name": "Markers"}, headers=admin.headers).json
    answer = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "t"},
                         headers=admin.headers)
    assert answer.status_code == 201

    raw = redis.Redis.from_url(settings.redis_url)
    markers = list(raw.scan_iter(match="applied:*"))
    assert markers, "the write's events were applied with a marker"
    for name in markers:
        assert 0 < raw.ttl(name) <= EVENT_MARKER_TTL
    versions = list(raw.scan_iter(match="v:*"))
    assert versions and all(raw.ttl(v) > EVENT_MARKER_TTL for v in versions)
    assert EVENT_MARKER_TTL < VERSION_TTL


def test_an_event_applied_twice_within_the_marker_ttl_bumps_once(services, settings):
    raw = redis.Redis.from_url(settings.redis_url)
    cache = services.cache
    assert cache.invalidate(["v:test:1"], org_ids=["o"], family="task", event_id="e1")
    first = raw.get("v:test:1")
    assert cache.invalidate(["v:test:1"], org_ids=["o"], family="task", event_id="e1")
    assert raw.get("v:test:1") == first
    assert cache.invalidate(["v:test:1"], org_ids=["o"], family="task", event_id="e2")
    assert raw.get("v:test:1") != first
