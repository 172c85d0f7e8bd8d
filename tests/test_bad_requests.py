"""Bad JSON on the JSON endpoints: a 400 (or 415) naming the problem, nothing written, and the
open round goes on to its new version."""

from __future__ import annotations

import pytest

from coordinator import services
from coordinator.models import (
    AuditEvent,
    Federation,
    LedgerEntry,
    Membership,
    MetricPoint,
    Round,
    RoundState,
    Site,
    Task,
)

from .conftest import SVT_PARAMS
from .factories import svt_update


def _snapshot() -> dict:
    """Everything a JSON endpoint could write."""
    return {
        "rounds": list(Round.objects.values_list("pk", "state")),
        "tasks": list(Task.objects.values_list("pk", "state", "progress")),
        "ledger": LedgerEntry.objects.count(),
        "audit": AuditEvent.objects.count(),
        "metrics": MetricPoint.objects.count(),
        "budgets": list(Membership.objects.values_list("pk", "budget_epsilon")),
        "federations": Federation.objects.count(),
        "agent_info": list(Site.objects.order_by("pk").values_list("agent_info", flat=True)),
    }


def _completes(round_: Round) -> None:
    """Both sites upload through the service, and the round aggregates into its new version."""
    round_.refresh_from_db()
    assert round_.is_open, round_.state
    for seed, task in enumerate(round_.tasks.select_related("round__base_version", "site")):
        services.update_accept(
            task=task, data=svt_update(round_.base_version.n_parameters, SVT_PARAMS, seed=seed)
        )
    assert services.round_check_completion(round_id=round_.pk) == "aggregating"
    assert services.round_aggregate(round_id=round_.pk).startswith("version")
    round_.refresh_from_db()
    assert round_.state == RoundState.DONE


@pytest.fixture
def round_(alice, federation, sites) -> Round:
    return services.round_launch(federation=federation, launched_by=alice)


def _endpoint(name: str, federation, round_, sites, alice, client_for):
    """(client, method, url) of each JSON endpoint, as its rightful caller."""
    person = client_for(alice)
    agent = client_for(token=sites["A"][1])
    task = Task.objects.get(round=round_, site=sites["A"][0])
    membership = Membership.objects.get(site=sites["A"][0])
    return {
        "launch": (person, "POST", f"/api/federations/{federation.pk}/rounds/"),
        "launch preview": (person, "POST", f"/api/federations/{federation.pk}/rounds/preview/"),
        "budget change": (person, "PATCH", f"/api/memberships/{membership.pk}/"),
        "membership add": (person, "POST", f"/api/federations/{federation.pk}/memberships/"),
        "federation create": (person, "POST", "/api/federations/"),
        "round abort": (person, "POST", f"/api/rounds/{round_.pk}/abort/"),
        "metrics": (agent, "POST", f"/api/agent/tasks/{task.pk}/metrics/"),
        "task status": (agent, "POST", f"/api/agent/tasks/{task.pk}/status/"),
        "heartbeat": (agent, "POST", "/api/agent/heartbeat/"),
    }[name]


ENDPOINTS = [
    "launch",
    "launch preview",
    "budget change",
    "membership add",
    "federation create",
    "round abort",
    "metrics",
    "task status",
    "heartbeat",
]
BAD_BODIES = {
    "cut-off JSON": ('{"budget": 3, "reason":', "JSON parse error - Expecting value"),
    "not JSON at all": ("budget=3", "JSON parse error"),
    "a bare NaN": ('{"budget": NaN, "points": NaN}', "JSON parse error - Out of range float values"),
    "a list, not an object": ("[1, 2]", "Invalid data. Expected a dictionary, but got list"),
    "a string, not an object": ('"3"', "Invalid data. Expected a dictionary, but got str"),
    "null": ("null", "No data provided"),
}


@pytest.mark.parametrize("body", sorted(BAD_BODIES))
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_malformed_json_is_refused_by_name_and_writes_nothing(
    client_for, alice, federation, round_, sites, endpoint, body
):
    text, words = BAD_BODIES[body]
    client, method, url = _endpoint(endpoint, federation, round_, sites, alice, client_for)
    before = _snapshot()
    response = client.generic(method, url, text, content_type="application/json")
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]
    assert _snapshot() == before
    _completes(round_)


@pytest.mark.parametrize("endpoint", ["launch", "budget change", "metrics"])
def test_a_body_that_is_not_json_by_its_type_is_refused(
    client_for, alice, federation, round_, sites, endpoint
):
    client, method, url = _endpoint(endpoint, federation, round_, sites, alice, client_for)
    before = _snapshot()
    response = client.generic(method, url, "budget: 3", content_type="text/plain")
    assert response.status_code == 415
    assert 'Unsupported media type "text/plain"' in response.json()["error"]
    assert _snapshot() == before
    _completes(round_)


# --- epsilon and budgets that are no usable number ---------------------------------------------
# tests/test_launch.py covers NaN (as a string) and a negative eps_query; test_budgets.py covers
# every bad budget on a change. These are the cases neither has.

BAD_EPSILONS = {
    "infinite, as a string": ('{"eps_release": "Infinity"}', "eps_release must be finite, not inf"),
    "infinite, as an overflowing number": (
        '{"eps_query": 1e400}',
        "mechanism_params: Value must be valid JSON",
    ),
    "a bare NaN": ('{"eps_release": NaN}', "JSON parse error - Out of range float values"),
    "zero": ('{"eps_release": 0}', "eps_release must be greater than zero, not 0.0"),
    "negative threshold part": (
        '{"eps_threshold": -0.5}',
        "eps_threshold must be greater than zero, not -0.5",
    ),
    "negative infinity": ('{"eps_threshold": "-Infinity"}', "eps_threshold must be finite, not -inf"),
}


def _svt_params_with(override: str) -> str:
    """The round's SVT parameters as JSON text, one of them replaced by ``override``'s raw text."""
    name = override.split('"')[1]
    pairs = [f'"{key}": {value!r}' for key, value in SVT_PARAMS.items() if key != name]
    return "{" + ", ".join([*pairs, override.strip("{}")]) + "}"


@pytest.mark.parametrize("case", sorted(BAD_EPSILONS))
@pytest.mark.parametrize("endpoint", ["launch", "launch preview"])
def test_an_epsilon_that_is_no_usable_number_is_refused(
    client_for, alice, federation, round_, sites, endpoint, case
):
    override, words = BAD_EPSILONS[case]
    client, method, url = _endpoint(endpoint, federation, round_, sites, alice, client_for)
    before = _snapshot()
    body = f'{{"mechanism": "svt", "mechanism_params": {_svt_params_with(override)}}}'
    response = client.generic(method, url, body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]
    assert _snapshot() == before
    _completes(round_)


@pytest.mark.parametrize(
    ("budget_json", "words"),
    [
        ('"NaN"', "budget must be a number, not NaN"),
        ('"Infinity"', "budget must be finite"),
        ('"-Infinity"', "budget must be finite"),
        ("1e400", "budget: Value must be valid JSON"),
        ("NaN", "JSON parse error - Out of range float values"),
        ("0", "budget must be greater than zero"),
        ("-0.0", "budget must be greater than zero"),
    ],
)
def test_a_new_site_with_a_budget_that_is_no_usable_number_is_refused(
    client_for, alice, federation, round_, sites, budget_json, words
):
    site, _ = services.site_register(name="Hospital C", registered_by=alice)
    before = _snapshot()
    response = client_for(alice).generic(
        "POST",
        f"/api/federations/{federation.pk}/memberships/",
        f'{{"site": {site.pk}, "budget": {budget_json}, "reason": "joins"}}',
        content_type="application/json",
    )
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]
    assert not Membership.objects.filter(site=site).exists()
    assert _snapshot() == before
    _completes(round_)
