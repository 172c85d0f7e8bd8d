"""The model, flat update vectors, local training and evaluation: a tiny SegResNet on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sitesagent import data, model, synth, training
from sitesagent.protocol import flat_layout
from sitesagent.training import TrainConfig, TrainConfigError

SIZE = 32  # voxels a side: the tiny model trains at about ten steps a second on two cores


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[data.Case]:
    out = tmp_path_factory.mktemp("site")
    synth.write_synthetic_cases(out, 4, seed=0, style=0, size=SIZE)
    return data.discover_cases(out)


def tiny(seed: int = 0) -> torch.nn.Module:
    return model.build_model(model.preset("tiny"), seed=seed)


def config(**overrides) -> TrainConfig:
    settings = {"max_iterations": 4, "roi_size": SIZE, "lr": 1e-2, "seed": 1, "device": "cpu"}
    return TrainConfig(**(settings | overrides))


class RecordingHooks:
    def __init__(self):
        self.phases: list[str] = []
        self.steps: list[tuple[int, int, float, float]] = []

    def on_phase(self, name: str) -> None:
        self.phases.append(name)

    def on_step(self, iteration: int, total: int, loss: float, samples_per_second: float) -> None:
        self.steps.append((iteration, total, loss, samples_per_second))


# -- the model --------------------------------------------------------------------------------


def test_brats_preset_has_the_papers_parameter_count():
    brats = model.preset("brats")

    assert (brats.init_filters, brats.blocks_down, brats.blocks_up) == (16, (1, 2, 2, 4), (1, 1, 1))
    assert model.count_parameters(brats) == model.BRATS_PARAMETER_COUNT == 4_702_227


def test_same_seed_builds_identical_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()

    first, again, other = tiny(seed=5), tiny(seed=5), tiny(seed=6)

    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(model.state_to_flat(first.state_dict()), model.state_to_flat(again.state_dict()))
    assert not torch.equal(model.state_to_flat(first.state_dict()), model.state_to_flat(other.state_dict()))


def test_flat_vector_round_trips_to_the_same_state():
    reference = tiny(seed=0).state_dict()
    flat = model.state_to_flat(tiny(seed=1).state_dict())

    restored = model.flat_to_state(flat, reference)

    assert list(restored) == list(reference)
    assert torch.equal(model.state_to_flat(restored), flat)
    loaded = tiny(seed=0)
    loaded.load_state_dict(restored)
    assert torch.equal(model.state_to_flat(loaded.state_dict()), flat)


def test_flat_vector_follows_the_protocols_sorted_layout():
    state = tiny().state_dict()
    flat = model.state_to_flat(state)

    layout = flat_layout(model.floating_shapes(state))

    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.numel() == layout[-1][2]
    for name, start, stop in layout:
        assert torch.equal(flat[start:stop], state[name].reshape(-1))


def test_flat_to_state_copies_rather_than_aliasing_the_vector():
    reference = tiny().state_dict()
    flat = model.state_to_flat(reference)

    restored = model.flat_to_state(flat, reference)
    flat.zero_()

    assert torch.equal(model.state_to_flat(restored), model.state_to_flat(reference))


def test_flat_vector_of_the_wrong_length_is_refused():
    reference = tiny().state_dict()

    with pytest.raises(ValueError, match="this model needs"):
        model.flat_to_state(torch.zeros(10), reference)


def test_delta_is_trained_minus_base():
    base, trained = tiny(seed=0).state_dict(), tiny(seed=1).state_dict()

    update = model.delta(base, trained)

    assert torch.allclose(model.state_to_flat(base) + update, model.state_to_flat(trained))
    with pytest.raises(ValueError, match="differ"):
        model.delta(base, model.build_model(model.preset("cpu")).state_dict())


def test_model_config_round_trips_through_json():
    for name in model.PRESETS:
        config_dict = json.loads(json.dumps(model.preset(name).to_dict()))
        assert model.ModelConfig.from_dict(config_dict) == model.preset(name)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"init_filters": 0}, "init_filters must be a whole number 1 or more"),
        ({"blocks_down": [1, 2], "blocks_up": [1, 1]}, "blocks_up needs one entry per level"),
        ({"init_filters": 12}, r"init_filters \(12\) must be a multiple of norm_groups \(8\)"),
        ({"dropout_prob": 1.5}, "dropout_prob must be"),
        ({"blocks_down": [1, "2"]}, "blocks_down must be a list"),
        ({"layers": 5}, "unknown model setting layers"),
    ],
)
def test_bad_model_config_is_refused_naming_the_setting(given, message):
    with pytest.raises(model.ModelConfigError, match=message):
        model.ModelConfig.from_dict(given)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(model.ModelConfigError, match="brats, cpu, tiny"):
        model.preset("huge")


# -- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cases) -> tuple[torch.nn.Module, training.TrainResult, RecordingHooks]:
    """The tiny model after 12 steps at a high learning rate, trained once for several tests."""
    hooks = RecordingHooks()
    network = tiny()
    result = training.train(network, cases, config(max_iterations=12, lr=3e-2), hooks=hooks)
    return network, result, hooks


def test_tiny_segresnet_loss_goes_down_on_synthetic_cases(trained):
    _, result, hooks = trained

    assert result.n_iterations == 12 and result.n_cases == 4 and len(result.losses) == 12
    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-3:])
    assert last < first - 0.03, f"loss went from {first:.3f} to {last:.3f}"
    assert hooks.phases == ["loading", "training"]
    assert [step[:2] for step in hooks.steps] == [(i, 12) for i in range(1, 13)]
    assert all(isinstance(value, float) and value > 0 for step in hooks.steps for value in step[2:])
    assert result.final_loss == result.losses[-1] == hooks.steps[-1][2]


def test_training_twice_with_the_same_seed_gives_identical_weights(cases):
    first, again = tiny(), tiny()

    losses_first = training.train(first, cases, config()).losses
    losses_again = training.train(again, cases, config()).losses

    assert losses_first == losses_again
    assert torch.equal(model.state_to_flat(first.state_dict()), model.state_to_flat(again.state_dict()))


def test_another_seed_trains_on_other_crops_and_order(cases):
    first, other = tiny(), tiny()

    training.train(first, cases, config(roi_size=16))
    training.train(other, cases, config(roi_size=16, seed=2))

    assert not torch.equal(model.state_to_flat(first.state_dict()), model.state_to_flat(other.state_dict()))


def test_training_leaves_the_global_random_state_alone(cases):
    torch.manual_seed(7)
    np.random.seed(7)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()

    training.train(tiny(), cases[:1], config(max_iterations=1, roi_size=16))

    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_epochs_set_the_number_of_steps():
    assert TrainConfig(local_epochs=2, batch_size=2).n_iterations(3) == 4
    assert TrainConfig(local_epochs=0, max_iterations=5).n_iterations(100) == 5
    assert TrainConfig(local_epochs=3, max_iterations=0).n_iterations(2) == 6, "0 iterations means unset"


def test_crop_that_does_not_suit_the_model_is_refused(cases):
    with pytest.raises(TrainConfigError, match=r"roi_size \[30, 30, 30\] must be multiples of 4"):
        training.train(tiny(), cases, config(roi_size=30))


def test_training_without_cases_is_refused():
    with pytest.raises(ValueError, match="no training cases"):
        training.train(tiny(), [], config())


def test_training_on_a_corrupt_scan_names_the_file(tmp_path: Path):
    (case_folder,) = synth.write_synthetic_cases(tmp_path, 1, size=16)
    broken = case_folder / f"{case_folder.name}_t2.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])

    with pytest.raises(data.DataError) as error:
        training.train(tiny(), data.discover_cases(tmp_path), config(roi_size=16))

    assert str(error.value).startswith(f"{broken}: cannot be read as NIfTI")


# -- evaluation -------------------------------------------------------------------------------


def test_evaluate_gives_three_dice_scores_and_their_mean(cases, trained):
    network, _, _ = trained
    hooks = RecordingHooks()

    scores = training.evaluate(network, cases[3:], config(), hooks=hooks)

    assert list(scores) == ["dice_et", "dice_tc", "dice_wt", "dice_mean"]
    assert all(0.0 <= score <= 1.0 for score in scores.values())
    regions = [scores["dice_et"], scores["dice_tc"], scores["dice_wt"]]
    assert scores["dice_mean"] == pytest.approx(sum(regions) / 3)
    assert hooks.phases == ["evaluating"]
    assert network.training, "evaluate puts the model back in the mode it found it in"


def test_evaluate_slides_a_window_smaller_than_the_volume(cases):
    untrained = tiny()

    whole = training.evaluate(untrained, cases[:1], config())
    windowed = training.evaluate(untrained, cases[:1], config(roi_size=16))

    assert set(whole) == set(windowed)
    assert all(0.0 <= score <= 1.0 for score in windowed.values())


def test_evaluate_without_validation_cases_returns_no_scores():
    assert training.evaluate(tiny(), [], config()) == {}


def test_window_shrinks_to_the_volume_rounded_to_the_models_divisor():
    assert training._window_size((48, 48, 30), (128, 128, 128), 8) == (48, 48, 32)
    assert training._window_size((240, 240, 155), (128, 128, 128), 8) == (128, 128, 128)


# -- settings and devices ---------------------------------------------------------------------


def test_train_config_round_trips_through_json():
    original = TrainConfig(max_iterations=10, roi_size=(96, 96, 64), amp=False, seed=3)

    assert TrainConfig.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    assert TrainConfig(roi_size=64).roi_size == (64, 64, 64)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"lr": 0}, "lr must be a number above 0"),
        ({"batch_size": 0}, "batch_size must be a whole number 1 or more"),
        ({"local_epochs": 0}, "set local_epochs or max_iterations"),
        ({"roi_size": (64, 64)}, "roi_size must be one or three"),
        ({"amp": "yes"}, "amp must be"),
        ({"device": "tpu"}, "device must be"),
        ({"cache_rate": 2}, "cache_rate must be a number at least 0 and at most 1"),
        ({"epochs": 1}, "unknown training setting epochs"),
    ],
)
def test_bad_training_setting_is_refused_naming_it(given, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_dict(given)


def test_resolve_device():
    assert training.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device must be"):
        training.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_asking_for_cuda_without_it_says_why():
    with pytest.raises(RuntimeError, match=r"device 'cuda' was asked for, but .*--device cpu"):
        training.resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_uses_mixed_precision_and_learns(cases):
    trained = tiny()

    result = training.train(trained, cases, config(max_iterations=12, lr=3e-2, device="cuda"))
    scores = training.evaluate(trained, cases[:1], config(device="cuda"))

    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.03
    assert next(trained.parameters()).device.type == "cuda"
    assert all(0.0 <= score <= 1.0 for score in scores.values())


def test_training_that_diverges_stops_with_the_step_named(cases):
    network = tiny()
    with torch.no_grad():
        next(network.parameters()).fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="training diverged: the loss was nan at step 1"):
        training.train(network, cases[:1], config(max_iterations=2, roi_size=16))
