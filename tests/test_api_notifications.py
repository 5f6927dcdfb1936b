"""Notifications: who gets TASK_ASSIGNED and TASK_COMMENTED, the unread badge, marking read."""

from __future__ import annotations

import pytest

from api_support import (add_member, assert_problem, make_comment, make_project, make_task,
                         random_id, walk)


@pytest.fixture
def team(client, admin):
    member = add_member(client, admin, display_name="Mia")
    other = add_member(client, admin, display_name="Olle")
    return {"admin": admin, "member": member, "other": other,
            "project": make_project(client, admin.headers)}


def _notes(client, headers, query=""):
    answer = client.get(f"/api/me/notifications{query}", headers=headers)
    assert answer.status_code == 200, answer.json
    return answer.json["items"]


def _unread(client, headers) -> int:
    answer = client.get("/api/me/notifications/unread-count", headers=headers)
    assert answer.status_code == 200 and set(answer.json) == {"unread"}
    return answer.json["unread"]


def test_assigning_a_task_to_someone_else_notifies_them(client, team):
    member = team["member"]
    task = make_task(client, team["admin"].headers, team["project"]["id"],
                     assignee_id=member["user"]["id"])
    notes = _notes(client, member["headers"])
    assert len(notes) == 1
    note = notes[0]
    assert set(note) == {"id", "user_id", "kind", "task_id", "read", "created_at"}
    assert (note["kind"], note["task_id"], note["user_id"], note["read"]) == (
        "TASK_ASSIGNED", task["id"], member["user"]["id"], False)
    assert _unread(client, member["headers"]) == 1
    assert _notes(client, team["admin"].headers) == []


def test_assigning_a_task_to_oneself_notifies_nobody(client, team):
    member = team["member"]
    make_task(client, member["headers"], team["project"]["id"], assignee_id=member["user"]["id"])
    task = make_task(client, member["headers"], team["project"]["id"])
    client.patch(f"/api/tasks/{task['id']}", headers=member["headers"],
                 json={"assignee_id": member["user"]["id"]})
    assert _notes(client, member["headers"]) == []
    assert _unread(client, member["headers"]) == 0


def test_reassigning_by_patch_notifies_the_new_assignee_only(client, team):
    member, other = team["member"], team["other"]
    task = make_task(client, team["admin"].headers, team["project"]["id"],
                     assignee_id=member["user"]["id"])
    client.patch(f"/api/tasks/{task['id']}", headers=team["admin"].headers,
                 json={"assignee_id": other["user"]["id"]})
    assert [n["kind"] for n in _notes(client, other["headers"])] == ["TASK_ASSIGNED"]
    assert len(_notes(client, member["headers"])) == 1


def test_editing_other_fields_of_an_assigned_task_notifies_nobody_again(client, team):
    member = team["member"]
    task = make_task(client, team["admin"].headers, team["project"]["id"],
                     assignee_id=member["user"]["id"])
    client.patch(f"/api/tasks/{task['id']}", headers=team["admin"].headers,
                 json={"status": "IN_PROGRESS", "assignee_id": member["user"]["id"]})
    assert len(_notes(client, member["headers"])) == 1


def test_a_comment_by_someone_other_than_the_assignee_notifies_the_assignee(client, team):
    member, other = team["member"], team["other"]
    task = make_task(client, member["headers"], team["project"]["id"],
                     assignee_id=member["user"]["id"])
    make_comment(client, other["headers"], task["id"])
    notes = _notes(client, member["headers"])
    assert [(n["kind"], n["task_id"]) for n in notes] == [("TASK_COMMENTED", task["id"])]
    assert _notes(client, other["headers"]) == []


def test_the_assignees_own_comment_notifies_nobody(client, team):
    member = team["member"]
    task = make_task(client, member["headers"], team["project"]["id"],
                     assignee_id=member["user"]["id"])
    make_comment(client, member["headers"], task["id"])
    assert _notes(client, member["headers"]) == []
    assert _notes(client, team["admin"].headers) == []


def test_a_comment_on_an_unassigned_task_notifies_nobody(client, team):
    task = make_task(client, team["admin"].headers, team["project"]["id"])
    make_comment(client, team["member"]["headers"], task["id"])
    for who in (team["admin"].headers, team["member"]["headers"], team["other"]["headers"]):
        assert _notes(client, who) == []


def test_notifications_are_newest_first_filter_unread_and_paginate(client, team):
    member = team["member"]
    tasks = [make_task(client, team["admin"].headers, team["project"]["id"],
                       assignee_id=member["user"]["id"]) for _ in range(5)]
    listed = walk(client, "/api/me/notifications", member["headers"], limit=2)
    assert [n["task_id"] for n in listed] == [t["id"] for t in reversed(tasks)]
    newest = listed[0]
    assert client.post(f"/api/me/notifications/{newest['id']}/read",
                       headers=member["headers"]).status_code == 204
    unread = _notes(client, member["headers"], "?unread=true")
    assert [n["id"] for n in unread] == [n["id"] for n in listed[1:]]
    everything = _notes(client, member["headers"], "?unread=false")
    assert [n["read"] for n in everything] == [True, False, False, False, False]
    assert _unread(client, member["headers"]) == 4


def test_marking_a_notification_read_twice_is_harmless(client, team):
    member = team["member"]
    make_task(client, team["admin"].headers, team["project"]["id"],
              assignee_id=member["user"]["id"])
    note = _notes(client, member["headers"])[0]
    for _ in range(2):
        answer = client.post(f"/api/me/notifications/{note['id']}/read", headers=member["headers"])
        assert answer.status_code == 204 and answer.data == b""
    assert _unread(client, member["headers"]) == 0


def test_read_all_clears_the_badge_of_the_caller_only(client, team):
    member, other = team["member"], team["other"]
    for who in (member, member, other):
        make_task(client, team["admin"].headers, team["project"]["id"],
                  assignee_id=who["user"]["id"])
    assert _unread(client, member["headers"]) == 2
    answer = client.post("/api/me/notifications/read-all", headers=member["headers"])
    assert answer.status_code == 204 and answer.data == b""
    assert _unread(client, member["headers"]) == 0
    assert _notes(client, member["headers"], "?unread=true") == []
    assert _unread(client, other["headers"]) == 1


def test_someone_elses_notification_is_404_and_stays_unread(client, team):
    member, other = team["member"], team["other"]
    make_task(client, team["admin"].headers, team["project"]["id"],
              assignee_id=member["user"]["id"])
    note = _notes(client, member["headers"])[0]
    missing = client.post(f"/api/me/notifications/{random_id()}/read", headers=other["headers"])
    foreign = client.post(f"/api/me/notifications/{note['id']}/read", headers=other["headers"])
    assert_problem(foreign, 404)
    assert foreign.json == assert_problem(missing, 404)
    assert _unread(client, member["headers"]) == 1


def test_an_invalid_unread_filter_is_422(client, team):
    assert_problem(client.get("/api/me/notifications?unread=maybe",
                              headers=team["member"]["headers"]), 422)
