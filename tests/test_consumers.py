"""Websockets through the real ASGI application (coordinator.asgi) and the real Redis channel layer.

Browser sockets authenticate with the session cookie and have their Origin checked; agent
sockets authenticate with the site token. Events are sent by the services themselves, on commit,
so these tests need committed transactions (transaction=True).
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from coordinator import services
from coordinator.asgi import application
from coordinator.models import MetricPoint, Task, TaskState

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 10


def test_the_channel_layer_is_redis():
    from channels_redis.core import RedisChannelLayer

    assert isinstance(get_channel_layer(), RedisChannelLayer)


def _session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def browser_socket(path: str, session: str | None = None, *, origin: str | None = "http://localhost"):
    """A browser's socket: ``session`` is the session cookie of the signed-in user (None: signed out)."""
    headers = []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if session is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


def agent_socket(token: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )


@database_sync_to_async
def launch(federation, alice):
    return services.round_launch(federation=federation, launched_by=alice)


@database_sync_to_async
def task_of(round_, site) -> Task:
    return Task.objects.select_related("round", "site").get(round=round_, site=site)


@database_sync_to_async
def loss(task: Task, value: float, step: int = 1) -> None:
    services.metrics_record(task=task, points=[{"name": "train_loss", "step": step, "value": value}])


async def connected(socket: WebsocketCommunicator) -> WebsocketCommunicator:
    ok, code = await socket.connect(timeout=TIMEOUT)
    assert ok, f"refused with {code}"
    return socket


def test_federation_socket_receives_round_and_task_events(federation, sites, alice):
    session = _session_cookie(alice)

    async def scenario():
        socket = await connected(browser_socket(f"/ws/federations/{federation.pk}/", session))
        round_ = await launch(federation, alice)
        event = await socket.receive_json_from(timeout=TIMEOUT)
        assert event == {
            "type": "round.state",
            "round": round_.pk,
            "number": 1,
            "state": "reserved",
            "reason": "",
        }
        task = await task_of(round_, sites["A"][0])
        await database_sync_to_async(services.task_report)(task=task, state=TaskState.TRAINING, progress=0.25)
        events = [await socket.receive_json_from(timeout=TIMEOUT) for _ in range(2)]
        task_event = next(e for e in events if e["type"] == "task.state")
        assert (task_event["site_name"], task_event["state"], task_event["progress"]) == (
            "Hospital A",
            "training",
            0.25,
        )
        assert {"type": "round.state", "state": "training"}.items() <= next(
            e for e in events if e["type"] == "round.state"
        ).items()
        await socket.disconnect()

    async_to_sync(scenario)()


def test_round_socket_receives_live_metrics(federation, sites, alice):
    session = _session_cookie(alice)

    async def scenario():
        round_ = await launch(federation, alice)
        socket = await connected(browser_socket(f"/ws/rounds/{round_.pk}/", session))
        await loss(await task_of(round_, sites["B"][0]), 0.42, step=3)
        event = await socket.receive_json_from(timeout=TIMEOUT)
        assert event == {
            "type": "metrics",
            "round": round_.pk,
            "site": sites["B"][0].pk,
            "site_name": "Hospital B",
            "points": [{"name": "train_loss", "step": 3, "value": 0.42}],
        }
        await socket.disconnect()

    async_to_sync(scenario)()


def test_a_site_admins_sockets_never_carry_another_sites_events(federation, sites, alice, bob, dave):
    bob_session, dave_session = _session_cookie(bob), _session_cookie(dave)

    async def scenario():
        round_ = await launch(federation, alice)
        task_a, task_b = await task_of(round_, sites["A"][0]), await task_of(round_, sites["B"][0])
        bob_round = await connected(browser_socket(f"/ws/rounds/{round_.pk}/", bob_session))
        bob_federation = await connected(browser_socket(f"/ws/federations/{federation.pk}/", bob_session))
        dave_round = await connected(browser_socket(f"/ws/rounds/{round_.pk}/", dave_session))
        # B's event goes out first: if bob's sockets carried it, it would arrive before A's.
        await loss(task_b, 0.9)
        await database_sync_to_async(services.task_report)(
            task=task_b, state=TaskState.DROPPED, reason="B's secret"
        )
        await loss(task_a, 0.1)
        for socket in (bob_round, bob_federation):
            event = await socket.receive_json_from(timeout=TIMEOUT)
            assert event["type"] == "metrics" and event["site"] == sites["A"][0].pk
            assert await socket.receive_nothing(timeout=0.5)
        seen_by_dave = [await dave_round.receive_json_from(timeout=TIMEOUT) for _ in range(2)]
        assert {e["site"] for e in seen_by_dave} == {sites["B"][0].pk}
        assert await dave_round.receive_nothing(timeout=0.5)
        for socket in (bob_round, bob_federation, dave_round):
            await socket.disconnect()

    async_to_sync(scenario)()


def test_a_site_admins_round_socket_skips_their_sites_other_rounds(federation, sites, alice, bob):
    session = _session_cookie(bob)

    async def scenario():
        first = await launch(federation, alice)
        second = await launch(federation, alice)
        socket = await connected(browser_socket(f"/ws/rounds/{second.pk}/", session))
        await loss(await task_of(first, sites["A"][0]), 0.5)
        await loss(await task_of(second, sites["A"][0]), 0.25)
        event = await socket.receive_json_from(timeout=TIMEOUT)
        assert event["round"] == second.pk and event["points"][0]["value"] == 0.25
        assert await socket.receive_nothing(timeout=0.5)
        await socket.disconnect()

    async_to_sync(scenario)()


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost.evil.example", None])
def test_a_browser_socket_from_another_origin_is_refused(federation, alice, origin):
    session = _session_cookie(alice)
    path = f"/ws/federations/{federation.pk}/"

    async def scenario():
        same_origin = await connected(browser_socket(path, session))  # the control: this one works
        await same_origin.disconnect()
        ok, _ = await browser_socket(path, session, origin=origin).connect(timeout=TIMEOUT)
        assert not ok

    async_to_sync(scenario)()


def test_anonymous_and_roleless_sockets_are_refused(federation, sites, alice, eve):
    eve_session = _session_cookie(eve)

    async def scenario():
        round_ = await launch(federation, alice)
        for user in (None, eve_session):
            for path in (
                f"/ws/federations/{federation.pk}/",
                f"/ws/rounds/{round_.pk}/",
                "/ws/federations/999999/",
            ):
                ok, code = await browser_socket(path, user).connect(timeout=TIMEOUT)
                assert (ok, code) == (False, 4403), (user, path)

    async_to_sync(scenario)()


def test_one_web_process_takes_a_burst_of_events_for_hundreds_of_sockets():
    """All sockets of one process share one Redis queue; a launch to N agents puts N events in
    it at once. channels_redis drops what arrives past its capacity without a word (a benchmark
    with 100 agents lost a push), so the capacity must hold such a burst."""
    layer = get_channel_layer()
    sockets = 300

    async def scenario() -> list[int]:
        channels = [await layer.new_channel() for _ in range(sockets)]
        for index, channel in enumerate(channels):
            await layer.group_add(f"burst-{index}", channel)
        for index in range(sockets):  # nobody reads meanwhile, as when the process is busy
            await layer.group_send(f"burst-{index}", {"type": "event.forward", "event": {"n": index}})
        receiving = [asyncio.ensure_future(layer.receive(channel)) for channel in channels]
        done, dropped = await asyncio.wait(receiving, timeout=10)
        for receive in dropped:
            receive.cancel()
        received = sorted(receive.result()["event"]["n"] for receive in done)
        for index, channel in enumerate(channels):
            await layer.group_discard(f"burst-{index}", channel)
        return received

    assert async_to_sync(scenario)() == list(range(sockets))


def test_an_agent_sends_metrics_over_its_socket_and_gets_an_ack(federation, sites, alice):
    session = _session_cookie(alice)

    async def scenario():
        round_ = await launch(federation, alice)
        task = await task_of(round_, sites["A"][0])
        watcher = await connected(browser_socket(f"/ws/rounds/{round_.pk}/", session))
        agent = await connected(agent_socket(sites["A"][1]))
        points = [
            {"name": "train_loss", "step": 1, "value": 0.8},
            {"name": "throughput", "step": 1, "value": 4.0},
        ]
        await agent.send_json_to({"type": "metrics", "task": task.pk, "points": points, "seq": 7})
        assert await agent.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "stored": 2, "seq": 7}
        forwarded = await watcher.receive_json_from(timeout=TIMEOUT)
        assert forwarded["type"] == "metrics" and forwarded["points"] == points
        count = await database_sync_to_async(MetricPoint.objects.filter(round=round_).count)()
        assert count == 2
        await agent.disconnect()
        await watcher.disconnect()

    async_to_sync(scenario)()


def test_a_batch_sent_again_overwrites_its_points_rather_than_duplicating_them(federation, sites, alice):
    """An agent whose socket dropped before the ack re-sends the batch over HTTP."""
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = Task.objects.get(round=round_, site=sites["A"][0])
    batch = [{"name": "train_loss", "step": s, "value": 1.0 / s} for s in (1, 2, 3)]
    services.metrics_record(task=task, points=batch)
    services.metrics_record(task=task, points=batch)
    services.metrics_record(task=task, points=[{"name": "train_loss", "step": 3, "value": 0.1}] * 2)
    stored = MetricPoint.objects.filter(round=round_, name="train_loss").order_by("step")
    assert [(p.step, p.value) for p in stored] == [(1, 1.0), (2, 0.5), (3, 0.1)]


def test_an_agent_cannot_send_metrics_for_another_sites_task(federation, sites, alice):
    async def scenario():
        round_ = await launch(federation, alice)
        task_b = await task_of(round_, sites["B"][0])
        agent = await connected(agent_socket(sites["A"][1]))
        await agent.send_json_to({"type": "metrics", "task": task_b.pk, "points": [], "seq": 1})
        answer = await agent.receive_json_from(timeout=TIMEOUT)
        # Another site's task is answered as a missing one is: its id tells nothing.
        assert answer == {"type": "error", "error": f"this site has no task {task_b.pk}", "seq": 1}
        await agent.disconnect()

    async_to_sync(scenario)()


@pytest.mark.parametrize("token", ["site_not-a-real-token", ""])
def test_an_agent_socket_with_a_bad_token_is_refused(sites, token):
    async def scenario():
        ok, code = await agent_socket(token).connect(timeout=TIMEOUT)
        assert (ok, code) == (False, 4401)

    async_to_sync(scenario)()


def test_a_revoked_sites_agent_socket_is_refused(sites, alice):
    site, token = sites["A"]
    services.site_token_revoke(site=site, revoked_by=alice, reason="stolen")

    async def scenario():
        ok, code = await agent_socket(token).connect(timeout=TIMEOUT)
        assert (ok, code) == (False, 4401)

    async_to_sync(scenario)()
