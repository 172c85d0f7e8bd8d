"""The agent's HTTP client waits out an overloaded or failing coordinator (429, 5xx), honouring
Retry-After, for as long as it takes, against a real HTTP server that answers as told."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sitesagent import client as client_module
from sitesagent.client import Client, CoordinatorError


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers) of the server's script, then 200."""

    def do_GET(self):  # noqa: N802 - http.server's name
        script = self.server.script  # type: ignore[attr-defined]
        self.server.seen.append(time.monotonic())  # type: ignore[attr-defined]
        status, headers = script.pop(0) if script else (200, {})
        body = b'{"ok": true}' if status == 200 else b'{"error": "busy"}'
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.seen = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_BACKOFF", 0.2)


def test_the_agent_waits_out_failures_beyond_any_fixed_number_of_tries(scripted):
    scripted.script = [(503, {})] * 12 + [(429, {})] * 3
    client = Client(f"http://127.0.0.1:{scripted.server_port}", "site_x")
    assert client.request("GET", "/api/agent/task/").json() == {"ok": True}
    assert len(scripted.seen) == 16  # the old client gave up after 8


def test_retry_after_is_honoured(scripted):
    scripted.script = [(429, {"Retry-After": "1"})]
    client = Client(f"http://127.0.0.1:{scripted.server_port}", "site_x")
    client.request("GET", "/api/agent/task/")
    first, second = scripted.seen
    assert second - first >= 0.95


def test_best_effort_requests_give_up_and_refusals_are_not_retried(scripted):
    scripted.script = [(503, {})] * 5
    client = Client(f"http://127.0.0.1:{scripted.server_port}", "site_x")
    with pytest.raises(ConnectionError, match="failed 3 times"):
        client.request("GET", "/api/agent/task/", attempts=3)
    scripted.script = [(403, {})]
    with pytest.raises(CoordinatorError):
        client.request("GET", "/api/agent/task/")
    assert len(scripted.seen) == 4
