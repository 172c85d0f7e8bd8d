"""The wire protocol and the privacy accounting both sides share.

Dependency-free on purpose: the coordinator and the agent import this one module, so the
names on the wire and the epsilon a round costs can never drift apart between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# Privacy mechanisms (DESIGN section 6). Everything about a mechanism that both sides need is in
# its `MechanismSpec` in MECHANISM_REGISTRY below: its parameters and their rules, its DP event
# (what it costs), its guarantee in words, and where the agent's code for it lives.
MECHANISM_NONE = "none"
MECHANISM_PARTIAL = "partial"
MECHANISM_SVT = "svt"
MECHANISM_DPSGD = "dpsgd"

SVT_EPSILON_PARTS = ("eps_threshold", "eps_query", "eps_release")

# DP events, as plain data (see sitesagent.accountant, which composes them with dp-accounting):
# - {"kind": "pure", "epsilon": e}: an e-DP mechanism (delta 0), such as one SVT release;
# - {"kind": "poisson_gaussian", "sample_rate": q, "noise_multiplier": sigma, "steps": T}: T steps
#   of the sampled Gaussian mechanism (DP-SGD with Poisson sampling at rate q, noise sigma * C).
EVENT_PURE = "pure"
EVENT_POISSON_GAUSSIAN = "poisson_gaussian"

# The coordinator's default SVT parameters when a federation sets none: a round costs epsilon 1.
DEFAULT_SVT_PARAMS: dict[str, float] = {
    "fraction": 0.1,
    "gamma": 1e-3,
    "tau": 1e-4,
    "eps_threshold": 0.01,
    "eps_query": 0.49,
    "eps_release": 0.5,
}

# The default DP-SGD parameters: noise sigma = 1 on per-case gradients clipped to norm 1, each
# case in a step with probability 0.25, 8 steps a round (about epsilon 1 per round at delta 1e-5).
DEFAULT_DPSGD_PARAMS: dict[str, float] = {
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "sample_rate": 0.25,
    "steps": 8,
    "crops_per_case": 1,
}


@dataclass(frozen=True)
class MechanismSpec:
    """One privacy mechanism, as both sides know it."""

    name: str
    label: str
    guarantee: str  # what the guarantee covers, in words for the pages; "" for none
    params: tuple[str, ...]
    positive: frozenset[str] = frozenset()  # parameters that must be > 0 (the rest >= 0)
    whole: frozenset[str] = frozenset()  # parameters that must be whole numbers
    at_most_one: frozenset[str] = frozenset()  # parameters in (0, 1]
    # The round's DP event for a site, from validated parameters; None: no formal guarantee.
    event: Callable[[Mapping[str, float]], dict[str, Any] | None] = lambda params: None
    # The mechanism works while training (DP-SGD), not on the finished delta.
    during_training: bool = False
    # The agent's release function, "module:function" (imported only on the agent).
    apply: str = ""
    sparse: bool = False  # updates carry indices (a subset of the coordinates)

    @property
    def has_guarantee(self) -> bool:
        return bool(self.guarantee)


def _svt_event(params: Mapping[str, float]) -> dict[str, Any]:
    epsilon = sum((Decimal(repr(float(params[name]))) for name in SVT_EPSILON_PARTS), Decimal(0))
    return {"kind": EVENT_PURE, "epsilon": float(epsilon)}


def _dpsgd_event(params: Mapping[str, float]) -> dict[str, Any]:
    return {
        "kind": EVENT_POISSON_GAUSSIAN,
        "sample_rate": float(params["sample_rate"]),
        "noise_multiplier": float(params["noise_multiplier"]),
        "steps": int(params["steps"]),
    }


MECHANISM_REGISTRY: dict[str, MechanismSpec] = {
    spec.name: spec
    for spec in (
        MechanismSpec(
            name=MECHANISM_NONE,
            label="None (full update, no protection)",
            guarantee="",
            params=(),
            apply="sitesagent.privacy:release_dense",
        ),
        MechanismSpec(
            name=MECHANISM_PARTIAL,
            label="Partial sharing (no formal guarantee)",
            guarantee="",
            params=("fraction", "gamma"),
            positive=frozenset({"fraction", "gamma"}),
            at_most_one=frozenset({"fraction"}),
            apply="sitesagent.privacy:partial_share",
            sparse=True,
        ),
        MechanismSpec(
            name=MECHANISM_SVT,
            label="Sparse vector technique (local DP of each site's update)",
            guarantee=(
                "local DP of each site's update: pure epsilon-DP between any two updates the site "
                "could send, whoever's data produced them"
            ),
            params=("fraction", "gamma", "tau", "eps_threshold", "eps_query", "eps_release"),
            positive=frozenset({"fraction", "gamma", *SVT_EPSILON_PARTS}),
            at_most_one=frozenset({"fraction"}),
            event=_svt_event,
            apply="sitesagent.privacy:svt",
            sparse=True,
        ),
        MechanismSpec(
            name=MECHANISM_DPSGD,
            label="DP-SGD (patient-level DP)",
            guarantee=(
                "patient-level (epsilon, delta)-DP: whether any one case (patient) was in the site's "
                "training data changes what the update can show by at most the stated epsilon and delta"
            ),
            params=("noise_multiplier", "max_grad_norm", "sample_rate", "steps", "crops_per_case"),
            positive=frozenset(
                {"noise_multiplier", "max_grad_norm", "sample_rate", "steps", "crops_per_case"}
            ),
            whole=frozenset({"steps", "crops_per_case"}),
            at_most_one=frozenset({"sample_rate"}),
            event=_dpsgd_event,
            during_training=True,
            apply="sitesagent.privacy:release_dense",
        ),
    )
}
MECHANISMS = tuple(MECHANISM_REGISTRY)
UNPROTECTED_MECHANISMS = tuple(name for name, spec in MECHANISM_REGISTRY.items() if not spec.has_guarantee)
MECHANISM_PARAMS: dict[str, tuple[str, ...]] = {
    name: spec.params for name, spec in MECHANISM_REGISTRY.items()
}

# Task states, in the order an agent moves through them (DESIGN section 5).
TASK_ASSIGNED = "assigned"
TASK_EVALUATING = "evaluating"
TASK_TRAINING = "training"
TASK_UPLOADED = "uploaded"
TASK_DROPPED = "dropped"
TASK_STATES = (TASK_ASSIGNED, TASK_EVALUATING, TASK_TRAINING, TASK_UPLOADED, TASK_DROPPED)

# Update files: safetensors holding one flat float32 vector over the model's floating-point
# tensors taken in sorted-name order (see `flat_layout`). Sparse updates carry "indices"
# (int64, sorted, unique) and "values"; dense updates carry "values" only.
UPDATE_INDICES = "indices"
UPDATE_VALUES = "values"
UPDATE_FORMAT = "fl-update/1"

# Metric names an agent reports.
METRIC_TRAIN_LOSS = "train_loss"
METRIC_THROUGHPUT = "throughput"
METRIC_DICE = ("dice_et", "dice_wt", "dice_tc", "dice_mean")
# The most metric points one websocket message or HTTP request may carry: the agent splits its
# batches at this size, and the coordinator refuses anything larger.
METRIC_POINTS_PER_MESSAGE = 1000

SITE_TOKEN_PREFIX = "site_"
# The largest whole-number parameter (steps, crops): anything near it is a mistake, not a plan.
MAX_WHOLE = 1_000_000
USER_TOKEN_PREFIX = "user_"


class ProtocolError(ValueError):
    """A value that breaks the protocol; the message names the value and the problem."""


def positive_finite(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, or raise naming ``name`` if it is not a usable number."""
    if isinstance(value, bool):
        raise ProtocolError(f"{name} must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"{name} must be a number, not {value!r}") from None
    if math.isnan(number):
        raise ProtocolError(f"{name} must be a number, not NaN")
    if math.isinf(number):
        raise ProtocolError(f"{name} must be finite, not {number}")
    if number < 0 or (number == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "greater than zero"
        raise ProtocolError(f"{name} must be {bound}, not {number}")
    return number


def mechanism_spec(mechanism: Any) -> MechanismSpec:
    """The registry entry of ``mechanism``, or a ProtocolError naming the known ones."""
    spec = MECHANISM_REGISTRY.get(mechanism) if isinstance(mechanism, str) else None
    if spec is None:
        raise ProtocolError(f"mechanism must be one of {', '.join(MECHANISMS)}, not {mechanism!r}")
    return spec


def validate_mechanism(mechanism: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a mechanism's parameters and return them as numbers, in a canonical dict.

    Whole-number parameters come back as ints, the others as floats. Raises ProtocolError naming
    the first bad or missing parameter.
    """
    spec = mechanism_spec(mechanism)
    if not isinstance(params, Mapping):
        raise ProtocolError(f"{mechanism} parameters must be an object, not {type(params).__name__}")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ProtocolError(f"{mechanism} takes no parameter {', '.join(map(str, unknown))}")
    clean: dict[str, Any] = {}
    for name in spec.params:
        if name not in params:
            raise ProtocolError(f"{mechanism} needs the parameter {name}")
        number = positive_finite(name, params[name], allow_zero=name not in spec.positive)
        if name in spec.whole:
            if number != int(number) or number > MAX_WHOLE:
                raise ProtocolError(f"{name} must be a whole number up to {MAX_WHOLE}, not {params[name]!r}")
            number = int(number)
        if name in spec.at_most_one and number > 1:
            raise ProtocolError(f"{name} must be at most 1, not {number}")
        clean[name] = number
    return clean


def round_event(mechanism: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The DP event one round of ``mechanism`` is for each site taking part; None: no guarantee.

    Both sides derive it from the round's parameters alone: the coordinator to reserve and
    account for it, the agent to check its own cap against what it will really apply.
    """
    spec = mechanism_spec(mechanism)
    return spec.event(validate_mechanism(mechanism, params))


def round_epsilon_exact(mechanism: str, params: Mapping[str, Any]) -> Decimal | None:
    """The pure epsilon of one round of ``mechanism``, when it is pure DP; else None.

    SVT (Lyu, Su and Li 2017, Alg. 1) is pure epsilon-DP with
    epsilon = eps_threshold + eps_query + eps_release, summed in decimal over the parameters as
    written (0.05 + 0.15 + 0.1 is 0.3, not 0.30000000000000004). DP-SGD's cost depends on delta
    (sitesagent.accountant), and "none" and partial sharing have no finite epsilon at all.
    """
    clean = validate_mechanism(mechanism, params)
    if mechanism != MECHANISM_SVT:
        return None
    return sum((Decimal(repr(clean[name])) for name in SVT_EPSILON_PARTS), Decimal(0))


def round_epsilon(mechanism: str, params: Mapping[str, Any]) -> float | None:
    """`round_epsilon_exact` as a float, for arithmetic that needs no exactness."""
    exact = round_epsilon_exact(mechanism, params)
    return None if exact is None else float(exact)


def selection_count(fraction: float, n_parameters: int) -> int:
    """c = ceil(Q * n): the most coordinates a partial or SVT update may release."""
    if n_parameters <= 0:
        raise ProtocolError(f"n_parameters must be positive, not {n_parameters}")
    # The epsilon guards against ceil(0.1 * 10) == 2 from binary rounding.
    return max(1, min(n_parameters, math.ceil(fraction * n_parameters - 1e-9)))


def svt_split(
    epsilon: float, *, fraction: float, n_parameters: int, release_share: float = 0.5
) -> dict[str, float]:
    """Split a round's total epsilon into SVT's three parts.

    ``release_share`` of it pays for the released values; the rest (the selection budget) is
    split eps_threshold : eps_query = 1 : (2c)^(2/3), the default of DESIGN section 6.
    """
    epsilon = positive_finite("epsilon", epsilon)
    if not 0 < release_share < 1:
        raise ProtocolError(f"release_share must be between 0 and 1, not {release_share}")
    c = selection_count(fraction, n_parameters)
    selection = epsilon * (1 - release_share)
    ratio = (2 * c) ** (2 / 3)
    eps_threshold = selection / (1 + ratio)
    return {
        "eps_threshold": eps_threshold,
        "eps_query": selection - eps_threshold,
        "eps_release": epsilon * release_share,
    }


def svt_noise_scales(params: Mapping[str, Any], n_parameters: int) -> dict[str, float]:
    """The Laplace scales SVT draws with: threshold, each query, each released value."""
    clean = validate_mechanism(MECHANISM_SVT, params)
    c = selection_count(clean["fraction"], n_parameters)
    gamma = clean["gamma"]
    return {
        "threshold": gamma / clean["eps_threshold"],
        "query": 2 * c * gamma / clean["eps_query"],
        "release": 2 * c * gamma / clean["eps_release"],
    }


def flat_layout(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, int, int]]:
    """Where each named tensor lives in the flat update vector: (name, start, stop).

    Tensors are taken in sorted-name order, so the layout depends only on the names and
    shapes, never on how a file or a state dict happened to order them.
    """
    layout = []
    start = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        layout.append((name, start, start + size))
        start += size
    return layout
