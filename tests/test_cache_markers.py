"""Event markers ("this event's bumps were applied") are left only for an event handed on to be
applied again, and kept only as long as that second application normally takes to come: one
marker per write event was the cache's key count following the write rate (RELIABILITY.md, the
soaks)."""

from __future__ import annotations

from sqlalchemy import select

from cache.store import EVENT_MARKER_TTL, VERSION_TTL


def markers(raw) -> set[bytes]:
    return set(raw.scan_iter(match="applied:*"))


def test_a_write_the_web_finishes_leaves_no_marker(client, admin, services):
    raw = services.redis  # a cluster client scans every master
    project = client.post("/api/projects", json={"name": "Finished"}, headers=admin.headers).json
    assert client.get(f"/api/projects/{project['id']}/stats", headers=admin.headers).status_code == 200
    before = markers(raw)

    answer = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "t"},
                         headers=admin.headers)
    assert answer.status_code == 201
    assert markers(raw) == before  # every version bumped, the delta folded in: nothing owed


def test_an_event_handed_to_a_worker_is_marked_so_its_second_application_bumps_nothing(
        client, admin, services, monkeypatch):
    from events.apply import apply_event
    from models import OutboxEvent

    raw = services.redis
    project = client.post("/api/projects", json={"name": "Handed"}, headers=admin.headers).json
    before = markers(raw)
    # The stats were never read: the delta finds no cached aggregate, and with no recount that
    # the web could schedule (as with the broker down) the event goes to a worker.
    monkeypatch.delitem(services.extras, "ensure_recount", raising=False)
    task = client.post(f"/api/projects/{project['id']}/tasks", json={"title": "t"},
                       headers=admin.headers).json
    left = markers(raw) - before
    assert left, "the event handed on carries its markers"
    for name in left:
        assert 0 < raw.ttl(name) <= EVENT_MARKER_TTL < VERSION_TTL
    versions = {name: raw.get(name) for name in raw.scan_iter(match="v:*")}
    assert versions and all(raw.ttl(v) > EVENT_MARKER_TTL for v in versions)

    with services.db.session() as db:
        event = next(e for e in db.scalars(select(OutboxEvent).order_by(OutboxEvent.id.desc()))
                     if e.payload.get("task_id") == task["id"])
    apply_event(services, kind=event.kind, org_id=event.organization_id, payload=event.payload,
                event_id=event.event_id, source="worker")
    assert {name: raw.get(name) for name in versions} == versions


def test_an_event_applied_twice_within_the_marker_ttl_bumps_once(services):
    raw = services.redis
    cache = services.cache
    assert cache.invalidate(["v:{test}:1"], org_ids=["o"], family="task", event_id="e1")
    first = raw.get("v:{test}:1")
    assert cache.invalidate(["v:{test}:1"], org_ids=["o"], family="task", event_id="e1")
    assert raw.get("v:{test}:1") == first
    assert cache.invalidate(["v:{test}:1"], org_ids=["o"], family="task", event_id="e2")
    assert raw.get("v:{test}:1") != first
