"""The federation's model: MONAI SegResNet, its configuration, and flat update vectors.

`ModelConfig` is plain data (the coordinator stores it per federation as JSON), so this module
imports torch only inside the functions that need it: reading or validating a configuration
stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from sitesagent.protocol import flat_layout

if TYPE_CHECKING:
    import torch

REGIONS = ("et", "tc", "wt")  # the model's output channels, in order


def settings_from_dict(
    cls: Any, data: Mapping[str, Any], *, what: str, error: type[Exception], tuples: tuple[str, ...]
) -> Any:
    """A settings dataclass from JSON: unknown names refused by ``error``, missing ones defaulted,
    and the ``tuples`` fields, which JSON turns into lists, turned back into tuples."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"unknown {what} setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {name: tuple(v) if name in tuples and isinstance(v, list) else v for name, v in data.items()}
    return cls(**values)


class ModelConfigError(ValueError):
    """A model configuration that cannot build a network; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """SegResNet's architecture (Myronenko 2018). The defaults are the BraTS configuration."""

    init_filters: int = 16
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    in_channels: int = 4
    out_channels: int = 3
    dropout_prob: float | None = None
    norm_groups: int = 8  # GroupNorm groups; init_filters must be a multiple of it

    def __post_init__(self) -> None:
        for name in ("init_filters", "in_channels", "out_channels", "norm_groups"):
            _check_positive_int(name, getattr(self, name))
        for name in ("blocks_down", "blocks_up"):
            blocks = getattr(self, name)
            if not isinstance(blocks, tuple) or not all(_is_positive_int(b) for b in blocks):
                raise ModelConfigError(f"{name} must be a list of whole numbers 1 or more, not {blocks!r}")
        if not self.blocks_down:
            raise ModelConfigError("blocks_down needs at least one level")
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ModelConfigError(
                f"blocks_up needs one entry per level below the top: {len(self.blocks_down) - 1} "
                f"for blocks_down {list(self.blocks_down)}, not {len(self.blocks_up)}"
            )
        if self.init_filters % self.norm_groups:
            raise ModelConfigError(
                f"init_filters ({self.init_filters}) must be a multiple of norm_groups ({self.norm_groups})"
            )
        if self.dropout_prob is not None and not (
            isinstance(self.dropout_prob, int | float) and 0 <= self.dropout_prob < 1
        ):
            raise ModelConfigError(f"dropout_prob must be empty or from 0 up to 1, not {self.dropout_prob!r}")

    @property
    def size_divisor(self) -> int:
        """Every input side must be a multiple of this (one halving per level below the top)."""
        return 2 ** (len(self.blocks_down) - 1)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-able values (tuples become lists)."""
        values = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Read a configuration from `to_dict`'s output; missing fields take the defaults.

        Raises ModelConfigError naming any unknown or bad field.
        """
        return settings_from_dict(
            cls, data, what="model", error=ModelConfigError, tuples=("blocks_down", "blocks_up")
        )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_positive_int(value):
        raise ModelConfigError(f"{name} must be a whole number 1 or more, not {value!r}")


# Named configurations. "brats" is DESIGN section 7's network (4,702,227 parameters).
# "cpu" keeps BraTS's depth at a quarter of the width, for CPU demos on 48^3 synthetic volumes.
# "tiny" is for tests: three levels, so inputs need only be multiples of 4.
PRESETS: dict[str, ModelConfig] = {
    "brats": ModelConfig(),
    "cpu": ModelConfig(init_filters=8),
    "tiny": ModelConfig(init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1), norm_groups=4),
}
BRATS_PARAMETER_COUNT = 4_702_227


def preset(name: str) -> ModelConfig:
    """The named configuration: "brats", "cpu" or "tiny"."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelConfigError(f"no model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def build_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A SegResNet for ``config`` whose initial weights depend only on ``seed``.

    The global torch random state is left as it was: the weights come from a forked RNG.
    The model is on the CPU; move it where it will run.
    """
    import torch
    from monai.networks.nets import SegResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SegResNet(
            spatial_dims=3,
            init_filters=config.init_filters,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            dropout_prob=config.dropout_prob,
            norm=("GROUP", {"num_groups": config.norm_groups}),
            blocks_down=config.blocks_down,
            blocks_up=config.blocks_up,
        )


def make_per_sample_compatible(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (in place, and return it) work with Opacus's per-sample gradients (DP-SGD).

    Opacus records per-sample gradients with backward hooks on every layer that has weights,
    and autograd refuses an in-place change to a hooked layer's output ("Output 0 of
    BackwardHookFunction is a view and is being modified inplace"). MONAI's SegResNet makes two:
    its activations run in place (ReLU(inplace=True) right after each GroupNorm), and its
    ResBlock adds the skip connection in place (``x += identity``) on a convolution's output.
    Here every activation (and dropout) runs out of place, and each ResBlock becomes a
    `sitesagent.dpsgd.PerSampleResBlock`: the same object, parameters and submodules, whose
    forward ends in ``x + identity``. Nothing is forked, so the state dict's keys and values and
    the function computed are exactly those of the original (out of place gives the same
    floating-point results). Calling it twice is harmless.
    """
    from monai.networks.blocks.segresnet_block import ResBlock

    from sitesagent.dpsgd import PerSampleResBlock

    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
        if type(module) is ResBlock:
            # Swapping the class keeps the instance (its parameters, hooks and place in the
            # model); a subclass at module level keeps the model deep-copyable and picklable.
            module.__class__ = PerSampleResBlock
    return model


def count_parameters(config: ModelConfig) -> int:
    """How many numbers the flat update vector of ``config``'s model holds."""
    state = build_model(config).state_dict()
    return sum(math.prod(shape) for shape in floating_shapes(state).values())


def floating_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the floating-point tensors of a state dict: what an update covers."""
    return {name: tuple(tensor.shape) for name, tensor in state.items() if tensor.is_floating_point()}


def state_to_flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One 1-D float32 CPU tensor holding every floating tensor of ``state``.

    Tensors are laid out by `protocol.flat_layout` (sorted names), so the order never depends
    on how the state dict happens to be ordered. Integer buffers are left out.
    """
    import torch

    layout = flat_layout(floating_shapes(state))
    if not layout:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([state[name].detach().reshape(-1).to("cpu", torch.float32) for name, _, _ in layout])


def flat_to_state(flat: torch.Tensor, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict whose floating tensors are read from ``flat`` (see `state_to_flat`).

    Shapes, dtypes and devices come from ``reference``; its non-floating entries are copied.
    Raises ValueError when ``flat`` is not 1-D or its length does not fit ``reference``.
    """
    layout = flat_layout(floating_shapes(reference))
    expected = layout[-1][2] if layout else 0
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}; this model needs ({expected},)")
    state = {name: tensor.clone() for name, tensor in reference.items() if not tensor.is_floating_point()}
    for name, start, stop in layout:
        target = reference[name]
        # copy=True: the result must not alias ``flat``, which the caller may go on changing.
        piece = flat[start:stop].reshape(target.shape)
        state[name] = piece.to(device=target.device, dtype=target.dtype, copy=True)
    return {name: state[name] for name in reference}  # keep the reference's order


def delta(base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The flat update ``trained - base`` (float32, `state_to_flat` layout).

    Raises ValueError when the two states do not hold the same tensor names and shapes.
    """
    base_shapes, trained_shapes = floating_shapes(base), floating_shapes(trained)
    if base_shapes != trained_shapes:
        differing = sorted(set(base_shapes.items()) ^ set(trained_shapes.items()))
        raise ValueError(f"the two states differ in {', '.join(name for name, _ in differing[:5])}")
    return state_to_flat(trained) - state_to_flat(base)
