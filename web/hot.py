"""GETs of the declared endpoints, answered without Flask's request dispatch.

Flask's dispatch (its request and application contexts, URL matching, signals, the hooks around
a view) cost more per request than a warm read's own work (BENCHMARKS.md, thirteenth session).
A GET without a body to a rule of `web.endpoint` is matched here and answered by the same
`serve` as Flask's view, its errors by the same handlers, with the same headers; anything else
(other methods, HEAD, bodies, static files, /docs, /metrics, paths no rule matches) goes to
Flask as before. tests/test_api_hot_path.py holds the two paths to the same answers.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from werkzeug.exceptions import HTTPException
from werkzeug.routing import UUIDConverter
from werkzeug.wrappers import Response

from services.errors import DomainError
from web import errors
from web.endpoint import JSON, OPERATIONS, Operation, serve

_PARAMETER = re.compile(r"<(?:(\w+):)?(\w+)>")
Route = tuple[Callable[[str], "re.Match[str] | None"], Operation]


def _pattern(rule: str) -> re.Pattern[str] | None:
    """The rule as a regular expression, or None for a converter this path does not know (its
    rule stays Flask's alone)."""
    parts, end = [], 0
    for found in _PARAMETER.finditer(rule):
        converter, name = found.groups()
        if converter != "uuid":
            return None
        parts += [re.escape(rule[end:found.start()]), f"(?P<{name}>{UUIDConverter.regex})"]
        end = found.end()
    parts.append(re.escape(rule[end:]))
    return re.compile("".join(parts))


def routes(operations: Iterable[Operation]) -> list[Route]:
    """(match, operation) for each GET without a body whose rule this path can match."""
    found = []
    for op in operations:
        if op.method == "GET" and op.body is None and op.view is not None:
            pattern = _pattern(op.rule)
            if pattern is not None:
                found.append((pattern.fullmatch, op))
    return found


def _carries_body(environ: dict) -> bool:
    return (environ.get("CONTENT_LENGTH") or "0") != "0" or "HTTP_TRANSFER_ENCODING" in environ


class HotPath:
    """WSGI middleware in front of Flask's `wsgi_app` (`app.wsgi_app = HotPath(...)`)."""

    def __init__(self, flask_wsgi: Callable, services: Any,
                 finish: Callable[[Response], Response]) -> None:
        self.flask_wsgi = flask_wsgi
        self.services = services
        self.finish = finish  # the headers Flask's hook adds to every answer
        # What it adds to a JSON 200, written as they are: building a werkzeug Response and its
        # Headers (each value checked by a regular expression) was a third of a warm read here.
        sample = finish(Response(b"", mimetype=JSON))
        self.finished = [(name, value) for name, value in sample.headers.items()
                         if name not in ("Content-Type", "Content-Length")]
        self.routes = routes(OPERATIONS)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "GET" and not _carries_body(environ):
            path = environ.get("PATH_INFO", "")
            for match, op in self.routes:
                found = match(path)
                if found is not None:
                    return self.answer(op, found.groupdict(), environ, start_response)
        return self.flask_wsgi(environ, start_response)

    def answer(self, op: Operation, params: dict, environ: dict,
               start_response: Callable) -> Iterable[bytes]:
        # Ids in lower case, as `web.endpoint.UUIDText` hands them to Flask's view.
        path = {name: value.lower() for name, value in params.items()}
        try:
            answer = serve(op, self.services, environ, path)
        except DomainError as exc:
            response = errors.domain_error(exc)
        except HTTPException as exc:
            response = errors.http_error(exc)
        except Exception as exc:  # the 500 Flask's handler would give, logged the same way
            response = errors.unexpected_error(exc)
        else:
            if answer.status == 200:
                start_response("200 OK", [("Content-Type", answer.mimetype),
                                          ("Content-Length", str(len(answer.body))),
                                          *answer.headers, *self.finished])
                return [answer.body]
            response = answer.response()
        return self.finish(response)(environ, start_response)
