"""Tighter bounds on a site's total epsilon than the plain sum, shown for information only.

What the coordinator enforces is basic sequential composition: a site's spend is the sum of its
per-round epsilons (pure DP, delta = 0). Allowing a small delta gives smaller numbers; the audit
pages show them next to the enforced sum, labelled as informational, with delta stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# The delta the audit pages state for the informational bounds.
DEFAULT_DELTA = 1e-5


def basic_composition(epsilons: Sequence[float]) -> float:
    """Pure epsilon-DP rounds compose by adding up: the bound that is enforced."""
    return float(sum(epsilons))


def advanced_composition(epsilons: Sequence[float], delta: float) -> float:
    """(eps', delta)-DP after the rounds (Dwork, Rothblum and Vadhan 2010).

    For k rounds of the same eps this is sqrt(2 k ln(1/delta)) eps + k eps (e^eps - 1); rounds of
    different eps_i generalise it to sqrt(2 ln(1/delta) sum eps_i^2) + sum eps_i (e^eps_i - 1).
    """
    _check_delta(delta)
    if not epsilons:
        return 0.0
    squares = sum(eps * eps for eps in epsilons)
    return math.sqrt(2 * squares * math.log(1 / delta)) + sum(eps * math.expm1(eps) for eps in epsilons)


def zcdp_composition(epsilons: Sequence[float], delta: float) -> float:
    """(eps', delta)-DP through zero-concentrated DP (Bun and Steinke 2016).

    Pure eps-DP implies (eps^2 / 2)-zCDP, zCDP adds up over rounds (rho = sum eps_i^2 / 2), and
    rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP.
    """
    _check_delta(delta)
    rho = sum(eps * eps for eps in epsilons) / 2
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1, not {delta}")


@dataclass(frozen=True)
class CompositionBounds:
    rounds: int
    unprotected_rounds: int
    basic: float
    advanced: float
    zcdp: float
    delta: float

    @property
    def tightest(self) -> float:
        return min(self.basic, self.advanced, self.zcdp)

    @property
    def has_formal_guarantee(self) -> bool:
        return self.unprotected_rounds == 0


def bounds_for(epsilons: Sequence[float | None], delta: float = DEFAULT_DELTA) -> CompositionBounds:
    """All three bounds over a site's committed rounds; None marks a round with no guarantee."""
    protected = [float(eps) for eps in epsilons if eps is not None]
    return CompositionBounds(
        rounds=len(protected),
        unprotected_rounds=len(epsilons) - len(protected),
        basic=basic_composition(protected),
        advanced=advanced_composition(protected, delta),
        zcdp=zcdp_composition(protected, delta),
        delta=delta,
    )
