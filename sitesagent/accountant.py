"""The privacy accountant both sides use: a site's epsilon over its DP events, at a delta.

The coordinator enforces budgets with it and the agent enforces its own cap with it, over the
same events (``protocol.round_event``), so the two figures are the same number. The arithmetic is
dp-accounting's (Google's accounting library), privacy loss distributions (PLD):

- DP-SGD steps: ``from_gaussian_mechanism(noise_multiplier, sampling_prob=sample_rate)``, the
  Poisson-sampled Gaussian mechanism under add-or-remove-one neighbours (one patient's case in
  or out), self-composed ``steps`` times;
- a pure epsilon-DP release (one SVT round): ``from_privacy_parameters(epsilon, 0)``, the worst
  case PLD of any epsilon-DP mechanism;
- the PLDs composed and read off with ``get_epsilon_for_delta(delta)``.

PLD was chosen over RDP because it is the tightest of the library's accountants for both kinds
of event (600 rounds of pure epsilon 0.1 give 12.8 at delta 1e-5; RDP's conversion gives more),
and, unlike Opacus's PRV accountant, it composes pure-DP events too. Its estimates are
pessimistic: rounding only ever over-states epsilon.

Two exact rules sit beside the library, because its discretised PLDs cannot express them:

- at delta 0, pure events compose to the plain sum of their epsilons (basic composition, which
  is tight for pure DP at delta 0), and any Gaussian event makes epsilon infinite;
- a pure event above ``PURE_PLD_LIMIT`` is added to the library's figure instead of composed
  with it (basic composition again: valid for any mix of events). The library cannot build a
  PLD for it (e^epsilon overflows past 709), and composing such an event gains nothing visible.

An auditor recomputes a figure with ``composed_epsilon`` and this docstring, or with the
library's calls above directly; the tests check both agree.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import metadata
from typing import Any

from sitesagent.protocol import EVENT_POISSON_GAUSSIAN, EVENT_PURE, ProtocolError, positive_finite

# The PLD's grid of privacy-loss values. 1e-3 keeps a figure within about 1e-4 of the library's
# finer default (1e-4) at a tenth of the time; pessimistic rounding keeps it an upper bound.
DISCRETIZATION = 1e-3
PURE_PLD_LIMIT = 20.0


def accountant_name() -> str:
    """What the pages print as the accountant: library, version and method."""
    return (
        f"dp-accounting {metadata.version('dp-accounting')}, privacy loss distributions "
        f"(pessimistic, discretisation {DISCRETIZATION:g})"
    )


@dataclass(frozen=True)
class DpEvent:
    """One round's DP event for one site, as ``protocol.round_event`` describes it."""

    kind: str
    epsilon: float = 0.0  # pure events
    sample_rate: float = 0.0  # Poisson-sampled Gaussian events
    noise_multiplier: float = 0.0
    steps: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DpEvent:
        """An event from its JSON form, checked; ProtocolError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ProtocolError(f"a DP event must be an object, not {data!r}")
        kind = data.get("kind")
        if kind == EVENT_PURE:
            _only(data, {"kind", "epsilon"})
            return cls(kind=kind, epsilon=positive_finite("epsilon", data.get("epsilon")))
        if kind == EVENT_POISSON_GAUSSIAN:
            _only(data, {"kind", "sample_rate", "noise_multiplier", "steps"})
            sample_rate = positive_finite("sample_rate", data.get("sample_rate"))
            if sample_rate > 1:
                raise ProtocolError(f"sample_rate must be at most 1, not {sample_rate}")
            steps = data.get("steps")
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ProtocolError(f"steps must be a whole number of at least 1, not {steps!r}")
            return cls(
                kind=kind,
                sample_rate=sample_rate,
                noise_multiplier=positive_finite("noise_multiplier", data.get("noise_multiplier")),
                steps=steps,
            )
        raise ProtocolError(
            f"a DP event's kind must be {EVENT_PURE} or {EVENT_POISSON_GAUSSIAN}, not {kind!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        if self.kind == EVENT_PURE:
            return {"kind": self.kind, "epsilon": self.epsilon}
        return {
            "kind": self.kind,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }

    @property
    def is_pure(self) -> bool:
        return self.kind == EVENT_PURE


def _only(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProtocolError(f"a {data.get('kind')} DP event has no field {', '.join(map(str, unknown))}")


def events_from(raw: Iterable[Mapping[str, Any] | DpEvent]) -> list[DpEvent]:
    return [event if isinstance(event, DpEvent) else DpEvent.from_dict(event) for event in raw]


def composed_epsilon(events: Iterable[Mapping[str, Any] | DpEvent], delta: float) -> float:
    """The epsilon of all ``events`` composed, at ``delta``: what a site has spent.

    Identical events are self-composed once (a federation's rounds mostly share parameters), so
    the cost grows with the number of distinct events, not with the number of rounds.
    """
    delta = _checked_delta(delta)
    counts = Counter(events_from(events))
    if not counts:
        return 0.0
    if delta == 0:
        if any(not event.is_pure for event in counts):
            return math.inf
        # In decimal, as the epsilons were written: six rounds of 0.3 are 1.8, not 1.7999999999999998.
        return float(sum((Decimal(repr(event.epsilon)) * n for event, n in counts.items()), Decimal(0)))
    added = math.fsum(
        event.epsilon * n for event, n in counts.items() if event.is_pure and event.epsilon > PURE_PLD_LIMIT
    )
    composed = [
        (event, n) for event, n in counts.items() if not (event.is_pure and event.epsilon > PURE_PLD_LIMIT)
    ]
    if not composed:
        return added
    pld = _self_composed(*composed[0])
    for event, n in composed[1:]:
        pld = pld.compose(_self_composed(event, n))
    return added + float(pld.get_epsilon_for_delta(delta))


def event_epsilon(event: Mapping[str, Any] | DpEvent, delta: float) -> float:
    """One event's own epsilon at ``delta`` (what one round costs, alone)."""
    return composed_epsilon([event], delta)


def rounds_within(
    events: Iterable[Mapping[str, Any] | DpEvent],
    event: Mapping[str, Any] | DpEvent,
    *,
    delta: float,
    budget: float,
    most: int = 10_000,
) -> int:
    """How many more rounds of ``event`` fit in ``budget`` after ``events`` (at most ``most``)."""
    history = events_from(events)
    (new,) = events_from([event])

    def fits(n: int) -> bool:
        return composed_epsilon([*history, *([new] * n)], delta) <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= most and fits(high):
        low, high = high, high * 2
    high = min(high, most + 1)
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _checked_delta(delta: Any) -> float:
    delta = positive_finite("delta", delta, allow_zero=True)
    if delta >= 1:
        raise ProtocolError(f"delta must be below 1, not {delta}")
    return delta


@functools.lru_cache(maxsize=256)
def _self_composed(event: DpEvent, count: int):
    from dp_accounting.pld import common, privacy_loss_distribution

    if event.is_pure:
        one = privacy_loss_distribution.from_privacy_parameters(
            common.DifferentialPrivacyParameters(event.epsilon, 0.0),
            value_discretization_interval=DISCRETIZATION,
        )
        return one.self_compose(count)
    one = privacy_loss_distribution.from_gaussian_mechanism(
        event.noise_multiplier,
        sampling_prob=event.sample_rate,
        value_discretization_interval=DISCRETIZATION,
    )
    return one.self_compose(event.steps * count)
