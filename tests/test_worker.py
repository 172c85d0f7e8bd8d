"""Rounds finish on a real Celery worker over real Redis: exactly one model version per round,
even when the aggregation runs twice or its worker is SIGKILLed mid-task; deadlines are
enforced by the worker's beat, not by anyone's browser."""

import time

import pytest
from django.conf import settings

from coordinator import accounting, services
from coordinator.celery import app as celery_app
from coordinator.models import Membership, ModelVersion, Round, RoundState, Task

from .conftest import SVT_PARAMS
from .factories import svt_update
from .servers import Worker

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def start_worker(tmp_path):
    celery_app.control.purge()  # messages other tests left for rounds that no longer exist
    workers = []

    def start(**env: str) -> Worker:
        worker = Worker(tmp_path / f"worker-{len(workers)}.log", settings.STORAGE_DIR, **env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


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


def test_three_updates_make_exactly_one_version_even_when_aggregated_twice(
    start_worker, federation, alice, three_sites
):
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
    first.wait_for_output("round_aggregate_task", timeout=30)
    time.sleep(1.0)  # inside the pause: the arithmetic is done, nothing is stored yet
    first.kill()
    round_.refresh_from_db()
    assert (
        round_.state == RoundState.AGGREGATING
        and not ModelVersion.objects.filter(produced_by=round_).exists()
    )

    second = start_worker()
    _wait_for_state(round_, {RoundState.DONE}, timeout=90)
    assert "round_aggregate_task" in second.output()
    assert ModelVersion.objects.filter(produced_by=round_).count() == 1
    assert federation.versions.count() == 2


def test_deadline_with_too_few_updates_fails_the_round_on_the_worker(
    start_worker, federation, alice, three_sites
):
    start_worker()
    round_ = services.round_launch(federation=federation, launched_by=alice, deadline_seconds=2, min_sites=2)
    task = Task.objects.filter(round=round_).first()
    services.update_accept(task=task, data=svt_update(round_.base_version.n_parameters, SVT_PARAMS))
    round_ = _wait_for_state(round_, {RoundState.FAILED, RoundState.DONE}, timeout=30)
    assert round_.state == RoundState.FAILED
    assert "only 1 accepted update(s), the round needs at least 2" in round_.failure_reason
    for membership in Membership.objects.filter(federation=federation):
        balance = accounting.membership_balance(membership)
        assert balance.reserved == 0
        uploaded = membership.site_id == task.site_id
        assert balance.remaining == (4 if uploaded else 5)
