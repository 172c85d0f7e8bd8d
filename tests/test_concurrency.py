"""Concurrent launches never overspend: real threads, separate database connections.

On PostgreSQL the launch locks the federation row (SELECT ... FOR UPDATE); on SQLite every
transaction begins IMMEDIATE. Either way a second launch reads balances only after the first
committed.
"""

import threading
from decimal import Decimal

import pytest
from django.db import connection

from coordinator import accounting, services
from coordinator.errors import LaunchRefused
from coordinator.models import Federation, LedgerEntry, LedgerKind, Membership

from .conftest import SVT_PARAMS, join


def _launch_concurrently(
    federation_id: int, user, count: int, params: dict, mechanism: str = "svt"
) -> list[str]:
    barrier = threading.Barrier(count)
    outcomes: list[str] = []

    def launch():
        try:
            barrier.wait(timeout=30)
            federation = Federation.objects.get(pk=federation_id)
            services.round_launch(
                federation=federation, launched_by=user, mechanism=mechanism, mechanism_params=params
            )
            outcomes.append("launched")
        except LaunchRefused:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=launch) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


@pytest.mark.django_db(transaction=True)
def test_two_launches_that_together_exceed_the_budget_reserve_once(alice, federation, sites):
    # Each launch costs 1.5 of a 2.0 budget: together they would overspend.
    params = {**SVT_PARAMS, "eps_release": 1.0}
    outcomes = _launch_concurrently(federation.pk, alice, 2, params)
    assert sorted(outcomes) == ["launched", "refused"]
    for site, _ in sites.values():
        assert LedgerEntry.objects.filter(membership__site=site, kind=LedgerKind.RESERVE).count() == 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_launches_never_pass_the_budget(alice, federation, sites):
    params = {**SVT_PARAMS, "eps_threshold": 0.05, "eps_query": 0.15, "eps_release": 0.1}  # 0.3 each
    outcomes = _launch_concurrently(federation.pk, alice, 20, params)
    assert outcomes.count("launched") == 6 and outcomes.count("refused") == 14  # 6 * 0.3 <= 2 < 7 * 0.3
    for membership in Membership.objects.filter(federation=federation):
        balance = accounting.membership_balance(membership)
        assert balance.reserved + balance.committed <= membership.budget_epsilon
        assert balance.reserved == Decimal("1.8")


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_dpsgd_launches_never_pass_the_accountants_budget(alice):
    from sitesagent import accountant, protocol

    from .conftest import TINY_MODEL

    params = {
        "noise_multiplier": 1.5,
        "max_grad_norm": 1.0,
        "sample_rate": 0.25,
        "steps": 8,
        "crops_per_case": 1,
    }
    federation = services.federation_create(
        name="DP-SGD study", created_by=alice, model_config=TINY_MODEL, budget_delta=1e-5,
        default_mechanism="dpsgd", default_mechanism_params=params,
    )  # fmt: skip
    event = protocol.round_event("dpsgd", params)
    affordable = accountant.rounds_within([], event, delta=1e-5, budget=8)
    assert 1 < affordable < 20
    for label in "AB":
        site, _ = services.site_register(name=f"DP hospital {label}", registered_by=alice)
        join(federation, site, budget=8, added_by=alice, accepted_by=alice)
    outcomes = _launch_concurrently(federation.pk, alice, 20, params, mechanism="dpsgd")
    assert outcomes.count("launched") == affordable and outcomes.count("refused") == 20 - affordable
    for membership in Membership.objects.filter(federation=federation):
        balance = accounting.membership_balance(membership)
        assert balance.committed + balance.reserved <= membership.budget_epsilon
