"""The site agent against a running coordinator (daphne, real HTTP and websockets): it takes a
task, trains, uploads a sparse SVT update, and streams metrics live; it refuses what the site's
own rules forbid, and remembers its spend across restarts."""

import pytest
from django.conf import settings

from coordinator import services
from coordinator.models import LedgerEntry, Membership, MetricPoint, Task, Update
from sitesagent.agent import Agent, AgentConfig
from sitesagent.state import AgentState, LocalCapExceeded
from sitesagent.synth import write_synthetic_cases

from .servers import AsgiServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
TRAINING = {"local_epochs": 1, "max_iterations": 3, "batch_size": 1, "roi_size": 16, "lr": 1e-3}


@pytest.fixture
def server(tmp_path):
    server = AsgiServer(tmp_path / "daphne.log", settings.STORAGE_DIR)
    yield server
    server.stop()


@pytest.fixture
def site_data(tmp_path):
    folder = tmp_path / "site-data"
    write_synthetic_cases(folder, 3, seed=5, style=1, size=32)
    return folder


def _agent(server, token, data, tmp_path, **overrides) -> Agent:
    config = AgentConfig(
        server=server.url,
        token=token,
        data=data,
        device="cpu",
        max_epsilon=10,
        state_file=tmp_path / "agent-state.json",
        poll_seconds=1,
        progress_bar=False,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    return Agent(config)


def test_agent_trains_uploads_a_sparse_update_and_streams_metrics(
    server, site_data, tmp_path, alice, federation, sites
):
    site, token = sites["A"]
    round_ = services.round_launch(
        federation=federation, launched_by=alice, site_ids=[site.pk], training_params=TRAINING
    )
    agent = _agent(server, token, site_data, tmp_path)
    assert agent.run(once=True) == 0

    task = Task.objects.get(round=round_, site=site)
    assert task.state == "uploaded"
    update = Update.objects.get(task=task)
    assert update.status == "accepted" and update.encoding == "sparse"
    assert 0 < update.n_values <= round(0.1 * round_.base_version.n_parameters) + 1
    assert update.n_iterations == 3 and update.n_cases == 2
    assert LedgerEntry.objects.filter(round=round_, kind="commit").count() == 1
    assert agent.channel.sent_over_websocket >= 1
    names = set(MetricPoint.objects.filter(round=round_, site=site).values_list("name", flat=True))
    assert {"train_loss", "throughput", "dice_mean", "dice_et", "dice_wt", "dice_tc"} <= names
    site.refresh_from_db()
    assert site.agent_info["cases"] == 3 and site.agent_info["device"] == "cpu"
    assert AgentState.load(tmp_path / "agent-state.json").spent(0) == pytest.approx(1.0)


def test_an_agent_restarted_mid_training_resumes_its_task(
    server, site_data, tmp_path, alice, federation, sites
):
    site, token = sites["A"]
    round_ = services.round_launch(
        federation=federation, launched_by=alice, site_ids=[site.pk], training_params=TRAINING
    )
    task = Task.objects.get(round=round_, site=site)
    # The agent got this far, then its machine rebooted.
    services.task_report(task=task, state="evaluating")
    services.task_report(task=task, state="training", progress=0.5)
    assert _agent(server, token, site_data, tmp_path).run(once=True) == 0
    task.refresh_from_db()
    assert task.state == "uploaded"
    assert LedgerEntry.objects.filter(round=round_, kind="commit").count() == 1


def test_agent_refuses_a_task_past_its_local_cap_and_says_why(
    server, site_data, tmp_path, alice, federation, sites
):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice, site_ids=[site.pk])
    assert _agent(server, token, site_data, tmp_path, max_epsilon=0.5).run(once=True) == 0
    task = Task.objects.get(round=round_, site=site)
    assert task.state == "dropped"
    assert "local limit of 0.5" in task.reason
    assert not Update.objects.exists()
    assert LedgerEntry.objects.filter(round=round_, kind="release").count() == 1


def test_agent_refuses_unprotected_sharing_unless_allowed_locally(
    server, site_data, tmp_path, alice, federation, sites
):
    site, token = sites["A"]
    membership = Membership.objects.get(site=site)
    services.budget_set(
        membership=membership, budget=2, changed_by=alice, reason="consent", allows_unprotected_sharing=True
    )
    round_ = services.round_launch(
        federation=federation,
        launched_by=alice,
        site_ids=[site.pk],
        mechanism="partial",
        mechanism_params={"fraction": 0.1, "gamma": 0.01},
    )
    assert _agent(server, token, site_data, tmp_path).run(once=True) == 0
    task = Task.objects.get(round=round_, site=site)
    assert task.state == "dropped" and "does not allow unprotected sharing" in task.reason


def test_local_spend_survives_a_restart_and_is_counted_once(tmp_path):
    pure = {"kind": "pure", "epsilon": 1.5}
    state = AgentState.load(tmp_path / "state.json")
    state.record_pending_upload(7, event=pure, update_file=tmp_path / "u")
    state.record_pending_upload(7, event=pure, update_file=tmp_path / "u")  # resumed after a crash
    reloaded = AgentState.load(tmp_path / "state.json")
    assert reloaded.spent(0) == 1.5 and reloaded.task(7)["status"] == "pending_upload"
    with pytest.raises(LocalCapExceeded, match="local limit of 2"):
        reloaded.check_cap({"kind": "pure", "epsilon": 1.0}, 2.0, 0)
    assert reloaded.check_cap({"kind": "pure", "epsilon": 0.5}, 2.0, 0) == 2.0


def test_an_old_state_files_total_is_kept_as_one_pure_release(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"spent_epsilon": 1.8, "tasks": {}}')
    assert AgentState.load(path).spent(0) == 1.8


def test_a_corrupt_state_file_stops_the_agent_rather_than_forget_its_spend(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="unreadable"):
        AgentState.load(path)
