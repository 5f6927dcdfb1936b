"""The cache on a real Redis Cluster (3 masters, 1 replica each, private), with two API instances
(two apps, two L1s, two connection pools) in one process: every consistency promise holds across
instances, keys sit where the design puts them, and a master's crash degrades to misses, never to a
5xx or a stale read. `TEST_REDIS=cluster` runs the rest of the cache and API tests on it too."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from cache_helpers import CACHED
from cache import keys
from config import Settings
from services.context import build_services
from stack.redis_cluster import SLOTS
from conftest import Account
from web import create_app

pytestmark = pytest.mark.slow


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster_settings(database_url, redis_server, redis_cluster) -> Settings:
    assert redis_cluster.is_healthy()
    redis_cluster.flushall()
    return Settings(database_url=database_url, redis_url=redis_server.url_for(0),
                    celery_broker_url=redis_server.url_for(1), secret_key="test-secret-" + "y" * 32,
                    breaker_cooldown=0.5, redis_cluster_url=redis_cluster.url,
                    counter_flush_interval=0)


@pytest.fixture
def instances(cluster_settings):
    """Two API instances on the cluster: A and B."""
    built = [build_services(cluster_settings) for _ in range(2)]
    for services in built:
        assert services.l1_subscriber.ready.wait(10)
    yield [(create_app(cluster_settings, s).test_client(), s) for s in built]
    for services in built:
        services.close()


def sign_up(client) -> Account:
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    answer = client.post("/api/orgs", json={"organization_name": "Acme", "email": email,
                                            "password": "correct horse battery",
                                            "display_name": "Admin"})
    assert answer.status_code == 201, answer.json
    body = answer.json
    return Account(body["access_token"], body["user"], body["organization"], email)


# -- where the keys are ----------------------------------------------------------------------------
def test_each_value_shares_a_slot_with_its_versions_and_organizations_spread(instances,
                                                                           redis_cluster):
    (a, services), _ = instances
    accounts = [sign_up(a) for _ in range(3)]
    for account in accounts:
        for n in range(4):
            project = a.post("/api/projects", json={"name": f"P{n}"},
                             headers=account.headers).json
            a.post(f"/api/projects/{project['id']}/tasks", json={"title": "T"},
                   headers=account.headers)
            for url in (f"/api/projects/{project['id']}", f"/api/projects/{project['id']}/tasks",
                        f"/api/projects/{project['id']}/stats", "/api/me", "/api/projects"):
                assert a.get(url, headers=account.headers).status_code == 200
    rc = services.redis
    org = accounts[0].organization["id"]
    project = a.get("/api/projects", headers=accounts[0].headers).json["items"][0]
    for key in (keys.project(org, project["id"]), keys.session(org, "u", "s"),
                keys.project_tasks(org, project["id"], status=None, assignee_id=None, limit=50,
                                   cursor=None), keys.member_list(org, limit=50, cursor=None)):
        assert len({rc.keyslot(name) for name in (key.name, *key.versions)}) == 1, key
    slots_by_org: dict[str, set[int]] = {}
    per_master = Counter()
    masters = redis_cluster.current_masters()
    for node in masters:
        for name in node.client().scan_iter(count=1000):
            name = name.decode()
            tag = keys.hash_tag(name)
            if tag.startswith("{o:"):
                slots_by_org.setdefault(tag.split(":")[1], set()).add(rc.keyslot(name))
                per_master[node.address] += 1
    mine = [acc.organization["id"] for acc in accounts]
    assert all(1 < len(slots_by_org[o]) <= keys.ORG_SLICES for o in mine), slots_by_org
    assert len(per_master) == len(masters) == 3, per_master  # every master holds keys


# -- consistency across instances ------------------------------------------------------------------
def test_read_your_writes_and_purge_across_instances(instances):
    (a, _), (b, _) = instances
    admin = sign_up(a)
    project = a.post("/api/projects", json={"name": "Before"}, headers=admin.headers).json
    url = f"/api/projects/{project['id']}"
    assert b.get(url, headers=admin.headers).json["name"] == "Before"
    assert b.get(url, headers=admin.headers).headers["X-Cache"] in CACHED
    assert b.get(f"{url}/tasks", headers=admin.headers).json["items"] == []

    assert a.patch(url, json={"name": "After"}, headers=admin.headers).status_code == 200
    task = a.post(f"{url}/tasks", json={"title": "T"}, headers=admin.headers).json
    assert b.get(url, headers=admin.headers).json["name"] == "After"  # the next request, B
    assert [t["id"] for t in b.get(f"{url}/tasks", headers=admin.headers).json["items"]] == [
        task["id"]]
    stats = b.get(f"{url}/stats", headers=admin.headers)
    assert stats.json["total_tasks"] == 1 and stats.json["stale"] is False
    a.post(f"{url}/tasks", json={"title": "U"}, headers=admin.headers)
    stats = b.get(f"{url}/stats", headers=admin.headers)  # a delta folded in, not a recount
    assert stats.headers["X-Cache"] in CACHED and stats.json["total_tasks"] == 2

    assert b.get(url, headers=admin.headers).headers["X-Cache"] in CACHED
    assert a.delete("/api/admin/cache", headers=admin.headers).status_code == 202
    assert b.get(url, headers=admin.headers).headers["X-Cache"] == "MISS"
    again = b.get(f"{url}/stats", headers=admin.headers)
    assert again.headers["X-Cache"] == "MISS" and again.json["total_tasks"] == 2


def test_logout_and_a_role_change_reach_the_other_instance_at_once(instances):
    (a, _), (b, _) = instances
    admin = sign_up(a)
    member_email = f"m-{admin.email}"
    member = a.post("/api/users", json={"email": member_email, "password": "correct horse battery",
                                        "display_name": "M"}, headers=admin.headers).json
    login = b.post("/api/auth/login", json={"email": member_email,
                                            "password": "correct horse battery"}).json
    member_headers = {"Authorization": f"Bearer {login['access_token']}"}
    assert b.get("/api/me", headers=member_headers).status_code == 200  # session cached
    assert a.get("/api/me", headers=member_headers).status_code == 200
    assert b.delete("/api/admin/cache", headers=member_headers).status_code == 403

    assert a.patch(f"/api/users/{member['id']}", json={"roles": ["admin"]},
                   headers=admin.headers).status_code == 200
    assert b.delete("/api/admin/cache", headers=member_headers).status_code == 202

    assert a.post("/api/auth/logout", headers=member_headers).status_code == 204
    assert b.get("/api/me", headers=member_headers).status_code == 401


def test_concurrent_cold_reads_on_two_instances_load_once(instances):
    (a, sa), (b, sb) = instances
    admin = sign_up(a)
    project = a.post("/api/projects", json={"name": "P"}, headers=admin.headers).json
    key = keys.project(admin.organization["id"], project["id"])
    loads = []
    barrier = threading.Barrier(20)

    def loader():
        loads.append(1)
        time.sleep(0.2)
        return {"id": project["id"]}

    def read(services):
        barrier.wait()
        return services.cache.read_through(key, loader)[0]

    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(read(s)))
               for s in [sa, sb] * 10]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20 and all(r == {"id": project["id"]} for r in results)
    assert len(loads) == 1


def test_a_config_change_reaches_the_other_instances_l1_over_sharded_pubsub(instances):
    from services.settings_store import DEFAULTS, set_config

    (a, sa), (b, sb) = instances
    b.get("/api/public/feature-flags")
    assert b.get("/api/public/feature-flags").headers["X-Cache"] == "HIT-L1"
    try:
        set_config(sa, "feature_flags", {"new_ui_enabled": False})
        wait_until(lambda: b.get("/api/public/feature-flags").json == {
            "flags": {"new_ui_enabled": False}}, 10, "B's L1 to drop the old flags")
    finally:
        set_config(sa, "feature_flags", DEFAULTS["feature_flags"])


def test_the_hit_tally_is_batched_per_process(cluster_settings, redis_cluster):
    from cache.store import tally_key

    services = build_services(cluster_settings.with_overrides(counter_flush_interval=3600),
                              subscribe_l1=False)
    try:
        client = create_app(services.settings, services).test_client()
        admin = sign_up(client)
        services.cache.counters.queue_flush(services.redis.pipeline(), force=True)  # drop
        for _ in range(25):
            client.get("/api/orgs/current", headers=admin.headers)
        assert services.redis.hgetall(tally_key()) == {}  # nothing written per request
        report = client.get("/health/cache").json  # flushes this process's counts first
        tally = services.redis.hgetall(tally_key())
        assert int(tally[b"hits"]) >= 25 and report["hit_rate"] > 0.6
        assert report["connected_clients"] >= len(redis_cluster.masters)
    finally:
        services.close()


def reapply_unprocessed_events(services) -> None:
    from sqlalchemy import select

    from events.apply import apply_event
    from models import OutboxEvent

    with services.db.session() as db:
        events = list(db.scalars(select(OutboxEvent).where(OutboxEvent.processed_at.is_(None))))
    for event in events:
        wait_until(lambda: apply_event(services, kind=event.kind, org_id=event.organization_id,
                                       payload=event.payload, event_id=event.event_id,
                                       source="worker")["invalidated"], 20,
                   "the event to apply on the promoted replica")


# -- a master dies ---------------------------------------------------------------------------------
def test_killing_a_master_degrades_to_misses_then_its_replica_serves_with_no_stale_read(
        instances, redis_cluster):
    (a, sa), (b, sb) = instances
    admin = sign_up(a)
    project = a.post("/api/projects", json={"name": "Before"}, headers=admin.headers).json
    url = f"/api/projects/{project['id']}"
    for client in (a, b):
        client.get(url, headers=admin.headers)
        client.get(f"{url}/stats", headers=admin.headers)
    assert b.get(url, headers=admin.headers).headers["X-Cache"] in CACHED

    org_key = keys.project(admin.organization["id"], project["id"]).name
    dead = redis_cluster.kill_master_of(org_key)
    try:
        # Until the replica is promoted (node timeout 2 s): every request answers from the
        # database, a write goes through, nothing is a 5xx.
        statuses, sources = Counter(), Counter()
        deadline = time.monotonic() + 1.5
        written = False
        while time.monotonic() < deadline:
            for client in (a, b):
                answer = client.get(url, headers=admin.headers)
                statuses[answer.status_code] += 1
                sources[answer.headers.get("X-Cache")] += 1
                if not written:
                    patched = client.patch(url, json={"name": "During"}, headers=admin.headers)
                    statuses[patched.status_code] += 1
                    written = patched.status_code == 200
        assert written and set(statuses) == {200}, statuses
        assert sources["HIT-L2"] == sources["HIT-L1"] == 0, sources  # the shard is gone: misses, not old values

        promoted = redis_cluster.wait_for_failover(org_key, dead)
        assert promoted is not dead
        # The promoted replica still holds the value cached before the write, whose
        # invalidation failed: the worker applies the write's outbox event again (as
        # tasks.events.process_event does on its retry); the writer owes a purge of the
        # organization meanwhile, paid before it reads from Redis again.
        reapply_unprocessed_events(sa)
        # After: the write made during the outage is what every instance serves, never the
        # value cached before it; both instances use the cache again.
        def fresh_everywhere():
            names = {c.get(url, headers=admin.headers).json["name"] for c in (a, b)}
            return names == {"During"}
        wait_until(fresh_everywhere, 20, "both instances to read the write")
        wait_until(lambda: all(c.get(url, headers=admin.headers).headers["X-Cache"] in CACHED
                               for c in (a, b)), 20, "the cache to serve again")
        for client in (a, b):
            answer = client.get(url, headers=admin.headers)
            assert answer.json["name"] == "During"
        stats = b.get(f"{url}/stats", headers=admin.headers)
        assert stats.status_code == 200 and stats.json["total_tasks"] == 0
    finally:
        redis_cluster.rejoin(dead)
    assert redis_cluster.is_healthy()
    assert SLOTS == 16384
