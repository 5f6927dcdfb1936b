"""The shortest path through the API: sign up, create, read through the cache."""

import pytest

from cache_helpers import CACHED
from conftest import topology_mode


def test_a_created_project_is_read_back_through_the_cache(client, admin):
    created = client.post("/api/projects", json={"name": "Launch"}, headers=admin.headers)
    assert created.status_code == 201
    url = f"/api/projects/{created.json['id']}"

    first = client.get(url, headers=admin.headers)
    second = client.get(url, headers=admin.headers)

    assert first.json == second.json == created.json
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] in CACHED


@pytest.mark.skipif(topology_mode() == "cluster", reason="names the in-process instance; "
                    "test_topology checks both instances' names")
def test_every_answer_names_the_instance_that_served_it(client, settings, admin):
    answers = [client.get("/health"), client.get("/api/projects", headers=admin.headers),
               client.get("/api/projects/not-a-uuid", headers=admin.headers)]

    assert {a.headers["X-Instance"] for a in answers} == {settings.instance_name}
    assert answers[2].status_code in (404, 422)  # error answers name it too
