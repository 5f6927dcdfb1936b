"""The OpenAPI 3.1 document, generated from the endpoint declarations and their schemas, and /docs:
Swagger UI served from its Python package's own files (no CDN: it works on a closed network)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from web.endpoint import OPERATIONS, Operation
from web.schemas import CacheHealth, Problem, Status

bp = Blueprint("docs", __name__)

REF = "#/components/schemas/{model}"


def _schema(model, components: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _query_params(model, components: dict) -> list[dict]:
    schema = model.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    return [{"name": name, "in": "query", "required": False, "schema": prop}
            for name, prop in schema.get("properties", {}).items()]


def _problem(description: str) -> dict:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": REF.format(
                model="Problem")}}}}


ERROR_TEXT = {400: "Malformed JSON", 401: "Missing, invalid, expired or revoked token",
              403: "Not allowed", 404: "Unknown id (or another organization's)",
              409: "Conflict", 413: "Body over 1 MiB", 415: "Body is not application/json",
              422: "Validation failed", 429: "Rate limited", 501: "Not available"}


def _operation(op: Operation, components: dict) -> dict:
    doc: dict = {"summary": op.summary, "tags": [op.tag],
                 "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_')}"
                 .replace("{", "").replace("}", "").replace("-", "_")}
    params = [{"name": p, "in": "path", "required": True,
               "schema": {"type": "string", "format": "uuid"}} for p in op.path_params]
    if op.query:
        params += _query_params(op.query, components)
    if params:
        doc["parameters"] = params
    if op.body:
        doc["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _schema(op.body, components)}}}
    ok: dict = {"description": "Success"}
    if op.response and op.status != 204:
        ok["content"] = {"application/json": {"schema": _schema(op.response, components)}}
    responses = {str(op.status): ok}
    codes = set(op.errors)
    if op.authenticated:
        codes.add(401)
        doc["security"] = [{"bearer": []}]
    if op.body:
        codes |= {400, 413, 415, 422}
    if op.query:
        codes.add(422)
    if op.path_params:
        codes.add(404)
    if op.method == "GET":
        responses["304"] = {"description": "Not modified (If-None-Match matched the ETag)"}
    for code in sorted(codes):
        responses[str(code)] = _problem(ERROR_TEXT[code])
    doc["responses"] = responses
    return doc


def document() -> dict:
    components: dict = {}
    _schema(Problem, components)
    paths: dict = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, components)
    paths["/health/ready"] = {"get": {"summary": "Readiness (503 when the database is down)",
                                      "operationId": "get_health_ready",
                                      "tags": ["operations"], "responses": {
        "200": {"description": "Ready", "content": {"application/json": {"schema": _schema(
            Status, components)}}},
        "503": {"description": "Database unreachable"}}}}
    paths["/health/cache"] = {"get": {"summary": "Cache health", "tags": ["operations"],
                                      "operationId": "get_health_cache",
                                      "responses": {"200": {"description": "Report", "content": {
        "application/json": {"schema": _schema(CacheHealth, components)}}}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", "tags": ["operations"],
                                 "operationId": "get_metrics",
                                 "responses": {"200": {"description": "Text exposition",
                                                       "content": {"text/plain": {}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Task Management API", "version": "1.0.0",
                 "description": "Multi-layer cached Task Management API (see API.md)."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    doc = current_app.extensions.setdefault("openapi", document())
    import orjson

    response = Response(orjson.dumps(doc), mimetype="application/json",
                        headers={"Cache-Control": "public, max-age=60, s-maxage=120"})
    # A public, cacheable GET: an ETag, and 304 on a matching If-None-Match.
    response.add_etag()
    return response.make_conditional(request)


# Swagger UI's own files, as the swagger-ui-bundle-v2 package ships them (no CDN).
DOCS_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")
# The page runs only its own files: no inline script (the init is /static/docs.js), no other
# origin; images may be data: URIs (Swagger UI's stylesheet draws its icons with them).
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
            "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Task Management API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="stylesheet" href="/static/docs.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png"></head>
<body><div id="swagger-ui"><noscript>The interactive reference needs JavaScript; the description
itself is <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</noscript></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script></body></html>
"""


@bp.get("/docs")
def docs() -> Response:
    """Swagger UI on /openapi.json: every operation, tried from the page with a bearer token
    (Authorize)."""
    return Response(DOCS_PAGE, mimetype="text/html",
                    headers={"Content-Security-Policy": DOCS_CSP,
                             "Cache-Control": "public, max-age=300"})


@bp.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    from flask import abort, send_from_directory
    from swagger_ui_bundle import swagger_ui_path

    if name not in DOCS_ASSETS:
        abort(404)
    response = send_from_directory(str(swagger_ui_path), name, max_age=86_400)
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response
