"""The aggregation arithmetic: a round's updates into the next model version's flat weights.

Pure functions on tensors (no Django, no database): the Celery task hands them decoded updates
and stores what comes back.

Definitions
-----------
Every update k carries N_k (its local iterations) and a delta dW_k over the flat weight vector
(``sitesagent.updates``), in weight units: the agent already multiplied its released values back
by N_k. A sparse update proposes *no change* where it sent nothing, so dW_k is 0 there. All
rules below use that one reading of "not sent".

``norm_bound`` (optional, applies before any rule): an update whose L2 norm exceeds the bound is
scaled down to it, dW_k <- dW_k * min(1, norm_bound / ||dW_k||). For a sparse update the norm
over its sent values *is* its full norm, since the rest is 0. The bound is in weight units.

``mean`` (FedAvg, DESIGN section 5 step 6):
    W_next = W_base + sum_k N_k dW_k / sum_k N_k.

``median``: coordinate-wise and unweighted, over all K updates, an unsent coordinate counting
as 0; with K even, the mean of the two middle values. The alternative, the median over only
the updates that sent a coordinate, was rejected: a coordinate that only one site sent would
then be set by that site alone, which is the very influence a median exists to deny. The cost
of this choice: a coordinate moves only when at least half the sites sent it, so with SVT
at a small Q (whose noisy selections rarely overlap) a median round moves little of the model.

``trimmed_mean``: coordinate-wise and unweighted: of the K values (unsent = 0), drop the
b = floor(trim_fraction * K) largest and the b smallest, and average the K - 2b left. With
b = 0 (fewer than 10 updates at the default 0.1) it is the plain unweighted mean.

Why the robust rules ignore N_k: N_k is reported by the site itself and nothing protects it
(DESIGN section 6 says so in the audit pages); weighting by it would let one site claim a huge
N_k and dominate exactly the rules meant to bound any one site's influence.

Cost
----
``mean`` adds each sparse update straight into one float32 buffer with ``index_add_`` (no
dense copy per update); dense updates add in place. On the CPU the buffer is visited in blocks
of ``CPU_BLOCK_COORDINATES`` coordinates, every update adding its share of a block before the
next block, so the block stays in cache instead of the whole buffer being streamed once per
update (measured in docs/performance-aggregation.md). On CUDA one ``index_add_`` per update.

``median`` and ``trimmed_mean`` need the K values of each coordinate. A coordinate that at
most (K-1)//2 updates sent has a median of 0, and one that at most b sent a trimmed mean of 0
(see ``_zero_at_or_below``), so only the other coordinates are gathered, block by block: a block
of L coordinates becomes a K x m matrix (m <= L) sorted along K. L = max(1,
robust_memory_bytes // (16 K)), so the matrix (4 bytes an entry) and the sort's values and
positions (4 + 8 bytes an entry) stay within ``robust_memory_bytes`` (256 MiB by default)
whatever K and n are. On top come 4 bytes a parameter for the sender counts and 4 for the
output vector.

Validation
----------
``aggregate`` trusts ``validate_update`` for what a round allows, and checks only what keeps its
own arithmetic sound (lengths, counts, index range). ``validate_update`` is what the upload
service calls on every update before it is stored; see its docstring for the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sitesagent import protocol
from sitesagent.updates import UpdateError, check_dense_layout, check_sparse_layout

RULES = ("mean", "median", "trimmed_mean")
DEVICES = ("auto", "cpu", "cuda")

# 2**20 float32 coordinates = 4 MiB, the best of 2**17..2**22 on a 32 MiB-L3 EPYC, where it
# ran 1.9x (13 updates) and 3.3x (100) faster than one pass per update; on a 300 MiB-L3 Xeon,
# where the whole vector stays cached anyway, it cost about 10% (docs/performance-aggregation.md).
CPU_BLOCK_COORDINATES = 1 << 20
DEFAULT_ROBUST_MEMORY_BYTES = 256 * 1024 * 1024
# Matrix entry (float32) + sorted value (float32) + sort position (int64).
_ROBUST_BYTES_PER_ENTRY = 16

# An SVT value is N_k * (clip + Laplace(b)); it passes while |Laplace| <= SVT_SANITY_SCALES * b.
SVT_SANITY_SCALES = 50.0
# float32 rounding of N_k * value, with room to spare.
_RELATIVE_TOLERANCE = 1e-5


class UpdateLike(Protocol):
    """What aggregate() reads of an update: ``sitesagent.updates.Update`` is one."""

    @property
    def indices(self) -> torch.Tensor | None: ...

    @property
    def values(self) -> torch.Tensor: ...

    @property
    def n_iterations(self) -> int: ...


class UpdateRejected(ValueError):
    """An update the round cannot accept; the message is the reason, for people to read."""


# --- aggregate ------------------------------------------------------------------------------


def aggregate(
    base: torch.Tensor,
    updates: Sequence[UpdateLike],
    *,
    rule: str = "mean",
    trim_fraction: float = 0.1,
    norm_bound: float | None = None,
    device: str = "auto",
    robust_memory_bytes: int = DEFAULT_ROBUST_MEMORY_BYTES,
) -> torch.Tensor:
    """The next flat weights from ``base`` and the round's updates, as a new CPU float32 tensor.

    ``rule``, ``trim_fraction`` and ``norm_bound`` are defined in the module docstring, and so
    is ``robust_memory_bytes``, the working memory median and trimmed mean may use.
    ``device``: "auto" runs on CUDA when torch sees it, else on the CPU; "cuda" without CUDA
    raises RuntimeError. Raises ValueError for no updates or malformed arguments. The updates
    are expected to have passed ``validate_update``; the robust rules refuse unsorted indices.
    """
    # The federation's settings may arrive as Decimal from the database.
    trim_fraction = float(trim_fraction)
    norm_bound = None if norm_bound is None else float(norm_bound)
    _check_arguments(base, updates, rule, trim_fraction, norm_bound)
    target = resolve_device(device)
    # copy=True: the one output buffer, and base itself is never written to.
    weights = base.detach().to(device=target, dtype=torch.float32, copy=True)
    deltas = [_on_device(update, weights.numel(), target) for update in updates]
    scales = _norm_scales(deltas, norm_bound)
    if rule == "mean":
        total = float(sum(update.n_iterations for update in updates))
        factors = [scale * update.n_iterations / total for scale, update in zip(scales, updates, strict=True)]
        result = _weighted_sum_into(weights, deltas, factors)
    else:
        result = _robust_into(weights, deltas, scales, rule, trim_fraction, robust_memory_bytes)
    return result.cpu()


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device here")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _check_arguments(
    base: torch.Tensor,
    updates: Sequence[UpdateLike],
    rule: str,
    trim_fraction: float,
    norm_bound: float | None,
) -> None:
    if len(updates) == 0:
        raise ValueError("there are no updates to aggregate")
    if base.dim() != 1 or not base.is_floating_point():
        raise ValueError(f"base must be a 1-D floating-point vector, not {base.dtype} {tuple(base.shape)}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be at least 0 and below 0.5, not {trim_fraction}")
    if norm_bound is not None and not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound must be a positive number, not {norm_bound}")
    for position, update in enumerate(updates):
        n_iterations = update.n_iterations
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(
                f"update {position}: n_iterations must be a whole number >= 1, not {n_iterations!r}"
            )


@dataclass(frozen=True, slots=True)
class _Delta:
    """One update's tensors on the aggregation device; indices None for a dense one."""

    indices: torch.Tensor | None
    values: torch.Tensor


def _on_device(update: UpdateLike, n_parameters: int, device: torch.device) -> _Delta:
    values = torch.as_tensor(update.values).to(device=device, dtype=torch.float32)
    if update.indices is None:
        if values.dim() != 1 or values.numel() != n_parameters:
            raise ValueError(f"a dense update needs {n_parameters} values, not shape {tuple(values.shape)}")
        return _Delta(None, values)
    indices = torch.as_tensor(update.indices).to(device=device, dtype=torch.int64)
    if indices.dim() != 1 or indices.shape != values.shape:
        raise ValueError(
            f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be matching 1-D"
        )
    if indices.numel() and not _indices_in_range(indices, n_parameters):
        raise ValueError(f"an index is outside the model's {n_parameters} parameters")
    return _Delta(indices, values)


def _indices_in_range(indices: torch.Tensor, n_parameters: int) -> bool:
    if indices.device.type == "cuda":
        # A bad index on CUDA is a device-side assert that poisons the worker's CUDA context,
        # so every one is checked; a full pass costs microseconds there.
        low, high = torch.aminmax(indices)
    else:
        # Validated indices are sorted, so the ends bound them all; an unsorted stray still
        # meets index_add_'s own check on the CPU (IndexError) rather than corrupting memory.
        low, high = indices[0], indices[-1]
    return int(low) >= 0 and int(high) < n_parameters


def _norm_scales(deltas: Sequence[_Delta], norm_bound: float | None) -> list[float]:
    if norm_bound is None:
        return [1.0] * len(deltas)
    norms = [float(torch.linalg.vector_norm(delta.values, dtype=torch.float64)) for delta in deltas]
    return [min(1.0, norm_bound / norm) if norm > 0 else 1.0 for norm in norms]


# --- mean -----------------------------------------------------------------------------------


def _weighted_sum_into(out: torch.Tensor, deltas: Sequence[_Delta], factors: Sequence[float]) -> torch.Tensor:
    """out += sum_k factors[k] * delta_k, sparse deltas added without densifying them."""
    sparse = []
    for delta, factor in zip(deltas, factors, strict=True):
        if delta.indices is None:
            out.add_(delta.values, alpha=factor)
        else:
            sparse.append((delta.indices, delta.values, factor))
    block = out.numel() if out.device.type == "cuda" else CPU_BLOCK_COORDINATES
    if block >= out.numel():
        for indices, values, factor in sparse:
            out.index_add_(0, indices, values, alpha=factor)
    else:
        _blocked_index_add(out, sparse, block)
    return out


def _blocked_index_add(
    out: torch.Tensor, sparse: Sequence[tuple[torch.Tensor, torch.Tensor, float]], block: int
) -> None:
    """Add every update's entries block by block, so each output block stays cache-resident."""
    bounds = _block_bounds(out.numel(), block, out.device)
    cuts = [_block_cuts(indices, bounds) for indices, _, _ in sparse]
    for number in range(len(bounds) - 1):
        for (indices, values, factor), cut in zip(sparse, cuts, strict=True):
            start, stop = cut[number], cut[number + 1]
            if stop > start:
                out.index_add_(0, indices[start:stop], values[start:stop], alpha=factor)


def _block_cuts(indices: torch.Tensor, bounds: torch.Tensor) -> list[int]:
    """Where each block starts in ``indices``: cuts that always partition the whole vector.

    searchsorted assumes sorted indices; forcing the cuts monotone from 0 to the end means an
    unsorted vector (never validated) still has each entry added exactly once, only slower.
    """
    cuts = torch.searchsorted(indices, bounds).tolist()
    cuts[0], cuts[-1] = 0, indices.numel()
    for position in range(1, len(cuts)):
        cuts[position] = min(max(cuts[position], cuts[position - 1]), indices.numel())
    return cuts


# --- median and trimmed mean ----------------------------------------------------------------


def _robust_into(
    out: torch.Tensor,
    deltas: Sequence[_Delta],
    scales: Sequence[float],
    rule: str,
    trim_fraction: float,
    memory_bytes: int,
) -> torch.Tensor:
    count = len(deltas)
    _require_sorted(deltas)
    can_move = _sender_counts(deltas, out.numel(), out.device) > _zero_at_or_below(rule, count, trim_fraction)
    block = max(1, memory_bytes // (_ROBUST_BYTES_PER_ENTRY * count))
    bounds = _block_bounds(out.numel(), block, out.device)
    cuts = [None if delta.indices is None else _block_cuts(delta.indices, bounds) for delta in deltas]
    for number, start in enumerate(range(0, out.numel(), block)):
        stop = min(start + block, out.numel())
        columns = can_move[start:stop].nonzero().squeeze(1)
        if columns.numel() == 0:
            continue
        matrix = _block_matrix(deltas, scales, cuts, number, start, stop, columns)
        out.index_add_(0, columns + start, _combine(matrix, rule, trim_fraction))
    return out


def _zero_at_or_below(rule: str, count: int, trim_fraction: float) -> int:
    """The most senders a coordinate can have while the rule is sure to give it 0.

    With s of the K values non-zero (a negative, p positive, a + p = s), sorting puts the zeros
    at positions a .. K-p-1. The median's middle positions (K-1)//2 and K//2 fall among them
    whenever s <= (K-1)//2; the trimmed mean keeps positions b .. K-b-1, all zeros whenever
    s <= b. Skipping those coordinates is exact, and leaves the median of sparse updates very
    little to sort.
    """
    if rule == "median":
        return (count - 1) // 2
    return math.floor(trim_fraction * count)


def _require_sorted(deltas: Sequence[_Delta]) -> None:
    # The robust rules place each entry by its block; unsorted indices would land in the wrong one.
    for position, delta in enumerate(deltas):
        indices = delta.indices
        if indices is not None and indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError(f"update {position}: indices must be sorted without repeats")


def _block_bounds(n_parameters: int, block: int, device: torch.device) -> torch.Tensor:
    bounds = torch.arange(0, n_parameters + block, block, dtype=torch.int64, device=device)
    bounds[-1] = n_parameters
    return bounds


def _sender_counts(deltas: Sequence[_Delta], n_parameters: int, device: torch.device) -> torch.Tensor:
    """How many updates sent a value at each coordinate (a dense update sends them all)."""
    dense = sum(delta.indices is None for delta in deltas)
    senders = torch.full((n_parameters,), dense, dtype=torch.int32, device=device)
    for delta in deltas:
        if delta.indices is not None:
            senders[delta.indices] += 1  # indices are unique, so no two writes collide
    return senders


def _block_matrix(
    deltas: Sequence[_Delta],
    scales: Sequence[float],
    cuts: Sequence[list[int] | None],
    number: int,
    start: int,
    stop: int,
    columns: torch.Tensor,
) -> torch.Tensor:
    """K x m: row k holds update k's (scaled) values at the block's chosen coordinates, else 0."""
    matrix = torch.zeros((len(deltas), columns.numel()), dtype=torch.float32, device=columns.device)
    # Where each coordinate of the block sits among the chosen columns; -1 where it is not one.
    column_of = torch.full((stop - start,), -1, dtype=torch.int64, device=columns.device)
    column_of[columns] = torch.arange(columns.numel(), device=columns.device)
    for row, (delta, scale, cut) in enumerate(zip(deltas, scales, cuts, strict=True)):
        if delta.indices is None:
            matrix[row] = delta.values[columns + start]
        else:
            assert cut is not None
            low, high = cut[number], cut[number + 1]
            positions = column_of[delta.indices[low:high] - start]
            chosen = positions >= 0
            matrix[row, positions[chosen]] = delta.values[low:high][chosen]
        if scale != 1.0:
            matrix[row] *= scale
    return matrix


def _combine(matrix: torch.Tensor, rule: str, trim_fraction: float) -> torch.Tensor:
    count = matrix.shape[0]
    ordered = torch.sort(matrix, dim=0).values
    if rule == "median":
        return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2
    trimmed = math.floor(trim_fraction * count)
    return ordered[trimmed : count - trimmed].mean(dim=0)


# --- validating one upload ------------------------------------------------------------------


def validate_update(
    update: Any,
    *,
    n_parameters: int,
    mechanism: str,
    params: Mapping[str, Any],
    max_values: int | None = None,
) -> None:
    """Refuse an update the round cannot take, with UpdateRejected naming the reason.

    ``mechanism`` and ``params`` are the round's, frozen at launch. Checks, in order: the
    update was made with exactly them; N_k >= 1 (and the case count, where present); the
    encoding fits the mechanism ("none" sends all n_parameters values, dense; partial and SVT
    send at most c = protocol.selection_count(fraction, n) sorted, unique, in-range indices, and
    at most ``max_values`` when given); every value finite; and the values within the bound the
    mechanism implies:

    - partial sharing: every value is N_k * clip(d, gamma), so |value| <= N_k * gamma.
    - SVT: every value is N_k * (clip(d, gamma) + Laplace(b)) with b = 2 c gamma / eps_release,
      which no hard bound holds. The check is a sanity bound against garbage,
      |value| <= N_k * (gamma + 50 b): an honest value breaks it only when its Laplace draw
      exceeds 50 b, probability exp(-50) ~ 1.9e-22 per value, so at most c * 1.9e-22 per
      update (~9e-17 for c = 470,223, a tenth of SegResNet's 4.7 M parameters).
    - none: no bound.

    Both bounds get a relative slack of 1e-5 for float32 rounding.
    """
    try:
        _validate(update, n_parameters, mechanism, params, max_values)
    except UpdateError as error:
        raise UpdateRejected(str(error)) from None


def _validate(
    update: Any,
    n_parameters: int,
    mechanism: str,
    params: Mapping[str, Any],
    max_values: int | None,
) -> None:
    round_params = protocol.validate_mechanism(mechanism, params)
    _check_same_mechanism(update, mechanism, round_params)
    declared = getattr(update, "n_parameters", n_parameters)
    if declared != n_parameters:
        raise UpdateRejected(f"the update is for {declared} parameters but the model has {n_parameters}")
    _check_counts(update)
    values = torch.as_tensor(update.values)
    spec = protocol.mechanism_spec(mechanism)
    if not spec.sparse:
        if update.indices is not None:
            raise UpdateRejected(f"mechanism {mechanism} shares the whole delta: the update must be dense")
        check_dense_layout(values, n_parameters)
        if spec.during_training and update.n_iterations != round_params["steps"]:
            raise UpdateRejected(
                f"the update took {update.n_iterations} steps but the round's DP event is for "
                f"{round_params['steps']}: a site may take exactly the steps it is accounted for"
            )
    else:
        if update.indices is None:
            raise UpdateRejected(f"mechanism {mechanism} shares a subset: the update must be sparse")
        check_sparse_layout(torch.as_tensor(update.indices), values, n_parameters)
        _check_value_count(values.numel(), round_params, n_parameters, max_values)
    _check_finite(values)
    bound = value_bound(mechanism, round_params, n_parameters, update.n_iterations)
    if bound is not None:
        _check_within(values, bound, mechanism)


def _check_same_mechanism(update: Any, mechanism: str, round_params: Mapping[str, float]) -> None:
    if update.mechanism != mechanism:
        raise UpdateRejected(
            f"the update was made with mechanism {update.mechanism!r} but the round uses {mechanism!r}"
        )
    try:
        update_params = protocol.validate_mechanism(mechanism, update.params)
    except protocol.ProtocolError as error:
        raise UpdateRejected(f"the update's mechanism parameters are invalid: {error}") from None
    for name, expected in round_params.items():
        # JSON carries floats exactly; the slack only forgives a Decimal or string on our side.
        if not math.isclose(update_params[name], expected, rel_tol=1e-9, abs_tol=1e-12):
            raise UpdateRejected(
                f"the update applied {name}={update_params[name]} but the round set {name}={expected}"
            )


def _check_counts(update: Any) -> None:
    for name in ("n_iterations", "n_cases"):
        count = getattr(update, name, 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UpdateRejected(f"{name} must be a whole number of at least 1, not {count!r}")


def _check_value_count(
    count: int, round_params: Mapping[str, float], n_parameters: int, max_values: int | None
) -> None:
    allowed = protocol.selection_count(round_params["fraction"], n_parameters)
    if count > allowed:
        raise UpdateRejected(
            f"the update sends {count} values but the round allows at most {allowed} "
            f"(fraction {round_params['fraction']} of {n_parameters} parameters)"
        )
    if max_values is not None and count > max_values:
        raise UpdateRejected(f"the update sends {count} values, more than the limit of {max_values}")


def _check_finite(values: torch.Tensor) -> None:
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        position = int((~finite).nonzero()[0, 0])
        raise UpdateRejected(f"value {position} is {float(values[position])}; every value must be finite")


def value_bound(
    mechanism: str, params: Mapping[str, Any], n_parameters: int, n_iterations: int
) -> float | None:
    """The largest |value| an honest update can carry (SVT: its sanity bound); None for "none"."""
    if mechanism == protocol.MECHANISM_PARTIAL:
        return n_iterations * float(params["gamma"])
    if mechanism == protocol.MECHANISM_SVT:
        release_scale = protocol.svt_noise_scales(params, n_parameters)["release"]
        return n_iterations * (float(params["gamma"]) + SVT_SANITY_SCALES * release_scale)
    return None


def _check_within(values: torch.Tensor, bound: float, mechanism: str) -> None:
    if values.numel() == 0:
        return
    magnitudes = values.abs()
    largest = int(torch.argmax(magnitudes))
    if float(magnitudes[largest]) > bound * (1 + _RELATIVE_TOLERANCE):
        meaning = (
            "N_k * (gamma + 50 release-noise scales)"
            if mechanism == protocol.MECHANISM_SVT
            else "N_k * gamma"
        )
        value = float(values[largest])
        raise UpdateRejected(
            f"value {largest} is {value:.6g}, beyond the {mechanism} bound {meaning} = {bound:.6g}"
        )
