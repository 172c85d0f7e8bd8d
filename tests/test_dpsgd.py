"""Patient-level DP-SGD at a site (sitesagent.dpsgd): a tiny SegResNet on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.losses import DiceLoss
from opacus import GradSampleModule

from sitesagent import dpsgd, model

ROI = 8


def tiny(seed: int = 0) -> torch.nn.Module:
    return model.build_model(model.preset("tiny"), seed=seed)


def weights(network: torch.nn.Module) -> torch.Tensor:
    return model.state_to_flat(network.state_dict())


def random_crops(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 4, ROI, ROI, ROI, generator=generator)
    labels = (torch.rand(n, 3, ROI, ROI, ROI, generator=generator) > 0.7).float()
    return images, labels


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
    loss = DiceLoss(sigmoid=True, reduction="none")

    plain = GradSampleModule(tiny(), loss_reduction="sum")
    with pytest.raises(RuntimeError, match="modified inplace"):
        loss(plain(images), labels).sum().backward()

    compatible = GradSampleModule(model.make_per_sample_compatible(tiny()), loss_reduction="sum")
    loss(compatible(images), labels).sum().backward()
    assert all(p.grad_sample.shape == (2, *p.shape) for p in compatible.parameters())
