"""A site's own policy, which its agent enforces whatever the coordinator says: which federations
it serves, which mechanisms it accepts and how much one round may cost; and the site page shows the
policy the agent last reported."""

import pytest

from coordinator import services
from sitesagent import protocol
from sitesagent.agent import Agent, AgentConfig, TaskRefused

from .conftest import SVT_PARAMS

DPSGD = {"noise_multiplier": 1.5, "max_grad_norm": 1.0, "sample_rate": 0.25, "steps": 8, "crops_per_case": 1}


def _agent(tmp_path, **policy) -> Agent:
    config = AgentConfig(
        server="http://127.0.0.1:9",
        token="site_x",
        data=tmp_path,
        state_file=tmp_path / "state.json",
        **policy,
    )
    return Agent(config)


def _task(federation="Study A", mechanism="dpsgd", params=DPSGD, delta=1e-5):
    from sitesagent.accountant import event_epsilon

    event = protocol.round_event(mechanism, params)
    return {
        "task": 1,
        "federation": federation,
        "mechanism": mechanism,
        "mechanism_params": params,
        "dp_event": event,
        "epsilon": event_epsilon(event, delta) if event else None,
        "delta": delta,
    }


def test_a_site_serves_only_the_federations_it_names(tmp_path):
    agent = _agent(tmp_path, federations=("Study A",))
    assert agent._check_site_rules(_task("Study A")) == protocol.round_event("dpsgd", DPSGD)
    with pytest.raises(TaskRefused, match="serves only Study A"):
        agent._check_site_rules(_task("Study B"))


def test_a_site_accepts_only_the_mechanisms_it_names(tmp_path):
    agent = _agent(tmp_path, mechanisms=("dpsgd",))
    agent._check_site_rules(_task())
    with pytest.raises(TaskRefused, match="accepts only dpsgd"):
        agent._check_site_rules(_task(mechanism="svt", params=SVT_PARAMS, delta=0))


def test_a_site_refuses_a_round_that_costs_more_than_its_limit_per_round(tmp_path):
    # One such DP-SGD round costs about 2.81 at delta 1e-5.
    _agent(tmp_path, max_round_epsilon=3)._check_site_rules(_task())
    with pytest.raises(TaskRefused, match="limit per round of 2.5"):
        _agent(tmp_path, max_round_epsilon=2.5)._check_site_rules(_task())


def test_the_policy_goes_to_the_coordinator_in_the_agents_own_words(tmp_path):
    policy = _agent(tmp_path, federations=("Study A",), mechanisms=("dpsgd",), max_epsilon=10).config.policy()
    assert policy == {
        "max_epsilon": 10,
        "max_round_epsilon": None,
        "delta": 1e-5,
        "federations": ["Study A"],
        "mechanisms": ["dpsgd"],
        "allow_unprotected": False,
    }


def test_the_site_page_shows_the_policy_the_agent_last_reported(client, bob, sites):
    site, _ = sites["A"]
    policy = {"max_epsilon": 10, "max_round_epsilon": 3, "delta": 1e-5, "federations": ["BraTS study"]}
    services.site_heartbeat(
        site=site, info={"policy": {**policy, "mechanisms": None, "allow_unprotected": False}}
    )
    client.force_login(bob)
    page = client.get(f"/sites/{site.pk}/").content.decode()
    assert "Federations served</dt><dd>BraTS study" in page
    assert "Mechanisms accepted</dt><dd>every protected one" in page
    assert "Cap per round</dt><dd>epsilon 3" in page and "Unprotected sharing</dt><dd>refused" in page
