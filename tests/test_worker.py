"""Rounds finish on a real Celery worker over real Redis: exactly one model version per round,
even when the aggregation runs twice or its worker is SIGKILLed mid-task; deadlines are
enforced by the worker's beat, not by anyone's browser."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from coordinator import selectors, services
from coordinator.celery import app as celery_app
from coordinator.models import Membership, ModelVersion, Round, RoundState, Task

from .conftest import SVT_PARAMS
from .factories import svt_update

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def _database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class Worker:
    """A `celery worker` process on the test database and the same Redis as this process."""

    def __init__(self, log_path: Path, **env: str):
        environment = {
            **os.environ,
            "DATABASE_URL": _database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "STORAGE_DIR": str(settings.STORAGE_DIR),
            "CELERY_VISIBILITY_TIMEOUT": "3",
            "DEADLINE_CHECK_SECONDS": "1",
            **env,
        }
        self.log_path = log_path
        self.log = log_path.open("ab")
        command = [sys.executable, "-m", "celery", "-A", "coordinator", "worker", "-B",
                   "-Q", "celery,aggregation", "-c", "1", "--without-gossip", "--without-mingle",
                   "-s", str(log_path.parent / "beat-schedule"), "-l", "info"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for("ready", timeout=60)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output()[after:]:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"the worker never logged {text!r}:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process, pool child and beat): no chance to clean up."""
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


@pytest.fixture
def start_worker(tmp_path):
    celery_app.control.purge()  # messages other tests left for rounds that no longer exist
    workers = []

    def start(**env: str) -> Worker:
        worker = Worker(tmp_path / f"worker-{len(workers)}.log", **env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def three_sites(federation, alice):
    tokens = {}
    for label in "ABC":
        site, token = services.site_register(name=f"Hospital {label}", registered_by=alice)
        services.membership_add(federation=federation, site=site, budget=5, added_by=alice, reason="study")
        tokens[site.pk] = token
    return tokens


def _upload_all(round_: Round) -> None:
    n = round_.base_version.n_parameters
    for seed, task in enumerate(Task.objects.filter(round=round_).select_related("round__base_version")):
        services.update_accept(task=task, data=svt_update(n, SVT_PARAMS, seed=seed))


def _wait_for_state(round_: Round, states: set[str], timeout: float = 60) -> Round:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        round_.refresh_from_db()
        if round_.state in states:
            return round_
        time.sleep(0.2)
    raise AssertionError(f"round stayed {round_.state}, expected one of {states}")


def test_three_updates_make_exactly_one_version_even_when_aggregated_twice(start_worker, federation, alice, three_sites):
    start_worker()
    round_ = services.round_launch(federation=federation, launched_by=alice)
    _upload_all(round_)
    _wait_for_state(round_, {RoundState.DONE})
    assert ModelVersion.objects.filter(produced_by=round_).count() == 1
    assert federation.versions.count() == 2

    from coordinator.tasks import round_aggregate_task

    again = round_aggregate_task.delay(round_.pk).get(timeout=60)
    assert again == "round already done"
    assert federation.versions.count() == 2


def test_a_sigkilled_workers_aggregation_is_redelivered_and_still_makes_one_version(
    start_worker, federation, alice, three_sites
):
    first = start_worker(AGGREGATION_PAUSE_SECONDS="30")
    round_ = services.round_launch(federation=federation, launched_by=alice)
    _upload_all(round_)
    first.wait_for("round_aggregate_task", timeout=30)
    time.sleep(1.0)  # inside the pause: the arithmetic is done, nothing is stored yet
    first.kill()
    round_.refresh_from_db()
    assert round_.state == RoundState.AGGREGATING and not ModelVersion.objects.filter(produced_by=round_).exists()

    second = start_worker()
    _wait_for_state(round_, {RoundState.DONE}, timeout=90)
    assert "round_aggregate_task" in second.output()
    assert ModelVersion.objects.filter(produced_by=round_).count() == 1
    assert federation.versions.count() == 2


def test_deadline_with_too_few_updates_fails_the_round_on_the_worker(start_worker, federation, alice, three_sites):
    start_worker()
    round_ = services.round_launch(federation=federation, launched_by=alice, deadline_seconds=2, min_sites=2)
    task = Task.objects.filter(round=round_).first()
    services.update_accept(task=task, data=svt_update(round_.base_version.n_parameters, SVT_PARAMS))
    round_ = _wait_for_state(round_, {RoundState.FAILED, RoundState.DONE}, timeout=30)
    assert round_.state == RoundState.FAILED
    assert "only 1 accepted update(s), the round needs at least 2" in round_.failure_reason
    for membership in Membership.objects.filter(federation=federation):
        balance = selectors.membership_balance(membership)
        assert balance.reserved == 0
        uploaded = membership.site_id == task.site_id
        assert balance.remaining == (4 if uploaded else 5)
