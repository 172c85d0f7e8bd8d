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

from .conftest import SVT_PARAMS


def _launch_concurrently(federation_id: int, user, count: int, params: dict) -> list[str]:
    barrier = threading.Barrier(count)
    outcomes: list[str] = []

    def launch():
        try:
            barrier.wait(timeout=30)
            federation = Federation.objects.get(pk=federation_id)
            services.round_launch(
                federation=federation, launched_by=user, mechanism="svt", mechanism_params=params
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
