"""The feature-extractor interface: images -> one feature vector each, for the metrics.

Fréchet distance, KID and precision/recall are only as meaningful as the features they
compare. Extractors are plugins (kind `extractor`): `inception` is the network of FID
papers; `random-conv` works offline anywhere. Numbers are comparable only between runs
scored with the same extractor and settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn


class FeatureExtractor(nn.Module, ABC):
    """Maps B x 3 x H x W images in [-1, 1] (any H, W) to B x `dim` float features."""

    dim: int

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [-1, 1] -> B x dim."""

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """N x dim float64 CPU features of every image in `batches` (each B x 3 x H x W)."""
    extractor.eval()
    out = [extractor(batch.to(extractor.device).float()).double().cpu() for batch in batches]
    if not out:
        return torch.zeros(0, extractor.dim, dtype=torch.float64)
    return torch.cat(out)
