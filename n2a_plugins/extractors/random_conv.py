"""`random-conv`: multi-scale statistics of a fixed, randomly initialised conv network.

Works on any machine with no download: the weights are drawn from a seeded CPU generator
each time, so every installation computes the same network. Random convolutional
features are a known baseline embedding for generative metrics (Naeem et al. 2020,
"Reliable Fidelity and Diversity Metrics", sec. 5: random embeddings rank models
sensibly on non-ImageNet data).

What it measures: per stage, the mean and standard deviation of every channel of four
conv + ReLU stages (strides 2; 32..256 channels) on the image resized to `size` x `size`,
so colour, contrast, edges and textures at scales from a few pixels to the whole image.
Limits: it knows nothing of objects or semantics (a cat and a dog with the same colours
and strokes look alike to it), its numbers are not FID and are not comparable with
papers, nor between different `size`, `seed` or `channels` settings.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from n2a_core import ComponentSpec, FeatureExtractor


class RandomConvSpec(ComponentSpec):
    type: Literal["random-conv"] = "random-conv"
    size: int = Field(64, ge=16, le=512)
    """Images are resized (bilinear, antialiased) to this square size first."""
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=1, max_length=8)
    """Output channels of each conv stage (each halves the resolution)."""
    seed: int = 0
    """Seed of the random weights: the same seed gives the same network everywhere."""


class RandomConvExtractor(FeatureExtractor):
    def __init__(self, size: int = 64, channels: list[int] | None = None, seed: int = 0):
        super().__init__()
        self.size = size
        channels = list(channels or [32, 64, 128, 256])
        generator = torch.Generator().manual_seed(seed)
        self.stages = nn.ModuleList()
        for c_in, c_out in zip([3, *channels[:-1]], channels, strict=True):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                # He initialisation (He et al. 2015), so activations keep their scale through
                # the ReLUs; zero bias. Drawn from our generator, not the global RNG.
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / (c_in * 9)) ** 0.5)
                conv.bias.zero_()
            conv.requires_grad_(False)
            self.stages.append(conv)
        self.dim = 2 * sum(channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        features = []
        for conv in self.stages:
            x = F.relu(conv(x))
            features += [x.mean((2, 3)), x.std((2, 3), correction=0)]  # 0, not NaN, on a 1 x 1 map
        return torch.cat(features, 1)
