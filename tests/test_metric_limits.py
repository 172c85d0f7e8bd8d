"""Metric floods and bad frames on the agent's channels: over the rate a message is refused by
name and not stored while the socket stays open; frames that are no JSON object get an answer,
not a closed socket. Through the real ASGI application and the Redis channel layer, and HTTP
against the real database; the real agent client stays under the default limit."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from coordinator import services
from coordinator.asgi import application
from coordinator.models import MetricPoint, Task
from coordinator.throttle import TokenBucket
from sitesagent import protocol
from sitesagent.client import Client, LiveChannel

from .servers import AsgiServer

TIMEOUT = 10


def _point(step: int = 1) -> dict:
    return {"name": "train_loss", "step": step, "value": 0.5}


def test_a_token_bucket_allows_a_burst_then_the_rate():
    now = [100.0]
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.25  # 2.5 tokens back
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 60  # never more than the burst, however long it rested
    assert sum(bucket.take() for _ in range(10)) == 3


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0)])
def test_a_token_bucket_refuses_a_limit_that_allows_nothing(rate, burst):
    with pytest.raises(ValueError, match="rate above 0 and a burst of 1 or more"):
        TokenBucket(rate=rate, burst=burst)


# --- the agent socket ---------------------------------------------------------------------------


def agent_socket(token: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )


@database_sync_to_async
def _launch_and_task(federation, alice, site) -> Task:
    round_ = services.round_launch(federation=federation, launched_by=alice)
    return Task.objects.select_related("round", "site").get(round=round_, site=site)


@database_sync_to_async
def _stored() -> int:
    return MetricPoint.objects.count()


@pytest.mark.django_db(transaction=True)
def test_a_metrics_flood_is_cut_to_the_rate_and_the_socket_recovers(federation, sites, alice):
    rate, burst, sent = settings.METRICS_MESSAGES_PER_SECOND, settings.METRICS_BURST, 1000
    assert (rate, burst) == (50, 200)  # the defaults are what this test measures

    async def scenario():
        task = await _launch_and_task(federation, alice, sites["A"][0])
        socket = agent_socket(sites["A"][1])
        assert (await socket.connect(timeout=TIMEOUT))[0]
        started = time.monotonic()
        for seq in range(sent):
            await socket.send_json_to(
                {"type": "metrics", "task": task.pk, "points": [_point(seq)], "seq": seq}
            )
        answers = [await socket.receive_json_from(timeout=TIMEOUT) for _ in range(sent)]
        elapsed = time.monotonic() - started
        acks = [a for a in answers if a["type"] == "ack"]
        refusals = [a for a in answers if a["type"] == "error"]
        assert len(acks) + len(refusals) == sent
        assert all(
            a["error"].startswith(f"rate limit: at most {rate} metrics messages a second") for a in refusals
        )
        assert {a["seq"] for a in answers} == set(range(sent))
        stored = await _stored()
        assert stored == len(acks)
        assert burst <= stored <= burst + rate * elapsed + 1, (stored, elapsed)
        assert len(refusals) >= sent - (burst + rate * elapsed + 1)
        # Still open: after a pause the same socket is heard again.
        await asyncio.sleep(0.2)
        await socket.send_json_to({"type": "metrics", "task": task.pk, "points": [_point()], "seq": "after"})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "stored": 1, "seq": "after"}
        await socket.disconnect()

    async_to_sync(scenario)()


TOO_MANY = [_point(step) for step in range(protocol.METRIC_POINTS_PER_MESSAGE + 1)]
BAD_FRAMES = {
    "malformed JSON": ({"text_data": '{"type": "metrics", '}, "the message is not JSON"),
    "deeply nested JSON": ({"text_data": "[" * 100_000 + "]" * 100_000}, "the message is not JSON"),
    "a JSON list": ({"text_data": "[1, 2]"}, "a message must be a JSON object, not list"),
    "a JSON number": ({"text_data": "42"}, "a message must be a JSON object, not int"),
    "a binary frame": ({"bytes_data": b"\x00\x01metrics"}, "binary frames are not understood"),
    "an unknown type": ({"json": {"type": "shout"}}, "unknown message type 'shout'"),
    "points not a list": ({"json": {"points": "loss=1"}}, "points must be a list of metric points, not str"),
    "a point not an object": ({"json": {"points": [3]}}, "a metric point must be an object"),
    "a NaN value": ({"json": {"points": [{"name": "x", "value": "NaN"}]}}, "metric x needs a finite value"),
    "too many points": (
        {"json": {"points": TOO_MANY}},
        f"too many metric points in one message: {len(TOO_MANY)}, the limit is {len(TOO_MANY) - 1}",
    ),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_a_bad_frame_gets_an_error_and_the_socket_stays_open(federation, sites, alice, case):
    frame, words = BAD_FRAMES[case]

    async def scenario():
        task = await _launch_and_task(federation, alice, sites["A"][0])
        socket = agent_socket(sites["A"][1])
        assert (await socket.connect(timeout=TIMEOUT))[0]
        if "json" in frame:
            await socket.send_json_to({"type": "metrics", "task": task.pk, "seq": 1, **frame["json"]})
        else:
            await socket.send_to(**frame)
        answer = await socket.receive_json_from(timeout=TIMEOUT)
        assert answer["type"] == "error" and words in answer["error"], answer
        assert await _stored() == 0
        await socket.send_json_to({"type": "metrics", "task": task.pk, "points": [_point()], "seq": 2})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "ack", "stored": 1, "seq": 2}
        await socket.disconnect()

    async_to_sync(scenario)()


# --- the HTTP endpoint --------------------------------------------------------------------------


def _post(client_for, token: str, task: Task, points: list[dict]):
    return client_for(token=token).post(
        f"/api/agent/tasks/{task.pk}/metrics/", {"points": points}, format="json"
    )


def test_a_site_over_the_http_metrics_rate_gets_429_and_nothing_is_stored(
    client_for, settings, federation, sites, alice
):
    settings.METRICS_MESSAGES_PER_SECOND, settings.METRICS_BURST = 1, 5  # a window of 5 seconds
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task_a, task_b = (Task.objects.get(round=round_, site=sites[label][0]) for label in "AB")
    for step in range(5):
        assert _post(client_for, sites["A"][1], task_a, [_point(step)]).status_code == 200
    refused = _post(client_for, sites["A"][1], task_a, [_point(99)])
    assert refused.status_code == 429
    assert refused.json()["error"].startswith("rate limit: at most 1 metrics requests a second")
    assert "bursts of at most 5" in refused.json()["error"]
    assert sorted(MetricPoint.objects.values_list("step", flat=True)) == [0, 1, 2, 3, 4]
    # Counted per site: the other site is not held back by the first one's flood.
    assert _post(client_for, sites["B"][1], task_b, [_point()]).status_code == 200


def test_too_many_points_in_one_http_request_are_refused_by_name(client_for, federation, sites, alice):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = Task.objects.get(round=round_, site=sites["A"][0])
    response = _post(client_for, sites["A"][1], task, TOO_MANY)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("points:") and f"no more than {len(TOO_MANY) - 1} elements" in error
    assert not MetricPoint.objects.exists()
    full = TOO_MANY[:-1]
    assert _post(client_for, sites["A"][1], task, full).json() == {"stored": len(full)}


# --- the real agent client ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_the_agents_live_channel_keeps_every_point_of_fast_training_under_the_default_limit(
    tmp_path, caplog, federation, sites, alice
):
    server = AsgiServer(tmp_path / "daphne.log", settings.STORAGE_DIR)
    try:
        round_ = services.round_launch(federation=federation, launched_by=alice)
        task = Task.objects.get(round=round_, site=sites["A"][0])
        channel = LiveChannel(Client(server.url, sites["A"][1])).start()
        assert channel.connected.wait(TIMEOUT)
        iterations = 3000  # two points each, as fast as the hooks can call: faster than any training
        for iteration in range(iterations):
            channel.send(task.pk, protocol.METRIC_TRAIN_LOSS, iteration, 1.0 / (iteration + 1))
            channel.send(task.pk, protocol.METRIC_THROUGHPUT, iteration, 4.0)
        channel.stop()
        deadline = time.monotonic() + TIMEOUT
        while MetricPoint.objects.count() < 2 * iterations and time.monotonic() < deadline:
            time.sleep(0.1)
        assert channel.sent_over_http == 0
        losses = MetricPoint.objects.filter(name=protocol.METRIC_TRAIN_LOSS).values_list("step", flat=True)
        assert sorted(losses) == list(range(iterations))
        assert MetricPoint.objects.count() == 2 * iterations
        assert "refused live metrics" not in caplog.text
    finally:
        server.stop()


def test_a_non_finite_value_is_not_sent_so_its_batch_is_not_refused(caplog):
    """One diverged step (NaN loss) must not cost the batch's other points."""
    channel = LiveChannel(Client("http://127.0.0.1:9", "site_unused"))
    for value in (float("nan"), float("inf"), 0.25):
        channel.send(7, protocol.METRIC_TRAIN_LOSS, 3, value)
    assert channel.outbox.qsize() == 1
    assert channel.outbox.get()[1]["value"] == 0.25
    assert "train_loss is nan at step 3; not sent" in caplog.text
