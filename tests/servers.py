"""Real servers for the tests that need them: daphne (ASGI: HTTP and websockets) and a Celery
worker, each a separate process on the test database and the same Redis as the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """The test database as a DATABASE_URL, for processes that must share it."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class Process:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, command: list[str], log_path: Path, environment: dict[str, str]):
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.log_path.name}: exited with {self.process.returncode}:\n{self.output()[-3000:]}"
            )

    def kill(self) -> None:
        """SIGKILL the whole group: no chance to clean up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class AsgiServer(Process):
    """daphne serving coordinator.asgi (through runserver, which adds static files)."""

    def __init__(self, log_path: Path, storage_dir: Path, **extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "manage.py",
            "runserver",
            f"127.0.0.1:{self.port}",
            "--noreload",
            "--insecure",
        ]
        environment = shared_environment(
            storage_dir, DEBUG="true", ALLOWED_HOSTS="127.0.0.1,localhost", **extra
        )
        super().__init__(command, log_path, environment)
        self.wait_until_up()

    def wait_until_up(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"the ASGI server did not answer within {timeout} s:\n{self.output()[-3000:]}")


class Worker(Process):
    """`celery worker -B` on both queues, one process in its pool."""

    def __init__(self, log_path: Path, storage_dir: Path, **extra: str):
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "coordinator",
            "worker",
            "-B",
            "-Q",
            "celery,aggregation",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "-s",
            str(log_path.parent / "beat-schedule"),
            "-l",
            "info",
        ]
        environment = shared_environment(
            storage_dir, CELERY_VISIBILITY_TIMEOUT="3", DEADLINE_CHECK_SECONDS="1", **extra
        )
        super().__init__(command, log_path, environment)
        self.wait_for("ready", timeout=60)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            self.check_alive()
            time.sleep(0.1)
        raise AssertionError(f"the worker never logged {text!r}:\n{self.output()[-3000:]}")
