"""Who may open which websocket: a table of role x socket route x object, through the real ASGI
application and the Redis channel layer (as tests/test_access.py does for HTTP).

Roles: alice coordinates the study; bob and dave administer its sites A and B; charlie audits it;
eve is signed in with no role; "anonymous" is signed out; the tokens are site A's, the token of a
site in another federation (where none of the people has a role), and site B's revoked token.
Every connection comes from the page's own origin, so the cell tests the consumer's decision.
"""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from coordinator import services
from coordinator.asgi import application
from coordinator.models import Task

from .conftest import SVT_PARAMS, TINY_MODEL, make_user

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 10

ROLES = [
    "coordinator",
    "site admin",
    "site admin of another site",
    "auditor",
    "no role",
    "anonymous",
    "site token",
    "other federation's site token",
    "revoked site token",
]
PEOPLE = {"coordinator", "site admin", "site admin of another site", "auditor"}
TOKENS = {"site token", "other federation's site token", "revoked site token"}

# Each route with the object it opens: "accept", a refusal's close code, or for the metrics
# column the agent's answer to metrics for site A's task ("ack" or "error").
TABLE = {
    "federation socket": {**{role: "accept" for role in PEOPLE}, "else": 4403},
    "other federation's socket": {"else": 4403},
    "missing federation's socket": {"else": 4403},
    "round socket": {**{role: "accept" for role in PEOPLE}, "else": 4403},
    "other federation's round socket": {"else": 4403},
    "agent socket": {"site token": "accept", "other federation's site token": "accept", "else": 4401},
    "agent socket: metrics for A's task": {
        "site token": "ack",
        "other federation's site token": "error",
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
        default_mechanism_params=SVT_PARAMS,
        min_sites=1,
    )
    site_c, token_c = services.site_register(name="Hospital C", registered_by=frank)
    services.membership_add(federation=other, site=site_c, budget=2, added_by=frank, reason="joined")
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
    people |= {"auditor": charlie, "no role": eve}
    tokens = {"site token": sites["A"][1], "other federation's site token": token_c}
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


@pytest.mark.parametrize("role", ROLES)
def test_socket_access_table(world, role):
    headers = _headers(world, role)

    async def row():
        return {route: await _outcome(world, route, headers) for route in TABLE}

    expected = {route: cells.get(role, cells["else"]) for route, cells in TABLE.items()}
    assert async_to_sync(row)() == expected
