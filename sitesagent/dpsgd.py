"""DP-SGD at a site: patient-level differential privacy for one round of local training.

The mechanism of Abadi et al. 2016 as Opacus implements it (DESIGN section 6). The privacy unit
is one case (one patient). Each of the round's ``steps``:

1. Poisson sampling: every training case is in the step's batch independently with probability
   q (``sample_rate``), so the batch size varies from step to step and may be 0.
2. ``crops_per_case`` random crops of each sampled case, through the same transforms (crop,
   flips, intensity scale and shift) as non-private training.
3. Opacus computes each crop's gradient (its hooks; for 3-D convolutions a faster sampler of
   the same numbers, `conv3d_grad_sample`); the crops of one case are summed into that case's
   one gradient *before* clipping, so a case counts once however many crops it gives.
4. Each case's gradient is clipped to L2 norm C (``max_grad_norm``) over all parameters together,
   the clipped gradients are summed, Gaussian noise N(0, sigma^2 C^2) is added to every
   coordinate of the sum, and the result is divided by the expected batch size B = q * N.
5. Adam takes a step on that noisy average alone, so the trained weights, and the update made
   from them, are post-processing: the round's DP event is (q, sigma, steps).

Randomness: the sampling and the noise come from one generator, the caller's (tests replay it)
or else one seeded from the operating system's entropy, never torch's global generator. The
augmentation (which crop, which flips) is seeded from `TrainConfig.seed`, as without DP: it is
part of the per-case computation, and the guarantee does not rest on it being secret.

Not protected: the loss and throughput values that `train` reports through its hooks are
computed from the sampled cases without noise (and the loss, NaN on an empty step, and the
throughput both give away each step's batch size, which the analysis assumes hidden); the agent
streams them as metrics, which DESIGN discloses as "not protected by the mechanism".
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from monai.data import DataLoader
from monai.networks.blocks.segresnet_block import ResBlock
from torch.nn.grad import conv3d_weight

from sitesagent.data import Case, data_errors_surfaced, make_dataset, train_transforms
from sitesagent.model import make_per_sample_compatible, settings_from_dict
from sitesagent.training import (
    TrainConfig,
    TrainConfigError,
    TrainingHooks,
    TrainResult,
    _check_range,
    _check_whole,
    _fast_cudnn,
    _to_device,
    _training_rng,
    dice_loss,
)

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer


class DpSgdConfigError(TrainConfigError):
    """A DP-SGD setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class DpSgdConfig:
    """The DP-SGD parameters of one round at one site. The accountant's event is
    (``sample_rate``, ``noise_multiplier``, ``steps``); ``max_grad_norm`` and ``crops_per_case``
    change what is learnt, not the privacy spent."""

    noise_multiplier: float  # sigma: the noise's standard deviation is sigma * C on the summed gradient
    max_grad_norm: float  # C: each case's gradient (all its crops together) is clipped to this L2 norm
    sample_rate: float  # q: each case is in each step's batch independently with this probability
    steps: int  # T: noisy optimiser steps this round
    crops_per_case: int = 1  # random crops taken from each sampled case in a step

    def __post_init__(self) -> None:
        # sigma 0 is allowed (no privacy at all) for tests and ablations; the ledger, not this
        # class, decides whether a round may run without noise.
        _check("noise_multiplier", self.noise_multiplier, low=0, high=math.inf)
        _check("max_grad_norm", self.max_grad_norm, low=0, high=math.inf, low_open=True)
        _check("sample_rate", self.sample_rate, low=0, high=1, low_open=True)
        for name in ("steps", "crops_per_case"):
            try:
                _check_whole(name, getattr(self, name), minimum=1)
            except TrainConfigError as error:
                raise DpSgdConfigError(str(error)) from None

    def expected_batch_size(self, n_cases: int) -> float:
        """B = q * N: what the summed noisy gradient is divided by (a number, not rounded)."""
        return self.sample_rate * n_cases

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-able values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DpSgdConfig:
        """Read parameters from `to_dict`'s output; raises DpSgdConfigError naming a bad or unknown one."""
        return settings_from_dict(cls, data, what="DP-SGD", error=DpSgdConfigError, tuples=())


def _check(name: str, value: Any, **bounds: Any) -> None:
    try:
        _check_range(name, value, **bounds)
    except TrainConfigError as error:
        raise DpSgdConfigError(str(error)) from None


class PerSampleResBlock(ResBlock):
    """MONAI's ResBlock with the skip connection added out of place, so that Opacus's backward
    hooks on ``conv2`` can see its output unchanged (see `model.make_per_sample_compatible`).
    Same submodules and parameters, same arithmetic as ResBlock.forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))
        return x + identity


def conv3d_grad_sample(
    layer: torch.nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a Conv3d's weight and bias: the grad sampler `per_sample_module`
    gives Opacus for 3-D convolutions.

    The same numbers as Opacus's own sampler (`opacus.grad_sample.conv`), computed another way:
    Opacus unfolds the input into every 3x3x3 neighbourhood and multiplies, and on a 3-D volume
    that copy is most of a DP-SGD step's time. Here the batch becomes the groups of one grouped
    convolution (sample s's input channels meet only sample s's output gradients), so a single
    weight-gradient convolution, the kernel the non-private backward pass uses, yields all the
    per-sample gradients at once. Layers this does not cover (string padding, another padding
    mode, an empty batch) go to Opacus's sampler.
    """
    from opacus.grad_sample.conv import compute_conv_grad_sample

    inputs = activations[0].to(backprops.dtype)
    n = inputs.shape[0]
    if n == 0 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    gradients = {}
    if layer.weight.requires_grad:
        out_channels, *per_group = layer.weight.shape
        grad_weight = conv3d_weight(
            inputs.reshape(1, n * layer.in_channels, *inputs.shape[2:]),
            (n * out_channels, *per_group),
            backprops.reshape(1, n * out_channels, *backprops.shape[2:]),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=n * layer.groups,
        )
        gradients[layer.weight] = grad_weight.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        gradients[layer.bias] = backprops.flatten(2).sum(dim=2)
    return gradients


@functools.cache
def _per_sample_class() -> type[GradSampleModule]:
    from opacus import GradSampleModule

    class PerSampleModule(GradSampleModule):
        # A registry of its own: Opacus's global one (and so anyone else's use of it) is untouched.
        GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, torch.nn.Conv3d: conv3d_grad_sample}

    return PerSampleModule


def per_sample_module(model: torch.nn.Module) -> GradSampleModule:
    """Opacus's GradSampleModule around ``model`` (made per-sample compatible first), with
    `conv3d_grad_sample` for its 3-D convolutions. ``loss_reduction="sum"``: backpropagate the
    sum of the per-crop losses, and each row of ``p.grad_sample`` is one crop's own gradient.
    Call ``cleanup()`` on it when done to hand the model back without Opacus's hooks."""
    return _per_sample_class()(model, batch_first=True, loss_reduction="sum")


def poisson_sample(n_cases: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """The indices (ascending) of the cases in one step's batch: each of ``n_cases`` is in it
    independently with probability ``sample_rate``, as the accountant assumes. The batch may be
    empty. Drawn in float64 from ``generator`` (a CPU generator)."""
    draws = torch.rand(n_cases, generator=generator, dtype=torch.float64)
    return torch.nonzero(draws < sample_rate).flatten().tolist()


def make_optimizer(
    model: torch.nn.Module,
    config: TrainConfig,
    dp: DpSgdConfig,
    n_cases: int,
    generator: torch.Generator,
) -> DPOptimizer:
    """Adam (lr and weight decay from ``config``) behind Opacus's DPOptimizer, which clips each
    row of ``p.grad_sample`` to ``dp.max_grad_norm`` over all parameters together, sums the rows,
    adds N(0, (sigma C)^2) noise drawn from ``generator`` (on the parameters' device), and divides
    by B = q * ``n_cases`` (``loss_reduction="mean"`` with ``expected_batch_size=B``) before Adam
    sees anything."""
    from opacus.optimizers import DPOptimizer

    adam = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return DPOptimizer(
        adam,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        # Opacus annotates an int but only divides by it; rounding q * N would bias the average.
        expected_batch_size=dp.expected_batch_size(n_cases),
        loss_reduction="mean",
        generator=generator,
    )


def private_step(
    model: GradSampleModule,
    optimizer: DPOptimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    n_cases: int,
    crops_per_case: int,
) -> float:
    """One DP-SGD step on the crops of ``n_cases`` sampled cases; returns their mean crop loss
    (NaN when ``n_cases`` is 0: the step still takes place, its update is noise alone).

    ``batches`` hold the ``n_cases * crops_per_case`` crops in case-major order (the crops of
    the first case, then of the second, ...), split into as many forward passes as memory needs.
    ``loss_function`` gives one loss per crop (shape (crops, ...), reduced here over the rest).
    The sum of the crop losses is backpropagated (``model`` wraps with ``loss_reduction="sum"``)
    so each crop's per-sample gradient is the gradient of its own loss; each case's crop
    gradients are summed before ``optimizer`` (from `make_optimizer`) clips, noises and steps.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    n_crops = 0
    for images, labels in batches:
        per_crop = loss_function(model(images), labels).flatten(1).mean(dim=1)
        with warnings.catch_warnings():
            # Opacus hooks the first convolution, whose input (the scans) needs no gradient;
            # torch warns that the hook then sees output gradients only, which is all it uses.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            per_crop.sum().backward()
        loss_sum += float(per_crop.detach().sum())
        n_crops += per_crop.shape[0]
    if n_crops != n_cases * crops_per_case:
        raise ValueError(f"{n_crops} crops given for {n_cases} cases of {crops_per_case} crops each")
    for parameter in optimizer.params:
        parameter.grad_sample = _per_case_gradients(parameter, n_cases, crops_per_case)
    optimizer.step()
    return loss_sum / n_crops if n_crops else math.nan


def _per_case_gradients(parameter: torch.Tensor, n_cases: int, crops_per_case: int) -> torch.Tensor:
    """(cases, *shape): the sum of each case's crop gradients, the rows DPOptimizer clips.

    Opacus leaves one tensor per backward pass (a list when a step takes several); an empty
    batch has had no backward pass, and gets zero rows, which DPOptimizer turns into a zero sum
    to which it still adds the noise.
    """
    grad_sample = getattr(parameter, "grad_sample", None)
    if n_cases == 0:
        return parameter.new_zeros((0, *parameter.shape))
    if grad_sample is None:
        raise RuntimeError(f"no per-sample gradient for a parameter of shape {tuple(parameter.shape)}")
    if isinstance(grad_sample, list):
        grad_sample = torch.cat(grad_sample)
    return grad_sample.reshape(n_cases, crops_per_case, *parameter.shape).sum(dim=1)


def mechanism_generator(generator: torch.Generator | None) -> torch.Generator:
    """The generator that sampling and noise draw from: ``generator`` itself (tests pass a seeded
    one), or a fresh CPU generator seeded from the operating system's entropy, so that nobody can
    reproduce the noise. Torch's global generator is never used."""
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    elif generator.device.type != "cpu":
        raise ValueError(f"the DP-SGD generator must be a CPU generator, not one on {generator.device}")
    return generator


def _noise_generator(source: torch.Generator, device: torch.device) -> torch.Generator:
    """Noise is drawn where the gradients are: from ``source`` on the CPU, else from a generator
    on ``device`` seeded by ``source`` (so a seeded run replays there too)."""
    if device.type == "cpu":
        return source
    seed = int(torch.randint(0, 2**63 - 1, (), generator=source))
    return torch.Generator(device=device).manual_seed(seed)


def train_private(
    model: torch.nn.Module,
    train_cases: Sequence[Case],
    config: TrainConfig,
    hooks: TrainingHooks,
    *,
    dp: DpSgdConfig,
    generator: torch.Generator | None,
    device: torch.device,
) -> TrainResult:
    """`training.train` with ``dp`` set: ``dp.steps`` DP-SGD steps. Call `training.train`."""
    if config.amp is True:
        # Not supported: GradScaler scales the loss, so Opacus's per-sample gradients would be
        # clipped while still scaled, and a step the scaler skips for an overflow would still
        # be a step the accountant counts. Unverified, so refused rather than approximated.
        raise TrainConfigError('amp (mixed precision) is not available with DP-SGD; use amp "auto" or false')
    n_cases = len(train_cases)
    source = mechanism_generator(generator)
    noise_generator = _noise_generator(source, device)

    hooks.on_phase("loading")
    load_start = time.perf_counter()
    # The whole round's batches are drawn first: they depend on the generator alone, and drawing
    # them before any noise keeps a seeded run exact whatever the data loader prefetches.
    samples = [poisson_sample(n_cases, dp.sample_rate, source) for _ in range(dp.steps)]
    chunks = list(_forward_passes(samples, dp.crops_per_case, config.batch_size))
    with data_errors_surfaced():
        dataset = make_dataset(train_cases, train_transforms(config.roi_size), cache_rate=config.cache_rate)
    loader = DataLoader(
        dataset,
        batch_sampler=chunks,  # one list of case indices (a case repeated once per crop) per forward pass
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),  # MONAI seeds the augmentations from it
        pin_memory=device.type == "cuda",
    )
    make_per_sample_compatible(model)
    model.to(device).train()
    # loss_reduction "sum" (in per_sample_module): `private_step` backpropagates the sum of the
    # crop losses, so Opacus must not rescale the per-sample gradients; the 1/B is DPOptimizer's.
    per_sample = per_sample_module(model)
    try:
        optimizer = make_optimizer(model, config, dp, n_cases, noise_generator)
        loss_function = dice_loss(reduction="none")
        load_seconds = time.perf_counter() - load_start

        hooks.on_phase("training")
        losses: list[float] = []
        crops = 0
        start = time.perf_counter()
        with _training_rng(config.seed, device), _fast_cudnn(device), data_errors_surfaced():
            loaded = iter(loader)
            for iteration, sample in enumerate(samples, start=1):
                n_passes = math.ceil(len(sample) * dp.crops_per_case / config.batch_size)
                batches = (_to_device(next(loaded), device) for _ in range(n_passes))
                loss = private_step(
                    per_sample,
                    optimizer,
                    batches,
                    loss_function,
                    n_cases=len(sample),
                    crops_per_case=dp.crops_per_case,
                )
                if sample and not math.isfinite(loss):
                    raise FloatingPointError(f"training diverged: the loss was {loss} at step {iteration}")
                losses.append(loss)
                crops += len(sample) * dp.crops_per_case
                hooks.on_step(iteration, dp.steps, loss, crops / (time.perf_counter() - start))
        seconds = time.perf_counter() - start
    finally:
        _detach(per_sample)
    return TrainResult(
        n_iterations=dp.steps,
        n_cases=n_cases,
        final_loss=losses[-1],
        losses=losses,
        seconds=seconds,
        load_seconds=load_seconds,
        samples_per_second=crops / seconds,
    )


def _forward_passes(
    samples: Sequence[Sequence[int]], crops_per_case: int, batch_size: int
) -> Iterator[list[int]]:
    """Every step's crops, a case's index repeated once per crop, cut into forward passes of at
    most ``batch_size`` crops (a case's crops may straddle two: the sums come after). Empty
    steps give none."""
    for sample in samples:
        crops = [case for case in sample for _ in range(crops_per_case)]
        for begin in range(0, len(crops), batch_size):
            yield crops[begin : begin + batch_size]


def _detach(per_sample: GradSampleModule) -> None:
    """Remove Opacus's hooks and the attributes it and DPOptimizer put on the parameters, so the
    model goes back to the caller as a plain module (its weights trained)."""
    per_sample.cleanup()
    for parameter in per_sample._module.parameters():
        if hasattr(parameter, "summed_grad"):
            del parameter.summed_grad
    for module in per_sample._module.modules():
        # Opacus's forward hooks keep each layer's inputs here until the backward pass; an
        # exception in between would leave tensors behind.
        for name in ("activations", "max_batch_len"):
            if name in vars(module):
                delattr(module, name)
