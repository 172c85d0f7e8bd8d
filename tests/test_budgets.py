"""Budgets: set through the API, refused when they make no sense, audited with a reason."""

from decimal import Decimal

import pytest

from coordinator.models import AuditEvent, LedgerEntry, Membership


def _membership(federation, site):
    return Membership.objects.get(federation=federation, site=site)


@pytest.mark.parametrize(
    ("budget_json", "words"),
    [
        ("-1", "greater than zero"),
        ("0", "greater than zero"),
        ('"NaN"', "budget must be a number, not NaN"),
        ('"Infinity"', "budget must be finite"),
        ('"1e400"', "budget must be finite"),
        # Bare NaN and infinities are not JSON at all: the parser refuses the whole body.
        ("NaN", "not JSON compliant"),
        ("Infinity", "not JSON compliant"),
        ("1e400", "budget: Value must be valid JSON"),
        ('"lots"', "number"),
        ("null", "may not be null"),
    ],
)
def test_bad_budgets_are_refused_and_nothing_changes(
    client_for, alice, federation, sites, budget_json, words
):
    membership = _membership(federation, sites["A"][0])
    body = f'{{"budget": {budget_json}, "reason": "typo"}}'
    response = client_for(alice).generic(
        "PATCH", f"/api/memberships/{membership.pk}/", body, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]
    assert _membership(federation, sites["A"][0]).budget_epsilon == Decimal(2)


def test_adding_a_site_with_a_bad_budget_is_refused(client_for, alice, federation):
    from coordinator import services

    site, _ = services.site_register(name="Hospital C", registered_by=alice)
    response = client_for(alice).post(
        f"/api/federations/{federation.pk}/memberships/",
        {"site": site.pk, "budget": -3, "reason": "joins"},
        format="json",
    )
    assert response.status_code == 400
    assert "budget must be greater than zero" in response.json()["error"]
    assert not Membership.objects.filter(site=site).exists()


def test_budget_change_is_audited_with_its_reason(client_for, alice, federation, sites):
    membership = _membership(federation, sites["A"][0])
    response = client_for(alice).patch(
        f"/api/memberships/{membership.pk}/",
        {"budget": 5, "reason": "ethics board approved more"},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["balance"]["remaining"] == "5.000000000000"
    event = AuditEvent.objects.get(action="budget.changed")
    assert event.actor == alice and event.reason == "ethics board approved more"
    assert event.details["old"] == "2.000000000000" and event.details["new"] == "5.000000000000"


def test_budget_change_needs_a_reason(client_for, alice, federation, sites):
    membership = _membership(federation, sites["A"][0])
    response = client_for(alice).patch(
        f"/api/memberships/{membership.pk}/", {"budget": 5, "reason": " "}, format="json"
    )
    assert response.status_code == 400


def test_budget_never_goes_below_what_is_committed(client_for, alice, federation, sites):
    from coordinator import services
    from coordinator.models import LedgerKind

    membership = _membership(federation, sites["A"][0])
    round_ = services.round_launch(federation=federation, launched_by=alice, site_ids=[sites["A"][0].pk])
    reservation = LedgerEntry.objects.get(round=round_, kind=LedgerKind.RESERVE)
    LedgerEntry.objects.create(
        membership=membership,
        round=round_,
        kind=LedgerKind.COMMIT,
        epsilon=reservation.epsilon,
        mechanism="svt",
    )
    response = client_for(alice).patch(
        f"/api/memberships/{membership.pk}/", {"budget": 0.5, "reason": "cut"}, format="json"
    )
    assert response.status_code == 400
    assert "already spent" in response.json()["error"]
    assert _membership(federation, sites["A"][0]).budget_epsilon == Decimal(2)


def test_site_admin_may_lower_but_never_raise_the_budget(client_for, bob, federation, sites):
    membership = _membership(federation, sites["A"][0])
    lowered = client_for(bob).patch(
        f"/api/memberships/{membership.pk}/", {"budget": 1, "reason": "our DPO"}, format="json"
    )
    assert lowered.status_code == 200
    raised = client_for(bob).patch(
        f"/api/memberships/{membership.pk}/", {"budget": 3, "reason": "more"}, format="json"
    )
    assert raised.status_code == 403
    assert "never raise" in raised.json()["error"]
    assert _membership(federation, sites["A"][0]).budget_epsilon == Decimal(1)


def test_ledger_rows_cannot_be_changed_or_deleted(alice, federation, sites):
    from coordinator import services

    round_ = services.round_launch(federation=federation, launched_by=alice)
    entry = LedgerEntry.objects.filter(round=round_).first()
    entry.epsilon = Decimal(0)
    with pytest.raises(TypeError, match="append-only"):
        entry.save()
    with pytest.raises(TypeError, match="append-only"):
        entry.delete()
    with pytest.raises(TypeError, match="append-only"):
        LedgerEntry.objects.filter(round=round_).update(epsilon=0)
    with pytest.raises(TypeError, match="append-only"):
        AuditEvent.objects.all().delete()
