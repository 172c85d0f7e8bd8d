"""Request bodies over their limit are refused while they arrive, before they are read in full.

Through the real server process (coordinator.serve, daphne as in production) with raw sockets,
so the client controls exactly what it has sent when the answer comes; and the ASGI guard in
coordinator.asgi on its own, fed one body message at a time.
"""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator

from coordinator import services
from coordinator.asgi import application
from coordinator.models import MetricPoint, Task, Update

from .conftest import SVT_PARAMS
from .factories import svt_update
from .servers import AsgiServer

UPDATE_LIMIT = 48_000  # a tiny model's SVT update is about 33 kB
REQUEST_LIMIT = 4096
PROMPT = 3.0  # seconds: an answer that waited for a body never sent would not come at all


pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def storage_dir(tmp_path):
    return tmp_path / "server-storage"


@pytest.fixture
def server(tmp_path, storage_dir):
    server = AsgiServer(
        tmp_path / "daphne.log",
        storage_dir,
        MAX_UPDATE_BYTES=str(UPDATE_LIMIT),
        MAX_REQUEST_BYTES=str(REQUEST_LIMIT),
    )
    yield server
    server.stop()


@pytest.fixture
def task(federation, sites, alice) -> Task:
    round_ = services.round_launch(federation=federation, launched_by=alice)
    return Task.objects.get(round=round_, site=sites["A"][0])


def _head(server, token: str, method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Authorization: Bearer {token}"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one response on ``sock``, read until the server closes it."""
    sock.settimeout(PROMPT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _nothing_stored(storage_dir) -> None:
    assert not Update.objects.exists()
    assert not (storage_dir / "updates").exists()


@pytest.mark.parametrize("expect_continue", [False, True])
def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    server, storage_dir, task, sites, expect_continue
):
    extra = ["Expect: 100-continue"] if expect_continue else []
    path = f"/api/agent/tasks/{task.pk}/update/"
    head = _head(server, sites["A"][1], "PUT", path, "Content-Length: 1000000000", *extra)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sock.sendall(head + b"abc")  # 3 of the 10^9 bytes announced
        status, body = _response(sock)
    assert status == 413 and time.monotonic() - started < PROMPT
    assert body == {"error": f"request body too large: the limit is {UPDATE_LIMIT} bytes for this endpoint"}
    _nothing_stored(storage_dir)


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(server, storage_dir, task, sites):
    path = f"/api/agent/tasks/{task.pk}/update/"
    head = _head(server, sites["A"][1], "PUT", path, "Transfer-Encoding: chunked")
    chunk = b"\x00" * 1000
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        while sent < 10 * UPDATE_LIMIT and not select.select([sock], [], [], 0.02)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, body = _response(sock)
    assert status == 413 and f"the limit is {UPDATE_LIMIT} bytes" in body["error"]
    # Answered on the chunk that crossed the limit (one more may have been on its way), and the
    # client never got to send the rest.
    assert UPDATE_LIMIT < sent <= UPDATE_LIMIT + 2 * len(chunk), sent
    _nothing_stored(storage_dir)


def test_other_requests_have_the_smaller_limit(server, task, sites):
    points = [{"name": "train_loss", "step": step, "value": 0.5} for step in range(200)]
    body = json.dumps({"points": points}).encode()
    assert len(body) > REQUEST_LIMIT
    response = httpx.post(
        f"{server.url}/api/agent/tasks/{task.pk}/metrics/",
        content=body,
        headers={"Authorization": f"Bearer {sites['A'][1]}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert (
        response.json()["error"]
        == f"request body too large: the limit is {REQUEST_LIMIT} bytes for this endpoint"
    )
    assert not MetricPoint.objects.exists()


def test_an_update_under_its_limit_is_still_taken_after_refusals(server, storage_dir, task, sites):
    data = svt_update(task.round.base_version.n_parameters, SVT_PARAMS)
    assert REQUEST_LIMIT < len(data) < UPDATE_LIMIT
    url = f"{server.url}/api/agent/tasks/{task.pk}/update/"
    headers = {"Authorization": f"Bearer {sites['A'][1]}", "Content-Type": "application/octet-stream"}
    too_big = httpx.put(url, content=data + b"\x00" * UPDATE_LIMIT, headers=headers)
    assert too_big.status_code == 413
    _nothing_stored(storage_dir)
    response = httpx.put(url, content=data, headers=headers)
    assert response.status_code == 200, response.text
    update = Update.objects.get(task=task)
    assert update.status == "accepted" and (storage_dir / update.path).exists()


# --- the ASGI guard, on its own ----------------------------------------------------------------


def _scope(path: str, *headers: tuple[bytes, bytes]) -> dict:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",  # a body on a GET: /healthz takes any, with no CSRF check in the way
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


async def _send_body(app: ApplicationCommunicator, size: int, *, more: bool) -> None:
    await app.send_input({"type": "http.request", "body": b"x" * size, "more_body": more})


def test_the_asgi_guard_refuses_a_declared_length_without_reading_the_body(settings):
    settings.MAX_REQUEST_BYTES = 100

    async def scenario():
        app = ApplicationCommunicator(application, _scope("/healthz", (b"content-length", b"101")))
        # No body message is ever sent: the answer cannot have waited for one.
        start = await app.receive_output(timeout=PROMPT)
        body = await app.receive_output(timeout=PROMPT)
        assert start["status"] == 413
        assert json.loads(body["body"])["error"].endswith("the limit is 100 bytes for this endpoint")
        await app.wait(timeout=PROMPT)

    async_to_sync(scenario)()


def test_the_asgi_guard_stops_a_streamed_body_at_the_limit(settings):
    settings.MAX_REQUEST_BYTES = 100

    async def scenario():
        app = ApplicationCommunicator(application, _scope("/healthz"))
        for _ in range(2):
            await _send_body(app, 40, more=True)
            assert await app.receive_nothing(timeout=0.1)
        await _send_body(app, 40, more=True)  # 120 bytes: past the limit, and more to come
        start = await app.receive_output(timeout=PROMPT)
        assert start["status"] == 413
        # Done, though the client said more was coming: the rest is never read.
        await app.receive_output(timeout=PROMPT)
        await app.wait(timeout=PROMPT)

    async_to_sync(scenario)()


def test_the_asgi_guard_lets_a_body_under_the_limit_through(settings):
    settings.MAX_REQUEST_BYTES = 100

    async def scenario():
        app = ApplicationCommunicator(application, _scope("/healthz"))
        await _send_body(app, 60, more=True)
        await _send_body(app, 40, more=False)  # 100 bytes: exactly the limit
        start = await app.receive_output(timeout=PROMPT)
        assert start["status"] == 200
        assert (await app.receive_output(timeout=PROMPT))["body"] == b"ok"

    async_to_sync(scenario)()
