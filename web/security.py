"""Headers every answer carries, and the body limit enforced before a view runs.

Bodies: a client on a keep-alive connection must see the 413, not a reset. Gunicorn discards at
most 64 KiB of a body the application left unread and otherwise closes the connection while the
client is still sending, which the client sees as a reset. So an over-limit body is read and
discarded here up to DRAIN_LIMIT before the 413 is sent; beyond that the 413 is sent at once and
gunicorn closes the connection (a client sending more than 10 MiB to a 1 MiB API may see a reset).
A chunked body (no Content-Length) is counted as it streams: at most MAX_BODY + 1 bytes are kept."""

from __future__ import annotations

import io

from flask import Flask, Request, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

MAX_BODY = 1024 * 1024
DRAIN_LIMIT = 10 * 1024 * 1024
_STEP = 64 * 1024

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# API answers are data, never a document: nothing may load or frame them.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# An HTML page of ours without a policy of its own: its own files only.
PAGE_CSP = ("default-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'")


def add_headers(response: Response) -> Response:
    # One pass over what the answer has, then one extend: werkzeug's setdefault raised and caught
    # a KeyError for each header it added, 12 us of every request (7 us more than this).
    present = {name.lower() for name, _ in response.headers.items()}
    missing = [(name, value) for name, value in HEADERS.items() if name.lower() not in present]
    # A view may set its own policy (the /docs page): it is kept.
    if "content-security-policy" not in present:
        missing.append(("Content-Security-Policy",
                        PAGE_CSP if response.mimetype == "text/html" else API_CSP))
    response.headers.extend(missing)
    if response.status_code >= 400:
        # An error is about this moment: no browser or edge keeps it (a 404 under /static/ included).
        response.headers["Cache-Control"] = "no-store"
    return response


def _drain(stream, budget: int) -> int:
    """Read and discard up to `budget` bytes; returns how many were read."""
    read = 0
    while read < budget:
        chunk = stream.read(min(_STEP, budget - read))
        if not chunk:
            break
        read += len(chunk)
    return read


def limit_body(req: Request) -> None:
    """Before the view: refuse a body over MAX_BODY (413), after draining it within DRAIN_LIMIT."""
    environ = req.environ
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if length.isdigit():
        size = int(length)
        if size > MAX_BODY:
            if size <= DRAIN_LIMIT:
                _drain(stream, size)
            raise RequestEntityTooLarge()
        return
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return
    body = stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        _drain(stream, DRAIN_LIMIT - len(body))
        raise RequestEntityTooLarge()
    # The view reads the counted body; werkzeug sees a plain body of known length.
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)


def register(app: Flask) -> None:
    """The body limit; the headers are added with the rest of every answer's (web/__init__.py)."""
    app.before_request(lambda: limit_body(request))
