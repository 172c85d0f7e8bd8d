"""Updates as an agent would make them, for tests that need real ones."""

import torch

from sitesagent.privacy import svt
from sitesagent.updates import encode_update


def svt_update(
    n_parameters: int, params: dict, *, n_iterations: int = 2, n_cases: int = 3, seed: int = 0
) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    per_step = torch.randn(n_parameters, generator=generator) * float(params["gamma"])
    indices, values = svt(per_step, **params, generator=generator)
    return encode_update(
        indices=indices,
        values=values * n_iterations,
        n_parameters=n_parameters,
        n_iterations=n_iterations,
        n_cases=n_cases,
        mechanism="svt",
        params=params,
    )
