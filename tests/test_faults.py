"""Faults survived with real processes: agents killed mid-training or mid-upload, Redis and the
web process restarted mid-round. A worker killed mid-aggregation is in tests/test_worker.py, a
database error inside a state change in tests/test_atomicity.py; docs/reliability.md lists each
with its outcome."""

from __future__ import annotations

import time

import pytest
from django.conf import settings

from coordinator import accounting, services
from coordinator.models import (
    LedgerEntry,
    Membership,
    MetricPoint,
    ModelVersion,
    Round,
    RoundState,
    Task,
    Update,
)
from sitesagent import protocol
from sitesagent.state import AgentState
from sitesagent.synth import write_synthetic_cases

from . import servers
from .conftest import SVT_PARAMS

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Long enough to catch an agent in the middle of it, short enough for a test.
TRAINING = {"local_epochs": 1, "max_iterations": 80, "batch_size": 1, "roi_size": 16, "lr": 1e-3}
ROUND_EPSILON = protocol.round_epsilon_exact("svt", SVT_PARAMS)


class Processes:
    """Every process a test starts, stopped however the test ends."""

    def __init__(self, folder):
        self.folder = folder
        self.started: list = []

    def start(self, kind, *args, **kwargs):
        process = kind(self.folder / f"{kind.__name__.lower()}-{len(self.started)}.log", *args, **kwargs)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()

    def assert_logs_never_mention(self, *secrets: str) -> None:
        """No process wrote a token to its log, whatever went wrong along the way."""
        for process in self.started:
            text = process.output()
            for secret in secrets:
                assert secret not in text, f"{process.log_path.name} contains a token"


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.stop_all()


@pytest.fixture
def site_data(tmp_path):
    """Three hospitals' synthetic scans, one folder each."""
    folders = []
    for index in range(3):
        folder = tmp_path / f"site-{index}"
        write_synthetic_cases(folder, 3, seed=10 + index, style=index, size=32)
        folders.append(folder)
    return folders


def _wait_for(condition, what: str, timeout: float, *watched: servers.ChildProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process in watched:
            process.check_alive()
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.log_path.name}\n{p.output()[-2000:]}" for p in watched)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _round_state(round_: Round, *states: str):
    return lambda: Round.objects.filter(pk=round_.pk, state__in=states).first()


def _task_state(task: Task, *states: str):
    return lambda: Task.objects.filter(pk=task.pk, state__in=states).first()


def _ledger(round_: Round, site_id: int) -> list[str]:
    return sorted(
        LedgerEntry.objects.filter(round=round_, membership__site_id=site_id).values_list("kind", flat=True)
    )


def test_an_agent_killed_mid_training_is_dropped_at_the_deadline_and_the_others_finish(
    processes, site_data, alice, federation, three_sites
):
    web = processes.start(servers.AsgiServer, settings.STORAGE_DIR)
    worker = processes.start(servers.Worker, settings.STORAGE_DIR)
    round_ = services.round_launch(
        federation=federation,
        launched_by=alice,
        training_params=TRAINING,
        min_sites=2,
        deadline_seconds=90,
    )
    doomed, *survivors = Task.objects.filter(round=round_).order_by("site_id")
    tokens = three_sites
    agent = processes.start(servers.Agent, web.url, tokens[doomed.site_id], site_data[0], once=True)
    _wait_for(_task_state(doomed, "training"), "the agent to start training", 120, web, agent)
    agent.kill()
    for task, data in zip(survivors, site_data[1:], strict=True):
        processes.start(servers.Agent, web.url, tokens[task.site_id], data, once=True)

    round_ = _wait_for(_round_state(round_, "done", "failed"), "the round to finish", 180, web, worker)

    assert round_.state == RoundState.DONE, round_.failure_reason
    assert ModelVersion.objects.filter(produced_by=round_).count() == 1
    doomed.refresh_from_db()
    assert doomed.state == "dropped" and "deadline passed" in doomed.reason
    assert _ledger(round_, doomed.site_id) == ["release", "reserve"]
    for task in survivors:
        assert _ledger(round_, task.site_id) == ["commit", "reserve"]
    for membership in Membership.objects.filter(federation=federation):
        balance = accounting.membership_balance(membership)
        assert balance.reserved == 0
        assert balance.committed == (0 if membership.site_id == doomed.site_id else ROUND_EPSILON)
    processes.assert_logs_never_mention(*tokens.values())


@pytest.mark.parametrize("cut", ["answer", "request"])
def test_an_agent_restarted_mid_upload_commits_its_update_and_epsilon_once(
    processes, site_data, alice, federation, sites, cut
):
    """``answer``: the coordinator stored the update, the agent never heard; ``request``: the
    update never arrived. The agent is SIGKILLed while it waits, then started again."""
    web = processes.start(servers.AsgiServer, settings.STORAGE_DIR)
    site, token = sites["A"]
    round_ = services.round_launch(
        federation=federation, launched_by=alice, site_ids=[site.pk], training_params=TRAINING
    )
    task = Task.objects.get(round=round_)
    proxy = servers.CuttingProxy(web.port, cut=cut)
    try:
        agent = processes.start(servers.Agent, proxy.url, token, site_data[0], once=True)
        _wait_for(proxy.cut_happened.is_set, "the upload to be cut", 180, web, agent)
        time.sleep(0.5)  # the coordinator finishes with what it received
        agent.kill()
    finally:
        proxy.close()
    assert Update.objects.filter(task=task).count() == (1 if cut == "answer" else 0)
    state = AgentState.load(agent.state_file)
    assert state.task(task.pk)["status"] == "pending_upload"

    again = processes.start(servers.Agent, web.url, token, site_data[0], once=True)
    _wait_for(lambda: not again.alive(), "the restarted agent to finish", 120, web)

    assert again.process.returncode == 0, again.output()[-3000:]
    assert "re-sending the update" in again.output()
    task.refresh_from_db()
    assert task.state == "uploaded"
    assert Update.objects.filter(task=task).count() == 1
    assert _ledger(round_, site.pk) == ["commit", "reserve"]
    state = AgentState.load(agent.state_file)
    assert state.task(task.pk)["status"] == "uploaded"
    assert state.spent(0) == pytest.approx(float(ROUND_EPSILON))
    processes.assert_logs_never_mention(token)


def _train_loss_steps(round_: Round, site_id: int) -> list[int]:
    return sorted(
        MetricPoint.objects.filter(
            round=round_, site_id=site_id, name=protocol.METRIC_TRAIN_LOSS
        ).values_list("step", flat=True)
    )


def _two_agents_training(processes, web_url, round_, sites, site_data):
    agents = [
        processes.start(servers.Agent, web_url, token, data, once=True)
        for (site, token), data in zip(sites.values(), site_data, strict=False)
    ]
    for task in Task.objects.filter(round=round_):
        _wait_for(_task_state(task, "training"), "both agents to train", 120, *agents)
    return agents


def _assert_agents_met_the_outage(agents) -> None:
    """The fault hit the agents mid-round (a test of a restart nobody noticed proves nothing)."""
    assert any("retrying in" in a.output() or "live channel down" in a.output() for a in agents)


def _assert_round_complete_and_nothing_lost(round_: Round, sites) -> None:
    round_.refresh_from_db()
    assert round_.state == RoundState.DONE, round_.failure_reason
    assert ModelVersion.objects.filter(produced_by=round_).count() == 1
    for site, _ in sites.values():
        assert _ledger(round_, site.pk) == ["commit", "reserve"]
        assert Update.objects.get(task__round=round_, task__site=site).status == "accepted"
        assert _train_loss_steps(round_, site.pk) == list(range(1, TRAINING["max_iterations"] + 1))


@pytest.mark.parametrize("outage", ["restart while training", "down while the updates arrive"])
def test_redis_restarted_mid_round_loses_nothing(
    processes, tmp_path, site_data, alice, federation, sites, outage
):
    redis = processes.start(servers.PrivateRedis)
    web = processes.start(servers.AsgiServer, settings.STORAGE_DIR, REDIS_URL=redis.url)
    worker = processes.start(servers.Worker, settings.STORAGE_DIR, REDIS_URL=redis.url)
    round_ = services.round_launch(federation=federation, launched_by=alice, training_params=TRAINING)
    agents = _two_agents_training(processes, web.url, round_, sites, site_data)

    redis.kill()  # everything Redis held is gone: queued tasks, channel groups
    if outage == "down while the updates arrive":
        # The aggregation cannot be queued: the round waits in "aggregating" for Redis.
        # (The agents are not watched: each exits, as --once asks, once its update is in.)
        _wait_for(_round_state(round_, "aggregating"), "both updates", 120, web, worker)
        web.wait_for_output("could not queue the aggregation", timeout=60)
        time.sleep(4)  # well past AGGREGATION_REQUEUE_SECONDS, while nothing can be queued
        assert Round.objects.get(pk=round_.pk).state == RoundState.AGGREGATING
    processes.started.append(redis.restarted())
    _wait_for(_round_state(round_, "done", "failed"), "the round to finish", 180, web, worker)

    assert all(agent.process.wait(timeout=60) == 0 for agent in agents)
    _assert_agents_met_the_outage(agents)
    _assert_round_complete_and_nothing_lost(round_, sites)
    processes.assert_logs_never_mention(*(token for _, token in sites.values()))


def test_the_web_process_restarted_mid_round_loses_nothing(
    processes, tmp_path, site_data, alice, federation, sites
):
    web = processes.start(servers.AsgiServer, settings.STORAGE_DIR)
    worker = processes.start(servers.Worker, settings.STORAGE_DIR)
    round_ = services.round_launch(federation=federation, launched_by=alice, training_params=TRAINING)
    agents = _two_agents_training(processes, web.url, round_, sites, site_data)

    web.kill()
    time.sleep(2)  # the agents meet a dead coordinator for a while
    web = processes.start(servers.AsgiServer, settings.STORAGE_DIR, port=web.port)
    _wait_for(_round_state(round_, "done", "failed"), "the round to finish", 180, web, worker)

    assert all(agent.process.wait(timeout=60) == 0 for agent in agents)
    _assert_agents_met_the_outage(agents)
    _assert_round_complete_and_nothing_lost(round_, sites)
    processes.assert_logs_never_mention(*(token for _, token in sites.values()))
