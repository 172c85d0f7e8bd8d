"""The privacy mechanisms, tested as the statistics they promise (DESIGN section 6).

Every random test runs from a fixed seed, so it passes or fails the same way on every run. Each
statistical check sits where the mechanism as specified passes with room to spare while the
mistakes it guards against (a wrong noise scale, noise added before clipping, a threshold drawn
per pass, a selection that follows the data when it should not) fail; companion tests run the
same check on such a mistake and show that it does fail.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter
from typing import Any

import pytest
import scipy.stats
import torch

from bench.svt import svt_python_loop
from sitesagent import privacy
from sitesagent.privacy import partial_share, svt
from sitesagent.protocol import ProtocolError, selection_count, svt_noise_scales

# A checked statistic this far out is a failure; from a fixed seed a correct mechanism lands far inside.
ALPHA = 1e-3
# How decisively a check must reject a known mistake, to show it has the power to catch it.
REJECT = 1e-6

# Noise-dominated: c = 10% of n, and every noise scale is many times gamma.
NOISY: dict[str, Any] = {
    "fraction": 0.1,
    "gamma": 1.0,
    "tau": 0.5,
    "eps_threshold": 1.0,
    "eps_query": 1.0,
    "eps_release": 1.0,
}
HUGE = 1e12  # an epsilon whose noise is far below any gap between the answers tested with it
EXACT: dict[str, Any] = {**NOISY, "eps_threshold": HUGE, "eps_query": HUGE, "eps_release": HUGE}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_svt(delta: torch.Tensor, seed: int, **overrides: float) -> tuple[torch.Tensor, torch.Tensor]:
    return svt(delta, generator=seeded(seed), **{**NOISY, **overrides})


def laplace_pvalue(sample: torch.Tensor, scale: float) -> float:
    return scipy.stats.kstest(sample.double().numpy(), scipy.stats.laplace(scale=scale).cdf).pvalue


def assert_sparse_update(indices: torch.Tensor, values: torch.Tensor, n: int) -> None:
    assert indices.dtype == torch.int64 and indices.dim() == 1
    assert values.dtype == torch.float32 and values.shape == indices.shape
    assert bool((indices[1:] > indices[:-1]).all()), "indices must be sorted without repeats"
    if indices.numel():
        assert int(indices[0]) >= 0 and int(indices[-1]) < n


# --- Shape of the output -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [NOISY, EXACT, {**NOISY, "tau": 3.0, "eps_query": 200.0}],
    ids=["noise-dominated", "near-exact", "few-qualify"],
)
def test_svt_releases_at_most_c_sorted_unique_coordinates(params):
    delta = torch.randn(1000, generator=seeded(0))
    c = selection_count(params["fraction"], delta.numel())
    for seed in range(30):
        indices, values = svt(delta, generator=seeded(seed), **params)
        assert_sparse_update(indices, values, delta.numel())
        assert indices.numel() <= c


def test_svt_selects_exactly_c_when_enough_coordinates_qualify():
    delta = torch.randn(5000, generator=seeded(1))
    c = selection_count(NOISY["fraction"], delta.numel())
    for seed in range(20):
        assert run_svt(delta, seed)[0].numel() == c  # noise-dominated: about half qualify each pass
        assert run_svt(delta, seed, **{**EXACT, "tau": 0.1})[0].numel() == c  # 92% are above tau


# --- The noise: release, query, threshold --------------------------------------------------------


def test_laplace_sampler_has_the_asked_scale_and_no_infinite_tail():
    sample = privacy._laplace(2.5, 200_000, seeded(2), torch.device("cpu"))
    assert laplace_pvalue(sample, 2.5) > ALPHA
    assert laplace_pvalue(sample, 2.5 * 1.2) < REJECT
    # The extreme uniforms torch.rand can return map to finite values, symmetric about 0.
    extremes = privacy._laplace_from_uniform(torch.tensor([0.0, 1 - 2.0**-24, 0.5 - 2.0**-24, 0.5]), 1.0)
    assert torch.isfinite(extremes).all()
    assert extremes[0] == -extremes[1] and extremes[2] == -extremes[3]
    assert extremes[1] == pytest.approx(24 * math.log(2))


def released_noise(delta, indices, values, gamma):
    return values.double() - delta[indices].double().clamp(-gamma, gamma)


def test_released_values_are_clipped_then_laplace_noised_at_2c_gamma_over_eps_release():
    delta = torch.randn(100_000, generator=seeded(3)).mul_(3)  # three quarters lie outside [-gamma, gamma]
    params = {**NOISY, "fraction": 0.2, "eps_release": 80_000.0}
    indices, values = svt(delta, generator=seeded(4), **params)
    scale = svt_noise_scales(params, delta.numel())["release"]
    assert scale == pytest.approx(0.5)  # 2 * 20000 * 1 / 80000
    noise = released_noise(delta, indices, values, params["gamma"])
    assert noise.numel() == 20_000
    assert laplace_pvalue(noise, scale) > ALPHA
    # Far outside the clip bound, the released values centre on the bound, not on the delta.
    far_above = delta[indices] > 2
    standard_error = scale * math.sqrt(2 / int(far_above.sum()))
    assert float(values[far_above].double().mean()) == pytest.approx(1.0, abs=4 * standard_error)


def test_the_release_check_rejects_a_wrong_scale_noise_before_clipping_and_no_clipping():
    delta = torch.randn(100_000, generator=seeded(3)).mul_(3)
    indices = torch.randperm(delta.numel(), generator=seeded(5))[:20_000].sort().values
    noise = privacy._laplace(0.5, indices.numel(), seeded(6), delta.device)
    chosen = delta[indices]
    right = chosen.clamp(-1, 1) + noise
    assert laplace_pvalue(released_noise(delta, indices, right, 1.0), 0.5) > ALPHA
    assert laplace_pvalue(released_noise(delta, indices, right, 1.0), 0.5 * 1.2) < REJECT
    assert laplace_pvalue(released_noise(delta, indices, right, 1.0), 0.5 * 0.8) < REJECT
    noised_then_clipped = (chosen + noise).clamp(-1, 1)
    assert laplace_pvalue(released_noise(delta, indices, noised_then_clipped, 1.0), 0.5) < REJECT
    never_clipped = chosen + noise
    assert laplace_pvalue(released_noise(delta, indices, never_clipped, 1.0), 0.5) < REJECT


def selected_share_by_level(levels: list[float], per_level: int, seed: int, **params: float) -> list[float]:
    """Run svt once on a delta holding each of ``levels`` ``per_level`` times; the share selected at each."""
    delta = torch.tensor(levels).repeat_interleave(per_level)
    indices, _ = svt(delta, generator=seeded(seed), **params)
    selected = torch.zeros(delta.numel(), dtype=torch.bool)
    selected[indices] = True
    return [float(share) for share in selected.view(len(levels), per_level).double().mean(dim=1)]


def consistent_with(shares: list[float], expected: list[float], per_level: int) -> bool:
    """Whether every observed share is within 4.5 binomial standard deviations of its expectation."""
    return all(
        abs(share - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1e-9) / per_level) + 1e-12
        for share, p in zip(shares, expected, strict=True)
    )


def test_each_query_gets_fresh_laplace_noise_at_2c_gamma_over_eps_query_in_every_pass():
    # fraction 1 makes c = n, so no call stops early: every coordinate is asked in every pass until
    # it qualifies, each time with fresh noise, against a threshold fixed at tau (huge eps_threshold).
    # A coordinate with answer a then ends up selected with chance 1 - (1 - P(a + Lap >= tau))^passes.
    levels, per_level = [0.0, 0.25, 0.5, 0.75, 1.0], 12_000
    n = len(levels) * per_level
    params = {"fraction": 1.0, "gamma": 1.0, "tau": 1.0, "eps_threshold": HUGE, "eps_release": 1.0}
    params["eps_query"] = 2 * n * 1.0 / 0.25  # query noise scale 0.25
    assert svt_noise_scales(params, n)["query"] == pytest.approx(0.25)
    shares = selected_share_by_level(levels, per_level, 7, **params)

    def expected(scale: float, passes: int = privacy.MAX_PASSES) -> list[float]:
        return [1 - (1 - privacy._laplace_survival(1.0 - level, scale)) ** passes for level in levels]

    assert consistent_with(shares, expected(0.25), per_level)
    assert not consistent_with(shares, expected(0.25 * 1.2), per_level)
    assert not consistent_with(shares, expected(0.25 * 0.8), per_level)
    assert not consistent_with(shares, expected(0.25, passes=1), per_level)  # noise reused across passes


def threshold_estimates(calls: int, **params: float) -> torch.Tensor:
    """Where the threshold fell in each of ``calls`` calls, read from the selection to within 1/2000.

    Queries are all but exact (huge eps_query) and c = n, so a call selects exactly the
    coordinates whose answer is at least T; on a grid of answers the smallest selected one pins T.
    """
    grid = 2000
    delta = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    estimates = []
    for seed in range(calls):
        indices, _ = svt(delta, generator=seeded(seed), **params)
        smallest_selected = int(indices[0]) if indices.numel() else grid
        estimates.append(smallest_selected / grid)
    return torch.tensor(estimates, dtype=torch.float64)


def test_threshold_gets_laplace_noise_at_gamma_over_eps_threshold_drawn_once_per_call(monkeypatch):
    # Three passes are enough to tell one threshold per call from one per pass, and quicker than ten.
    monkeypatch.setattr(privacy, "MAX_PASSES", 3)
    params = {"fraction": 1.0, "gamma": 1.0, "tau": 0.5, "eps_threshold": 25.0, "eps_query": HUGE}
    scale = svt_noise_scales({**params, "eps_release": 1.0}, 2000)["threshold"]
    assert scale == pytest.approx(0.04)
    noise = threshold_estimates(1500, eps_release=1.0, **params) - params["tau"]
    assert laplace_pvalue(noise, scale) > ALPHA
    # The mean absolute deviation estimates the scale (to about 2.6% here); a 20% error is far out.
    assert float(noise.abs().mean()) == pytest.approx(scale, rel=0.08)
    assert float(noise.abs().mean()) != pytest.approx(scale * 1.2, rel=0.08)
    assert float(noise.abs().mean()) != pytest.approx(scale * 0.8, rel=0.08)


def test_the_threshold_check_rejects_a_threshold_redrawn_every_pass():
    # Redrawn each of 3 passes, a call would select down to the lowest of 3 thresholds.
    lowest_of_three = (
        privacy._laplace(0.04, 3 * 1500, seeded(8), torch.device("cpu")).view(1500, 3).amin(dim=1)
    )
    assert laplace_pvalue(lowest_of_three, 0.04) < REJECT


def test_svt_draws_each_noise_at_its_documented_scale(monkeypatch):
    draws: list[tuple[float, int]] = []
    sample = privacy._laplace

    def recording(scale, count, generator, device):
        draws.append((scale, count))
        return sample(scale, count, generator, device)

    monkeypatch.setattr(privacy, "_laplace", recording)
    delta = torch.randn(10_000, generator=seeded(9))
    indices, _ = run_svt(delta, 10)
    scales = svt_noise_scales(NOISY, delta.numel())
    assert scales == {"threshold": 1.0, "query": 2000.0, "release": 2000.0}  # gamma 1, c 1000, eps 1
    assert draws[0] == (scales["threshold"], 1)  # one threshold per call
    assert draws[-1] == (scales["release"], indices.numel())  # one release draw per selected coordinate
    assert all(scale == scales["query"] for scale, _ in draws[1:-1])
    assert sum(count for _, count in draws[1:-1]) >= indices.numel()


# --- Which coordinates are selected --------------------------------------------------------------


def test_with_huge_epsilon_svt_selects_exactly_the_coordinates_whose_clipped_magnitude_reaches_tau():
    delta = torch.tensor([0.9, -0.2, 3.0, -5.0, 0.1, 0.7, 0.0, -0.6, 0.45, -0.55])
    for seed in range(20):
        indices, values = run_svt(delta, seed, **{**EXACT, "fraction": 0.6})
        assert indices.tolist() == [0, 2, 3, 5, 7, 9]
        assert values.tolist() == pytest.approx([0.9, 1.0, -1.0, 0.7, -0.6, -0.55])


def test_queries_see_the_clipped_delta_so_nothing_qualifies_above_gamma():
    delta = torch.tensor([5.0, -3.0, 0.9, 100.0])
    for seed in range(5):
        indices, _ = run_svt(delta, seed, **{**EXACT, "tau": 1.5})  # gamma is 1
        assert indices.numel() == 0


def test_with_huge_epsilon_and_more_qualifying_than_c_the_choice_among_them_is_uniform():
    qualifying = [i for i in range(20) if i % 2 == 0]
    delta = torch.tensor([0.8 if i in qualifying else 0.2 for i in range(20)])
    calls = 3000
    subsets = Counter(
        tuple(run_svt(delta, seed, **{**EXACT, "fraction": 0.15})[0].tolist()) for seed in range(calls)
    )
    assert set(subsets) <= set(itertools.combinations(qualifying, 3))
    counts = [subsets[subset] for subset in itertools.combinations(qualifying, 3)]
    assert scipy.stats.chisquare(counts).pvalue > ALPHA


def selection_counts(delta: torch.Tensor, calls: int, **params: float) -> list[int]:
    counts = torch.zeros(delta.numel(), dtype=torch.int64)
    for seed in range(calls):
        counts[run_svt(delta, seed, **params)[0]] += 1
    return counts.tolist()


def test_with_tiny_epsilon_selection_is_close_to_uniform_over_coordinates():
    delta = torch.tensor([0.0, 10.0]).repeat(20)  # half far below tau, half far above
    tiny = {"eps_threshold": 1e-6, "eps_query": 1e-6, "eps_release": 1e-6}
    assert scipy.stats.chisquare(selection_counts(delta, 2000, **tiny)).pvalue > ALPHA
    # The same check on a selection that does follow the data rejects it.
    assert scipy.stats.chisquare(selection_counts(delta, 200, **EXACT)).pvalue < REJECT


def test_selection_follows_the_same_distribution_as_the_per_coordinate_loop(monkeypatch):
    # Shrink the spare so that a pass's first stage often falls short and the rarely needed later
    # stages run too; the distribution must not depend on how many stages a pass takes.
    monkeypatch.setattr(privacy, "_SPARE_SIGMAS", -1.0)
    monkeypatch.setattr(privacy, "_SPARE_MINIMUM", 0)
    levels, per_level = [0.1, 0.3, 0.5, 0.7, 0.9], 40
    delta = torch.tensor(levels).repeat_interleave(per_level)
    params = {
        "fraction": 0.02,
        "gamma": 1.0,
        "tau": 0.5,
        "eps_threshold": 10.0,
        "eps_query": 8.0,
        "eps_release": 1.0,
    }
    assert svt_noise_scales(params, delta.numel())["query"] == pytest.approx(1.0)
    calls = 1500

    def level_counts(selections) -> list[int]:
        counts = Counter(index // per_level for indices in selections for index in indices)
        return [counts[level] for level in range(len(levels))]

    vectorised = [svt(delta, generator=seeded(seed), **params)[0].tolist() for seed in range(calls)]
    values = delta.tolist()
    looped = [svt_python_loop(values, rng=random.Random(seed), **params)[0] for seed in range(calls)]
    table = [level_counts(vectorised), level_counts(looped)]
    assert min(map(sum, table)) > 1000
    assert scipy.stats.chi2_contingency(table).pvalue > ALPHA
    assert {len(indices) for indices in vectorised + looped} == {4}


def test_bernoulli_positions_take_each_position_with_the_given_share_even_when_drawing_in_rounds():
    size, share = 100_000, 0.05
    taken = torch.zeros(size, dtype=torch.int64)
    for seed in range(40):
        # Drawing three standard deviations short forces several rounds of gaps.
        positions = privacy._bernoulli_positions(
            size, share, seeded(seed), torch.device("cpu"), spare_sigmas=-3
        )
        assert (
            bool((positions[1:] > positions[:-1]).all())
            and int(positions[0]) >= 0
            and int(positions[-1]) < size
        )
        taken[positions] += 1
    total = int(taken.sum())
    assert total == pytest.approx(40 * size * share, abs=4.5 * math.sqrt(40 * size * share))
    per_block = taken.view(100, -1).sum(dim=1).tolist()  # where along the range they fall
    assert scipy.stats.chisquare(per_block).pvalue > ALPHA


def test_unmark_random_clears_exactly_count_set_entries_uniformly():
    mask = torch.zeros(3000, dtype=torch.bool)
    mask[::3] = True  # 1000 set entries
    cleared = torch.zeros(3000, dtype=torch.int64)
    for seed in range(2000):
        # 20 of 1000: the draw-and-drop-repeats path of _random_distinct, not the permutation
        trial = mask.clone()
        privacy._unmark_random(trial, 20, seeded(seed))
        assert int(trial.sum()) == 980 and not bool((trial & ~mask).any())
        cleared += (mask & ~trial).long()
    assert int(cleared[~mask].sum()) == 0
    assert scipy.stats.chisquare(cleared[mask].tolist()).pvalue > ALPHA


# --- Randomness, purity, termination -------------------------------------------------------------


def test_same_seed_gives_the_same_update_and_another_seed_another():
    delta = torch.randn(20_000, generator=seeded(11))
    first, again, other = run_svt(delta, 12), run_svt(delta, 12), run_svt(delta, 13)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_svt_leaves_the_global_random_state_alone():
    delta = torch.randn(20_000, generator=seeded(14))
    before = torch.get_rng_state()
    run_svt(delta, 15)
    unseeded = [svt(delta, **NOISY) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(unseeded[0][0], unseeded[1][0])  # each unseeded call seeds its own generator


def test_svt_does_not_change_the_delta():
    delta = torch.randn(1000, generator=seeded(16)).mul_(3)
    kept = delta.clone()
    run_svt(delta, 17, fraction=0.5)
    partial_share(delta, fraction=0.5, gamma=1.0)
    assert torch.equal(delta, kept)


def test_svt_terminates_with_fewer_than_c_when_nothing_can_qualify():
    delta = torch.randn(200_000, generator=seeded(18))
    started = time.perf_counter()
    indices, values = run_svt(delta, 19, tau=1e6)
    assert time.perf_counter() - started < 10  # ten full passes over 200,000 coordinates
    assert indices.numel() < selection_count(NOISY["fraction"], delta.numel())
    assert_sparse_update(indices, values, delta.numel())


def test_svt_accepts_other_float_dtypes_and_releases_float32():
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        delta = torch.randn(1000, generator=seeded(20)).to(dtype)
        indices, values = run_svt(delta, 21)
        assert_sparse_update(indices, values, delta.numel())


# --- Refusals ------------------------------------------------------------------------------------


BAD_PARAMETERS = [
    ("fraction", 0),
    ("fraction", -0.1),
    ("fraction", 1.5),
    ("fraction", math.nan),
    ("gamma", 0),
    ("gamma", -1),
    ("gamma", math.inf),
    ("tau", -0.5),
    ("tau", math.nan),
    ("eps_threshold", 0),
    ("eps_threshold", math.inf),
    ("eps_query", -1),
    ("eps_query", math.nan),
    ("eps_release", 0),
    ("eps_release", "much"),
]


@pytest.mark.parametrize(("name", "value"), BAD_PARAMETERS)
def test_svt_refuses_a_bad_parameter_by_name(name, value):
    with pytest.raises(ProtocolError, match=name):
        run_svt(torch.ones(100), 0, **{name: value})


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, value in BAD_PARAMETERS if name in ("fraction", "gamma")]
)
def test_partial_share_refuses_a_bad_parameter_by_name(name, value):
    with pytest.raises(ProtocolError, match=name):
        partial_share(torch.ones(100), **{"fraction": 0.1, "gamma": 1.0, name: value})


@pytest.mark.parametrize(
    ("delta", "problem"),
    [
        (torch.randn(10, 10), "1-D"),
        (torch.arange(10), "floating-point"),
        (torch.tensor([0.1, math.nan]), "finite"),
        (torch.tensor([0.1, -math.inf]), "finite"),
        (torch.empty(0), "empty"),
        ([0.1, 0.2], "torch.Tensor"),
    ],
    ids=["2-D", "integer", "NaN", "infinite", "empty", "list"],
)
def test_both_mechanisms_refuse_an_unusable_delta(delta, problem):
    with pytest.raises(ProtocolError, match=f"delta must .*{problem}"):
        svt(delta, **NOISY)
    with pytest.raises(ProtocolError, match=f"delta must .*{problem}"):
        partial_share(delta, fraction=0.1, gamma=1.0)


def test_a_finite_delta_whose_sum_overflows_is_accepted():
    delta = torch.tensor([3e38, 3e38, -1.0])
    assert_sparse_update(*run_svt(delta, 22), delta.numel())


# --- Partial sharing -----------------------------------------------------------------------------


def test_partial_share_releases_exactly_the_largest_c_by_magnitude_clipped():
    magnitudes = torch.randperm(1000, generator=seeded(23)).double().add_(1).div_(500)  # distinct, up to 2
    signs = torch.randint(0, 2, (1000,), generator=seeded(24)).mul(2).sub(1)
    delta = (magnitudes * signs).float()
    indices, values = partial_share(delta, fraction=0.1, gamma=1.5)
    assert_sparse_update(indices, values, delta.numel())
    assert indices.tolist() == sorted(delta.abs().argsort(descending=True)[:100].tolist())
    assert torch.equal(values, delta[indices].clamp(-1.5, 1.5))
    assert torch.equal(partial_share(delta, fraction=0.1, gamma=1.5)[1], values)  # nothing random


# --- On the GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_svt_and_partial_share_work_on_a_cuda_delta_with_a_cuda_generator():
    device = torch.device("cuda")
    delta = torch.randn(100_000, generator=seeded(30)).mul_(3).to(device)
    params = {**NOISY, "fraction": 0.2, "eps_release": 80_000.0}  # release noise scale 0.5
    cuda_state = torch.cuda.get_rng_state()
    indices, values = svt(delta, generator=torch.Generator(device=device).manual_seed(31), **params)
    assert indices.device == delta.device and values.device == delta.device
    assert_sparse_update(indices.cpu(), values.cpu(), delta.numel())
    assert indices.numel() == 20_000
    assert laplace_pvalue(released_noise(delta.cpu(), indices.cpu(), values.cpu(), 1.0), 0.5) > ALPHA
    again = svt(delta, generator=torch.Generator(device=device).manual_seed(31), **params)
    assert torch.equal(again[0], indices) and torch.equal(again[1], values)
    assert svt(delta, **params)[0].device == delta.device  # its own generator, on the delta's device
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    largest, clipped = partial_share(delta, fraction=0.1, gamma=1.0)
    assert largest.device == delta.device
    assert largest.tolist() == sorted(delta.abs().argsort(descending=True)[:10_000].tolist())
