"""The client's address: the peer's, or, when the peer is a trusted reverse proxy, the address
that proxy saw (X-Forwarded-For read from the right, skipping trusted hops).

Not werkzeug's ProxyFix: it believes the last N X-Forwarded-For entries of whoever connects, so a
client that reaches the API port directly could choose its own address. Here the header counts
only when the connection itself comes from a listed proxy (TRUSTED_PROXIES, none by default)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def trusted_networks(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(environ: Mapping[str, str], proxies: tuple[str, ...]) -> str | None:
    address = environ.get("REMOTE_ADDR") or None
    networks = trusted_networks(proxies)
    if address is None or not networks:
        return address
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    while hops and _trusted(address, networks):
        address = hops.pop()
    return address
