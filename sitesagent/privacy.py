"""The privacy mechanisms a site applies to its update before it leaves the site (DESIGN section 6).

Both mechanisms take the per-step delta (the site's delta divided by its case count N_k) as one
flat 1-D float tensor and return a sparse update ``(indices, values)``: the released positions as
a sorted int64 tensor without repeats, and the float32 values released at them. Coordinates not
in ``indices`` are not sent at all. Both functions are pure: no I/O, and every random draw comes
from the ``generator`` passed in (never from torch's global generator), so a seeded generator
replays a call exactly.

What is protected, and what is not
----------------------------------
``svt`` is the sparse vector technique in the form Lyu, Su and Li proved private (PVLDB 2017,
Alg. 1). Its output is epsilon-differentially private with
epsilon = eps_threshold + eps_query + eps_release (``protocol.round_epsilon``), pure DP. Because
every coordinate is clipped to [-gamma, gamma] before anything is computed from it, this holds
between *any* two per-step deltas, not only deltas of neighbouring data sets: whoever sees the
update learns, up to a factor e^epsilon, nothing about which delta produced it. Rounds compose by
summing their epsilons; the coordinator's ledger does that, this module does not.

Not protected by ``svt``:

- everything else the agent sends: metrics, case counts, timing, and the fact of taking part;
- the running time of a call, which depends on how many noisy queries it takes to find c
  coordinates and so on the data (as in any SVT implementation that stops early);
- floating-point effects: the Laplace noise is sampled in float32 from a grid of 2^24 uniform
  values (its tails end at about 16.6 scales). Like every floating-point Laplace sampler it is
  not exactly epsilon-DP (Mironov, CCS 2012); the guarantee above is that of the idealised
  mechanism it implements.

``partial_share`` (Shokri and Shmatikov, CCS 2015) adds no noise and gives **no formal
guarantee**: it releases which coordinates moved most and their exact clipped values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sitesagent.protocol import (
    MECHANISM_PARTIAL,
    MECHANISM_SVT,
    ProtocolError,
    selection_count,
    svt_noise_scales,
    validate_mechanism,
)

MAX_PASSES = 10
"""How many passes SVT makes over the not-yet-selected coordinates before it gives up short of c.

Each pass asks every remaining coordinate again with fresh query noise; the threshold stays the
one drawn at the start of the call. The bound makes every call terminate: when fewer than c
coordinates ever qualify (a threshold far above every answer), a call returns what it found after
this many passes, possibly nothing. Ten passes cost about ten times one full pass in that case.
"""

# A stage of a pass samples enough coordinates that it expects this many standard deviations (and
# a few) more qualifying ones than it needs, so that a second stage (a second look at the pool) is
# rare; the surplus costs a little noise. Tests shrink these to exercise the later stages.
_SPARE_SIGMAS = 4.0
_SPARE_MINIMUM = 16

# Sampling which coordinates to visit first pays only when most of the pool can stay unvisited;
# above this share of the pool, a stage simply visits all of it.
_VISIT_ALL_SHARE = 0.5

# torch.rand draws float32 multiples of 2^-24 in [0, 1); see _laplace_from_uniform.
_FLOAT32_UNIFORM_STEP = 2.0**-24


def svt(
    delta: torch.Tensor,
    *,
    fraction: float,
    gamma: float,
    tau: float,
    eps_threshold: float,
    eps_query: float,
    eps_release: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Release at most c = ceil(fraction * n) noisy coordinates of ``delta`` by the sparse vector technique.

    Lyu, Su and Li (PVLDB 2017), Alg. 1, as DESIGN section 6 specifies it:

    - each coordinate's query is |clip(delta_i, gamma)| (sensitivity gamma);
    - the threshold T = tau + Lap(gamma / eps_threshold) is drawn once per call;
    - coordinates are visited in a uniformly random order, each query with fresh noise
      Lap(2 c gamma / eps_query); a coordinate is selected when its noisy answer is at least T,
      and the call stops at exactly the c-th selection;
    - a pass that ends with fewer than c selected is followed by another over the coordinates
      not yet selected, with fresh query noise, up to ``MAX_PASSES`` passes (so fewer than c,
      even none, may come back);
    - each selected coordinate is released as clip(delta_i, gamma) + Lap(2 c gamma / eps_release):
      clipped first, then noised. Nothing else about the delta leaves.

    The release is epsilon-DP with epsilon = eps_threshold + eps_query + eps_release between any
    two deltas; see the module docstring for what that does not cover.

    The random visit is carried out without building the random order (see ``_one_pass``): the
    output has exactly the distribution of the one-coordinate-at-a-time algorithm, and the tests
    compare the two. The work grows with the coordinates visited (about c divided by the chance
    that a query qualifies); the rest of the delta is read once, to check it is finite.

    Args:
        delta: the per-step delta, a 1-D floating-point tensor with finite values.
        fraction: Q, the largest share of coordinates released, in (0, 1].
        gamma: the clip bound, > 0.
        tau: the threshold before noise, >= 0.
        eps_threshold, eps_query, eps_release: the three parts of the round's epsilon, each > 0.
        generator: every random draw comes from it; it must live on the delta's device. When
            None, a fresh generator seeded from the operating system is used.

    Returns:
        ``(indices, values)``: the selected positions (sorted, unique, int64) and the released
        values at them (float32), on the delta's device.

    Raises:
        ProtocolError: a parameter or the delta is unusable; the message names it.
    """
    params = validate_mechanism(
        MECHANISM_SVT,
        {
            "fraction": fraction,
            "gamma": gamma,
            "tau": tau,
            "eps_threshold": eps_threshold,
            "eps_query": eps_query,
            "eps_release": eps_release,
        },
    )
    delta = _checked_delta(delta)
    scales = svt_noise_scales(params, delta.numel())
    if generator is None:
        generator = _fresh_generator(delta.device)

    threshold = params["tau"] + _laplace(scales["threshold"], 1, generator, delta.device).item()
    queries = _NoisyQueries(delta, params["gamma"], threshold, scales["query"], generator)
    indices = _select_above_threshold(queries, selection_count(params["fraction"], delta.numel()))
    noise = _laplace(scales["release"], indices.numel(), generator, delta.device)
    return indices, _clipped(delta, indices, params["gamma"]).add_(noise)


def partial_share(delta: torch.Tensor, *, fraction: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Release the c = ceil(fraction * n) coordinates of ``delta`` with the largest |delta|, clipped.

    Shokri and Shmatikov's partial sharing (CCS 2015). No noise is added, so this gives **no
    formal privacy guarantee**: the update reveals exactly which coordinates moved most and their
    values clipped to [-gamma, gamma]. Nothing in it is random; ties in |delta| at the cut are
    broken by ``torch.topk``.

    Returns ``(indices, values)`` shaped as ``svt`` returns them: sorted unique int64 positions
    and the float32 clipped values at them. Raises ProtocolError naming a bad parameter or delta.
    """
    params = validate_mechanism(MECHANISM_PARTIAL, {"fraction": fraction, "gamma": gamma})
    delta = _checked_delta(delta)
    count = selection_count(params["fraction"], delta.numel())
    largest = torch.topk(delta.abs(), count, sorted=False).indices.sort().values
    return largest, _clipped(delta, largest, params["gamma"])


def release_dense(delta: torch.Tensor) -> tuple[None, torch.Tensor]:
    """Release the whole per-step delta as it is: ``(None, delta)``, a dense update.

    For "none" this is no protection at all. For DP-SGD it is post-processing: the noise was
    added to every step's gradients while training, so the delta is already private.
    """
    return None, _checked_delta(delta)


def _checked_delta(delta: torch.Tensor) -> torch.Tensor:
    """The delta, detached from autograd, or a ProtocolError saying why it cannot be used."""
    if not isinstance(delta, torch.Tensor):
        raise ProtocolError(f"delta must be a torch.Tensor, not {type(delta).__name__}")
    delta = delta.detach()
    if delta.dim() != 1:
        raise ProtocolError(f"delta must be one flat 1-D tensor, not of shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise ProtocolError(f"delta must hold floating-point values, not {delta.dtype}")
    if delta.numel() == 0:
        raise ProtocolError("delta must not be empty")
    # The sum is a cheap first look: it is finite unless a value is NaN or infinite (or the sum
    # overflows), so the full elementwise check runs only when something may be wrong.
    if not torch.isfinite(delta.sum()):
        bad = int((~torch.isfinite(delta)).sum())
        if bad:
            raise ProtocolError(f"delta must be finite, but {bad} of its {delta.numel()} values are not")
    return delta


def _fresh_generator(device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.seed()  # from the operating system's entropy, not from torch's global generator
    return generator


def _clipped(delta: torch.Tensor, coordinates: torch.Tensor, gamma: float) -> torch.Tensor:
    """clip(delta_i, gamma) at ``coordinates``, as a new float32 tensor."""
    return delta[coordinates].to(torch.float32).clamp_(-gamma, gamma)


@dataclass(frozen=True)
class _NoisyQueries:
    """SVT's queries on one delta: |clip(delta_i, gamma)| + fresh Lap(scale), against one threshold."""

    delta: torch.Tensor
    gamma: float
    threshold: float
    scale: float
    generator: torch.Generator

    def first_qualifying(self, arriving: torch.Tensor, need: int) -> torch.Tensor:
        """Of a stage's ``arriving`` coordinates, the first ``need`` whose noisy answer reaches the threshold.

        The arrivals come in a uniformly random order among themselves, and whether a coordinate
        qualifies does not depend on that order, so the first ``need`` to qualify are a uniformly
        random ``need`` of those that do. Returns all that qualify when there are no more than that.
        """
        answers = _clipped(self.delta, arriving, self.gamma).abs_()
        noise = _laplace(self.scale, arriving.numel(), self.generator, self.delta.device)
        qualifies = answers.add_(noise) >= self.threshold
        excess = int(qualifies.sum()) - need
        if excess > 0:
            _unmark_random(qualifies, excess, self.generator)
        return arriving[qualifies]


def _select_above_threshold(queries: _NoisyQueries, count: int) -> torch.Tensor:
    """SVT's selection: the sorted coordinates of the first ``count`` noisy answers at least the threshold.

    Runs up to MAX_PASSES passes; each later pass visits only the coordinates not yet selected,
    so selection is without replacement.
    """
    selected: list[torch.Tensor] = []
    need = count
    for _ in range(MAX_PASSES):
        found = _one_pass(queries, _unselected(queries.delta, selected), need)
        selected += found
        need -= sum(piece.numel() for piece in found)
        if need == 0:
            break
    return _sorted_union(selected, queries.delta.device)


def _one_pass(queries: _NoisyQueries, pool: torch.Tensor | None, need: int) -> list[torch.Tensor]:
    """One SVT pass over ``pool`` (sorted coordinates; None for all of them), as sorted pieces.

    The pass behaves exactly as visiting the pool in a uniformly random order and stopping at the
    ``need``-th coordinate whose noisy answer reaches the threshold, but it never builds that order
    (a permutation of millions of coordinates costs more than all the noise). Picture each
    coordinate arriving at an independent uniformly random time: the ones that arrive before some
    time t are a sample taking each coordinate with probability t, they arrive in a uniformly random
    order among themselves, and all arrive before the rest. So a stage samples the unvisited pool,
    gives the sampled coordinates their query noise, and when more qualify than are needed keeps a
    uniformly random ``need`` of them: the ones the sequential visit would have met first. When too
    few qualify, the next stage samples among the coordinates still unvisited. Any t gives the same
    output distribution; it is chosen only so that one stage almost always suffices without
    visiting many more coordinates than needed.
    """
    delta = queries.delta
    found: list[torch.Tensor] = []
    unvisited = pool
    # An answer is at least 0, so each coordinate qualifies with at least this chance.
    least_chance = _laplace_survival(queries.threshold, queries.scale)
    while need > 0 and (size := _size(unvisited, delta)) > 0:
        share = _share_to_visit(need, size, least_chance)
        arriving_at = _bernoulli_positions(size, share, queries.generator, delta.device)
        qualifying = queries.first_qualifying(_take(unvisited, arriving_at), need)
        found.append(qualifying)
        need -= qualifying.numel()
        if need > 0:
            unvisited = _drop(unvisited, arriving_at, size)
    return found


def _unmark_random(mask: torch.Tensor, count: int, generator: torch.Generator) -> None:
    """Clear ``count`` of the set entries of the 1-D bool ``mask``, chosen uniformly at random."""
    rank = mask.cumsum(0)  # rank[i]: how many entries are set up to and including i
    ranks_to_clear = _random_distinct(int(rank[-1]), count, generator, mask.device).add_(1)
    mask[torch.searchsorted(rank, ranks_to_clear)] = False


def _random_distinct(size: int, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A uniformly random set of ``count`` distinct positions in range(size), in no particular order."""
    if 4 * count > size:
        return torch.randperm(size, generator=generator, device=device)[:count]
    # Few of many (the usual case: a stage's small surplus of qualifying coordinates): draw with
    # replacement and drop repeats, which is far cheaper than a permutation of all `size`. Given
    # how many distinct values came up, which ones they are is a uniformly random set of that size.
    drawn = torch.randint(size, (count + count // 2 + 16,), generator=generator, device=device).unique()
    while drawn.numel() < count:
        more = torch.randint(size, (count,), generator=generator, device=device)
        drawn = torch.cat([drawn, more]).unique()
    return drawn[torch.randperm(drawn.numel(), generator=generator, device=device)[:count]]


def _share_to_visit(need: int, unvisited: int, least_chance: float) -> float:
    """The share of the unvisited coordinates a stage samples to find ``need`` qualifying ones."""
    if least_chance <= 0:
        return 1.0
    wanted = max(1.0, need + _SPARE_SIGMAS * math.sqrt(need) + _SPARE_MINIMUM)
    share = wanted / (least_chance * unvisited)
    return 1.0 if share >= _VISIT_ALL_SHARE else share


def _bernoulli_positions(
    size: int,
    share: float,
    generator: torch.Generator,
    device: torch.device,
    *,
    spare_sigmas: float = 6.0,
) -> torch.Tensor:
    """Sorted positions in range(size), each taken independently with probability ``share``.

    Draws the geometric gaps between taken positions rather than one coin per position, so the
    work is proportional to the number taken, not to ``size``. Draws enough gaps to pass the end
    but for a ``spare_sigmas`` shortfall, and then draws more.
    """
    if share >= 1:
        return torch.arange(size, device=device)
    log_miss = math.log1p(-share)
    pieces: list[torch.Tensor] = []
    last = -1
    while last < size - 1:
        expected = (size - 1 - last) * share
        uniform = torch.rand(
            max(1, int(expected + spare_sigmas * math.sqrt(expected) + 16)),
            dtype=torch.float64,
            generator=generator,
            device=device,
        )
        # P(gap > k) = (1 - share)^k; 1 - uniform lies in (0, 1], so the log is finite. A gap
        # past the end is as good as any longer one, and the cap keeps the sum in int64.
        gaps = torch.log1p(-uniform).div_(log_miss).floor_().clamp_(max=size).to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(last)
        pieces.append(positions[: int(torch.searchsorted(positions, size))])
        last = int(positions[-1])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _laplace(scale: float, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` independent float32 draws from Laplace(0, scale)."""
    uniform = torch.rand(count, generator=generator, device=device)
    return _laplace_from_uniform(uniform, scale)


def _laplace_from_uniform(uniform: torch.Tensor, scale: float) -> torch.Tensor:
    """Laplace(0, scale) from float32 uniforms in [0, 1).

    On the CPU torch.rand draws the grid k * 2^-24, k = 0 .. 2^24 - 1. Shifting 2u - 1 by half a
    grid step maps it onto the odd multiples of 2^-24 in (-1, 1), exactly in float32: symmetric
    about 0, never 0 and never +-1. The sign then picks the side and -log(1 - |v|) is an Exp(1)
    magnitude that is always finite (at most 24 ln 2, about 16.6). Any u in [0, 1), on any grid,
    lands within 1 - 2^-24 of 0, so the log is finite whatever the device.
    """
    signed = uniform.mul(2).sub_(1 - _FLOAT32_UNIFORM_STEP)
    magnitude = signed.abs().neg_().log1p_().mul_(-scale)  # scale * Exp(1), never negative
    return magnitude.copysign_(signed)


def _laplace_survival(x: float, scale: float) -> float:
    """P(Lap(0, scale) >= x)."""
    if x >= 0:
        return 0.5 * math.exp(-x / scale)
    return 1 - 0.5 * math.exp(x / scale)


# Pools of coordinates are sorted int64 tensors, or None for "every coordinate of the delta":
# building that as a tensor would cost a write of the delta's length for nothing in the common
# case, where one stage of the first pass finds all c.


def _size(pool: torch.Tensor | None, delta: torch.Tensor) -> int:
    return delta.numel() if pool is None else pool.numel()


def _take(pool: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """The coordinates at ``positions`` within ``pool``."""
    return positions if pool is None else pool[positions]


def _drop(pool: torch.Tensor | None, positions: torch.Tensor, size: int) -> torch.Tensor:
    """``pool`` without the coordinates at ``positions``."""
    keep = torch.ones(size, dtype=torch.bool, device=positions.device)
    keep[positions] = False
    return keep.nonzero().squeeze(1) if pool is None else pool[keep]


def _unselected(delta: torch.Tensor, selected: list[torch.Tensor]) -> torch.Tensor | None:
    """The coordinates not in any of the ``selected`` pieces (None while nothing is selected)."""
    if not any(piece.numel() for piece in selected):
        return None
    keep = torch.ones(delta.numel(), dtype=torch.bool, device=delta.device)
    for piece in selected:
        keep[piece] = False
    return keep.nonzero().squeeze(1)


def _sorted_union(pieces: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The disjoint sorted ``pieces`` as one sorted tensor (one piece needs no sort)."""
    nonempty = [piece for piece in pieces if piece.numel()]
    if not nonempty:
        return torch.empty(0, dtype=torch.int64, device=device)
    if len(nonempty) == 1:
        return nonempty[0]
    return torch.cat(nonempty).sort().values
