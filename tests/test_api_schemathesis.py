"""Property-based conformance: schemathesis generates requests (valid and invalid) for every
operation of /openapi.json and checks that the API never answers 5xx and that every answer is
one the document declares (status code, content type, body schema).

The run is authenticated as a signed-up admin; logout and refresh revoke the token they are sent
with, so those two operations get a fresh login each time. MAX_EXAMPLES bounds the run."""

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
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
SELF_REVOKING = {"/api/auth/logout", "/api/auth/refresh"}

EXAMPLES: Counter = Counter()
STATUSES: dict[str, Counter] = {"sqlite": Counter(), "mysql+pymysql": Counter()}


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
    headers = admin.headers
    if case.path in SELF_REVOKING:
        login = client.post("/api/auth/login", json={"email": admin.email, "password": PASSWORD})
        headers = bearer(login.json["access_token"])
    backend = database_url.split(":")[0]
    EXAMPLES[backend] += 1
    response = case.call_and_validate(headers=headers, checks=CHECKS, app=app)
    STATUSES[backend][response.status_code] += 1


def test_schemathesis_ran_a_bounded_number_of_examples(database_url, capsys):
    backend = database_url.split(":")[0]
    if not EXAMPLES[backend]:
        pytest.skip("the schemathesis run was not part of this session")
    with capsys.disabled():
        print(f"\nschemathesis examples on {backend}: {EXAMPLES[backend]}, by status: "
              f"{dict(sorted(STATUSES[backend].items()))}")
    assert EXAMPLES[backend] >= 30 * min(MAX_EXAMPLES, 5)
