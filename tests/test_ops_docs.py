"""/docs in a real browser: headless Chromium (Debian's package) loads Swagger UI from the API's
own files under its Content-Security-Policy and lists every operation of /openapi.json."""

from __future__ import annotations

import re
import subprocess
import threading

import pytest
from werkzeug.serving import make_server

from tests.ops_tools import ensure_binary

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_binary("chromium", "chromium")


@pytest.fixture(scope="module")
def docs_app(redis_server, tmp_path_factory):
    """/docs and /openapi.json read no database: one app for the module, whatever the backends
    of the session (the browser runs once)."""
    from config import Settings
    from web import create_app

    folder = tmp_path_factory.mktemp("docs")
    app = create_app(Settings(database_url=f"sqlite:///{folder / 'unused.db'}",
                              redis_url=redis_server.url_for(0),
                              celery_broker_url=redis_server.url_for(1),
                              secret_key="docs-" + "x" * 32))
    yield app
    app.extensions["taskcache"].close()


@pytest.fixture(scope="module")
def served(docs_app):
    """The app on a real HTTP server (a free port), for a real browser."""
    server = make_server("127.0.0.1", 0, docs_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def _render(chromium: str, url: str, profile) -> subprocess.CompletedProcess:
    # Virtual time: the page's scripts, its fetch of /openapi.json and the render all run before
    # the DOM is dumped, however loaded the machine is.
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)


def test_docs_lists_every_operation_in_a_browser(chromium, served, docs_app, tmp_path):
    document = docs_app.test_client().get("/openapi.json").json
    wanted = {f"operations-{op['tags'][0]}-{op['operationId']}"
              for methods in document["paths"].values() for op in methods.values()}
    assert len(wanted) >= 30

    done = _render(chromium, served + "/docs", tmp_path / "profile")
    dom = done.stdout
    assert 'id="swagger-ui"' in dom, done.stderr[-3000:]
    shown = set(re.findall(r'id="(operations-[^"]+)"', dom))
    assert wanted <= shown, sorted(wanted - shown)
    # The bearer scheme: an Authorize button, and a lock on each operation that needs the token.
    assert re.search(r'class="[^"]*btn authorize', dom)
    assert dom.count("authorization__btn") >= sum(
        1 for methods in document["paths"].values() for op in methods.values()
        if op.get("security"))
    # Nothing the page needed was refused by its Content-Security-Policy.
    assert "Content Security Policy" not in done.stderr, [
        line for line in done.stderr.splitlines() if "Content Security Policy" in line][:5]


def test_docs_has_its_own_policy_and_no_inline_script(docs_app):
    client = docs_app.test_client()
    answer = client.get("/docs")
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    page = answer.get_data(as_text=True)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="/' in attrs and not body.strip() for attrs, body in scripts)
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', page):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/docs/assets/index.html").status_code == 404  # only what the page uses
