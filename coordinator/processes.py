"""Child processes that stop completely: the demo, the tests and the benchmarks start daphne,
Celery workers and agents with this. Each runs in its own process group (so its own children,
a worker's pool or beat, go with it) and writes its output to a log file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChildProcess:
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

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.log_path.name}: exited with {self.process.returncode}:\n{self.output()[-3000:]}"
            )

    def wait_for_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            self.check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"{self.log_path.name} never printed {text!r}:\n{self.output()[-3000:]}")

    def wait_until_http_ok(self, url: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{url} did not answer within {timeout} s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group: no chance to clean up."""
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the group, then SIGKILL what is left of it after ``timeout`` seconds."""
        if self.alive():
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        # The group's other members (a worker's pool, beat) may outlive its leader.
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log.close()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


def worker_command(*, beat_schedule: Path, log_level: str = "info") -> list[str]:
    """One Celery worker on both queues, beat inside it, one process in its pool."""
    return [
        sys.executable, "-m", "celery", "-A", "coordinator", "worker", "-B",
        "-Q", "celery,aggregation", "-c", "1", "--without-gossip", "--without-mingle",
        "-s", str(beat_schedule), "-l", log_level,
    ]  # fmt: skip


def agent_command(
    server: str, data: Path, *, state_file: Path, device: str = "cpu", max_epsilon: float, once: bool = False
) -> list[str]:
    """A site agent (``python -m sitesagent run``); its token comes from ``SITE_TOKEN``."""
    command = [
        sys.executable, "-m", "sitesagent", "run", "--server", server, "--data", str(data),
        "--device", device, "--max-epsilon", str(max_epsilon), "--state-file", str(state_file),
        "--no-progress", "--poll-seconds", "1" if once else "2",
    ]  # fmt: skip
    return [*command, "--once"] if once else command


def daphne_command(port: int, *, access_log: Path | None = None) -> list[str]:
    """daphne serving the ASGI application on 127.0.0.1, as in production: coordinator.serve,
    which refuses a request body over its limit while it arrives."""
    command = [sys.executable, "-m", "coordinator.serve", "-b", "127.0.0.1", "-p", str(port)]
    if access_log is not None:
        command += ["--access-log", str(access_log)]
    return [*command, "coordinator.asgi:application"]
