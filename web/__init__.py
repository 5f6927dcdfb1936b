"""The Flask application factory. Nothing is built at import time."""

from __future__ import annotations

import logging
from typing import Callable

from flask import Flask, Response
from flask.sessions import NullSession, SessionInterface

from config import Settings, load_settings
from services.context import Services, build_services



def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    from web import security

    app.config.update(MAX_CONTENT_LENGTH=security.MAX_BODY, SECRET_KEY=settings.secret_key,
                      SEND_FILE_MAX_AGE_DEFAULT=3600)
    app.json.sort_keys = False
    app.session_interface = _NoCookieSession()
    from web.endpoint import UUIDText

    app.url_map.converters["uuid"] = UUIDText
    services = services or build_services(settings)
    app.extensions["taskcache"] = services
    _attach_worker(app, services)
    _register_blueprints(app)
    _static_headers(app)
    finish = _answer_headers(app, settings.instance_name)
    from web import errors

    errors.register(app)
    security.register(app)
    _logging(app)
    if settings.web_hot_path:
        from web.hot import HotPath

        app.wsgi_app = HotPath(app.wsgi_app, services, finish)
    return app


class _NoCookieSession(SessionInterface):
    """A bearer-token API keeps no cookie session. Opening Flask's signed-cookie one on every
    request cost about 45 us, a quarter of a warm read (BENCHMARKS.md)."""

    def __init__(self) -> None:
        # One for every request (a null session refuses every write): building Flask's anew
        # showed as 2.5% of a warm task GET's GIL samples under load.
        self._null = NullSession()

    def open_session(self, app, request):
        return self._null

    def save_session(self, app, session, response) -> None:
        pass


def _register_blueprints(app: Flask) -> None:
    from web import openapi
    from web.views import accounts, operations, work

    for module in (accounts, work, operations, openapi):
        app.register_blueprint(module.bp)


def _attach_worker(app: Flask, services: Services) -> None:
    """Events go to Celery after commit; without the worker package the outbox sweep would."""
    try:
        from worker import attach_publisher, register_cli
    except ImportError:
        return
    attach_publisher(services)
    register_cli(app)  # `flask --app web warm`
    from web.cli import cache_size_command

    app.cli.add_command(cache_size_command)  # `flask --app web cache-size`


def _static_headers(app: Flask) -> None:
    @app.after_request
    def immutable_static(response):
        from flask import request

        # Only a file is immutable: an error answer is not (security.add_headers: no-store).
        if request.path.startswith("/static/") and response.status_code in (200, 304):
            response.headers["Cache-Control"] = "public, max-age=3600, immutable"
            response.add_etag() if not response.get_etag()[0] else None
        return response


def _answer_headers(app: Flask, name: str) -> Callable[[Response], Response]:
    """The headers of every answer, Flask's and the hot path's (web/hot.py): the security
    headers, and which API server answered (behind a balancer a client, and a test, can tell)."""
    from web import security

    @app.after_request
    def finish(response: Response) -> Response:
        response = security.add_headers(response)
        response.headers["X-Instance"] = name
        return response

    return finish


def _logging(app: Flask) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
