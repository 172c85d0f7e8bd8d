"""Who may open which websocket: a table of role x socket route x object, through the real ASGI
application and the Redis channel layer (as tests/test_access.py does for HTTP).

Roles: alice coordinates the study; bob and dave administer its sites A and B; charlie audits it;
eve is signed in with no role; frank coordinates another federation, whose site C hank
administers; gina is staff with a federation of her own; ivy administers site D, invited into the
study and not yet accepted; "anonymous" is signed out; the tokens are site A's, site C's (in the
other federation), site D's (invited, not accepted), and site B's revoked token.
Every connection comes from the page's own origin, so the cell tests the consumer's decision.
"""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from coordinator import services
from coordinator.asgi import application
from coordinator.models import MetricPoint, Task

from .conftest import SVT_PARAMS, TINY_MODEL, join, make_user

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 10

ROLES = [
    "coordinator",
    "site admin",
    "site admin of another site",
    "auditor",
    "no role",
    "coordinator of another federation",
    "staff with their own federation",
    "site admin in another federation",
    "admin of a site that has not accepted",
    "anonymous",
    "site token",
    "other federation's site token",
    "token of a site that has not accepted",
    "revoked site token",
]
PEOPLE = {"coordinator", "site admin", "site admin of another site", "auditor"}
# Who may watch the other federation: its coordinator, and the admin of its site C.
OTHERS = {"coordinator of another federation", "site admin in another federation"}

# Each route with the object it opens: "accept", a refusal's close code, or for the metrics
# column the agent's answer to metrics for site A's task ("ack" or "error").
TABLE = {
    "federation socket": {**{role: "accept" for role in PEOPLE}, "else": 4403},
    "other federation's socket": {**{role: "accept" for role in OTHERS}, "else": 4403},
    "missing federation's socket": {"else": 4403},
    "round socket": {**{role: "accept" for role in PEOPLE}, "else": 4403},
    "other federation's round socket": {**{role: "accept" for role in OTHERS}, "else": 4403},
    "agent socket": {
        "site token": "accept",
        "other federation's site token": "accept",
        "token of a site that has not accepted": "accept",  # it may connect; it gets no task
        "else": 4401,
    },
    "agent socket: metrics for A's task": {
        "site token": "ack",
        "other federation's site token": "error",
        "token of a site that has not accepted": "error",
        "else": 4401,
    },
}


@pytest.fixture
def world(federation, sites, alice, bob, dave, charlie, eve):
    frank = make_user("frank")
    other = services.federation_create(
        name="Another study",
        created_by=frank,
        model_config=TINY_MODEL,
        default_mechanism="svt",
        default_mechanism_params=SVT_PARAMS,
        budget_delta=0,
        min_sites=1,
    )
    hank, ivy, gina = make_user("hank"), make_user("ivy"), make_user("gina", is_staff=True)
    services.federation_create(name="Gina's study", created_by=gina, model_config=TINY_MODEL)
    site_c, token_c = services.site_register(name="Hospital C", registered_by=frank)
    services.site_admin_add(site=site_c, user=hank, added_by=frank)
    join(other, site_c, budget=2, added_by=frank, accepted_by=hank)
    site_d, token_d = services.site_register(name="Hospital D", registered_by=alice)
    services.site_admin_add(site=site_d, user=ivy, added_by=alice)
    services.membership_add(federation=federation, site=site_d, budget=2, added_by=alice, reason="invited")
    round_ = services.round_launch(federation=federation, launched_by=alice)
    other_round = services.round_launch(federation=other, launched_by=frank)
    services.site_token_revoke(site=sites["B"][0], revoked_by=alice, reason="laptop stolen")
    paths = {
        "federation socket": f"/ws/federations/{federation.pk}/",
        "other federation's socket": f"/ws/federations/{other.pk}/",
        "missing federation's socket": "/ws/federations/999999/",
        "round socket": f"/ws/rounds/{round_.pk}/",
        "other federation's round socket": f"/ws/rounds/{other_round.pk}/",
        "agent socket": "/ws/agent/",
        "agent socket: metrics for A's task": "/ws/agent/",
    }
    people = {"coordinator": alice, "site admin": bob, "site admin of another site": dave}
    people |= {"auditor": charlie, "no role": eve, "coordinator of another federation": frank}
    people |= {"staff with their own federation": gina, "site admin in another federation": hank}
    people |= {"admin of a site that has not accepted": ivy}
    tokens = {"site token": sites["A"][1], "other federation's site token": token_c}
    tokens["token of a site that has not accepted"] = token_d
    tokens["revoked site token"] = sites["B"][1]
    return {
        "paths": paths,
        "people": people,
        "tokens": tokens,
        "task_a": Task.objects.get(round=round_, site=sites["A"][0]).pk,
    }


def _headers(world, role: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", b"http://localhost")]
    if role in world["people"]:
        client = Client()
        client.force_login(world["people"][role])
        cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    if role in world["tokens"]:
        headers.append((b"authorization", f"Bearer {world['tokens'][role]}".encode()))
    return headers


async def _outcome(world, route: str, headers) -> str | int:
    socket = WebsocketCommunicator(application, world["paths"][route], headers=headers)
    ok, code = await socket.connect(timeout=TIMEOUT)
    if not ok:
        return code
    outcome = "accept"
    if route.endswith("metrics for A's task"):
        point = {"name": "train_loss", "step": 1, "value": 0.5}
        await socket.send_json_to({"type": "metrics", "task": world["task_a"], "points": [point], "seq": 1})
        outcome = (await socket.receive_json_from(timeout=TIMEOUT))["type"]
    await socket.disconnect()
    return outcome


CELLS = [(role, route) for role in ROLES for route in TABLE]


@pytest.mark.parametrize(("role", "route"), CELLS, ids=[f"{route} as {role}" for role, route in CELLS])
def test_socket_access_table(world, role, route):
    expected = TABLE[route].get(role, TABLE[route]["else"])
    assert async_to_sync(_outcome)(world, route, _headers(world, role)) == expected


# --- A token revoked or rotated while its agent's socket is open ------------------------------


def _agent_socket(token: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )


async def _send_loss(socket, task_id: int, step: int) -> None:
    point = {"name": "train_loss", "step": step, "value": 0.5}
    await socket.send_json_to({"type": "metrics", "task": task_id, "points": [point], "seq": step})


def _change_token(change: str, site, admin) -> None:
    if change == "revoke":
        services.site_token_revoke(site=site, revoked_by=admin, reason="laptop stolen")
    else:
        services.site_token_rotate(site=site, rotated_by=admin)


@pytest.mark.parametrize("change", ["revoke", "rotate"])
def test_a_revoked_or_rotated_token_closes_its_open_agent_socket_for_good(world, sites, bob, change):
    site_a, token_a = sites["A"]

    async def scenario():
        socket = _agent_socket(token_a)
        assert (await socket.connect(timeout=TIMEOUT))[0]
        await _send_loss(socket, world["task_a"], 1)
        assert (await socket.receive_json_from(timeout=TIMEOUT))["type"] == "ack"
        await database_sync_to_async(_change_token)(change, site_a, bob)
        assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
        again = _agent_socket(token_a)
        assert await again.connect(timeout=TIMEOUT) == (False, 4401)

    async_to_sync(scenario)()
    assert list(MetricPoint.objects.values_list("step", flat=True)) == [1]


@pytest.mark.parametrize("change", ["revoke", "rotate"])
def test_an_open_socket_checks_its_token_before_it_stores_anything(world, sites, bob, change, monkeypatch):
    """Even when the message to close never reaches it (a lost channel-layer message), the socket of
    a revoked or rotated token stores nothing: it checks its token first, and closes."""
    monkeypatch.setattr(services.events, "close_agent_sockets_on_commit", lambda site_id: None)
    site_a, token_a = sites["A"]

    async def scenario():
        socket = _agent_socket(token_a)
        assert (await socket.connect(timeout=TIMEOUT))[0]
        await database_sync_to_async(_change_token)(change, site_a, bob)
        await _send_loss(socket, world["task_a"], 1)
        assert await socket.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}

    async_to_sync(scenario)()
    assert not MetricPoint.objects.exists()
