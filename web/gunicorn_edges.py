"""What gunicorn answers by itself, before the application sees a request: its error pages
(400 bad request line, 414 request line over `limit_request_line`, 431 header over
`limit_request_field_size` or more than `limit_request_fields` headers ...) become problem+json
with the headers every answer carries, and no answer names the server (`Server: gunicorn`).

Gunicorn has no setting for either (benoitc/gunicorn#825: "set it in your application", which
only adds a second Server header), so `install()` replaces the functions that write them; it
runs in the master from gunicorn's `on_starting` hook, and the workers inherit it. The tests
against a real gunicorn (tests/test_server_edges.py) fail if an upgrade moves these functions.
`install()` also has the `Date` header's text made once a second instead of for every answer."""

from __future__ import annotations

import time
from typing import Callable

import orjson

from web.security import API_CSP, HEADERS

DETAILS = {
    400: "the request could not be parsed",
    414: "the request line (method, path and query) is too long",
    431: "a request header field is too large, or there are too many",
}


def problem_bytes(status: int, reason: str, message: str) -> bytes:
    detail = DETAILS.get(status) or (message[:200] if message else reason)
    body = orjson.dumps({"type": "about:blank", "title": reason, "status": status,
                         "detail": detail})
    head = [f"HTTP/1.1 {status} {reason}", "Connection: close",
            "Content-Type: application/problem+json", f"Content-Length: {len(body)}",
            "Cache-Control: no-store", f"Content-Security-Policy: {API_CSP}",
            *(f"{name}: {value}" for name, value in HEADERS.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def install() -> None:
    from gunicorn import util
    from gunicorn.http import wsgi

    def write_error(sock, status_int, reason, mesg):
        util.write_nonblock(sock, problem_bytes(int(status_int), reason, mesg))

    util.write_error = write_error

    default_headers = wsgi.Response.default_headers

    def without_server(self):
        return [line for line in default_headers(self) if not line.startswith("Server:")]

    wsgi.Response.default_headers = without_server
    util.http_date = per_second(util.http_date)


def per_second(http_date: Callable[..., str]) -> Callable[..., str]:
    """gunicorn formats every answer's `Date` anew (email.utils, 5% of a warm read's samples once
    Flask's dispatch was gone); its text changes once a second. Two threads that find it old
    both format it: the same text."""
    last = (-1, "")

    def dated(timestamp: float | None = None) -> str:
        nonlocal last
        if timestamp is not None:
            return http_date(timestamp)
        second = int(time.time())
        if last[0] != second:
            last = (second, http_date(second))
        return last[1]

    return dated
