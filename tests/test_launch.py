"""Launching a round reserves each site's epsilon, or refuses with names and balances."""

from decimal import Decimal

import pytest

from coordinator import accounting, services
from coordinator.models import LedgerEntry, LedgerKind, Membership, Round, RoundState, Task

from .conftest import SVT_PARAMS


def _launch(client, federation, **body):
    # The suite's SVT parameters are mostly noise on purpose (cheap to check, far from useful);
    # tests of that refusal say confirm_noise=False.
    body.setdefault("confirm_noise", True)
    return client.post(f"/api/federations/{federation.pk}/rounds/", body, format="json")


def _balance(federation, site):
    return accounting.membership_balance(Membership.objects.get(federation=federation, site=site))


def test_launch_reserves_each_sites_epsilon(client_for, alice, federation, sites):
    response = _launch(client_for(alice), federation)
    assert response.status_code == 201, response.content
    round_ = Round.objects.get(pk=response.json()["id"])
    assert round_.state == RoundState.RESERVED and round_.epsilon_per_site == Decimal(1)
    assert Task.objects.filter(round=round_).count() == 2
    for site, _ in sites.values():
        balance = _balance(federation, site)
        assert (balance.reserved, balance.committed, balance.remaining) == (1, 0, 1)


def test_launch_leaves_out_a_site_without_budget_and_says_why(client_for, alice, federation, sites):
    site_a = sites["A"][0]
    services.budget_set(
        membership=Membership.objects.get(site=site_a), budget=0.5, changed_by=alice, reason="cut"
    )
    response = _launch(client_for(alice), federation)
    assert response.status_code == 201
    excluded = response.json()["excluded_sites"]
    assert [e["name"] for e in excluded] == ["Hospital A"]
    assert "0.5 epsilon left" in excluded[0]["reason"] and "would take it to 1" in excluded[0]["reason"]
    assert _balance(federation, site_a).reserved == 0


def test_launch_refuses_when_fewer_than_the_minimum_can_take_part(client_for, alice, federation, sites):
    for site, _ in sites.values():
        services.budget_set(
            membership=Membership.objects.get(site=site), budget=0.25, changed_by=alice, reason="cut"
        )
    response = _launch(client_for(alice), federation, min_sites=1)
    assert response.status_code == 409
    message = response.json()["error"]
    assert "Hospital A has 0.25 epsilon left" in message and "Hospital B has 0.25 epsilon left" in message
    assert not Round.objects.exists() and not LedgerEntry.objects.exists()


def test_unprotected_mechanisms_need_the_sites_explicit_consent(client_for, alice, federation, sites):
    membership = Membership.objects.get(site=sites["A"][0])
    services.budget_set(
        membership=membership,
        budget=2,
        changed_by=alice,
        reason="consent given",
        allows_unprotected_sharing=True,
    )
    response = _launch(
        client_for(alice), federation, mechanism="partial", mechanism_params={"fraction": 0.1, "gamma": 0.1}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["epsilon_per_site"] is None
    assert [e["name"] for e in body["excluded_sites"]] == ["Hospital B"]
    assert "does not allow unprotected sharing" in body["excluded_sites"][0]["reason"]
    entry = LedgerEntry.objects.get(round_id=body["id"])
    assert entry.epsilon is None and entry.kind == LedgerKind.RESERVE


@pytest.mark.parametrize(
    "bad", [{"eps_release": "NaN"}, {"eps_query": -1}, {"gamma": 0}, {"fraction": 2}, {"tau": "x"}]
)
def test_launch_with_bad_mechanism_parameters_is_refused(client_for, alice, federation, sites, bad):
    response = _launch(client_for(alice), federation, mechanism="svt", mechanism_params={**SVT_PARAMS, **bad})
    assert response.status_code == 400
    assert next(iter(bad)) in response.json()["error"]
    assert not Round.objects.exists()


def test_abort_releases_every_reservation(client_for, alice, federation, sites):
    round_id = _launch(client_for(alice), federation).json()["id"]
    response = client_for(alice).post(
        f"/api/rounds/{round_id}/abort/", {"reason": "wrong settings"}, format="json"
    )
    assert response.status_code == 200 and response.json()["state"] == "aborted"
    for site, _ in sites.values():
        assert _balance(federation, site).remaining == 2
    assert LedgerEntry.objects.filter(round_id=round_id, kind=LedgerKind.RELEASE).count() == 2
    again = client_for(alice).post(f"/api/rounds/{round_id}/abort/", {"reason": "again"}, format="json")
    assert again.status_code == 409


def test_deadline_with_too_few_updates_fails_the_round_and_returns_the_budget(alice, federation, sites):
    from datetime import timedelta

    from django.utils import timezone

    round_ = services.round_launch(federation=federation, launched_by=alice, deadline_seconds=60)
    services.rounds_enforce_deadlines(now=timezone.now() + timedelta(seconds=61))
    round_.refresh_from_db()
    assert round_.state == RoundState.FAILED
    assert "needs at least 1" in round_.failure_reason
    assert set(round_.tasks.values_list("state", flat=True)) == {"dropped"}
    for site, _ in sites.values():
        assert _balance(federation, site).remaining == 2
