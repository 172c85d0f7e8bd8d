"""DP-SGD at a site: patient-level differential privacy for one round of local training.

The mechanism of Abadi et al. 2016 as Opacus implements it (DESIGN section 6).
"""

from __future__ import annotations

import torch
from monai.networks.blocks.segresnet_block import ResBlock


class PerSampleResBlock(ResBlock):
    """MONAI's ResBlock with the skip connection added out of place, so that Opacus's backward
    hooks on ``conv2`` can see its output unchanged (see `model.make_per_sample_compatible`).
    Same submodules and parameters, same arithmetic as ResBlock.forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))
        return x + identity
