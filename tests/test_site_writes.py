"""A site writes only into open work, and only so much about itself: no metrics for a finished
round (its history stays as it was), none for a dropped task, and a bounded agent_info. Through
the real HTTP API and the agent's websocket (the real ASGI application)."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client

from coordinator import services
from coordinator.asgi import application
from coordinator.models import MetricPoint, Site, Task

from .test_dashboard import finish, record, upload

TIMEOUT = 10


def _post_metrics(client_for, token: str, task: Task, **values: float):
    points = [{"name": name, "step": task.round.number, "value": v} for name, v in values.items()]
    return client_for(token=token).post(
        f"/api/agent/tasks/{task.pk}/metrics/", {"points": points}, format="json"
    )


def _dice(task: Task) -> float:
    return MetricPoint.objects.get(round=task.round, site=task.site, name="dice_mean").value


@pytest.fixture
def round_(federation, sites, alice):
    return services.round_launch(federation=federation, launched_by=alice)


def _tasks(round_, sites):
    return [Task.objects.select_related("round", "site").get(round=round_, site=sites[k][0]) for k in "AB"]


def _finish(how: str, round_, sites, alice) -> None:
    task_a, task_b = _tasks(round_, sites)
    if how == "done":
        upload(task_a, n_cases=10)
        upload(task_b, n_cases=10)
        finish(round_)
    else:
        services.round_abort(round_=round_, aborted_by=alice, reason="wrong settings")


@pytest.mark.parametrize("how", ["done", "aborted"])
def test_a_finished_rounds_metrics_cannot_be_rewritten_over_http(client_for, round_, sites, alice, how):
    task_a, _ = _tasks(round_, sites)
    record(task_a, dice_mean=0.12)
    _finish(how, round_, sites, alice)
    response = _post_metrics(client_for, sites["A"][1], task_a, dice_mean=0.99, dice_et=0.99)
    assert response.status_code == 409
    assert response.json()["error"] == f"round 1 is {how}: it takes no more metrics"
    assert _dice(task_a) == 0.12
    assert not MetricPoint.objects.filter(name="dice_et").exists()


def test_a_done_rounds_dice_chart_stays_as_it_was(client_for, round_, sites, alice, federation):
    task_a, task_b = _tasks(round_, sites)
    record(task_a, dice_mean=0.12)
    record(task_b, dice_mean=0.12)
    _finish("done", round_, sites, alice)
    _post_metrics(client_for, sites["A"][1], task_a, dice_mean=0.99)
    browser = Client()
    browser.force_login(alice)
    figure = browser.get(f"/federations/{federation.pk}/").context["figures"]["dice"]
    (mean,) = [trace for trace in figure["data"] if trace["name"] == "Mean"]
    assert mean["y"] == [0.12]


@pytest.mark.django_db(transaction=True)
def test_a_finished_rounds_metrics_cannot_be_rewritten_over_the_socket(round_, sites, alice):
    task_a, _ = _tasks(round_, sites)
    record(task_a, dice_mean=0.12)
    _finish("done", round_, sites, alice)
    point = {"name": "dice_mean", "step": 1, "value": 0.99}

    async def send():
        socket = WebsocketCommunicator(
            application, "/ws/agent/", headers=[(b"authorization", f"Bearer {sites['A'][1]}".encode())]
        )
        assert (await socket.connect(timeout=TIMEOUT))[0]
        await socket.send_json_to({"type": "metrics", "task": task_a.pk, "points": [point], "seq": 7})
        reply = await socket.receive_json_from(timeout=TIMEOUT)
        await socket.disconnect()
        return reply

    reply = async_to_sync(send)()
    assert reply == {"type": "error", "error": "round 1 is done: it takes no more metrics", "seq": 7}
    assert _dice(task_a) == 0.12


def test_a_dropped_task_takes_no_metrics(client_for, round_, sites):
    task_a, _ = _tasks(round_, sites)
    services.task_report(task=task_a, state="dropped", reason="out of disk")
    response = _post_metrics(client_for, sites["A"][1], task_a, train_loss=0.5)
    assert response.status_code == 409
    assert response.json()["error"] == "this task was dropped: it takes no more metrics"
    assert not MetricPoint.objects.exists()


def test_an_uploaded_task_in_an_open_round_still_takes_its_last_metrics(client_for, round_, sites):
    """The agent's socket buffer may flush after the upload: those points are still the round's."""
    task_a, _ = _tasks(round_, sites)
    upload(task_a, n_cases=10)
    assert _post_metrics(client_for, sites["A"][1], task_a, train_loss=0.5).status_code == 200
    assert MetricPoint.objects.get(name="train_loss").value == 0.5


# --- What an agent says about itself ------------------------------------------------------------


def _heartbeat(client_for, token: str, info):
    return client_for(token=token).post("/api/agent/heartbeat/", {"info": info}, format="json")


def test_agent_info_is_bounded_in_keys_and_the_record_stays_unchanged(client_for, sites):
    site, token = sites["A"]
    assert _heartbeat(client_for, token, {f"key{i}": i for i in range(30)}).status_code == 200
    refused = _heartbeat(client_for, token, {"device": "cpu", "cases": 3, "more": 1})
    assert refused.status_code == 413
    assert refused.json()["error"] == "agent info may have at most 32 keys; with this heartbeat it has 33"
    site.refresh_from_db()
    assert site.agent_info == {f"key{i}": i for i in range(30)}
    assert _heartbeat(client_for, token, {"device": "cpu", "cases": 3}).status_code == 200


def test_agent_info_is_bounded_in_bytes_however_many_heartbeats_bring_it(client_for, sites):
    """Five heartbeats of a few kB each, under the key limit, cannot add up past 16 KiB."""
    site, token = sites["A"]
    answers = [_heartbeat(client_for, token, {f"blob{i}": "x" * 4000}).status_code for i in range(5)]
    assert answers == [200, 200, 200, 200, 413]
    site.refresh_from_db()
    assert sorted(site.agent_info) == ["blob0", "blob1", "blob2", "blob3"]
    refused = _heartbeat(client_for, token, {"blob9": "x" * 4000})
    assert "agent info may take at most 16384 bytes as JSON" in refused.json()["error"]
    assert len(Site.objects.get(pk=site.pk).agent_info) == 4


@pytest.mark.parametrize("info", [[1, 2], "text", 5])
def test_agent_info_that_is_no_object_is_refused(client_for, sites, info):
    response = _heartbeat(client_for, sites["A"][1], info)
    assert response.status_code == 400
    assert "info must be a JSON object" in response.json()["error"]
