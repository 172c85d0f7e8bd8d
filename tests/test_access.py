"""Who may do what: a table of role x endpoint x object, each cell a test.

Roles: alice coordinates; bob and dave administer sites A and B; charlie audits; eve has no
role; "anon" is signed out; "agent A" and "agent B" hold the sites' tokens.
"""

import pytest

from coordinator import services
from coordinator.models import MetricPoint, Task, Update

ROLES = ["alice", "bob", "dave", "charlie", "eve", "anon", "agent A", "agent B"]


@pytest.fixture
def world(federation, sites, alice, bob, dave, charlie, eve):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task_a = Task.objects.get(round=round_, site=sites["A"][0])
    membership_a = sites["A"][0].memberships.get()
    return {
        "users": {"alice": alice, "bob": bob, "dave": dave, "charlie": charlie, "eve": eve},
        "tokens": {"agent A": sites["A"][1], "agent B": sites["B"][1]},
        "ids": {
            "fed": federation.pk,
            "round": round_.pk,
            "task_a": task_a.pk,
            "site_a": sites["A"][0].pk,
            "mem_a": membership_a.pk,
            "version": federation.latest_version().pk,
        },
    }


def _client(world, role, client_for):
    if role in world["users"]:
        return client_for(world["users"][role])
    if role in world["tokens"]:
        return client_for(token=world["tokens"][role])
    return client_for()


# (name, method, path, body, expected status per role; roles not named expect the "else" entry)
TABLE = [
    (
        "federation",
        "get",
        "/api/federations/{fed}/",
        None,
        {"alice": 200, "bob": 200, "dave": 200, "charlie": 200, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "membership A",
        "get",
        "/api/memberships/{mem_a}/",
        None,
        {"alice": 200, "bob": 200, "charlie": 200, "dave": 404, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "ledger of site A",
        "get",
        "/api/memberships/{mem_a}/ledger/",
        None,
        {"alice": 200, "bob": 200, "charlie": 200, "dave": 404, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "raise A's budget",
        "patch",
        "/api/memberships/{mem_a}/",
        {"budget": 9, "reason": "r"},
        {"alice": 200, "bob": 403, "charlie": 403, "dave": 404, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "lower A's budget",
        "patch",
        "/api/memberships/{mem_a}/",
        {"budget": 1.5, "reason": "r"},
        {"alice": 200, "bob": 200, "charlie": 403, "dave": 404, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "launch a round",
        "post",
        "/api/federations/{fed}/rounds/",
        {"confirm_noise": True},
        {"alice": 201, "bob": 403, "dave": 403, "charlie": 403, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "abort a round",
        "post",
        "/api/rounds/{round}/abort/",
        {"reason": "r"},
        {"alice": 200, "bob": 403, "dave": 403, "charlie": 403, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "audit log",
        "get",
        "/api/federations/{fed}/audit/",
        None,
        {"alice": 200, "charlie": 200, "bob": 403, "dave": 403, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "site A",
        "get",
        "/api/sites/{site_a}/",
        None,
        {"alice": 200, "bob": 200, "charlie": 200, "dave": 404, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "rotate A's token",
        "post",
        "/api/sites/{site_a}/rotate-token/",
        None,
        {"alice": 200, "bob": 403, "charlie": 403, "dave": 404, "eve": 404, "anon": 401, "else": 403},
    ),
    (
        "register a site",
        "post",
        "/api/sites/",
        {"name": "Hospital New"},
        {"alice": 201, "anon": 401, "else": 403},
    ),
    (
        "A's task, agent side",
        "get",
        "/api/agent/tasks/{task_a}/",
        None,
        {"agent A": 200, "agent B": 403, "anon": 401, "else": 403},
    ),
    (
        "A's task status",
        "post",
        "/api/agent/tasks/{task_a}/status/",
        {"state": "evaluating"},
        {"agent A": 200, "agent B": 403, "anon": 401, "else": 403},
    ),
    (
        "A's task metrics",
        "post",
        "/api/agent/tasks/{task_a}/metrics/",
        {"points": [{"name": "loss", "value": 1}]},
        {"agent A": 200, "agent B": 403, "anon": 401, "else": 403},
    ),
    (
        "A's task update",
        "put",
        "/api/agent/tasks/{task_a}/update/",
        b"not-an-update",
        {"agent A": 400, "agent B": 403, "anon": 401, "else": 403},
    ),
    (
        "model weights",
        "get",
        "/api/versions/{version}/weights/",
        None,
        {
            "alice": 200,
            "bob": 200,
            "dave": 200,
            "charlie": 200,
            "agent A": 200,
            "agent B": 200,
            "eve": 404,
            "anon": 401,
        },
    ),
]

CELLS = [(row, role) for row in TABLE for role in ROLES if role in row[4] or "else" in row[4]]


@pytest.mark.parametrize(("row", "role"), CELLS, ids=[f"{row[0]} as {role}" for row, role in CELLS])
def test_access_table(world, client_for, row, role):
    name, method, path, body, expected = row
    client = _client(world, role, client_for)
    url = path.format(**world["ids"])
    if isinstance(body, bytes):
        response = client.generic(method.upper(), url, body, content_type="application/octet-stream")
    else:
        response = (
            getattr(client, method)(url, body, format="json")
            if body is not None
            else getattr(client, method)(url)
        )
    assert response.status_code == expected.get(role, expected.get("else")), response.content[:300]


def test_another_sites_agent_changes_nothing(world, client_for):
    client = client_for(token=world["tokens"]["agent B"])
    task_id = world["ids"]["task_a"]
    client.post(f"/api/agent/tasks/{task_id}/status/", {"state": "dropped", "reason": "x"}, format="json")
    client.post(
        f"/api/agent/tasks/{task_id}/metrics/", {"points": [{"name": "loss", "value": 1}]}, format="json"
    )
    client.generic(
        "PUT", f"/api/agent/tasks/{task_id}/update/", b"x", content_type="application/octet-stream"
    )
    task = Task.objects.get(pk=task_id)
    assert task.state == "assigned"
    assert not MetricPoint.objects.exists() and not Update.objects.exists()


def test_site_admin_sees_only_their_sites_rows(world, client_for):
    bob = client_for(world["users"]["bob"])
    ids = world["ids"]
    memberships = bob.get(f"/api/federations/{ids['fed']}/memberships/").json()
    assert [m["site_name"] for m in memberships] == ["Hospital A"]
    ledger = bob.get(f"/api/federations/{ids['fed']}/ledger/").json()
    assert ledger and {row["site_name"] for row in ledger} == {"Hospital A"}
    tasks = bob.get(f"/api/rounds/{ids['round']}/").json()["tasks"]
    assert [t["site_name"] for t in tasks] == ["Hospital A"]
    alice = client_for(world["users"]["alice"])
    assert {row["site_name"] for row in alice.get(f"/api/federations/{ids['fed']}/ledger/").json()} == {
        "Hospital A",
        "Hospital B",
    }


def test_agent_gets_only_its_own_next_task(world, client_for):
    task = client_for(token=world["tokens"]["agent A"]).get("/api/agent/task/").json()
    assert task["task"] == world["ids"]["task_a"]
    assert task["mechanism"] == "svt" and task["epsilon"] == "1.000000000000"
