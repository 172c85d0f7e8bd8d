"""What a round would cost and what would survive of the updates, before it is launched.

Per site: the accountant's epsilon at the site's delta now, after this round and after the
series asked for, and how many such rounds its budget has left (coordinator.accounting). Per
mechanism: the noise against the largest signal it lets through, and a refusal (unless the
coordinator confirms) when that makes the update mostly noise.
"""

from __future__ import annotations

import math
from typing import Any

from coordinator import accounting
from coordinator.errors import InvalidInput, LaunchRefused
from coordinator.models import Federation, Membership, MembershipStatus
from sitesagent import protocol
from sitesagent.model import count_parameters, preset

# A per-round epsilon above this bounds an adversary's odds ratio by more than e^10 (22,000):
# formally a guarantee, practically none.
WEAK_EPSILON = 10.0
# Below this expected cosine similarity, the released update is mostly noise.
MOSTLY_NOISE_COSINE = 0.5
# The paper's and NVIDIA FLARE's SVT setting (fraction 0.9, epsilon_1 0.001 split 1 : (2c)^(2/3),
# release noise 2 gamma, so eps_release = c), shown at its full cost on the BraTS model.
PAPER_SVT_FRACTION = 0.9


def mechanism_summary(mechanism: str, params: dict[str, Any], n_parameters: int) -> dict[str, Any]:
    """Noise scales, share released, and an upper bound on how much signal survives."""
    spec = protocol.mechanism_spec(mechanism)
    summary: dict[str, Any] = {
        "mechanism": mechanism,
        "label": spec.label,
        "guarantee": spec.guarantee or "no formal guarantee",
        "epsilon": protocol.round_epsilon(mechanism, params),
        "n_parameters": n_parameters,
        "warnings": [],
        "mostly_noise": False,
    }
    if mechanism == protocol.MECHANISM_NONE:
        summary.update(share_released=1.0, coordinates_released=n_parameters, cosine_upper_bound=1.0)
        summary["warnings"].append(
            "No formal guarantee: the full update is shared with no protection at all."
        )
        return summary
    if mechanism == protocol.MECHANISM_DPSGD:
        summary.update(share_released=1.0, coordinates_released=n_parameters)
        return summary  # its noise depends on each site's case count: see _site_row
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
    cosine = 1 / math.sqrt(1 + 2 * scales["release"] ** 2 / gamma**2)
    summary.update(
        noise_scales=scales,
        noise_over_gamma={name: scale / gamma for name, scale in scales.items()},
        cosine_upper_bound=cosine,
    )
    epsilon = summary["epsilon"]
    if epsilon > WEAK_EPSILON:
        summary["warnings"].append(
            f"A guarantee so weak it means little: epsilon {accounting.show(epsilon)} per round lets an "
            f"observer's odds about a site's update change by a factor of up to e^{epsilon:g}."
        )
    if cosine < MOSTLY_NOISE_COSINE:
        summary["mostly_noise"] = True
        summary["warnings"].append(
            f"The update will be mostly noise: each released value gets Laplace noise of scale "
            f"{scales['release']:.3g} against a clip bound of {gamma:.3g}, so at best the released "
            f"update points {cosine:.2g} of the way along the true one (cosine similarity)."
        )
    return summary


def dpsgd_noise_over_signal(params: dict[str, Any], train_cases: int) -> float:
    """Per coordinate, the noise std on a step's averaged gradient, sigma * C / B with the expected
    batch B = q * N, over the largest signal a coordinate can carry, C."""
    expected_batch = float(params["sample_rate"]) * train_cases
    return math.inf if expected_batch <= 0 else float(params["noise_multiplier"]) / expected_batch


def preview(
    *,
    federation: Federation,
    sites: list[int] | None = None,
    mechanism: str | None = None,
    mechanism_params: dict | None = None,
    rounds: int = 1,
    **_ignored: Any,
) -> dict[str, Any]:
    """Per-site preview of a launch of ``rounds`` rounds with these settings; nothing is written."""
    mechanism = mechanism or federation.default_mechanism
    params = mechanism_params if mechanism_params is not None else federation.default_mechanism_params
    cost = accounting.round_cost(mechanism, params)
    version = federation.latest_version()
    summary = mechanism_summary(mechanism, cost.params, version.n_parameters if version else 1)
    memberships = list(federation.memberships.select_related("site"))
    if sites is not None:
        memberships = [m for m in memberships if m.site_id in set(sites)]
    else:
        memberships = [m for m in memberships if m.status != MembershipStatus.LEFT]
    balances = accounting.balances_for(m for m in memberships if m.is_active)
    rows = [
        _site_row(m, balances[m.pk], cost, max(1, rounds)) if m.is_active else _left_out_row(m)
        for m in memberships
    ]
    if mechanism == protocol.MECHANISM_DPSGD and any(row.get("mostly_noise") for row in rows):
        summary["mostly_noise"] = True
    if mechanism == protocol.MECHANISM_SVT:
        # For comparison, at its full cost: what the paper's setting would cost on this model.
        summary["paper_svt"] = paper_svt_setting(summary["n_parameters"])
    return {
        **summary,
        "rounds": max(1, rounds),
        "event": cost.event,
        "epsilon_at_federation_delta": _text(cost.epsilon_at(federation.budget_delta)),
        "delta": federation.budget_delta,
        "accountant": accounting.accountant.accountant_name(),
        "sites": rows,
    }


def _left_out_row(membership: Membership) -> dict[str, Any]:
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


def noise_refusal(preview_result: dict[str, Any]) -> str | None:
    """Why a launch with this preview needs the coordinator's confirmation, or None."""
    if not preview_result.get("mostly_noise"):
        return None
    reasons = " ".join(
        w for w in preview_result["warnings"] if w.startswith("The update will be mostly noise")
    ) or "; ".join(
        f"{row['name']}: {w}"
        for row in preview_result["sites"]
        for w in row["warnings"]
        if "mostly noise" in w
    )
    return f"{reasons} Launch again with confirm_noise to go ahead anyway."


def check_noise(*, federation: Federation, confirm_noise: bool, **launch: Any) -> None:
    """Refuse a launch whose updates would be mostly noise, unless the coordinator confirmed it."""
    if confirm_noise:
        return
    try:
        reason = noise_refusal(preview(federation=federation, **launch))
    except protocol.ProtocolError as error:
        raise InvalidInput(str(error)) from None
    if reason:
        raise LaunchRefused(reason, details={"needs": "confirm_noise"})


def _site_row(
    membership: Membership, balance: accounting.Balance, cost: accounting.RoundCost, rounds: int
) -> dict[str, Any]:
    refusal = accounting.participation_refusal(membership, membership.site, cost, balance)
    warnings = [f"{refusal}: it will be left out."] if refusal else []
    row: dict[str, Any] = {
        "site": membership.site_id,
        "name": membership.site.name,
        "delta": balance.delta,
        "budget": str(balance.budget),
        "epsilon": _text(cost.epsilon_at(balance.delta)),
        "spent_before": str(balance.committed + balance.reserved),
        "remaining_before": str(balance.remaining),
        "warnings": warnings,
    }
    if not cost.has_guarantee:
        row.update(remaining_after=str(balance.remaining), rounds_left=None)
        return row
    after_one = balance.after(cost.event)
    after_all = balance.after(cost.event, rounds)
    row.update(
        spent_after=str(after_one),
        spent_after_all=str(after_all),
        remaining_after=str(balance.budget - after_one),
        rounds_left=balance.rounds_left(cost.event) if after_one.is_finite() else 0,
    )
    if rounds > 1 and not refusal and after_all > balance.budget:
        warnings.append(
            f"Only {row['rounds_left']} of the {rounds} rounds fit in the budget: after {rounds} the site "
            f"would reach epsilon {accounting.show(after_all)} of {accounting.show(balance.budget)}; the "
            "series stops at the first round it cannot afford."
        )
    if cost.mechanism == protocol.MECHANISM_DPSGD:
        _dpsgd_site_noise(row, membership, cost)
    return row


def _dpsgd_site_noise(row: dict[str, Any], membership: Membership, cost: accounting.RoundCost) -> None:
    from coordinator.selectors import case_count

    cases = case_count(membership.site.agent_info)
    if cases is None:
        return
    ratio = dpsgd_noise_over_signal(cost.params, cases)
    row["noise_over_signal"] = ratio
    if ratio > 1:
        row["mostly_noise"] = True
        row["warnings"].append(
            f"The update will be mostly noise: with {cases} cases and sample rate "
            f"{cost.params['sample_rate']:g} a step averages about {cost.params['sample_rate'] * cases:.3g} "
            f"cases, so the noise std on each coordinate ({ratio:.3g} x the clip bound) exceeds the "
            "largest signal a coordinate can carry."
        )


def paper_svt_setting(n_parameters: int | None = None) -> dict[str, Any]:
    """The paper's and NVIDIA FLARE's SVT setting with its full per-round cost (DESIGN section 6)."""
    n = n_parameters or count_parameters(preset("brats"))
    c = protocol.selection_count(PAPER_SVT_FRACTION, n)
    selection = 0.001
    ratio = (2 * c) ** (2 / 3)
    params = {
        "fraction": PAPER_SVT_FRACTION,
        "gamma": 1e-4,
        "tau": 1e-4,
        "eps_threshold": selection / (1 + ratio),
        "eps_query": selection - selection / (1 + ratio),
        "eps_release": float(c),  # release noise 2 c gamma / eps_release = 2 gamma
    }
    return {
        "params": params,
        "epsilon": protocol.round_epsilon(protocol.MECHANISM_SVT, params),
        "n_parameters": n,
    }


def _text(epsilon) -> str | None:
    return None if epsilon is None else str(epsilon)
