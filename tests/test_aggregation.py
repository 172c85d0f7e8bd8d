"""The aggregation arithmetic against a plain dense NumPy reference, and the upload checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.stats
import torch
from torch.profiler import ProfilerActivity, profile

from coordinator import aggregation
from coordinator.aggregation import UpdateRejected, aggregate, validate_update
from sitesagent import protocol
from sitesagent.updates import Update, decode_update, encode_update

N = 5_000
FRACTION = 0.1
GAMMA = 0.01
SVT = {
    "fraction": FRACTION,
    "gamma": GAMMA,
    "tau": 0.001,
    "eps_threshold": 0.1,
    "eps_query": 0.4,
    "eps_release": 0.5,
}
PARTIAL = {"fraction": FRACTION, "gamma": GAMMA}

# float32 output against a float64 reference, on values of order 1.
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


@dataclass
class Plain:
    """The least an update must offer aggregate(): indices (None when dense), values, N_k."""

    indices: torch.Tensor | None
    values: torch.Tensor
    n_iterations: int


def random_updates(seed: int, count: int, *, dense: int = 0, n: int = N, spread: float = 1.0) -> list[Plain]:
    """``count`` updates, the first ``dense`` of them dense, the rest a random tenth each."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for position in range(count):
        n_iterations = int(torch.randint(1, 500, (1,), generator=generator))
        if position < dense:
            values = torch.randn(n, generator=generator) * spread
            updates.append(Plain(None, values, n_iterations))
            continue
        c = protocol.selection_count(FRACTION, n)
        indices = torch.randperm(n, generator=generator)[:c].sort().values
        values = torch.randn(c, generator=generator) * spread
        updates.append(Plain(indices, values, n_iterations))
    return updates


def dense_rows(updates: list[Plain], n: int, norm_bound: float | None) -> np.ndarray:
    """The documented reading: an unsent coordinate is 0; rows scaled to the norm bound."""
    rows = np.zeros((len(updates), n), dtype=np.float64)
    for row, update in zip(rows, updates, strict=True):
        if update.indices is None:
            row[:] = update.values.numpy()
        else:
            row[update.indices.numpy()] = update.values.numpy()
        norm = np.linalg.norm(row)
        if norm_bound is not None and norm > norm_bound:
            row *= norm_bound / norm
    return rows


def reference(
    base: torch.Tensor,
    updates: list[Plain],
    rule: str = "mean",
    trim_fraction: float = 0.1,
    norm_bound: float | None = None,
) -> np.ndarray:
    rows = dense_rows(updates, base.numel(), norm_bound)
    if rule == "mean":
        weights = np.array([update.n_iterations for update in updates], dtype=np.float64)
        change = weights @ rows / weights.sum()
    elif rule == "median":
        change = np.median(rows, axis=0)
    else:
        # SciPy's trim_mean cuts int(proportion * K) from each end: the documented definition.
        change = scipy.stats.trim_mean(rows, trim_fraction, axis=0)
    return base.numpy().astype(np.float64) + change


def base_weights(n: int = N, seed: int = 99) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def assert_matches(result: torch.Tensor, expected: np.ndarray) -> None:
    assert result.dtype == torch.float32 and result.device.type == "cpu"
    np.testing.assert_allclose(result.numpy(), expected, **TOLERANCE)


# --- mean -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "dense"), [(1, 0), (5, 0), (13, 0), (4, 4), (7, 2)])
@pytest.mark.parametrize("norm_bound", [None, 3.0])
def test_mean_matches_the_dense_reference(count, dense, norm_bound):
    base = base_weights()
    updates = random_updates(count, count, dense=dense)
    result = aggregate(base, updates, norm_bound=norm_bound, device="cpu")
    assert_matches(result, reference(base, updates, norm_bound=norm_bound))


@pytest.mark.parametrize("dense", [0, 3])
def test_mean_in_cpu_blocks_matches_the_reference(monkeypatch, dense):
    # Small blocks, so the block-by-block path runs with many blocks and uneven edges.
    monkeypatch.setattr(aggregation, "CPU_BLOCK_COORDINATES", 777)
    base = base_weights()
    updates = random_updates(21, 11, dense=dense)
    assert_matches(aggregate(base, updates, device="cpu"), reference(base, updates))


def test_mean_weights_updates_by_their_iterations():
    base = torch.zeros(4)
    updates = [
        Plain(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), 3),
        Plain(torch.tensor([1, 2]), torch.tensor([5.0, 5.0]), 1),
    ]
    # (3 * [1, 1, 0, 0] + 1 * [0, 5, 5, 0]) / 4
    assert aggregate(base, updates, device="cpu").tolist() == [0.75, 2.0, 1.25, 0.0]


def test_one_update_moves_the_base_by_exactly_its_values():
    base = base_weights()
    (update,) = random_updates(3, 1)
    expected = base.clone()
    expected[update.indices] += update.values
    assert torch.equal(aggregate(base, [update], device="cpu"), expected)


def test_norm_bound_scales_a_large_update_down_to_the_bound():
    base = torch.zeros(3)
    update = Plain(torch.tensor([0, 2]), torch.tensor([3.0, 4.0]), 1)  # norm 5
    assert aggregate(base, [update], norm_bound=1.0, device="cpu").tolist() == pytest.approx([0.6, 0, 0.8])
    assert aggregate(base, [update], norm_bound=10.0, device="cpu").tolist() == [3.0, 0.0, 4.0]


def test_aggregate_leaves_the_base_and_the_updates_untouched():
    base = base_weights()
    updates = random_updates(4, 3, dense=1)
    before = [base.clone()] + [update.values.clone() for update in updates]
    for rule in aggregation.RULES:
        aggregate(base, updates, rule=rule, norm_bound=1.0, device="cpu")
    after = [base] + [update.values for update in updates]
    assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True))


def test_decoded_updates_aggregate_like_plain_ones():
    base = base_weights()
    updates = random_updates(8, 3)
    decoded = [
        decode_update(
            encode_update(
                indices=update.indices,
                values=update.values,
                n_parameters=N,
                n_iterations=update.n_iterations,
                n_cases=1,
                mechanism="partial",
                params=PARTIAL,
            )
        )
        for update in updates
    ]
    assert torch.equal(aggregate(base, decoded, device="cpu"), aggregate(base, updates, device="cpu"))


# --- median and trimmed mean ----------------------------------------------------------------


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize(("count", "dense"), [(1, 0), (4, 0), (13, 0), (12, 0), (6, 2), (3, 3)])
@pytest.mark.parametrize("norm_bound", [None, 3.0])
def test_robust_rules_match_the_dense_reference(rule, count, dense, norm_bound):
    base = base_weights()
    # A third of the coordinates each, so coordinates sent by many updates are common.
    updates = random_updates(100 + count, count, dense=dense)
    for update in updates[dense:]:
        update.indices = torch.cat([update.indices, torch.arange(0, N, 7)]).unique()
        update.values = torch.randn(update.indices.numel(), generator=torch.Generator().manual_seed(count))
    result = aggregate(base, updates, rule=rule, norm_bound=norm_bound, device="cpu")
    assert_matches(result, reference(base, updates, rule=rule, norm_bound=norm_bound))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_in_small_memory_blocks_match_the_reference(rule):
    base = base_weights()
    updates = random_updates(7, 10, dense=1)
    # 16 bytes an entry, 10 updates: blocks of 37 coordinates, 136 of them.
    result = aggregate(
        base, updates, rule=rule, trim_fraction=0.2, device="cpu", robust_memory_bytes=16 * 10 * 37
    )
    assert_matches(result, reference(base, updates, rule=rule, trim_fraction=0.2))


def test_median_counts_an_unsent_coordinate_as_no_change():
    base = torch.zeros(3)
    updates = [
        Plain(torch.tensor([0, 1]), torch.tensor([9.0, 1.0]), 1),
        Plain(torch.tensor([1]), torch.tensor([2.0]), 1),
        Plain(torch.tensor([1, 2]), torch.tensor([3.0, 4.0]), 1),
    ]
    # Coordinate 0: only one site of three sent it, so the median is 0, not 9.
    assert aggregate(base, updates, rule="median", device="cpu").tolist() == [0.0, 2.0, 0.0]


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    base = torch.zeros(1)
    updates = [Plain(torch.tensor([0]), torch.tensor([value]), 1) for value in (1.0, 2.0, 4.0, 100.0)]
    assert aggregate(base, updates, rule="median", device="cpu").tolist() == [3.0]


def test_median_moves_a_coordinate_that_half_the_updates_sent():
    base = torch.zeros(2)
    updates = [
        Plain(torch.tensor([0, 1]), torch.tensor([3.0, 7.0]), 1),
        Plain(torch.tensor([0]), torch.tensor([5.0]), 1),
        Plain(torch.tensor([], dtype=torch.int64), torch.tensor([]), 1),
        Plain(torch.tensor([], dtype=torch.int64), torch.tensor([]), 1),
    ]
    # Coordinate 0: [0, 0, 3, 5] has median 1.5; coordinate 1: [0, 0, 0, 7] has 0.
    assert aggregate(base, updates, rule="median", device="cpu").tolist() == [1.5, 0.0]


def test_median_ignores_how_many_iterations_a_site_claims():
    base = torch.zeros(1)
    updates = [
        Plain(torch.tensor([0]), torch.tensor([1.0]), 1),
        Plain(torch.tensor([0]), torch.tensor([1.0]), 1),
    ]
    updates.append(Plain(torch.tensor([0]), torch.tensor([1000.0]), 10**9))
    assert aggregate(base, updates, rule="median", device="cpu").tolist() == [1.0]
    assert aggregate(base, updates, device="cpu").item() > 999


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    base = torch.zeros(1)
    values = (-50.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1e6)
    updates = [Plain(torch.tensor([0]), torch.tensor([value]), 1) for value in values]
    assert aggregate(base, updates, rule="trimmed_mean", trim_fraction=0.1, device="cpu").tolist() == [4.5]


def test_trimmed_mean_that_trims_nothing_is_the_unweighted_mean():
    base = base_weights()
    updates = random_updates(31, 4)
    result = aggregate(base, updates, rule="trimmed_mean", trim_fraction=0.1, device="cpu")
    rows = dense_rows(updates, N, None)
    assert_matches(result, base.numpy() + rows.mean(axis=0))


# --- arguments ------------------------------------------------------------------------------


def test_no_updates_is_an_error():
    with pytest.raises(ValueError, match="no updates"):
        aggregate(base_weights(), [], device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "mode"}, "rule must be one of"),
        ({"rule": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction"),
        ({"trim_fraction": -0.1}, "trim_fraction"),
        ({"norm_bound": 0.0}, "norm_bound"),
        ({"norm_bound": float("nan")}, "norm_bound"),
        ({"device": "tpu"}, "device must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate(base_weights(), random_updates(1, 2), **{"device": "cpu", **kwargs})


@pytest.mark.parametrize(
    ("update", "match"),
    [
        (Plain(None, torch.zeros(N - 1), 1), "dense update needs 5000"),
        (Plain(torch.tensor([1, 2]), torch.zeros(3), 1), "matching 1-D"),
        (Plain(torch.tensor([1, N]), torch.zeros(2), 1), "outside"),
        (Plain(torch.tensor([-1, 2]), torch.zeros(2), 1), "outside"),
        (Plain(torch.tensor([1, 2]), torch.zeros(2), 0), "n_iterations"),
    ],
)
def test_malformed_updates_are_refused(update, match):
    with pytest.raises(ValueError, match=match):
        aggregate(base_weights(), [update], device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        aggregate(base_weights(), random_updates(1, 1), device="cuda")


def test_auto_runs_on_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert aggregation.resolve_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", aggregation.RULES)
def test_cuda_agrees_with_the_cpu(rule):
    base = base_weights(200_000)
    updates = random_updates(77, 13, dense=2, n=200_000)
    on_cpu = aggregate(base, updates, rule=rule, norm_bound=50.0, device="cpu")
    on_cuda = aggregate(base, updates, rule=rule, norm_bound=50.0, device="cuda")
    assert on_cuda.device.type == "cpu"
    # The order of CUDA's atomic adds differs from the CPU's, so the last bit may.
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-6, atol=1e-6)


# --- no dense copy per update ---------------------------------------------------------------


def bytes_allocated(function) -> int:
    """Every byte torch allocated on the CPU while ``function`` ran (frees not subtracted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    return sum(event.self_cpu_memory_usage for event in profiler.events() if event.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("block", [aggregation.CPU_BLOCK_COORDINATES, 50_000])
def test_mean_allocates_one_output_not_one_dense_vector_per_update(monkeypatch, block):
    monkeypatch.setattr(aggregation, "CPU_BLOCK_COORDINATES", block)
    n = 400_000
    base = base_weights(n)
    updates = random_updates(5, 20, n=n)
    allocated = bytes_allocated(lambda: aggregate(base, updates, device="cpu"))
    one_vector = 4 * n
    # The output and small bookkeeping; densifying each update would be 20 vectors or more.
    assert one_vector <= allocated < 1.5 * one_vector

    def densifying():
        out = base.clone()
        for update in updates:
            out += torch.zeros(n).index_put_((update.indices,), update.values)

    assert bytes_allocated(densifying) > 20 * one_vector  # the measure can tell them apart


def test_sparse_updates_are_added_with_index_add_of_their_own_size(monkeypatch):
    calls = []
    original = torch.Tensor.index_add_

    def spy(self, dim, index, source, **kwargs):
        calls.append((self.numel(), source.numel()))
        return original(self, dim, index, source, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add_", spy)
    updates = random_updates(6, 4)
    aggregate(base_weights(), updates, device="cpu")
    c = protocol.selection_count(FRACTION, N)
    assert calls == [(N, c)] * 4


def test_robust_rules_stay_within_their_memory_budget():
    n, count, budget = 1_000_000, 10, 16 * 2**20
    base = base_weights(n)
    updates = random_updates(9, count, n=n)

    # Trimming nothing, every coordinate anyone sent is gathered: two thirds of them.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        aggregate(
            base, updates, rule="trimmed_mean", trim_fraction=0.0, device="cpu", robust_memory_bytes=budget
        )
    level = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    # The budget, plus the output and the sender counts (4 bytes a parameter each).
    assert peak <= budget + 8 * n + 2**20


# --- validate_update ------------------------------------------------------------------------


def svt_like_update(seed: int, n_iterations: int = 40, n: int = N) -> Update:
    """What an SVT agent uploads: N_k * (clip(d, gamma) + Laplace(2 c gamma / eps_release))."""
    generator = np.random.default_rng(seed)
    c = protocol.selection_count(FRACTION, n)
    release_scale = protocol.svt_noise_scales(SVT, n)["release"]
    per_step = generator.normal(0, 0.05, n)
    chosen = np.sort(generator.choice(n, c, replace=False))
    released = np.clip(per_step[chosen], -GAMMA, GAMMA) + generator.laplace(0, release_scale, c)
    return Update(
        indices=torch.from_numpy(chosen),
        values=torch.from_numpy((n_iterations * released).astype(np.float32)),
        n_parameters=n,
        n_iterations=n_iterations,
        n_cases=5,
        mechanism="svt",
        params=dict(SVT),
        encoding="sparse",
    )


def partial_update(n_iterations: int = 40, **changes) -> Update:
    c = protocol.selection_count(FRACTION, N)
    generator = np.random.default_rng(3)
    delta = generator.normal(0, 0.05, N)
    chosen = np.sort(np.argsort(-np.abs(delta))[:c])
    values = n_iterations * np.clip(delta[chosen], -GAMMA, GAMMA)
    fields = {
        "indices": torch.from_numpy(chosen),
        "values": torch.from_numpy(values.astype(np.float32)),
        "n_parameters": N,
        "n_iterations": n_iterations,
        "n_cases": 5,
        "mechanism": "partial",
        "params": dict(PARTIAL),
        "encoding": "sparse",
    }
    fields.update(changes)
    return Update(**fields)


def dense_update(**changes) -> Update:
    fields = {
        "indices": None,
        "values": torch.randn(N),
        "n_parameters": N,
        "n_iterations": 3,
        "n_cases": 5,
        "mechanism": "none",
        "params": {},
        "encoding": "dense",
    }
    fields.update(changes)
    return Update(**fields)


def validate_partial(update) -> None:
    validate_update(update, n_parameters=N, mechanism="partial", params=PARTIAL)


@pytest.mark.parametrize("seed", range(20))
def test_honest_svt_updates_are_accepted(seed):
    validate_update(
        svt_like_update(seed, n_iterations=1 + seed * 37), n_parameters=N, mechanism="svt", params=SVT
    )


def test_honest_partial_and_dense_updates_are_accepted():
    validate_partial(partial_update())
    validate_update(dense_update(), n_parameters=N, mechanism="none", params={})


def test_a_partial_value_of_exactly_the_clip_bound_is_accepted():
    update = partial_update(n_iterations=7)
    update.values[0] = 7 * GAMMA
    validate_partial(update)


def test_updates_from_the_agents_own_svt_are_accepted():
    privacy = pytest.importorskip("sitesagent.privacy")
    generator = torch.Generator().manual_seed(11)
    delta = torch.randn(N, generator=generator) * 0.02
    indices, released = privacy.svt(delta, **SVT, generator=generator)
    n_iterations = 25
    data = encode_update(
        indices=indices,
        values=released * n_iterations,
        n_parameters=N,
        n_iterations=n_iterations,
        n_cases=4,
        mechanism="svt",
        params=SVT,
    )
    validate_update(decode_update(data), n_parameters=N, mechanism="svt", params=SVT)


def test_the_svt_sanity_bound_and_its_false_reject_odds():
    bound = aggregation.value_bound("svt", SVT, N, 10)
    scale = protocol.svt_noise_scales(SVT, N)["release"]
    assert bound == pytest.approx(10 * (GAMMA + 50 * scale))
    # An honest value breaks it only with a Laplace draw beyond 50 scales.
    assert math.exp(-50) * protocol.selection_count(FRACTION, 4_702_227) < 1e-16


def rejected(update, match: str, *, mechanism: str = "partial", params=None, **kwargs) -> None:
    with pytest.raises(UpdateRejected, match=match):
        validate_update(
            update,
            n_parameters=N,
            mechanism=mechanism,
            params=PARTIAL if params is None else params,
            **kwargs,
        )


def test_another_mechanism_than_the_rounds_is_rejected():
    rejected(svt_like_update(1), "made with mechanism 'svt' but the round uses 'partial'")


def test_other_parameters_than_the_rounds_are_rejected():
    rejected(
        partial_update(params={"fraction": FRACTION, "gamma": 0.02}),
        "applied gamma=0.02 but the round set gamma=0.01",
    )
    rejected(partial_update(params={"fraction": 0.2, "gamma": GAMMA}), "applied fraction=0.2")


def test_parameters_that_are_invalid_are_rejected():
    rejected(partial_update(params={"fraction": FRACTION}), "parameters are invalid.*gamma")


def test_an_update_for_another_model_size_is_rejected():
    rejected(partial_update(n_parameters=N + 1), "for 5001 parameters but the model has 5000")


@pytest.mark.parametrize("field", ["n_iterations", "n_cases"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_counts_below_one_are_rejected(field, bad):
    rejected(partial_update(**{field: bad}), f"{field} must be a whole number of at least 1")


def test_a_dense_update_for_a_sparse_mechanism_is_rejected():
    rejected(dense_update(mechanism="partial", params=dict(PARTIAL)), "must be sparse")


def test_a_sparse_update_for_mechanism_none_is_rejected():
    update = dense_update(indices=torch.tensor([1]), values=torch.tensor([1.0]))
    rejected(update, "must be dense", mechanism="none", params={})


def test_a_dense_update_of_the_wrong_length_is_rejected():
    rejected(dense_update(values=torch.zeros(N - 1)), "needs 5000 values", mechanism="none", params={})


def test_more_values_than_the_fraction_allows_are_rejected():
    c = protocol.selection_count(FRACTION, N)
    update = partial_update(indices=torch.arange(c + 1), values=torch.zeros(c + 1))
    rejected(update, f"sends {c + 1} values but the round allows at most {c}")


def test_more_values_than_max_values_are_rejected():
    rejected(partial_update(), "more than the limit of 10", max_values=10)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([5, 5, 9], "sorted without repeats"),
        ([9, 5, 20], "sorted"),
        ([1, 2, N], "outside"),
        ([-3, 1, 2], "outside"),
    ],
)
def test_bad_indices_are_rejected(indices, match):
    rejected(partial_update(indices=torch.tensor(indices), values=torch.zeros(3)), match)


def test_indices_of_another_dtype_are_rejected():
    rejected(partial_update(indices=torch.tensor([1, 2], dtype=torch.int32), values=torch.zeros(2)), "int64")


def test_values_of_another_dtype_are_rejected():
    rejected(
        partial_update(indices=torch.tensor([1, 2]), values=torch.zeros(2, dtype=torch.float64)), "float32"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_values_that_are_not_finite_are_rejected(bad):
    update = partial_update()
    update.values[3] = bad
    rejected(update, "value 3 is .*; every value must be finite")


def test_a_partial_value_beyond_the_clip_bound_is_rejected():
    update = partial_update(n_iterations=7)
    update.values[2] = 7 * GAMMA * 1.01
    rejected(update, "value 2 is 0.0707, beyond the partial bound N_k \\* gamma = 0.07")


def test_an_svt_value_beyond_the_sanity_bound_is_rejected():
    update = svt_like_update(4)
    bound = aggregation.value_bound("svt", SVT, N, update.n_iterations)
    update.values[10] = -bound * 1.01
    rejected(update, "value 10 .* beyond the svt bound", mechanism="svt", params=SVT)


def test_mechanism_none_has_no_value_bound():
    validate_update(dense_update(values=torch.full((N,), 1e30)), n_parameters=N, mechanism="none", params={})
