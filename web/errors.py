"""RFC 9457 problem details for every error, so no client ever parses an HTML error page."""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from services.errors import DomainError, RateLimited, Unauthorized

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, errors: list[dict] | None = None,
            headers: dict | None = None) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    response = Response(orjson.dumps(body), status=status, mimetype=PROBLEM)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def domain_error(exc: DomainError) -> Response:
    headers = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    return problem(exc.status, exc.title, exc.detail, exc.errors, headers)


def http_error(exc: HTTPException) -> Response:
    headers = dict(exc.get_response().headers)
    headers.pop("Content-Type", None)
    headers.pop("Content-Length", None)
    detail = {413: "request body is larger than 1 MiB"}.get(exc.code or 500, exc.description)
    return problem(exc.code or 500, exc.name, detail, headers=headers)


def unexpected_error(exc: Exception) -> Response:
    log.exception("unhandled error")
    return problem(500, "Internal Server Error", "an unexpected error occurred")


def register(app: Flask) -> None:
    app.register_error_handler(DomainError, domain_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
