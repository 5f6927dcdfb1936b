"""Which address the login limiter counts: X-Forwarded-For is believed only from trusted proxies."""

from web.client import client_address

NGINX = ("127.0.0.1", "10.0.0.0/8")


def test_without_trusted_proxies_the_peer_is_the_client_whatever_it_forwards():
    environ = {"REMOTE_ADDR": "198.51.100.4", "HTTP_X_FORWARDED_FOR": "1.2.3.4"}
    assert client_address(environ, ()) == "198.51.100.4"


def test_an_untrusted_peer_cannot_choose_its_address():
    environ = {"REMOTE_ADDR": "198.51.100.4", "HTTP_X_FORWARDED_FOR": "1.2.3.4"}
    assert client_address(environ, NGINX) == "198.51.100.4"


def test_behind_a_trusted_proxy_the_address_it_saw_is_the_client():
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}
    assert client_address(environ, NGINX) == "203.0.113.9"


def test_entries_a_client_forged_left_of_the_proxies_are_ignored():
    # The client sent "X-Forwarded-For: 1.2.3.4"; nginx (10.0.0.5) and a second trusted hop
    # appended what they saw.
    environ = {"REMOTE_ADDR": "127.0.0.1",
               "HTTP_X_FORWARDED_FOR": "1.2.3.4, 203.0.113.9, 10.0.0.5"}
    assert client_address(environ, NGINX) == "203.0.113.9"


def test_a_trusted_peer_without_the_header_is_itself_the_client():
    assert client_address({"REMOTE_ADDR": "127.0.0.1"}, NGINX) == "127.0.0.1"
    assert client_address({}, NGINX) is None
