"""Failed sign-ins and failed bearer tokens are limited per client address (and sign-ins per
username), counted in the real Redis; successes are never counted, and a valid token is never
refused for what other clients at its address sent.

Each test sets small limits. Clients name their address with REMOTE_ADDR, as daphne does.
"""

from __future__ import annotations

import time

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import caches
from django.test import Client

from coordinator import ratelimit
from coordinator.asgi import application

ALICE = {"username": "alice", "password": "alice-password-123"}


def sign_in(address: str, username: str = "alice", password: str = "wrong-password"):
    return Client(REMOTE_ADDR=address).post("/login/", {"username": username, "password": password})


def signed_in(response) -> bool:
    return response.status_code == 302 and response.url == "/"


@pytest.fixture
def limits(settings):
    settings.SIGN_IN_FAILURES_PER_USERNAME = 3
    settings.SIGN_IN_FAILURES_PER_IP = 5
    settings.TOKEN_FAILURES_PER_IP = 3
    return settings


# --- Sign-in ------------------------------------------------------------------------------------


def test_a_username_with_too_many_failed_sign_ins_is_refused_from_any_address(limits, alice, bob):
    for _ in range(3):
        assert sign_in("10.0.0.1").status_code == 200  # the form again, with its error
    refused = sign_in("10.0.0.2", **ALICE)
    assert refused.status_code == 429
    assert 0 < int(refused["Retry-After"]) <= 300
    assert f"too many failed sign-ins, try again in {refused['Retry-After']} s" in refused.content.decode()
    assert signed_in(sign_in("10.0.0.1", "bob", "bob-password-123"))


def test_an_address_with_too_many_failed_sign_ins_is_refused_for_every_username(limits, alice):
    for username in ("u1", "u2", "u3", "u4", "u5"):
        assert sign_in("10.0.0.1", username).status_code == 200
    assert sign_in("10.0.0.1", **ALICE).status_code == 429
    assert signed_in(sign_in("10.0.0.2", **ALICE))


def test_a_refused_sign_in_does_not_check_the_password(limits, alice):
    checked = []

    def record(**kwargs):
        checked.append(kwargs)

    user_login_failed.connect(record)
    user_logged_in.connect(record)
    try:
        for _ in range(3):
            sign_in("10.0.0.1")
        assert len(checked) == 3
        assert sign_in("10.0.0.1").status_code == 429
        assert sign_in("10.0.0.1", **ALICE).status_code == 429
        assert len(checked) == 3
    finally:
        user_login_failed.disconnect(record)
        user_logged_in.disconnect(record)


def test_successful_sign_ins_are_never_counted(limits, alice):
    for _ in range(5):
        assert signed_in(sign_in("10.0.0.1", **ALICE))
    for _ in range(2):
        sign_in("10.0.0.1")
    assert signed_in(sign_in("10.0.0.1", **ALICE))


def test_sign_in_works_again_once_the_window_ends(limits, alice):
    limits.SIGN_IN_FAILURE_WINDOW_SECONDS = 1
    for _ in range(3):
        sign_in("10.0.0.1")
    refused = sign_in("10.0.0.1", **ALICE)
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    time.sleep(1.05)
    assert signed_in(sign_in("10.0.0.1", **ALICE))


# --- Bearer tokens ------------------------------------------------------------------------------


def agent_task(address: str, token: str):
    return Client(REMOTE_ADDR=address, HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/agent/task/")


def test_an_address_with_too_many_failed_tokens_gets_429_for_unknown_tokens_only(
    limits, sites, client_for, alice
):
    """Junk tokens from a shared address (a hospital's NAT, a proxy) lock nobody out: the valid
    site and personal tokens there still work; only more junk is refused."""
    token = sites["A"][1]
    personal = client_for(alice).post("/api/tokens/", {"name": "script"}, format="json").json()["token"]
    for bad in ("site_not-a-token", "user_not-a-token", "neither"):
        assert agent_task("10.0.0.1", bad).status_code == 401
    for bad in ("site_not-a-token", "user_another"):
        refused = agent_task("10.0.0.1", bad)
        assert refused.status_code == 429
        wait = refused["Retry-After"]
        assert refused.json() == {"error": f"too many failed token authentications, try again in {wait} s"}
    assert agent_task("10.0.0.1", token).status_code == 204
    assert client_for(token=personal).get("/api/federations/", REMOTE_ADDR="10.0.0.1").status_code == 200
    assert agent_task("10.0.0.2", "site_not-a-token").status_code == 401


def test_successful_tokens_are_never_counted(limits, sites):
    token = sites["A"][1]
    for _ in range(5):
        assert agent_task("10.0.0.1", token).status_code == 204
    for _ in range(2):
        agent_task("10.0.0.1", "site_not-a-token")
    assert agent_task("10.0.0.1", token).status_code == 204


def test_with_redis_unreachable_the_limits_lapse_and_agents_still_get_through(limits, sites, caplog):
    """Redis down must not take the API down with it: agents finish their rounds over HTTP."""
    from coordinator.processes import free_port

    dead = {**limits.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    limits.CACHES = {"default": dead}
    for _ in range(5):
        assert agent_task("10.0.0.1", "site_not-a-token").status_code == 401
    assert agent_task("10.0.0.1", sites["A"][1]).status_code == 204
    assert "rate limits are not enforced while Redis is unreachable" in caplog.text


def test_the_limit_ends_with_its_window(limits, sites):
    limits.TOKEN_FAILURE_WINDOW_SECONDS = 1
    for _ in range(3):
        agent_task("10.0.0.1", "site_not-a-token")
    refused = agent_task("10.0.0.1", "site_not-a-token")
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    time.sleep(1.05)
    assert agent_task("10.0.0.1", "site_not-a-token").status_code == 401


def _agent_socket_from(address: str, token: str):
    """The agent socket through the real ASGI application, from ``address`` as daphne reports it."""
    from channels.testing import WebsocketCommunicator

    async def from_address(scope, receive, send):
        return await application({**scope, "client": [address, 50000]}, receive, send)

    return WebsocketCommunicator(
        from_address, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )


def _connect(address: str, token: str):
    async def attempt():
        socket = _agent_socket_from(address, token)
        ok, code = await socket.connect(timeout=10)
        if ok:
            await socket.disconnect()
        return ok, code

    return async_to_sync(attempt)()


@pytest.mark.django_db(transaction=True)
def test_the_agent_socket_shares_the_token_limit_and_never_refuses_a_valid_token(limits, sites):
    token = sites["A"][1]
    assert _connect("10.0.0.1", "site_not-a-token") == (False, 4401)
    assert agent_task("10.0.0.1", "site_not-a-token").status_code == 401
    assert _connect("10.0.0.1", "site_not-a-token") == (False, 4401)
    assert _connect("10.0.0.1", "site_not-a-token") == (False, 4429)
    assert agent_task("10.0.0.1", "site_not-a-token").status_code == 429
    assert _connect("10.0.0.1", token) == (True, None)
    assert agent_task("10.0.0.1", token).status_code == 204


# --- Where the counts live ----------------------------------------------------------------------


def test_the_counts_live_in_redis_where_every_process_sees_them(limits, db):
    import redis

    assert settings.CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert settings.CACHES["default"]["LOCATION"] == settings.REDIS_URL
    limit = ratelimit.token_limits("10.0.0.1")
    for _ in range(3):
        agent_task("10.0.0.1", "site_not-a-token")
    # Another client of the shared cache (as in another web process) finds the limit used up...
    other_process = caches.create_connection("default")
    assert "10.0.0.1" not in limit[0].key
    end = other_process.get(limit[0].key)
    assert other_process.get(f"{limit[0].key}:{end}") == 3
    with pytest.raises(ratelimit.RateLimited):
        ratelimit.check(limit)
    # ...because the keys are in Redis itself, as JSON.
    server = redis.Redis.from_url(settings.REDIS_URL)
    keys = server.keys(other_process.make_key(limit[0].key) + "*")
    assert len(keys) == 2
    assert sorted(int(float(server.get(key))) for key in keys) == [3, int(end)]
