"""The wire protocol and the privacy accounting both sides share.

Dependency-free on purpose: the coordinator and the agent import this one module, so the
names on the wire and the epsilon a round costs can never drift apart between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

# Privacy mechanisms (DESIGN section 6).
MECHANISM_NONE = "none"
MECHANISM_PARTIAL = "partial"
MECHANISM_SVT = "svt"
MECHANISMS = (MECHANISM_NONE, MECHANISM_PARTIAL, MECHANISM_SVT)
UNPROTECTED_MECHANISMS = (MECHANISM_NONE, MECHANISM_PARTIAL)

# The parameters each mechanism takes, and which must be strictly positive.
MECHANISM_PARAMS: dict[str, tuple[str, ...]] = {
    MECHANISM_NONE: (),
    MECHANISM_PARTIAL: ("fraction", "gamma"),
    MECHANISM_SVT: ("fraction", "gamma", "tau", "eps_threshold", "eps_query", "eps_release"),
}
SVT_EPSILON_PARTS = ("eps_threshold", "eps_query", "eps_release")
_POSITIVE = {"fraction", "gamma", *SVT_EPSILON_PARTS}

# The coordinator's default SVT parameters when a federation sets none: a round costs epsilon 1.
DEFAULT_SVT_PARAMS: dict[str, float] = {
    "fraction": 0.1,
    "gamma": 1e-3,
    "tau": 1e-4,
    "eps_threshold": 0.01,
    "eps_query": 0.49,
    "eps_release": 0.5,
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


def validate_mechanism(mechanism: str, params: Mapping[str, Any]) -> dict[str, float]:
    """Check a mechanism's parameters and return them as floats, in a canonical dict.

    Raises ProtocolError naming the first bad or missing parameter.
    """
    if mechanism not in MECHANISM_PARAMS:
        raise ProtocolError(f"mechanism must be one of {', '.join(MECHANISMS)}, not {mechanism!r}")
    expected = MECHANISM_PARAMS[mechanism]
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise ProtocolError(f"{mechanism} takes no parameter {', '.join(unknown)}")
    clean: dict[str, float] = {}
    for name in expected:
        if name not in params:
            raise ProtocolError(f"{mechanism} needs the parameter {name}")
        clean[name] = positive_finite(name, params[name], allow_zero=name not in _POSITIVE)
    if "fraction" in clean and clean["fraction"] > 1:
        raise ProtocolError(f"fraction must be at most 1, not {clean['fraction']}")
    return clean


def round_epsilon_exact(mechanism: str, params: Mapping[str, Any]) -> Decimal | None:
    """The epsilon one round of ``mechanism`` costs a site, or None for "no formal guarantee".

    SVT (Lyu, Su and Li 2017, Alg. 1) is pure epsilon-DP with
    epsilon = eps_threshold + eps_query + eps_release; basic sequential composition then
    makes a site's spend the plain sum over its rounds. "none" and partial sharing add no
    noise, so they have no finite epsilon at all: None, never a number.

    The sum is taken in decimal over the parameters as written (0.05 + 0.15 + 0.1 is 0.3, not
    0.30000000000000004), so the ledger adds up exactly what people set.
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
