"""What a round would cost and what would survive of the updates, before it is launched.

Pure arithmetic on the mechanism's parameters (DESIGN section 6), shown per site on the launch
page and returned by the preview API. The utility estimate is an upper bound: it assumes every
released coordinate sits at the clip bound gamma, the strongest signal the mechanism lets through.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from coordinator import selectors, services
from coordinator.errors import InvalidInput
from coordinator.models import Federation, MembershipStatus
from sitesagent import protocol

# A per-round epsilon above this bounds an adversary's odds ratio by more than e^10 (22,000):
# formally a guarantee, practically none.
WEAK_EPSILON = 10.0
# Below this expected cosine similarity, the released update is mostly noise.
MOSTLY_NOISE_COSINE = 0.5


def mechanism_summary(mechanism: str, params: dict[str, Any], n_parameters: int) -> dict[str, Any]:
    """Cost, noise scales, share released, and an upper bound on how much signal survives."""
    epsilon = protocol.round_epsilon(mechanism, params)
    summary: dict[str, Any] = {
        "mechanism": mechanism,
        "epsilon": epsilon,
        "n_parameters": n_parameters,
        "warnings": [],
    }
    if mechanism == protocol.MECHANISM_NONE:
        summary.update(share_released=1.0, coordinates_released=n_parameters, cosine_upper_bound=1.0)
        summary["warnings"].append(
            "No formal guarantee: the full update is shared with no protection at all."
        )
        return summary
    c = protocol.selection_count(float(params["fraction"]), n_parameters)
    summary.update(share_released=c / n_parameters, coordinates_released=c, gamma=float(params["gamma"]))
    if mechanism == protocol.MECHANISM_PARTIAL:
        summary["cosine_upper_bound"] = 1.0
        summary["warnings"].append(
            "No formal guarantee: partial sharing adds no noise, so the shared values are the true "
            "(clipped) update values."
        )
        return summary
    scales = protocol.svt_noise_scales(params, n_parameters)
    gamma = float(params["gamma"])
    # Laplace(b) has variance 2 b^2; a released coordinate carries at most gamma of signal.
    noise_to_signal = 2 * scales["release"] ** 2 / gamma**2
    cosine = 1 / math.sqrt(1 + noise_to_signal)
    summary.update(
        noise_scales=scales,
        noise_over_gamma={name: scale / gamma for name, scale in scales.items()},
        cosine_upper_bound=cosine,
    )
    if epsilon is not None and epsilon > WEAK_EPSILON:
        summary["warnings"].append(
            f"A guarantee so weak it means little: epsilon {epsilon:g} per round lets an observer's "
            f"odds about any patient change by a factor of up to e^{epsilon:g}."
        )
    if cosine < MOSTLY_NOISE_COSINE:
        summary["warnings"].append(
            f"The update will be mostly noise: each released value gets Laplace noise of scale "
            f"{scales['release']:.3g} against a clip bound of {gamma:.3g}, so at best the released "
            f"update points {cosine:.2g} of the way along the true one (cosine similarity)."
        )
    return summary


def preview(
    *,
    federation: Federation,
    sites: list[int] | None = None,
    mechanism: str | None = None,
    mechanism_params: dict | None = None,
    **_ignored: Any,
) -> dict[str, Any]:
    """Per-site preview of a launch with these settings; nothing is written."""
    mechanism = mechanism or federation.default_mechanism
    params = mechanism_params if mechanism_params is not None else federation.default_mechanism_params
    version = federation.latest_version()
    try:
        summary = mechanism_summary(mechanism, params, version.n_parameters if version else 1)
    except protocol.ProtocolError as error:
        raise InvalidInput(str(error)) from None
    cost = services.round_cost(mechanism, params)
    memberships = list(federation.memberships.select_related("site"))
    if sites is not None:
        memberships = [m for m in memberships if m.site_id in set(sites)]
    else:
        memberships = [m for m in memberships if m.status != MembershipStatus.LEFT]
    balances = selectors.balances_for(m for m in memberships if m.is_active)
    rows = [_site_row(m, balances[m.pk], cost) if m.is_active else _left_out_row(m) for m in memberships]
    return {**summary, "sites": rows}


def _left_out_row(membership) -> dict[str, Any]:
    """A site that does not take part (invited, not yet accepted; or left): no arithmetic, a reason."""
    if membership.status == MembershipStatus.INVITED:
        reason = f"{membership.site.name} has not accepted the invitation to this federation"
    else:
        reason = f"{membership.site.name} left this federation"
    return {
        "site": membership.site_id,
        "name": membership.site.name,
        "left_out": reason,
        "epsilon": None,
        "remaining_before": None,
        "remaining_after": None,
        "budget": str(membership.budget_epsilon),
        "warnings": [f"{reason}: it will be left out."],
    }


def _site_row(membership, balance: selectors.Balance, cost: Decimal | None) -> dict[str, Any]:
    warnings = []
    if cost is None:
        if not membership.allows_unprotected_sharing:
            warnings.append("This site does not allow unprotected sharing: it will be left out.")
        after = balance.remaining
    else:
        after = balance.remaining - cost
        if after < 0:
            warnings.append(
                f"Budget insufficient: {balance.remaining.normalize()} left, the round costs "
                f"{cost.normalize()}. The site will be left out."
            )
    return {
        "site": membership.site_id,
        "name": membership.site.name,
        "epsilon": str(cost) if cost is not None else None,
        "remaining_before": str(balance.remaining),
        "remaining_after": str(after),
        "budget": str(balance.budget),
        "warnings": warnings,
    }
