"""Real servers for the tests that need them: daphne (ASGI: HTTP and websockets) and a Celery
worker, each a separate process on the test database and the same Redis as the tests."""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

from coordinator import embedded_redis
from coordinator.processes import ChildProcess, agent_command, daphne_command, free_port, worker_command


def database_url() -> str:
    """The test database as a DATABASE_URL, for processes that must share it."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def shared_environment(storage_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CHANNELS_PREFIX": settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"],
        "STORAGE_DIR": str(storage_dir),
        "LOG_LEVEL": "WARNING",
        **extra,
    }


class AsgiServer(ChildProcess):
    """The production command, daphne as coordinator.serve, on coordinator.asgi (which serves the
    static files itself with DEBUG on); runserver would run daphne without the body limits."""

    def __init__(self, log_path: Path, storage_dir: Path, *, port: int | None = None, **extra: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = daphne_command(self.port)
        environment = shared_environment(
            storage_dir, DEBUG="true", ALLOWED_HOSTS="127.0.0.1,localhost", **extra
        )
        super().__init__(command, log_path, environment)
        self.wait_until_http_ok(f"{self.url}/healthz")


class Worker(ChildProcess):
    """`celery worker -B` on both queues, one process in its pool."""

    def __init__(self, log_path: Path, storage_dir: Path, **extra: str):
        command = worker_command(beat_schedule=log_path.parent / "beat-schedule")
        environment = shared_environment(
            storage_dir,
            CELERY_VISIBILITY_TIMEOUT="3",
            DEADLINE_CHECK_SECONDS="1",
            AGGREGATION_REQUEUE_SECONDS="3",
            **extra,
        )
        super().__init__(command, log_path, environment)
        self.wait_for_output("ready", timeout=60)


class Agent(ChildProcess):
    """A site agent process, ``python -m sitesagent run``, on its own data and state file."""

    def __init__(self, log_path: Path, server_url: str, token: str, data: Path, **options):
        self.state_file = data.parent / f"{data.name}-state.json"
        command = agent_command(server_url, data, state_file=self.state_file, max_epsilon=10, **options)
        # One thread each: agents sharing two cores beat agents fighting over them.
        environment = {**os.environ, "SITE_TOKEN": token, "OMP_NUM_THREADS": "1"}
        super().__init__(command, log_path, environment)


class PrivateRedis(ChildProcess):
    """A Redis server of the test's own, on a TCP port, so that the test may kill and restart it.
    Like the production setup, it keeps nothing on disk: a restart loses everything in it."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = [
            str(embedded_redis.server_binary()),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(log_path.parent),
        ]  # fmt: skip
        super().__init__(command, log_path, dict(os.environ))
        self.wait_for_output("Ready to accept connections", timeout=10)

    def restarted(self) -> PrivateRedis:
        """A new server on the same port, empty; this one killed first if it still runs."""
        if self.alive():
            self.kill()
        return PrivateRedis(self.log_path, self.port)


class CuttingProxy:
    """A TCP proxy in front of the coordinator that loses one update upload, as a network can.

    ``cut="answer"``: the upload reaches the coordinator, and its answer never reaches the agent.
    ``cut="request"``: the upload never reaches the coordinator. Either way the agent is left
    waiting; ``cut_happened`` is set, and everything else passes through untouched.
    """

    UPLOAD = re.compile(rb"PUT /api/agent/tasks/\d+/update/ HTTP")

    def __init__(self, upstream_port: int, *, cut: str):
        assert cut in ("answer", "request")
        self.upstream_port = upstream_port
        self.cut = cut
        self.cut_happened = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            uploading = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, uploading), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, uploading), daemon=True).start()

    def _requests(self, source: socket.socket, target: socket.socket, uploading: threading.Event) -> None:
        while chunk := _receive(source):
            if self.UPLOAD.search(chunk) and not self.cut_happened.is_set():
                uploading.set()
            if uploading.is_set() and self.cut == "request":
                self.cut_happened.set()
                continue
            target.sendall(chunk)

    def _answers(self, source: socket.socket, target: socket.socket, uploading: threading.Event) -> None:
        while chunk := _receive(source):
            if uploading.is_set() and self.cut == "answer":
                self.cut_happened.set()
                continue
            target.sendall(chunk)


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""
