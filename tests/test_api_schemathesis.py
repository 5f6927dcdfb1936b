"""Property-based conformance: schemathesis generates requests (valid and invalid) for every
operation of /openapi.json and checks that the API never answers 5xx and that every answer is
one the document declares (status code, content type, body schema).

Every phase runs: the examples, coverage and fuzzing phases per operation, then the stateful phase
(workflows that feed one answer's ids into the next request, along the links schemathesis infers
from the document), through schemathesis' own runner against a real gunicorn. The run is authenticated as a signed-up admin; logout and refresh revoke the
token they are sent with, so those two operations get a fresh login each time.
SCHEMATHESIS_MAX_EXAMPLES and SCHEMATHESIS_STATEFUL_EXAMPLES bound the run: `make test` keeps it
short, `make fuzz` runs it long (figures in RELIABILITY.md, Fuzzing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from api_support import PASSWORD, bearer
from gunicorn_server import start_gunicorn

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "15"))
STATEFUL_EXAMPLES = int(os.environ.get("SCHEMATHESIS_STATEFUL_EXAMPLES", "10"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
SELF_REVOKING = {"/api/auth/logout", "/api/auth/refresh"}

EXAMPLES: Counter = Counter()
STATUSES: dict[str, Counter] = {"sqlite": Counter(), "mysql+pymysql": Counter()}
# operation label -> statuses it answered, per backend (every phase)
REACHED: dict[str, dict[str, Counter]] = {"sqlite": {}, "mysql+pymysql": {}}


def _record(backend: str, case, status: int) -> None:
    STATUSES[backend][status] += 1
    REACHED[backend].setdefault(case.operation.label, Counter())[status] += 1


def _document() -> dict:
    """The document /openapi.json serves, built by the same code (the views declare it)."""
    import web.views.accounts  # noqa: F401  (registering the operations)
    import web.views.operations  # noqa: F401
    import web.views.work  # noqa: F401
    from web.openapi import document

    return document()


# Built at import from the generator itself (schemathesis' lazy `from_fixture` loader does not run
# under pytest 9); the test below also proves /openapi.json serves exactly this document.
schema = schemathesis.openapi.from_dict(_document())


def test_openapi_json_serves_the_document_under_test(client):
    assert client.get("/openapi.json").json == _document()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_its_openapi_description(case, app, client, admin,
                                                            database_url):
    backend = database_url.split(":")[0]
    EXAMPLES[backend] += 1
    response = case.call_and_validate(headers=_headers(case, client, admin), checks=CHECKS,
                                      app=app)
    _record(backend, case, response.status_code)


def _headers(case, client, admin) -> dict:
    if case.path not in SELF_REVOKING:
        return admin.headers
    login = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
    assert login.status_code == 200, login.json
    return bearer(login.json["access_token"])


@pytest.fixture(scope="module")
def live_server(database_url, redis_server, tmp_path_factory):
    server = start_gunicorn(database_url, redis_server.url_for(0),
                            tmp_path_factory.mktemp("fuzz"))
    yield server
    server.stop()


def test_stateful_workflows_conform_to_the_openapi_description(live_server, capsys):
    """The stateful phase through schemathesis' own runner, against a real gunicorn: its
    workflows depend on what the server answered before (a second sign-up with one email is a
    409), which hypothesis' pytest state machines report as flaky data generation. Logout and
    refresh would end the run's session: the per-operation phases above cover them."""
    signed_up = requests.post(f"{live_server.base}/api/orgs", timeout=60, json={
        "organization_name": "Fuzz", "email": f"{uuid.uuid4().hex[:12]}@example.com",
        "password": PASSWORD, "display_name": "Fuzzer"})
    assert signed_up.status_code == 201, signed_up.text
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run",
         f"{live_server.base}/openapi.json", "--phases", "stateful", "--no-color",
         "-H", f"Authorization: Bearer {signed_up.json()['access_token']}",
         "--checks", ",".join(check.__name__ for check in CHECKS),
         "--max-examples", str(STATEFUL_EXAMPLES), "--seed", "13",
         *[arg for path in SELF_REVOKING for arg in ("--exclude-path", path)]],
        capture_output=True, text=True, timeout=3600)
    summary = [line.strip() for line in run.stdout.splitlines()
               if re.match(r"\s*(Scenarios|API Links|Test cases|\d+ generated)", line)]
    with capsys.disabled():
        print(f"\nschemathesis stateful: {'; '.join(summary)}")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout


def test_schemathesis_reached_every_operation(database_url, capsys):
    backend = database_url.split(":")[0]
    if not EXAMPLES[backend]:
        pytest.skip("the schemathesis run was not part of this session")
    reached = REACHED[backend]
    succeeded = sorted(op for op, statuses in reached.items()
                       if any(200 <= s < 300 for s in statuses))
    with capsys.disabled():
        print(f"\nschemathesis on {backend}: {EXAMPLES[backend]} requests over "
              f"{len(reached)} operations ({len(succeeded)} with a 2xx), by status: "
              f"{dict(sorted(STATUSES[backend].items()))}")
        for op in sorted(set(schema_labels()) - set(succeeded)):
            print(f"  no 2xx: {op} {dict(reached.get(op, {}))}")
    assert set(reached) == set(schema_labels())
    assert EXAMPLES[backend] >= 30 * min(MAX_EXAMPLES, 5)


def schema_labels() -> list[str]:
    return [result.ok().label for result in schema.get_all_operations()]
