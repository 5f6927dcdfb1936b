"""Property-based conformance: schemathesis generates requests (valid and invalid) for every
operation of /openapi.json and checks that the API never answers 5xx and that every answer is
one the document declares (status code, content type, body schema).

Every phase runs: the examples, coverage and fuzzing phases per operation, then the stateful phase
(workflows that feed one answer's ids into the next request, along the links schemathesis infers
from the document). The run is authenticated as a signed-up admin; logout and refresh revoke the
token they are sent with, so those two operations get a fresh login each time.
SCHEMATHESIS_MAX_EXAMPLES and SCHEMATHESIS_STATEFUL_EXAMPLES bound the run: `make test` keeps it
short, `make fuzz` runs it long (figures in RELIABILITY.md, Fuzzing)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from api_support import PASSWORD, bearer

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "15"))
STATEFUL_EXAMPLES = int(os.environ.get("SCHEMATHESIS_STATEFUL_EXAMPLES", "10"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
SELF_REVOKING = {"/api/auth/logout", "/api/auth/refresh"}

EXAMPLES: Counter = Counter()
STATEFUL_STEPS: Counter = Counter()
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


def test_stateful_workflows_conform_to_the_openapi_description(app, client, admin, database_url):
    backend = database_url.split(":")[0]
    machine = schema.as_state_machine()
    assert machine.bundles, "schemathesis inferred no links between operations"

    class Workflow(machine):
        def get_call_kwargs(self, case):
            return {"app": app, "headers": _headers(case, client, admin)}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            STATEFUL_STEPS[backend] += 1
            _record(backend, case, response.status_code)
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Workflow.run(settings=settings(max_examples=STATEFUL_EXAMPLES, deadline=None,
                                   derandomize=True, stateful_step_count=8,
                                   suppress_health_check=list(HealthCheck)))


def test_schemathesis_reached_every_operation(database_url, capsys):
    backend = database_url.split(":")[0]
    if not EXAMPLES[backend]:
        pytest.skip("the schemathesis run was not part of this session")
    reached = REACHED[backend]
    succeeded = sorted(op for op, statuses in reached.items()
                       if any(200 <= s < 300 for s in statuses))
    with capsys.disabled():
        print(f"\nschemathesis on {backend}: {EXAMPLES[backend]} requests per operation and "
              f"{STATEFUL_STEPS[backend]} in stateful workflows, over "
              f"{len(reached)} operations ({len(succeeded)} with a 2xx), by status: "
              f"{dict(sorted(STATUSES[backend].items()))}")
        for op in sorted(set(schema_labels()) - set(succeeded)):
            print(f"  no 2xx: {op} {dict(reached.get(op, {}))}")
    assert set(reached) == set(schema_labels())
    assert EXAMPLES[backend] >= 30 * min(MAX_EXAMPLES, 5)


def schema_labels() -> list[str]:
    return [result.ok().label for result in schema.get_all_operations()]
