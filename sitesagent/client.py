"""The coordinator's API as the agent uses it: HTTP with retries, and a live websocket.

No training code here, and no network calls in the training code: the agent loop joins the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import random
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from sitesagent import protocol

log = logging.getLogger("sitesagent")

RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class CoordinatorError(Exception):
    """The coordinator refused a request; the message is its own words."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


# A request that keeps failing waits at most this long between tries (Retry-After may ask for more,
# up to MAX_RETRY_AFTER): a hospital's agent outlasts any outage of the coordinator by waiting.
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 300.0
# Best-effort requests (progress reports from the training loop) give up after this many tries:
# training must not wait for them, and the next report says the same and more.
BEST_EFFORT_ATTEMPTS = 3


class Client:
    def __init__(self, server: str, token: str, *, attempts: int | None = None, timeout: float = 60.0):
        """``attempts``: how often a failing request is tried; None (the agent's way) for ever."""
        self.server = server.rstrip("/")
        self.token = token
        self.attempts = attempts
        self.http = httpx.Client(
            base_url=self.server, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, *, attempts: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request; network faults, 429 and 5xx answers are waited out with capped, jittered
        backoff (honouring Retry-After), for ever unless ``attempts`` (or the client's) says otherwise.
        Any other error status raises CoordinatorError at once."""
        limit = attempts or self.attempts
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                failure, wait = f"network: {error}", delay
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    if attempt > 1:
                        log.info("the coordinator answers again (%s %s)", method, path)
                    if response.status_code >= 400:
                        raise CoordinatorError(response.status_code, _error_text(response))
                    return response
                failure, wait = f"HTTP {response.status_code}", max(delay, _retry_after(response))
            if limit is not None and attempt >= limit:
                raise ConnectionError(f"{method} {path} failed {attempt} times, last: {failure}")
            if attempt == 1 or attempt % 10 == 0:
                log.warning(
                    "%s %s failed (%s); retrying in %.0f s (try %d), waiting for the coordinator",
                    method, path, failure, wait, attempt,
                )  # fmt: skip
            time.sleep(wait * (0.5 + random.random()) if wait == delay else wait)
            delay = min(delay * 2, MAX_BACKOFF)

    # --- the agent's endpoints -----------------------------------------------------------

    def next_task(self) -> dict[str, Any] | None:
        response = self.request("GET", "/api/agent/task/")
        return None if response.status_code == 204 else response.json()

    def weights(self, version_id: int, expected_sha256: str) -> bytes:
        data = self.request("GET", f"/api/versions/{version_id}/weights/").content
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise ConnectionError(f"model version {version_id} arrived corrupted (its hash does not match)")
        return data

    def report(
        self,
        task_id: int,
        state: str,
        *,
        progress: float | None = None,
        reason: str = "",
        attempts: int | None = None,
    ) -> None:
        body: dict[str, Any] = {"state": state, "reason": reason}
        if progress is not None:
            body["progress"] = progress
        self.request("POST", f"/api/agent/tasks/{task_id}/status/", json=body, attempts=attempts)

    def post_metrics(self, task_id: int, points: list[dict[str, Any]]) -> None:
        """Sent from the live channel's own thread, which waits out an outage; training does not."""
        self.request("POST", f"/api/agent/tasks/{task_id}/metrics/", json={"points": points})

    def upload(self, task_id: int, data: bytes) -> dict[str, Any]:
        response = self.request(
            "PUT",
            f"/api/agent/tasks/{task_id}/update/",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return response.json()

    def heartbeat(self, info: dict[str, Any]) -> None:
        self.request("POST", "/api/agent/heartbeat/", json={"info": info})

    def websocket_url(self) -> str:
        parts = urlsplit(self.server)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/agent/", "", ""))


def _retry_after(response: httpx.Response) -> float:
    """The seconds a 429 or 503 asks the client to wait (Retry-After in seconds), capped; else 0."""
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(response.headers.get("Retry-After", 0))))
    except ValueError:
        return 0.0  # an HTTP date, which the coordinator never sends: the backoff decides


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:500]


class LiveChannel:
    """Metrics out and task notifications in, over the agent's websocket, on a background thread.

    ``send`` never blocks the training loop: points are queued and sent in batches, one message
    per task every ``batch_seconds`` (well under the coordinator's default rate limit of 50
    messages a second), and never more than ``protocol.METRIC_POINTS_PER_MESSAGE`` points in one.
    Each message waits for the coordinator's ack. When the websocket goes down, or the
    coordinator refuses a message (its rate limit, say), the unacknowledged batches go over HTTP
    instead, and so does everything after them until the socket is back, so no point is lost.
    A batch stored just before its ack was lost arrives twice; the coordinator keeps one point
    per (task, name, step), so that is harmless.
    """

    def __init__(self, client: Client, *, batch_seconds: float = 0.2):
        self.client = client
        self.batch_seconds = batch_seconds
        self.outbox: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue()
        self.task_waiting = threading.Event()
        self.connected = threading.Event()
        self.sent_over_websocket = 0
        self.sent_over_http = 0
        # Sent over the websocket and not yet acknowledged: {sequence number: (task, points)}.
        self._unacked: dict[int, tuple[int, list[dict[str, Any]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-channel", daemon=True)

    def start(self) -> LiveChannel:
        self._thread.start()
        return self

    def send(self, task_id: int, name: str, step: int, value: float) -> None:
        if not math.isfinite(value):
            # The coordinator stores finite values only, and would refuse the whole batch.
            log.warning("task %s: %s is %s at step %s; not sent", task_id, name, value, step)
            return
        self.outbox.put((task_id, {"name": name, "step": step, "value": value}))

    def flush(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(self.batch_seconds)

    def stop(self) -> None:
        self.flush()
        self._stop.set()
        self.outbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_websocket()
            except Exception as error:  # noqa: BLE001 - any websocket failure falls back to HTTP
                self.connected.clear()
                log.info("live channel down (%s); sending metrics over HTTP", error)
                self._resend_unacked_over_http()
                self._drain_over_http(seconds=3.0)
        self._resend_unacked_over_http()

    def _run_websocket(self) -> None:
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self.client.token}"}
        with connect(self.client.websocket_url(), additional_headers=headers, open_timeout=10) as socket:
            self.connected.set()
            sequence = 0
            while not self._stop.is_set():
                self._read_replies(socket)
                for task_id, points in self._take_batches().items():
                    sequence += 1
                    self._unacked[sequence] = (task_id, points)
                    socket.send(
                        json.dumps({"type": "metrics", "task": task_id, "points": points, "seq": sequence})
                    )
                    self.sent_over_websocket += len(points)
            self._await_acks(socket, timeout=5.0)

    def _read_replies(self, socket, timeout: float = 0) -> None:
        while True:
            try:
                message = json.loads(socket.recv(timeout=timeout))
            except TimeoutError:
                return
            kind = message.get("type")
            if kind == "task.assigned":
                self.task_waiting.set()
            elif kind == "ack":
                self._unacked.pop(message.get("seq"), None)
            elif kind == "error":
                log.warning("coordinator refused live metrics: %s", message.get("error"))
                refused = self._unacked.pop(message.get("seq"), None)
                if refused is not None:
                    self._post_over_http(*refused)

    def _await_acks(self, socket, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._unacked and time.monotonic() < deadline:
            self._read_replies(socket, timeout=0.1)

    def _resend_unacked_over_http(self) -> None:
        unacked, self._unacked = self._unacked, {}
        for task_id, points in unacked.values():
            self._post_over_http(task_id, points)

    def _post_over_http(self, task_id: int, points: list[dict[str, Any]]) -> None:
        try:
            self.client.post_metrics(task_id, points)
            self.sent_over_http += len(points)
        except (ConnectionError, CoordinatorError) as error:
            log.warning("could not send %d metric points: %s", len(points), error)

    def _take_batches(self) -> dict[int, list[dict[str, Any]]]:
        batches: dict[int, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + self.batch_seconds
        while time.monotonic() < deadline:
            try:
                item = self.outbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                break
            batch = batches.setdefault(item[0], [])
            batch.append(item[1])
            if len(batch) == protocol.METRIC_POINTS_PER_MESSAGE:
                break  # a full message goes now; the coordinator refuses larger ones
        return batches

    def _drain_over_http(self, *, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            for task_id, points in self._take_batches().items():
                self._post_over_http(task_id, points)
