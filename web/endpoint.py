"""Declaring an endpoint: its schemas validate the request, describe it in OpenAPI, and say how
the answer is cached by clients. Views receive validated input and return (data, X-Cache)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Callable, NamedTuple

import orjson
import xxhash
from flask import Blueprint, Response, current_app, request
from pydantic import BaseModel, ValidationError
from werkzeug.routing import UUIDConverter
from werkzeug.wrappers import Request

from cache.near import MISSING, ByIdentity
from services import auth
from services.errors import DomainError, Unauthorized

JSON = "application/json"


@dataclass
class Operation:
    method: str
    rule: str
    summary: str
    tag: str
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    authenticated: bool
    public: bool
    errors: tuple[int, ...] = field(default_factory=tuple)
    view: Callable[..., Any] | None = None
    prefetch: Callable[[Any, str, dict], list] | None = None

    @property
    def path(self) -> str:
        return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", self.rule)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"<(?:\w+:)?(\w+)>", self.rule)


OPERATIONS: list[Operation] = []


class BadRequest(DomainError):
    status, title = 400, "Bad Request"


class UnsupportedMediaType(DomainError):
    status, title = 415, "Unsupported Media Type"


class Unprocessable(DomainError):
    status, title = 422, "Unprocessable Content"


class UUIDText(UUIDConverter):
    """`<uuid:...>` in a rule: werkzeug's pattern, handed to the view as the canonical text the
    database and the keys use. Building a uuid.UUID only to turn it back into text was 2% of a warm
    task GET."""

    def to_python(self, value: str) -> str:
        return value.lower()


def services():
    return current_app.extensions["taskcache"]


def _field_errors(exc: ValidationError) -> list[dict]:
    return [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in exc.errors(include_url=False)]


def parse_body(model: type[BaseModel]) -> BaseModel:
    if request.mimetype != JSON:
        raise UnsupportedMediaType("send the body as application/json")
    raw = request.get_data(cache=False)
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest("the body is not valid JSON") from None
        errors = _field_errors(exc)
        raise Unprocessable("; ".join(f"{e['field']}: {e['message']}" for e in errors),
                            errors) from None


# Valid query strings, parsed: clients send the same few again and again (a page's URL), and
# parsing one was 5% of a warm list read. Short ones only, emptied when full.
_QUERIES_MAX, _QUERY_MAX_CHARS = 1024, 256
_queries: dict[tuple[type[BaseModel], str], BaseModel] = {}


def parse_query(model: type[BaseModel], environ: dict) -> BaseModel:
    raw = environ.get("QUERY_STRING", "")
    found = _queries.get((model, raw))
    if found is not None:
        return found
    try:
        parsed = model.model_validate(Request(environ).args.to_dict())
    except ValidationError as exc:
        errors = _field_errors(exc)
        raise Unprocessable("; ".join(f"{e['field']}: {e['message']}" for e in errors),
                            errors) from None
    if len(raw) <= _QUERY_MAX_CHARS:
        if len(_queries) >= _QUERIES_MAX:
            _queries.clear()
        _queries[(model, raw)] = parsed
    return parsed


def bearer_token(environ: dict) -> str:
    header = environ.get("HTTP_AUTHORIZATION", "")  # not the header map's search
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an access token: Authorization: Bearer <token>")
    return token.strip()


PUBLIC_CACHING = "public, max-age=60, s-maxage=120"
PRIVATE_CACHING = "private, no-cache"


# The JSON and ETag of large values: a warm list page is the near cache's own object each time,
# and encoding its 27 KB again cost more than the rest of its view.
_ENCODED_MIN_BYTES = 4096
_encoded = ByIdentity(64)


def _encode(data: Any) -> tuple[bytes, str]:
    found = _encoded.get(data)
    if found is not MISSING:
        return found
    body = orjson.dumps(data)
    # xxh3: a list page's ETag took 26 us with blake2b, half a microsecond with it; an ETag needs
    # no resistance to an attacker, only to accidental collisions (128 bits).
    etag = '"' + xxhash.xxh3_128_hexdigest(body) + '"'
    if len(body) >= _ENCODED_MIN_BYTES:
        _encoded.put(data, (body, etag))
    return body, etag


class Answer(NamedTuple):
    """A view's answer before it is a Response: the hot path writes a 200 as it is."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    mimetype: str | None = JSON

    def response(self) -> Response:
        return Response(self.body, status=self.status, headers=self.headers,
                        mimetype=self.mimetype)


def respond(result: Any, op: Operation, environ: dict) -> Answer:
    if op.status == 204:
        return Answer(204, [], b"", None)
    data, source = result if isinstance(result, tuple) else (result, None)
    if op.method != "GET":
        return Answer(op.status, [], orjson.dumps(data))
    body, etag = _encode(data)
    # Headers given at once: each one set on a Response afterwards is validated and searched for
    # again.
    headers = [("ETag", etag), ("Cache-Control", PUBLIC_CACHING if op.public else PRIVATE_CACHING)]
    if source:
        headers.append(("X-Cache", source))
    if etag in environ.get("HTTP_IF_NONE_MATCH", ""):
        return Answer(304, headers, b"")
    return Answer(op.status, headers, body)


def serve(op: Operation, ctx: Any, environ: dict, path: dict) -> Answer:
    """One request to `op`, from its WSGI environ and path parameters: Flask's view and the hot
    path (web/hot.py) both answer with it. A body is read through Flask's request: only Flask's
    view serves an operation that takes one."""
    kwargs = dict(path)
    # Who is asking comes first: an anonymous caller learns nothing from validation.
    if op.authenticated:
        plan = None if op.prefetch is None else (lambda org: op.prefetch(ctx, org, kwargs))
        kwargs["actor"], lookups = auth.authenticate(ctx, bearer_token(environ), prefetch=plan)
        if op.prefetch is not None:
            kwargs["lookups"] = lookups
    if op.body is not None:
        kwargs["body"] = parse_body(op.body)
    if op.query is not None:
        kwargs["query"] = parse_query(op.query, environ)
    return respond(op.view(ctx, **kwargs), op, environ)


def endpoint(bp: Blueprint, method: str, rule: str, *, summary: str,
             body: type[BaseModel] | None = None, query: type[BaseModel] | None = None,
             response: type[BaseModel] | None = None, status: int = 200,
             authenticated: bool = True, public: bool = False,
             errors: tuple[int, ...] = (),
             prefetch: Callable[[Any, str, dict], list] | None = None) -> Callable:
    """`prefetch(services, org_id, path_params)` names what the view reads (cache keys, side
    reads): it is read in the session's round trip and handed to the view as `lookups` (in the
    same order)."""

    def wrap(fn: Callable) -> Callable:
        op = Operation(method, rule, summary, bp.name, body, query, response, status,
                       authenticated, public, errors, fn, prefetch)
        OPERATIONS.append(op)

        @wraps(fn)
        def view(**path: Any) -> Response:
            return serve(op, services(), request.environ, path).response()

        bp.add_url_rule(rule, endpoint=fn.__name__, view_func=view, methods=[method])
        return fn

    return wrap
