"""The coordinator's privacy accounting, in one place (DESIGN section 6).

- epsilons and deltas people type, parsed;
- what a round costs: its DP event (``protocol.round_event``) and that event's epsilon;
- who may take part in a round (the launch and its preview ask the same question here);
- balances: a site's epsilon at its budget's delta over its committed and reserved events,
  composed by the accountant (``sitesagent.accountant``), never summed by hand;
- the composition figures the audit pages show.

Balances are derived from the append-only ledger every time; nothing here writes.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from coordinator.errors import InvalidInput
from coordinator.models import (
    EPSILON_QUANTUM,
    LedgerEntry,
    LedgerKind,
    Membership,
    MembershipStatus,
    Round,
    Site,
)
from sitesagent import accountant, protocol

ZERO = Decimal(0)
INFINITE = Decimal("Infinity")


# --- numbers from people -------------------------------------------------------------------------


def epsilon_from_input(name: str, value: Any, *, allow_zero: bool = False) -> Decimal:
    """A budget or epsilon as an exact decimal, refusing negative, NaN, infinite or malformed values."""
    try:
        number = protocol.positive_finite(name, value, allow_zero=allow_zero)
    except protocol.ProtocolError as error:
        raise InvalidInput(str(error)) from None
    try:
        return Decimal(repr(number)).quantize(EPSILON_QUANTUM, rounding=ROUND_CEILING)
    except InvalidOperation:
        raise InvalidInput(f"{name} is too large: {value!r}") from None


def delta_from_input(name: str, value: Any) -> float:
    """A budget's delta: zero (pure DP) or a probability below 1."""
    try:
        delta = protocol.positive_finite(name, value, allow_zero=True)
    except protocol.ProtocolError as error:
        raise InvalidInput(str(error)) from None
    if delta >= 1:
        raise InvalidInput(f"{name} must be below 1 (a probability), not {delta}")
    return delta


def as_decimal(epsilon: float) -> Decimal:
    """An accountant's figure as a decimal for the ledger's columns, rounded up (never under-stated)."""
    if math.isinf(epsilon):
        return INFINITE
    return Decimal(repr(epsilon)).quantize(EPSILON_QUANTUM, rounding=ROUND_CEILING)


# --- what a round costs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundCost:
    """A round's mechanism, its parameters as the agents apply them, and its DP event per site."""

    mechanism: str
    params: dict[str, Any]
    event: dict[str, Any] | None  # None: no formal guarantee

    @property
    def has_guarantee(self) -> bool:
        return self.event is not None

    def epsilon_at(self, delta: float) -> Decimal | None:
        """This round alone, at ``delta``; None without a formal guarantee."""
        if self.event is None:
            return None
        return as_decimal(_composed(((_key(self.event), 1),), delta))


def round_cost(mechanism: str, params: Any) -> RoundCost:
    """The checked parameters and DP event of one round, or InvalidInput naming the bad value."""
    try:
        clean = protocol.validate_mechanism(mechanism, params)
        return RoundCost(mechanism, clean, protocol.round_event(mechanism, clean))
    except protocol.ProtocolError as error:
        raise InvalidInput(str(error)) from None


# --- balances --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Balance:
    """A site's standing in one federation, at its budget's delta.

    ``committed`` is the accountant's epsilon over the committed events; ``reserved`` is what
    the open reservations add on top of it (the accountant's epsilon over both, less
    ``committed``), so that committed + reserved + remaining = budget, as the pages draw it.
    """

    budget: Decimal
    delta: float
    committed: Decimal
    reserved: Decimal
    unprotected_rounds: int
    events: tuple[tuple[tuple, int], ...] = ()  # committed and open reserved events, with counts

    @property
    def remaining(self) -> Decimal:
        return self.budget - self.committed - self.reserved

    def after(self, event: dict[str, Any] | None, rounds: int = 1) -> Decimal:
        """The accountant's epsilon once ``rounds`` more rounds of ``event`` are added."""
        held = self.committed + self.reserved
        if event is None or rounds == 0:
            return held
        counts = dict(self.events)
        counts[_key(event)] = counts.get(_key(event), 0) + rounds
        return as_decimal(_composed(tuple(sorted(counts.items())), self.delta))

    def fits(self, event: dict[str, Any] | None) -> bool:
        return event is None or self.after(event) <= self.budget

    def rounds_left(self, event: dict[str, Any] | None, most: int = 10_000) -> int | None:
        """How many more rounds of ``event`` the budget allows (None: no limit, no guarantee)."""
        if event is None:
            return None
        history = [dict(key) for key, count in self.events for _ in range(count)]
        return accountant.rounds_within(
            history, event, delta=self.delta, budget=float(self.budget), most=most
        )

    def as_dict(self) -> dict:
        return {
            "budget": str(self.budget),
            "delta": self.delta,
            "committed": str(self.committed),
            "reserved": str(self.reserved),
            "remaining": str(self.remaining),
            "unprotected_rounds": self.unprotected_rounds,
        }


def balance_from_entries(budget: Decimal, delta: float, entries: Iterable[LedgerEntry]) -> Balance:
    """The balance after ``entries`` (one membership's, in order)."""
    committed: dict[tuple, int] = defaultdict(int)
    reserved: dict[int, tuple] = {}  # round id -> event, while its reservation is open
    unprotected = 0
    for entry in entries:
        if entry.dp_event is None:
            unprotected += entry.kind == LedgerKind.COMMIT
            continue
        key = _key(entry.dp_event)
        if entry.kind == LedgerKind.RESERVE:
            reserved[entry.round_id] = key
        else:
            reserved.pop(entry.round_id, None)
            if entry.kind == LedgerKind.COMMIT:
                committed[key] += 1
    held = dict(committed)
    for key in reserved.values():
        held[key] = held.get(key, 0) + 1
    committed_epsilon = as_decimal(_composed(tuple(sorted(committed.items())), delta))
    held_epsilon = as_decimal(_composed(tuple(sorted(held.items())), delta))
    return Balance(
        budget=budget,
        delta=delta,
        committed=committed_epsilon,
        reserved=held_epsilon - committed_epsilon
        if committed_epsilon.is_finite() and held_epsilon.is_finite()
        else INFINITE,
        unprotected_rounds=unprotected,
        events=tuple(sorted(held.items())),
    )


def membership_balance(membership: Membership) -> Balance:
    return balance_from_entries(membership.budget_epsilon, membership.budget_delta, membership.ledger.all())


def balances_for(memberships: Iterable[Membership]) -> dict[int, Balance]:
    """Balances of several memberships in one ledger query, keyed by membership id."""
    memberships = list(memberships)
    entries: dict[int, list[LedgerEntry]] = defaultdict(list)
    for entry in LedgerEntry.objects.filter(membership__in=memberships).order_by("id"):
        entries[entry.membership_id].append(entry)
    return {m.pk: balance_from_entries(m.budget_epsilon, m.budget_delta, entries[m.pk]) for m in memberships}


def ledger_with_balances(entries: Iterable[LedgerEntry], memberships: Iterable[Membership]) -> list[dict]:
    """Ledger rows in order, each with its membership's balance right after it.

    Balances use today's budgets: they show what remains under the budget as it stands.
    """
    by_id = {m.pk: m for m in memberships}
    so_far: dict[int, list[LedgerEntry]] = defaultdict(list)
    rows = []
    for entry in entries:
        membership = by_id[entry.membership_id]
        so_far[entry.membership_id].append(entry)
        balance = balance_from_entries(
            membership.budget_epsilon, membership.budget_delta, so_far[entry.membership_id]
        )
        rows.append({"entry": entry, "balance": balance})
    return rows


def open_reservations(round_: Round) -> list[LedgerEntry]:
    """Reservations of ``round_`` that were neither committed nor released yet."""
    entries = list(round_.ledger.select_related("membership"))
    ended = {e.membership_id for e in entries if e.kind != LedgerKind.RESERVE}
    return [e for e in entries if e.kind == LedgerKind.RESERVE and e.membership_id not in ended]


def _key(event: dict[str, Any]) -> tuple:
    """An event as a hashable, canonical key (and back with ``dict(key)``)."""
    return tuple(sorted(accountant.DpEvent.from_dict(event).to_dict().items()))


@functools.lru_cache(maxsize=4096)
def _composed(counted_keys: tuple[tuple[tuple, int], ...], delta: float) -> float:
    """The accountant's epsilon over events given as (key, count); cached, as pages ask often."""
    events = [dict(key) for key, count in counted_keys for _ in range(count)]
    return accountant.composed_epsilon(events, delta)


# --- who takes part ----------------------------------------------------------------------------------


def participation_refusal(
    membership: Membership | None, site: Site, cost: RoundCost, balance: Balance | None
) -> str | None:
    """Why ``site`` cannot take part in a round of ``cost``, or None when it can.

    The launch leaves such a site out with this reason, and the preview shows the same reason.
    """
    if membership is None:
        return f"{site} is not a member of this federation"
    if membership.status == MembershipStatus.INVITED:
        return f"{site} has not accepted the invitation to this federation"
    if membership.status == MembershipStatus.LEFT:
        return f"{site} left this federation"
    if site.is_revoked:
        return f"{site}'s token is revoked"
    if not cost.has_guarantee:
        if membership.allows_unprotected_sharing:
            return None
        return f"{site} does not allow unprotected sharing ({cost.mechanism} has no formal guarantee)"
    assert balance is not None  # a member always has one
    after = balance.after(cost.event)
    if not after.is_finite():
        return (
            f"{site}'s budget is stated at delta {balance.delta:g}, at which {cost.mechanism} has no "
            "finite epsilon: give the budget a delta above zero"
        )
    if after > balance.budget:
        return (
            f"{site} has {show(balance.remaining)} epsilon left of {show(balance.budget)} at delta "
            f"{balance.delta:g}; this round would take it to {show(after)}"
        )
    return None


def show(epsilon: Decimal | float | None) -> str:
    """An epsilon for people: four significant decimals, "infinite", or "no formal guarantee"."""
    if epsilon is None:
        return "no formal guarantee"
    number = float(epsilon)
    if math.isinf(number):
        return "infinite"
    if number >= 1e15:
        return f"{number:.3e}"
    return f"{number:,.4f}".rstrip("0").rstrip(".")


# --- the audit pages' figures ------------------------------------------------------------------------


@dataclass(frozen=True)
class CompositionFigures:
    """What a site's committed rounds add up to, for the privacy audit page."""

    rounds: int
    unprotected_rounds: int
    delta: float
    accountant_epsilon: float  # what is enforced
    plain_sum: float | None  # the sum of the rounds' own epsilons, for comparison (pure rounds only)

    @property
    def has_formal_guarantee(self) -> bool:
        return self.unprotected_rounds == 0


def composition_figures(events: Sequence[dict[str, Any] | None], delta: float) -> CompositionFigures:
    """The committed events of one site (None: a round with no guarantee) composed at ``delta``."""
    protected = [event for event in events if event is not None]
    counts: dict[tuple, int] = defaultdict(int)
    for event in protected:
        counts[_key(event)] += 1
    pure = all(event.get("kind") == protocol.EVENT_PURE for event in protected)
    return CompositionFigures(
        rounds=len(protected),
        unprotected_rounds=len(events) - len(protected),
        delta=delta,
        accountant_epsilon=_composed(tuple(sorted(counts.items())), delta),
        plain_sum=math.fsum(float(event["epsilon"]) for event in protected) if pure else None,
    )
