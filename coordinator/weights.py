"""Model weights as safetensors bytes: the initial version of a federation, and the flat view
the aggregation works on. The model itself is defined once, in sitesagent.model."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sitesagent import protocol


def initial_weights(model_config: dict[str, Any], seed: int) -> bytes:
    from sitesagent.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(model_config), seed=seed)
    return state_to_bytes(model.state_dict())


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({name: tensor.detach().contiguous().cpu() for name, tensor in state.items()})


def bytes_to_state(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def flat_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The tensors an update covers: every floating-point tensor of the model."""
    return {name: tuple(tensor.shape) for name, tensor in state.items() if tensor.is_floating_point()}


def flatten(state: dict[str, torch.Tensor]) -> torch.Tensor:
    layout = protocol.flat_layout(flat_shapes(state))
    return torch.cat([state[name].reshape(-1).to(torch.float32) for name, _, _ in layout])


def unflatten(flat: torch.Tensor, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put a flat vector back into ``reference``'s tensors (non-floating tensors kept as they are)."""
    state = dict(reference)
    for name, start, stop in protocol.flat_layout(flat_shapes(reference)):
        state[name] = flat[start:stop].reshape(reference[name].shape).to(reference[name].dtype)
    return state


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in state.values() if tensor.is_floating_point())
