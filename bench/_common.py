"""What the benchmarks share: timing statistics, the machine they ran on, JSON output, and a
throwaway coordinator (its own database, Redis, daphne and Celery worker) for the benchmarks that
need the real servers.

Not a test helper: ``bench/`` never imports from ``tests/``; child processes come from
``coordinator.processes``, as for the tests and the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script from anywhere: make `coordinator` and `sitesagent` importable without installing.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator.processes import ChildProcess, daphne_command, free_port, worker_command  # noqa: E402

POSTGRES_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"


# --- statistics -------------------------------------------------------------------------------


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def percentile(samples: Sequence[float], share: float) -> float:
    """The ``share`` quantile (0..1) by linear interpolation between the two nearest samples."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    position = share * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def time_runs(function: Callable[[], object], runs: int, *, warmups: int = 1) -> list[float]:
    """Seconds each of ``runs`` calls of ``function`` took, after ``warmups`` untimed calls."""
    for _ in range(warmups):
        function()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return samples


def interleaved_runs(
    functions: dict[str, Callable[[], object]], runs: int, *, warmups: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taken in turns on every run.

    Taking them in turns means a floor and the code it bounds meet the same state of a shared
    machine; timing one block after the other can put a burst of someone else's load in one only.
    """
    for function in functions.values():
        for _ in range(warmups):
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return samples


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, spread and the samples themselves, as the JSON output carries them."""
    return {
        "median": median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
        "samples": list(samples),
    }


# --- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Where a figure was measured. The load average matters: the sandbox is shared."""
    import torch

    return {
        "cpu": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "load_average": load_average(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def machine_line(info: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in info.items())


# --- command line and output ------------------------------------------------------------------


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the option every benchmark takes: ``--json PATH``."""
    first_paragraph = (doc or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(
        description=first_paragraph, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file as JSON")
    return parser


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {path}", file=sys.stderr)


# --- a throwaway coordinator ------------------------------------------------------------------


class Coordinator:
    """A coordinator of its own: a fresh database, Redis, and the servers a benchmark starts.

    Use ``throwaway_coordinator()``; it configures Django in this process against the same
    database and Redis, so the benchmark can create users, sites and federations directly.
    """

    def __init__(self, workdir: Path, environment: dict[str, str]):
        self.workdir = workdir
        self.environment = environment
        self.processes: list[ChildProcess] = []
        self.url = ""

    def start_daphne(self) -> ChildProcess:
        """daphne serving coordinator.asgi, as in production (README: Production)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # One line a request would bury the errors in daphne.log.
        command = daphne_command(port, access_log=self.workdir / "daphne-access.log")
        server = self._start(command, "daphne.log")
        server.wait_until_http_ok(f"{self.url}/healthz", timeout=90)
        return server

    def start_worker(self) -> ChildProcess:
        """One Celery worker on both queues with beat, one process in its pool (as the tests run it)."""
        worker = self._start(worker_command(beat_schedule=self.workdir / "beat-schedule"), "worker.log")
        worker.wait_for_output("ready", timeout=90)
        return worker

    def _start(self, command: list[str], log_name: str) -> ChildProcess:
        process = ChildProcess(command, self.workdir / log_name, self.environment)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def print_log_tails(self, characters: int = 4000) -> None:
        for process in self.processes:
            print(f"--- end of {process.log_path.name}:\n{process.output()[-characters:]}", file=sys.stderr)


@contextlib.contextmanager
def throwaway_coordinator(*, database: str = "sqlite", redis_url: str = "") -> Iterator[Coordinator]:
    """Configure Django in this process on a fresh database and Redis, migrate, and clean up after.

    ``database``: "sqlite" (a file in a temporary folder, the default install) or "postgres" (a
    fresh database on 127.0.0.1:5432, dropped afterwards). ``redis_url``: empty for an embedded
    Redis in the temporary folder (nothing shared with anyone), else that server. Every process
    started through the returned Coordinator is stopped on the way out, and the folder removed.
    """
    workdir = Path(tempfile.mkdtemp(prefix="fl-bench-"))
    postgres_name = f"fl_bench_{os.getpid()}_{secrets.token_hex(3)}" if database == "postgres" else ""
    try:
        database_url = _create_database(database, workdir, postgres_name)
        environment = _configure_environment(workdir, database_url, redis_url)
        coordinator = Coordinator(workdir, environment)
        try:
            _setup_django()
            # The embedded Redis, if any, is now running; children must reuse it, not start another.
            from django.conf import settings

            environment["REDIS_URL"] = os.environ["REDIS_URL"] = settings.REDIS_URL
            yield coordinator
        except BaseException:
            coordinator.print_log_tails()  # the folder, logs included, goes away below
            raise
        finally:
            coordinator.stop()
            _close_django_connections()
    finally:
        if postgres_name:
            _drop_postgres_database(postgres_name)
        if not redis_url:
            from coordinator import embedded_redis

            embedded_redis.stop(workdir / "var" / "redis")
        shutil.rmtree(workdir, ignore_errors=True)


def _create_database(kind: str, workdir: Path, postgres_name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'db.sqlite3'}"
    if kind != "postgres":
        raise ValueError(f"database must be sqlite or postgres, not {kind!r}")
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{postgres_name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{postgres_name}"


def _drop_postgres_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _configure_environment(workdir: Path, database_url: str, redis_url: str) -> dict[str, str]:
    """Production-like settings (DEBUG off) for this process and every child it starts."""
    settings = {
        "DJANGO_SETTINGS_MODULE": "coordinator.settings",
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        # No TLS proxy in front here, so no redirect to https.
        "SECURE_SSL_REDIRECT": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "VAR_DIR": str(workdir / "var"),
        "STORAGE_DIR": str(workdir / "storage"),
        "DATABASE_URL": database_url,
        "CHANNELS_PREFIX": f"bench{os.getpid()}",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(settings)
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    else:
        os.environ.pop("REDIS_URL", None)
    return dict(os.environ)


def _setup_django() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def _close_django_connections() -> None:
    with contextlib.suppress(Exception):
        from django.db import connections

        connections.close_all()
