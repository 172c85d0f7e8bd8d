"""Local training and evaluation: plain PyTorch and MONAI, no network.

The agent loop calls `train` and `evaluate` and hears about progress through hooks (an object
with ``on_phase`` and ``on_step``); nothing here knows about the coordinator.

The recipe is MONAI's BraTS tutorial, which follows Myronenko 2018: Adam (lr 1e-4, weight
decay 1e-5), soft Dice loss on the three sigmoid outputs ET, TC, WT, random crops, flips and
intensity scale and shift, and mixed precision on CUDA. A fresh optimiser is made for every
call, as in FedAvg, where each round starts from the aggregated weights alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from monai.data import DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric

from sitesagent.data import (
    REGIONS,
    Case,
    data_errors_surfaced,
    make_dataset,
    train_transforms,
    val_transforms,
)
from sitesagent.model import settings_from_dict

if TYPE_CHECKING:
    from sitesagent.dpsgd import DpSgdConfig

AMP_CHOICES = ("auto", True, False)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class TrainConfigError(ValueError):
    """A training setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class TrainConfig:
    """How one site trains for one round. Every field is JSON-able (see `to_dict`)."""

    local_epochs: int = 1
    # When set (0 means unset), exactly this many steps, cycling through the cases as often as
    # needed, and local_epochs is ignored; otherwise local_epochs passes over the cases.
    max_iterations: int | None = None
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    roi_size: tuple[int, int, int] = (128, 128, 128)  # a single number means a cube
    num_workers: int = 0  # data-loading processes; 0 loads in the training process
    amp: str | bool = "auto"  # mixed precision: "auto" is on for CUDA, off on the CPU
    seed: int = 0  # data order and augmentation (and dropout, if the model has it)
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    cache_rate: float = 1.0  # share of cases kept in memory once loaded and normalised
    sw_overlap: float = 0.5  # sliding-window overlap when evaluating volumes bigger than roi_size
    sw_batch_size: int = 1

    def __post_init__(self) -> None:
        roi = (self.roi_size,) * 3 if isinstance(self.roi_size, int) else tuple(self.roi_size)
        object.__setattr__(self, "roi_size", roi)
        if self.max_iterations == 0:
            object.__setattr__(self, "max_iterations", None)
        for name in ("batch_size", "sw_batch_size"):
            _check_whole(name, getattr(self, name), minimum=1)
        _check_whole("local_epochs", self.local_epochs, minimum=0)
        _check_whole("num_workers", self.num_workers, minimum=0)
        _check_whole("seed", self.seed, minimum=0)
        if self.max_iterations is not None:
            _check_whole("max_iterations", self.max_iterations, minimum=1)
        elif self.local_epochs == 0:
            raise TrainConfigError(
                "set local_epochs or max_iterations: with neither, there is nothing to train"
            )
        if len(roi) != 3 or not all(_is_whole(n) and n >= 1 for n in roi):
            raise TrainConfigError(
                f"roi_size must be one or three whole numbers 1 or more, not {self.roi_size!r}"
            )
        _check_range("lr", self.lr, low=0, high=math.inf, low_open=True)
        _check_range("weight_decay", self.weight_decay, low=0, high=math.inf)
        _check_range("cache_rate", self.cache_rate, low=0, high=1)
        _check_range("sw_overlap", self.sw_overlap, low=0, high=1, high_open=True)
        if self.amp not in AMP_CHOICES or isinstance(self.amp, int) and not isinstance(self.amp, bool):
            raise TrainConfigError(f'amp must be "auto", true or false, not {self.amp!r}')
        if not isinstance(self.device, str) or self.device.split(":")[0] not in DEVICE_CHOICES:
            raise TrainConfigError(f'device must be "auto", "cpu", "cuda" or "cuda:N", not {self.device!r}')

    def n_iterations(self, n_cases: int) -> int:
        """The number of optimiser steps (N_k, the weight of this site's update) for ``n_cases``."""
        if self.max_iterations is not None:
            return self.max_iterations
        return self.local_epochs * math.ceil(n_cases / self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values."""
        values = asdict(self)
        values["roi_size"] = list(self.roi_size)
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Read settings from `to_dict`'s output; missing ones take the defaults."""
        return settings_from_dict(cls, data, what="training", error=TrainConfigError, tuples=("roi_size",))


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_whole(name: str, value: Any, *, minimum: int) -> None:
    if not _is_whole(value) or value < minimum:
        raise TrainConfigError(f"{name} must be a whole number {minimum} or more, not {value!r}")


def _check_range(
    name: str, value: Any, *, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if math.isnan(number) or too_low or too_high:
        bounds = f"{'above' if low_open else 'at least'} {low:g}"
        if math.isfinite(high):
            bounds += f" and {'below' if high_open else 'at most'} {high:g}"
        raise TrainConfigError(f"{name} must be a number {bounds}, not {value!r}")


class TrainingHooks(Protocol):
    """What `train` and `evaluate` report as they go. Called from the training loop with plain
    numbers; keep them quick (queue the values, send them elsewhere)."""

    def on_phase(self, name: str) -> None:
        """A phase begins: "loading", "training" or "evaluating"."""

    def on_step(self, iteration: int, total: int, loss: float, samples_per_second: float) -> None:
        """Optimiser step ``iteration`` of ``total`` (from 1) is done; ``samples_per_second``
        is the average since training began."""


class NoHooks:
    """Hooks that do nothing: the default."""

    def on_phase(self, name: str) -> None:
        pass

    def on_step(self, iteration: int, total: int, loss: float, samples_per_second: float) -> None:
        pass


@dataclass(frozen=True)
class TrainResult:
    """What one call of `train` did."""

    n_iterations: int  # N_k: optimiser steps taken
    n_cases: int
    final_loss: float
    losses: list[float] = field(repr=False)  # one per step
    seconds: float  # the training loop alone, loading and caching excluded
    load_seconds: float
    samples_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".

    Raises RuntimeError saying why when CUDA is asked for but cannot be used.
    """
    kind = name.split(":")[0] if isinstance(name, str) else None
    if kind not in DEVICE_CHOICES:
        raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N", not {name!r}')
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise RuntimeError(
            f"device {name!r} was asked for, but this PyTorch ({torch.__version__}) is built without CUDA; "
            "install a CUDA build of torch, or use --device cpu"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was asked for, but no CUDA GPU is visible (check the driver and "
            "CUDA_VISIBLE_DEVICES), or use --device cpu"
        )
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device {name!r} was asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return device


def train(
    model: torch.nn.Module,
    train_cases: Sequence[Case],
    config: TrainConfig,
    hooks: TrainingHooks | None = None,
    *,
    dp: DpSgdConfig | None = None,
    generator: torch.Generator | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_cases`` for ``config.n_iterations(len(train_cases))`` steps,
    or, with ``dp``, for ``dp.steps`` steps of DP-SGD.

    The model is moved to the configured device and left there. Data order and augmentation
    come from ``config.seed`` alone, and the global torch random state is restored afterwards,
    so on the CPU two calls with the same model weights, cases and config give bit-identical
    weights (on CUDA, cuDNN's algorithm choice makes results only close). Raises DataError
    naming the file when a scan cannot be loaded, TrainConfigError when ``roi_size`` does not
    suit the model, and FloatingPointError when the loss stops being finite (without AMP).
    An exception from a hook stops training too.

    With ``dp`` (a `sitesagent.dpsgd.DpSgdConfig`) training is patient-level DP-SGD (see
    `sitesagent.dpsgd`): each step Poisson-samples the cases with rate ``dp.sample_rate``,
    takes ``dp.crops_per_case`` crops of each, clips each case's summed gradient to
    ``dp.max_grad_norm``, adds Gaussian noise and divides by the expected batch size; Adam (lr
    and weight decay from ``config``) sees only that. ``config.max_iterations`` and
    ``local_epochs`` are then ignored, ``config.batch_size`` is the most crops per forward pass
    (memory, not privacy), and AMP is off (``amp`` true is refused). Sampling and noise draw from
    ``generator`` (a CPU generator; give one only to replay a run, as tests do), else from one
    seeded from the operating system. The model is made per-sample compatible in place
    (`model.make_per_sample_compatible`: same weights, same function). The result has
    ``n_iterations == dp.steps``; a step whose batch is empty still updates the model (by noise
    alone) and reports its loss as NaN. The losses the hooks hear are not protected by the
    mechanism (DESIGN section 6 discloses metrics as such).
    """
    if not train_cases:
        raise ValueError("no training cases: a site needs at least one case to train on")
    hooks = hooks or NoHooks()
    device = resolve_device(config.device)
    _check_roi_fits(model, config.roi_size)
    if dp is not None:
        from sitesagent.dpsgd import train_private  # Opacus loads only when a round is private

        return train_private(model, train_cases, config, hooks, dp=dp, generator=generator, device=device)
    if generator is not None:
        raise ValueError("generator drives DP-SGD's sampling and noise; it is only taken with dp")
    use_amp = _amp_enabled(config.amp, device)
    total = config.n_iterations(len(train_cases))

    hooks.on_phase("loading")
    load_start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    with data_errors_surfaced():
        dataset = make_dataset(train_cases, train_transforms(config.roi_size), cache_rate=config.cache_rate)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        generator=generator,  # MONAI seeds the augmentations from it too
        pin_memory=device.type == "cuda",
    )
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_function = dice_loss()
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    load_seconds = time.perf_counter() - load_start

    hooks.on_phase("training")
    losses: list[float] = []
    samples = 0
    start = time.perf_counter()
    with _training_rng(config.seed, device), _fast_cudnn(device), data_errors_surfaced():
        for iteration, batch in enumerate(_batches(loader, total), start=1):
            images, labels = _to_device(batch, device)
            loss = _step(model, images, labels, optimizer, loss_function, scaler, use_amp)
            if not math.isfinite(loss) and not use_amp:  # under AMP the scaler skips such steps
                raise FloatingPointError(f"training diverged: the loss was {loss} at step {iteration}")
            losses.append(loss)
            samples += images.shape[0]
            hooks.on_step(iteration, total, loss, samples / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return TrainResult(
        n_iterations=total,
        n_cases=len(train_cases),
        final_loss=losses[-1],
        losses=losses,
        seconds=seconds,
        load_seconds=load_seconds,
        samples_per_second=samples / seconds,
    )


def dice_loss(reduction: str = "mean") -> DiceLoss:
    """The training loss: soft Dice on the three sigmoid outputs (MONAI's BraTS tutorial).
    ``reduction="none"`` gives one value per crop and region (DP-SGD's per-crop losses)."""
    return DiceLoss(
        smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True, reduction=reduction
    )


def _step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_function: torch.nn.Module,
    scaler: torch.amp.GradScaler,
    use_amp: bool,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, enabled=use_amp):
        loss = loss_function(model(images), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def _batches(loader: DataLoader, total: int) -> Iterator[dict[str, Any]]:
    """``total`` batches, going round the loader (a new shuffle each pass) as often as needed."""
    produced = 0
    while True:
        for batch in loader:
            yield batch
            produced += 1
            if produced == total:
                return


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Plain tensors: MONAI's MetaTensor would track metadata through every layer of the network.
    images = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor)
    labels = torch.as_tensor(batch["label"]).as_subclass(torch.Tensor)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@contextlib.contextmanager
def _training_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (dropout draws from it) and put the caller's state back after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _fast_cudnn(device: torch.device) -> Iterator[None]:
    """On CUDA let cuDNN pick the fastest 3-D convolutions for the fixed crop size."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _amp_enabled(amp: str | bool, device: torch.device) -> bool:
    if amp == "auto":
        return device.type == "cuda"
    if amp and device.type != "cuda":
        raise TrainConfigError(
            'amp (mixed precision) needs a CUDA device; use amp "auto" or false on the CPU'
        )
    return bool(amp)


def _size_divisor(model: torch.nn.Module) -> int:
    """Input sides must be multiples of this: SegResNet halves them once per level below the top."""
    blocks_down = getattr(model, "blocks_down", None)
    return 2 ** (len(blocks_down) - 1) if blocks_down else 1


def _check_roi_fits(model: torch.nn.Module, roi_size: Sequence[int]) -> None:
    divisor = _size_divisor(model)
    if any(side % divisor for side in roi_size):
        raise TrainConfigError(
            f"roi_size {list(roi_size)} must be multiples of {divisor} for this model "
            f"(it halves the volume {int(math.log2(divisor))} times)"
        )


def evaluate(
    model: torch.nn.Module,
    val_cases: Sequence[Case],
    config: TrainConfig,
    hooks: TrainingHooks | None = None,
) -> dict[str, float]:
    """Mean Dice of ``model`` on ``val_cases``: ``dice_et``, ``dice_tc``, ``dice_wt`` and ``dice_mean``.

    Each output channel is thresholded at sigmoid > 0.5 and compared with MONAI's DiceMetric;
    volumes are segmented whole, by sliding windows of ``config.roi_size``. A region absent
    from a case's labels scores as in the BraTS challenge (MONAI's ignore_empty=False): 1 when
    the prediction is empty too, 0 otherwise, so every score is a number in [0, 1].
    ``dice_mean`` is the mean of the three. With no validation cases, returns an empty dict.
    The model is left in the mode it was in.
    """
    if not val_cases:
        return {}
    hooks = hooks or NoHooks()
    device = resolve_device(config.device)
    use_amp = _amp_enabled(config.amp, device)
    hooks.on_phase("evaluating")
    # Each case is read once per evaluation, so a cache would only cost memory.
    loader = DataLoader(
        make_dataset(val_cases, val_transforms(), cache_rate=0), num_workers=config.num_workers
    )
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    divisor = _size_divisor(model)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad(), data_errors_surfaced():
            for batch in loader:
                images, labels = _to_device(batch, device)
                window = _window_size(images.shape[2:], config.roi_size, divisor)
                with torch.autocast(device.type, enabled=use_amp):
                    logits = sliding_window_inference(
                        images, window, config.sw_batch_size, model, overlap=config.sw_overlap
                    )
                assert isinstance(logits, torch.Tensor)  # SegResNet has one output
                metric(y_pred=torch.sigmoid(logits.float()) > 0.5, y=labels)
    finally:
        model.train(was_training)
    per_region = [float(score) for score in metric.aggregate()]
    scores = {f"dice_{region}": score for region, score in zip(REGIONS, per_region, strict=True)}
    scores["dice_mean"] = sum(per_region) / len(per_region)
    return scores


def _window_size(volume: Sequence[int], roi_size: Sequence[int], divisor: int) -> tuple[int, ...]:
    """The roi, shrunk to the volume (rounded up to the model's divisor) where the volume is smaller:
    a 48^3 volume then costs one 48^3 window, not a 128^3 one padded with zeros."""
    return tuple(
        min(roi, math.ceil(side / divisor) * divisor) for side, roi in zip(volume, roi_size, strict=True)
    )
