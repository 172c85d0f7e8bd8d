"""A site's own cap holds against a lying coordinator, through the real agent process.

The coordinator here is real (daphne on the test database); it lies because the round's stated
cost is rewritten in its database after launch, as a compromised or buggy coordinator would
state it. The agent (``python -m sitesagent run --once``) computes the cost from the parameters
it would apply, and must never upload past ``--max-epsilon``, whatever it is told.
"""

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

from coordinator import services
from coordinator.models import Round, Task, Update
from sitesagent.synth import write_synthetic_cases

from .conftest import join
from .servers import AsgiServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TRAINING = {"local_epochs": 1, "max_iterations": 1, "batch_size": 1, "roi_size": 16, "lr": 1e-3}
# SVT parameters whose true cost is 1.5 per round (the sites' budgets are 2); the agent's cap is 1.
COSTLY_SVT = {
    "fraction": 0.1,
    "gamma": 0.01,
    "tau": 0.001,
    "eps_threshold": 0.5,
    "eps_query": 0.5,
    "eps_release": 0.5,
}


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


def _run_agent(server, token, data, state_file, max_epsilon) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "sitesagent", "run", "--server", server.url, "--data", str(data),
        "--device", "cpu", "--max-epsilon", str(max_epsilon), "--delta", "0",
        "--state-file", str(state_file), "--no-progress", "--poll-seconds", "1", "--once",
    ]  # fmt: skip
    return subprocess.run(
        command, env={**os.environ, "SITE_TOKEN": token}, capture_output=True, text=True, timeout=240
    )


def _launch(federation, alice, site, params):
    return services.round_launch(
        federation=federation,
        launched_by=alice,
        site_ids=[site.pk],
        mechanism="svt",
        mechanism_params=params,
        training_params=TRAINING,
    )


@pytest.mark.parametrize(
    "stated",
    [
        pytest.param(
            {"epsilon_per_site": "0.3", "dp_event": {"kind": "pure", "epsilon": 0.3}}, id="understated"
        ),
        pytest.param({"epsilon_per_site": None, "dp_event": None}, id="null"),
        pytest.param({"epsilon_per_site": "1.5", "dp_event": {"kind": "pure", "epsilon": 1.5}}, id="honest"),
    ],
)
def test_the_agent_never_uploads_past_its_cap_whatever_the_coordinator_states(
    server, site_data, tmp_path, alice, federation, sites, stated
):
    site, token = sites["A"]
    round_ = _launch(federation, alice, site, COSTLY_SVT)
    Round.objects.filter(pk=round_.pk).update(**stated)  # the coordinator now states this cost

    state_file = tmp_path / "agent-state.json"
    finished = _run_agent(server, token, site_data, state_file, max_epsilon=1)
    assert finished.returncode == 0, finished.stderr[-3000:]

    task = Task.objects.get(round=round_, site=site)
    assert not Update.objects.filter(task=task).exists()
    assert task.state == "dropped" and "refused by the site" in task.reason
    saved = json.loads(state_file.read_text())
    assert saved["releases"] == [] and saved["tasks"][str(task.pk)]["status"] == "refused"


def test_control_the_same_agent_uploads_a_round_within_its_cap(
    server, site_data, tmp_path, alice, federation, sites
):
    site, token = sites["A"]
    round_ = _launch(federation, alice, site, COSTLY_SVT)
    state_file = tmp_path / "agent-state.json"
    finished = _run_agent(server, token, site_data, state_file, max_epsilon=1.5)
    assert finished.returncode == 0, finished.stderr[-3000:]
    task = Task.objects.get(round=round_, site=site)
    assert Update.objects.filter(task=task).exists()
    saved = json.loads(state_file.read_text())
    assert saved["releases"] == [{"task": task.pk, "event": {"kind": "pure", "epsilon": 1.5}}]


def test_a_dpsgd_round_end_to_end_charges_the_same_epsilon_on_both_sides(server, site_data, tmp_path, alice):
    from coordinator import accounting
    from coordinator.models import Membership

    from .conftest import TINY_MODEL

    federation = services.federation_create(
        name="DP-SGD study",
        created_by=alice,
        model_config=TINY_MODEL,
        default_mechanism="dpsgd",
        default_mechanism_params={
            "noise_multiplier": 1.5,
            "max_grad_norm": 1.0,
            "sample_rate": 0.5,
            "steps": 2,
            "crops_per_case": 1,
        },  # fmt: skip
        budget_delta=1e-5,
        training_defaults=TRAINING,
    )
    site, token = services.site_register(name="Hospital P", registered_by=alice)
    membership = join(federation, site, budget=10, added_by=alice, accepted_by=alice)
    round_ = services.round_launch(federation=federation, launched_by=alice)

    state_file = tmp_path / "agent-state.json"
    command_delta = "1e-5"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "sitesagent",
            "run",
            "--server",
            server.url,
            "--data",
            str(site_data),
            "--device",
            "cpu",
            "--max-epsilon",
            "10",
            "--delta",
            command_delta,
            "--state-file",
            str(state_file),
            "--no-progress",
            "--poll-seconds",
            "1",
            "--once",
        ],  # fmt: skip
        env={**os.environ, "SITE_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]

    update = Update.objects.get(task__round=round_, task__site=site)
    assert update.status == "accepted" and update.encoding == "dense" and update.n_iterations == 2
    # No step's loss or throughput left the site (they would show each step's batch size); the
    # base model's evaluation did.
    from coordinator.models import MetricPoint

    names = set(MetricPoint.objects.filter(round=round_).values_list("name", flat=True))
    assert "dice_mean" in names and not names & {"train_loss", "throughput"}
    saved = json.loads(state_file.read_text())
    assert [release["event"] for release in saved["releases"]] == [round_.dp_event]
    from sitesagent.state import AgentState

    agent_spent = AgentState.load(state_file).spent(1e-5)
    ledger = accounting.membership_balance(Membership.objects.get(pk=membership.pk))
    assert ledger.reserved == 0 and float(ledger.committed) == pytest.approx(agent_spent, abs=1e-11)
