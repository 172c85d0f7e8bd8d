"""Reads that several views, the API and the services share. Balances come from the ledger."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal

from coordinator.models import LedgerEntry, LedgerKind, Membership, Round, RoundState, Task, TaskState

ZERO = Decimal(0)


@dataclass(frozen=True)
class Balance:
    budget: Decimal
    committed: Decimal
    reserved: Decimal
    unprotected_rounds: int

    @property
    def remaining(self) -> Decimal:
        return self.budget - self.committed - self.reserved

    def as_dict(self) -> dict:
        return {
            "budget": str(self.budget),
            "committed": str(self.committed),
            "reserved": str(self.reserved),
            "remaining": str(self.remaining),
            "unprotected_rounds": self.unprotected_rounds,
        }


def apply_entry(balance: Balance, entry: LedgerEntry) -> Balance:
    """The balance after one more ledger entry: each reservation is later committed or released."""
    if entry.epsilon is None:
        unprotected = balance.unprotected_rounds + (entry.kind == LedgerKind.COMMIT)
        return replace(balance, unprotected_rounds=unprotected)
    if entry.kind == LedgerKind.RESERVE:
        return replace(balance, reserved=balance.reserved + entry.epsilon)
    if entry.kind == LedgerKind.COMMIT:
        return replace(
            balance, reserved=balance.reserved - entry.epsilon, committed=balance.committed + entry.epsilon
        )
    return replace(balance, reserved=balance.reserved - entry.epsilon)


def balance_from_entries(budget: Decimal, entries: Iterable[LedgerEntry]) -> Balance:
    balance = Balance(budget, ZERO, ZERO, 0)
    for entry in entries:
        balance = apply_entry(balance, entry)
    return balance


def membership_balance(membership: Membership) -> Balance:
    return balance_from_entries(membership.budget_epsilon, membership.ledger.all())


def balances_for(memberships: Iterable[Membership]) -> dict[int, Balance]:
    """Balances of several memberships in one ledger query, keyed by membership id."""
    memberships = list(memberships)
    entries: dict[int, list[LedgerEntry]] = defaultdict(list)
    for entry in LedgerEntry.objects.filter(membership__in=memberships):
        entries[entry.membership_id].append(entry)
    return {m.pk: balance_from_entries(m.budget_epsilon, entries[m.pk]) for m in memberships}


def ledger_with_balances(entries: Iterable[LedgerEntry], budgets: dict[int, Decimal]) -> list[dict]:
    """Ledger rows in order, each with its membership's balance right after it.

    ``budgets`` are the current budgets: the balance shows what remains under today's budget.
    """
    running: dict[int, Balance] = {}
    rows = []
    for entry in entries:
        before = running.get(entry.membership_id) or Balance(budgets[entry.membership_id], ZERO, ZERO, 0)
        running[entry.membership_id] = after = apply_entry(before, entry)
        rows.append({"entry": entry, "balance": after})
    return rows


def open_reservations(round_: Round) -> list[LedgerEntry]:
    """Reservations of ``round_`` that were neither committed nor released yet."""
    entries = list(round_.ledger.all())
    ended = {e.membership_id for e in entries if e.kind != LedgerKind.RESERVE}
    return [e for e in entries if e.kind == LedgerKind.RESERVE and e.membership_id not in ended]


def next_task_for(site_id: int) -> Task | None:
    """The oldest task of this site that still waits for work, in an open round."""
    return (
        Task.objects.filter(
            site_id=site_id,
            state__in=[TaskState.ASSIGNED, TaskState.EVALUATING, TaskState.TRAINING],
            round__state__in=[RoundState.RESERVED, RoundState.TRAINING],
        )
        .select_related("round", "round__base_version", "round__federation")
        .order_by("round__launched_at", "id")
        .first()
    )


def federated_dice(round_: Round) -> dict[str, float]:
    """The sites' Dice of the round's base model, averaged weighted by each site's validation cases.

    Agents evaluate the base model on their own validation cases before training (DESIGN 5.2)
    and report dice_et, dice_wt, dice_tc and dice_mean; the latest report per site counts.
    """
    from coordinator.models import MetricPoint
    from sitesagent.protocol import METRIC_DICE

    latest: dict[tuple[int, str], float] = {}
    weights: dict[int, float] = {}
    points = (
        MetricPoint.objects.filter(round=round_, name__in=METRIC_DICE).select_related("site").order_by("id")
    )
    for point in points:
        latest[(point.site_id, point.name)] = point.value
        weights[point.site_id] = float(point.site.agent_info.get("validation_cases") or 1)
    result = {}
    for name in METRIC_DICE:
        values = [(value, weights[site]) for (site, metric), value in latest.items() if metric == name]
        if values:
            result[name] = sum(v * w for v, w in values) / sum(w for _, w in values)
    return result
