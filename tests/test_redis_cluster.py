"""The private Redis Cluster that `make up-cluster` and the cluster tests run on."""

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from config import load_settings
from services.context import redis_client
from stack.redis_cluster import cluster_answers, parse_cluster_url

pytestmark = pytest.mark.slow


def test_parse_cluster_url():
    assert parse_cluster_url("redis://127.0.0.1:7000") == [("127.0.0.1", 7000)]
    assert parse_cluster_url("redis://a:1, b:2,redis://:pw@c:3/0") == [("a", 1), ("b", 2), ("c", 3)]
    with pytest.raises(ValueError):
        parse_cluster_url(" , ")


def test_the_cluster_serves_every_slot_from_three_masters(redis_cluster):
    assert cluster_answers(redis_cluster.url)
    assert len(redis_cluster.masters) == 3 and len(redis_cluster.replicas) == 3
    client = ClusterClient.from_url(redis_cluster.nodes[0].server.url)
    try:
        assert len(client.get_primaries()) == 3
        masters = redis_cluster.current_masters()  # a failover test may have swapped roles
        assert [m.client().info("replication")["connected_slaves"] for m in masters] == [1, 1, 1]
        keys = [f"spread:{i}" for i in range(300)]
        for key in keys:
            client.set(key, "1")
        per_master = [m.client().dbsize() for m in masters]
        assert all(count > 0 for count in per_master), per_master
        assert sum(per_master) >= 300
        with pytest.raises(redis.ResponseError, match="hash to the same slot"):
            masters[0].ask("MGET", "{a}1", "{b}2")
    finally:
        client.close()


def test_settings_name_the_cluster_and_the_client_follows(redis_cluster):
    settings = load_settings({"REDIS_CLUSTER_URL": redis_cluster.url})
    assert settings.redis_cluster_url == redis_cluster.url
    client = redis_client(settings)
    try:
        assert isinstance(client, ClusterClient)
        client.set("{o:1}:probe", "x")
        assert client.get("{o:1}:probe") == b"x"
    finally:
        client.close()
    assert load_settings({}).redis_cluster_url is None
