"""Patient-level DP-SGD at a site (sitesagent.dpsgd): a tiny SegResNet on CPU, synthetic cases.

The statistical tests draw from seeded generators, so they give the same numbers every run;
each states its tolerance in standard errors and checks that the same test rejects a plausible
wrong answer (a control), so that it can fail.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample

from sitesagent import data, dpsgd, model, synth, training
from sitesagent.dpsgd import DpSgdConfig, DpSgdConfigError
from sitesagent.training import TrainConfig, TrainConfigError

SIZE = 16  # voxels a side of the synthetic cases
ROI = 8  # the crop: a DP step of the tiny model then takes milliseconds
Z = 5.0  # tolerance of the statistical tests, in standard errors


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[data.Case]:
    out = tmp_path_factory.mktemp("site")
    synth.write_synthetic_cases(out, 3, seed=0, style=0, size=SIZE)
    return data.discover_cases(out)


def tiny(seed: int = 0) -> torch.nn.Module:
    return model.build_model(model.preset("tiny"), seed=seed)


def config(**overrides) -> TrainConfig:
    settings = {"max_iterations": 1, "roi_size": ROI, "lr": 1e-2, "seed": 1, "device": "cpu", "batch_size": 4}
    return TrainConfig(**(settings | overrides))


def dp(**overrides) -> DpSgdConfig:
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.5, "steps": 3}
    return DpSgdConfig(**(settings | overrides))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def weights(network: torch.nn.Module) -> torch.Tensor:
    return model.state_to_flat(network.state_dict())


class Recorder:
    """A DPOptimizer step hook: what Adam is about to see (the noisy average) and the per-case
    rows DPOptimizer clipped, at every step."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def __call__(self, optimizer) -> None:
        self.grads.append(flat(p.grad for p in optimizer.params).clone())
        self.rows.append(torch.cat([p.grad_sample.detach().flatten(1) for p in optimizer.params], dim=1))


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    """Records every step of `training.train(dp=...)`: train builds its optimiser with
    `dpsgd.make_optimizer`, wrapped here to attach the hook."""
    recording = Recorder()
    make_optimizer = dpsgd.make_optimizer

    def recording_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.attach_step_hook(recording)
        return optimizer

    monkeypatch.setattr(dpsgd, "make_optimizer", recording_optimizer)
    return recording


def random_crops(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = seeded(seed)
    images = torch.randn(n, 4, ROI, ROI, ROI, generator=generator)
    labels = (torch.rand(n, 3, ROI, ROI, ROI, generator=generator) > 0.7).float()
    return images, labels


def autograd_gradient(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain gradient of the mean Dice loss of ``images``, every parameter, one flat vector."""
    network.zero_grad(set_to_none=True)
    training.dice_loss()(network(images), labels).backward()
    return flat(p.grad for p in network.parameters())


def one_private_step(
    images: torch.Tensor, labels: torch.Tensor, settings: DpSgdConfig, *, n_cases: int, train_cases: int
) -> Recorder:
    """`dpsgd.private_step` on the tiny model with these crops, ``train_cases`` being N."""
    network = model.make_per_sample_compatible(tiny())
    per_sample = dpsgd.per_sample_module(network)
    optimizer = dpsgd.make_optimizer(network, config(), settings, train_cases, seeded())
    recording = Recorder()
    optimizer.attach_step_hook(recording)
    dpsgd.private_step(
        per_sample,
        optimizer,
        [(images, labels)],
        training.dice_loss(reduction="none"),
        n_cases=n_cases,
        crops_per_case=settings.crops_per_case,
    )
    return recording


def within(measured: float, expected: float, standard_error: float) -> bool:
    return abs(measured - expected) <= Z * standard_error


# -- the model ---------------------------------------------------------------------------------


def test_per_sample_compatible_model_computes_the_same_function_with_the_same_state():
    original, compatible = tiny(), model.make_per_sample_compatible(tiny())
    images, _ = random_crops(2)

    with torch.no_grad():
        assert torch.equal(original(images), compatible(images)), "out of place must give the same floats"
    assert list(compatible.state_dict()) == list(original.state_dict())
    assert torch.equal(weights(compatible), weights(original))
    assert not any(getattr(module, "inplace", False) for module in compatible.modules())
    assert any(isinstance(module, dpsgd.PerSampleResBlock) for module in compatible.modules())
    copy.deepcopy(compatible)  # the swapped class is importable, so the model still copies


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first conv's input needs no grad
def test_opacus_per_sample_hooks_fail_on_plain_segresnet_and_work_on_the_compatible_one():
    images, labels = random_crops(2)
    loss = training.dice_loss(reduction="none")

    plain = GradSampleModule(tiny(), loss_reduction="sum")
    with pytest.raises(RuntimeError, match="modified inplace"):
        loss(plain(images), labels).sum().backward()

    compatible = GradSampleModule(model.make_per_sample_compatible(tiny()), loss_reduction="sum")
    loss(compatible(images), labels).sum().backward()
    assert all(p.grad_sample.shape == (2, *p.shape) for p in compatible.parameters())


def test_per_sample_gradients_equal_each_example_alone_through_autograd():
    images, labels = random_crops(2)
    settings = dp(noise_multiplier=0.0, max_grad_norm=1e9, sample_rate=1.0)

    rows = one_private_step(images, labels, settings, n_cases=2, train_cases=2).rows[0]

    plain = tiny()
    for i in range(2):
        alone = autograd_gradient(plain, images[i : i + 1], labels[i : i + 1])
        # float32 per-sample convolutions (Opacus unfolds them) against cuDNN-free CPU autograd:
        # agreement to 1e-5 of the gradient's largest coordinate.
        assert torch.allclose(rows[i], alone, rtol=0, atol=1e-5 * alone.abs().max())
    assert not torch.allclose(rows[0], rows[1], rtol=0.1), "control: the two examples differ"


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "kernel", "stride", "groups", "bias"),
    [(4, 8, 3, 1, 1, False), (8, 4, 3, 2, 1, False), (8, 6, 1, 1, 1, True), (4, 6, 3, 1, 2, True)],
)
def test_grouped_convolution_sampler_gives_opacus_unfolded_per_sample_gradients(
    in_channels, out_channels, kernel, stride, groups, bias
):
    layer = torch.nn.Conv3d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=bias)
    generator = seeded(4)
    inputs = torch.randn(3, in_channels, 8, 8, 8, generator=generator)
    backprops = torch.randn(3, out_channels, *layer(inputs).shape[2:], generator=generator)

    ours = dpsgd.conv3d_grad_sample(layer, [inputs], backprops)
    theirs = compute_conv_grad_sample(layer, [inputs], backprops)

    assert set(ours) == set(theirs) == {p for p in layer.parameters()}
    for parameter, expected in theirs.items():
        assert ours[parameter].shape == expected.shape == (3, *parameter.shape)
        assert torch.allclose(ours[parameter], expected, rtol=0, atol=1e-5 * expected.abs().max())


# -- grouping crops by case, clipping ----------------------------------------------------------


def test_two_crops_of_one_case_are_summed_into_one_gradient_before_clipping():
    images, labels = random_crops(2)
    plain = tiny()
    crop_gradients = [autograd_gradient(plain, images[i : i + 1], labels[i : i + 1]) for i in range(2)]
    summed = crop_gradients[0] + crop_gradients[1]
    one_case = {"noise_multiplier": 0.0, "sample_rate": 1.0, "crops_per_case": 2}  # B = q * N = 1

    unclipped = one_private_step(images, labels, dp(max_grad_norm=1e9, **one_case), n_cases=1, train_cases=1)
    assert unclipped.rows[0].shape[0] == 1, "one row (one record) for the case"
    assert torch.allclose(unclipped.grads[0], summed, rtol=0, atol=1e-5 * summed.abs().max())

    bound = 0.01 * float(min(g.norm() for g in crop_gradients))
    clipped = one_private_step(images, labels, dp(max_grad_norm=bound, **one_case), n_cases=1, train_cases=1)
    assert float(clipped.grads[0].norm()) == pytest.approx(bound, rel=1e-4)
    assert torch.allclose(clipped.grads[0], bound * summed / summed.norm(), rtol=0, atol=1e-4 * bound)
    # Control: clipping each crop on its own would let the case contribute nearly 2C.
    separately = sum(bound * g / g.norm() for g in crop_gradients)
    assert float(separately.norm()) > 1.5 * bound


def test_each_case_is_clipped_to_C_over_all_parameters_and_the_clipped_cases_are_summed():
    images, labels = random_crops(3, seed=1)
    unclipped_rows = one_private_step(
        images, labels, dp(noise_multiplier=0.0, max_grad_norm=1e9), n_cases=3, train_cases=4
    ).rows[0]
    norms = unclipped_rows.norm(dim=1)
    bound = float(norms.min() + norms.median()) / 2  # the smallest case stays whole, two are clipped
    settings = dp(noise_multiplier=0.0, max_grad_norm=bound)  # B = 0.5 * 4 = 2

    recording = one_private_step(images, labels, settings, n_cases=3, train_cases=4)

    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    contributions = factors[:, None] * unclipped_rows
    assert bool((contributions.norm(dim=1) <= bound * (1 + 1e-5)).all())
    assert int((factors < 1).sum()) == 2 and int((factors == 1).sum()) == 1
    expected = contributions.sum(dim=0) / 2.0
    assert torch.allclose(recording.grads[0], expected, rtol=0, atol=1e-5 * expected.abs().max())
    # Control: the layer-by-layer clipping of some implementations gives another answer.
    assert not torch.allclose(recording.grads[0], unclipped_rows.sum(dim=0) / 2.0, rtol=0.01)


def test_training_with_a_small_C_keeps_every_step_within_C(cases, recorder):
    settings = dp(noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=1.0, steps=3)

    # The whole volume: a smaller crop may miss the tumour, and then the Dice loss is flat.
    training.train(tiny(), cases[:1], config(roi_size=SIZE), dp=settings, generator=seeded())

    for grad, rows in zip(recorder.grads, recorder.rows, strict=True):
        assert rows.shape[0] == 1
        assert float(rows.norm()) > 1e-2, "the case's gradient is well above C, so clipping acts"
        assert float(grad.norm()) == pytest.approx(1e-3, rel=1e-3)  # B = 1


# -- noise -------------------------------------------------------------------------------------


def test_noise_on_the_averaged_gradient_has_std_sigma_C_over_B(cases, recorder):
    # N = 3 and q = 0.5, so B = 1.5: rounding B (as int(q * N) would) changes the answer by half.
    # With sigma = 100 the clipped signal (norm at most 3 C over 27,559 coordinates) adds a
    # relative 1e-8 to the variance: what is measured is the noise.
    sigma, bound = 100.0, 0.5
    settings = dp(noise_multiplier=sigma, max_grad_norm=bound, sample_rate=0.5, steps=3)

    training.train(tiny(), cases, config(), dp=settings, generator=seeded(3))

    noise = torch.cat(recorder.grads).double()
    n = noise.numel()
    std = float(noise.std())
    expected = sigma * bound / 1.5
    standard_error = expected / math.sqrt(2 * n)  # of a normal sample's standard deviation
    assert within(std, expected, standard_error), f"std {std:.4f}, expected {expected:.4f}"
    assert within(float(noise.mean()), 0.0, expected / math.sqrt(n))
    inside_one_std = float((noise.abs() < expected).double().mean())
    assert within(inside_one_std, 0.682689, math.sqrt(0.682689 * 0.317311 / n)), "Gaussian, not Laplace"
    # Controls: no 1/B (or B rounded down to 1), 1/(2B), and B rounded up to 2.
    for wrong in (sigma * bound, sigma * bound / 3.0, sigma * bound / 2.0):
        assert not within(std, wrong, wrong / math.sqrt(2 * n)), f"control {wrong} must be rejected"


def test_an_empty_batch_is_still_a_step_that_adds_noise(cases, recorder):
    hooks_losses: list[float] = []

    class Hooks(training.NoHooks):
        def on_step(self, iteration, total, loss, samples_per_second):
            hooks_losses.append(loss)

    settings = dp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-12, steps=2)  # B = 3e-12
    network = tiny()
    before = weights(network)

    result = training.train(network, cases, config(), Hooks(), dp=settings, generator=seeded())

    assert result.n_iterations == 2 and len(recorder.grads) == 2
    assert all(rows.shape[0] == 0 for rows in recorder.rows)
    assert all(math.isnan(loss) for loss in result.losses + hooks_losses) and len(hooks_losses) == 2
    noise = torch.cat(recorder.grads).double()
    expected = 1.0 / 3e-12
    assert within(float(noise.std()), expected, expected / math.sqrt(2 * noise.numel()))
    assert not torch.equal(weights(network), before), "the noise moved the weights"


def test_without_noise_an_empty_batch_leaves_the_gradient_zero(cases, recorder):
    settings = dp(noise_multiplier=0.0, sample_rate=1e-12, steps=1)

    training.train(tiny(), cases, config(), dp=settings, generator=seeded())

    assert not bool(recorder.grads[0].any())


# -- Poisson sampling --------------------------------------------------------------------------


def sampling_looks_poisson(batches: list[list[int]], n_cases: int, q: float) -> bool:
    """Each case's inclusion frequency is q, and the batch size's mean and variance are the
    binomial's (N q and N q (1 - q)), all within Z standard errors."""
    steps = len(batches)
    included = np.zeros(n_cases)
    for batch in batches:
        included[batch] += 1
    frequency_ok = all(within(count / steps, q, math.sqrt(q * (1 - q) / steps)) for count in included)
    sizes = np.array([len(batch) for batch in batches], dtype=float)
    variance = n_cases * q * (1 - q)
    mean_ok = within(sizes.mean(), n_cases * q, math.sqrt(variance / steps))
    variance_ok = within(sizes.var(ddof=1), variance, variance * math.sqrt(2 / (steps - 1)))
    return frequency_ok and mean_ok and variance_ok


def test_poisson_sampling_includes_each_case_with_probability_q_and_varies_the_batch():
    n_cases, q, steps = 20, 0.3, 4000
    generator = seeded(5)

    batches = [dpsgd.poisson_sample(n_cases, q, generator) for _ in range(steps)]

    assert sampling_looks_poisson(batches, n_cases, q)
    assert all(batch == sorted(set(batch)) for batch in batches), "no case twice in a batch"
    # Controls: a fixed batch of N q cases (shuffled, as a plain DataLoader) and another rate.
    fixed = [torch.randperm(n_cases, generator=generator)[:6].tolist() for _ in range(steps)]
    assert not sampling_looks_poisson(fixed, n_cases, q)
    assert not sampling_looks_poisson(batches, n_cases, 0.33)


def test_poisson_sampling_gives_empty_batches_as_often_as_it_should():
    n_cases, q, steps = 3, 0.3, 4000
    generator = seeded(6)

    empty = sum(not dpsgd.poisson_sample(n_cases, q, generator) for _ in range(steps)) / steps

    expected = (1 - q) ** n_cases
    assert within(empty, expected, math.sqrt(expected * (1 - expected) / steps))


def test_training_draws_a_poisson_batch_every_step(cases, recorder):
    steps = 40
    settings = dp(noise_multiplier=0.0, max_grad_norm=1e9, sample_rate=0.5, steps=steps)

    training.train(tiny(), cases, config(), dp=settings, generator=seeded(7))

    sizes = [rows.shape[0] for rows in recorder.rows]
    assert len(sizes) == steps and set(sizes) >= {0, 1, 2}, f"batch sizes seen: {sorted(set(sizes))}"
    replay = seeded(7)
    assert sizes == [len(dpsgd.poisson_sample(3, 0.5, replay)) for _ in range(steps)]


def test_a_step_split_into_several_forward_passes_in_a_loader_process_keeps_its_cases(cases, recorder):
    # batch_size 1: each crop is a forward pass of its own, so a case's two crops straddle passes.
    settings = dp(noise_multiplier=0.0, max_grad_norm=1e9, sample_rate=0.5, steps=6, crops_per_case=2)

    training.train(tiny(), cases, config(batch_size=1, num_workers=1), dp=settings, generator=seeded(8))

    replay = seeded(8)
    assert [rows.shape[0] for rows in recorder.rows] == [
        len(dpsgd.poisson_sample(3, 0.5, replay)) for _ in range(6)
    ]


# -- training ----------------------------------------------------------------------------------


def test_dp_training_takes_the_steps_asked_and_replays_exactly_with_a_seeded_generator(cases):
    settings = dp(steps=4, crops_per_case=2)
    first, again, other = tiny(), tiny(), tiny()

    result = training.train(first, cases, config(), dp=settings, generator=seeded(1))
    replay = training.train(again, cases, config(), dp=settings, generator=seeded(1))
    training.train(other, cases, config(), dp=settings, generator=seeded(2))

    assert result.n_iterations == 4 and result.n_cases == 3 and len(result.losses) == 4
    np.testing.assert_array_equal(result.losses, replay.losses)  # NaN (an empty step) equals NaN here
    assert torch.equal(weights(first), weights(again))
    assert not torch.equal(weights(first), weights(other))


def test_without_a_generator_the_noise_comes_from_the_operating_system(cases):
    settings = dp(steps=1)
    first, again = tiny(), tiny()

    torch.manual_seed(0)
    training.train(first, cases, config(), dp=settings)
    torch.manual_seed(0)
    training.train(again, cases, config(), dp=settings)

    assert not torch.equal(weights(first), weights(again)), "torch's global generator is not the source"


def test_dp_training_learns_with_little_noise(cases):
    settings = dp(noise_multiplier=0.01, max_grad_norm=1.0, sample_rate=1.0, steps=12)

    result = training.train(tiny(), cases, config(lr=3e-2, roi_size=SIZE), dp=settings, generator=seeded())

    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-3:])
    assert last < first - 0.03, f"loss went from {first:.3f} to {last:.3f}"


def test_dp_training_hands_back_a_plain_model(cases):
    network = tiny()

    training.train(network, cases, config(), dp=dp(steps=1), generator=seeded())
    training.train(network, cases, config(), dp=dp(steps=1), generator=seeded())  # no "hooks twice"

    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in network.parameters())
    assert not any(module._forward_hooks or module._backward_hooks for module in network.modules())
    assert not any(hasattr(module, "activations") for module in network.modules())
    training.train(network, cases, config(max_iterations=1))  # and trains without DP as before


def test_dp_training_refuses_mixed_precision(cases):
    with pytest.raises(TrainConfigError, match="amp .* not available with DP-SGD"):
        training.train(tiny(), cases, config(amp=True), dp=dp(), generator=seeded())


def test_a_generator_without_dp_is_refused(cases):
    with pytest.raises(ValueError, match="only taken with dp"):
        training.train(tiny(), cases, config(), generator=seeded())


# -- settings ----------------------------------------------------------------------------------


def test_dp_settings_round_trip_through_json():
    original = dp(crops_per_case=2)

    assert DpSgdConfig.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    assert original.expected_batch_size(7) == 3.5


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"noise_multiplier": -1}, "noise_multiplier must be a number at least 0"),
        ({"max_grad_norm": 0}, "max_grad_norm must be a number above 0"),
        ({"sample_rate": 0}, "sample_rate must be a number above 0 and at most 1"),
        ({"sample_rate": 1.5}, "sample_rate must be a number above 0 and at most 1"),
        ({"steps": 0}, "steps must be a whole number 1 or more"),
        ({"crops_per_case": 1.5}, "crops_per_case must be a whole number 1 or more"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a number"),
    ],
)
def test_bad_dp_setting_is_refused_naming_it(given, message):
    with pytest.raises(DpSgdConfigError, match=message):
        dp(**given)


def test_unknown_dp_setting_is_refused():
    with pytest.raises(DpSgdConfigError, match="unknown DP-SGD setting epsilon"):
        DpSgdConfig.from_dict({**dp().to_dict(), "epsilon": 1.0})
