"""Real servers for the tests that need them: daphne (ASGI: HTTP and websockets) and a Celery
worker, each a separate process on the test database and the same Redis as the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

from coordinator.processes import ChildProcess, free_port, worker_command


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
        self.wait_until_http_ok(f"{self.url}/healthz")


class Worker(ChildProcess):
    """`celery worker -B` on both queues, one process in its pool."""

    def __init__(self, log_path: Path, storage_dir: Path, **extra: str):
        command = worker_command(beat_schedule=log_path.parent / "beat-schedule")
        environment = shared_environment(
            storage_dir, CELERY_VISIBILITY_TIMEOUT="3", DEADLINE_CHECK_SECONDS="1", **extra
        )
        super().__init__(command, log_path, environment)
        self.wait_for_output("ready", timeout=60)
