"""The private redis-server that tests use to take Redis down and bring it back."""

import pytest
import redis

from stack.redis_server import RedisServer, RedisServerFailed, RedisServerMissing, redis_answers

pytestmark = pytest.mark.slow


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


def test_kill_then_restart_on_the_same_port():
    server = RedisServer.start()
    try:
        client = client_for(server.url)
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        port, crashed_pid = server.port, server.pid

        server.kill()
        assert not server.is_running()
        assert not redis_answers(server.url)
        with pytest.raises(redis.ConnectionError):
            client.get("greeting")

        server.restart()
        assert server.is_running()
        assert server.port == port
        assert server.pid != crashed_pid
        assert client.get("greeting") is None  # no persistence: a crash loses the data
        assert client.set("greeting", "again")
        assert client.get("greeting") == b"again"
    finally:
        server.stop()
    assert not server.is_running()
    assert not redis_answers(server.url)


def test_settings_urls_and_context_manager():
    with RedisServer.start(maxmemory_policy="noeviction") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.url_for(1) == f"redis://127.0.0.1:{server.port}/1"
        client = client_for(server.url)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        client_for(server.url_for(1)).set("broker-key", "1")
        assert client.get("broker-key") is None  # db 1 is a separate keyspace
    assert not server.is_running()


def test_a_taken_port_fails_with_the_log_tail():
    with RedisServer.start() as first:
        with pytest.raises(RedisServerFailed, match="Address already in use"):
            RedisServer.start(port=first.port)
        assert redis_answers(first.url)


def test_missing_binary_has_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerMissing, match="redis-server not found on PATH"):
        RedisServer.start()
