"""Model weights as safetensors bytes. The model and its flat layout are defined once, in
sitesagent.model; the coordinator only stores, loads and counts."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sitesagent.model import ModelConfig, build_model, flat_to_state, state_to_flat

flatten = state_to_flat
unflatten = flat_to_state


def initial_weights(model_config: dict[str, Any], seed: int) -> bytes:
    model = build_model(ModelConfig.from_dict(model_config), seed=seed)
    return state_to_bytes(model.state_dict())


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({name: tensor.detach().contiguous().cpu() for name, tensor in state.items()})


def bytes_to_state(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in state.values() if tensor.is_floating_point())
