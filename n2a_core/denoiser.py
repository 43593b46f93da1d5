"""The denoiser interface: (z_t, t, cond) -> prediction of epsilon, v or z0."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from n2a_core.errors import SpecError

PredictionType = Literal["epsilon", "v", "sample"]
"""epsilon: the added noise (DDPM); v: sqrt(a) eps - sqrt(1-a) z0 (Salimans & Ho 2022);
sample: z0 itself."""


@dataclass(frozen=True)
class Conditioning:
    """What conditioning a denoiser accepts."""

    kind: Literal["none", "vector", "sequence"] = "none"
    dim: int = 0
    """D: vector B x D, or sequence B x L x D (cross-attention)."""

    def accepts(self, kind: str, dim: int) -> bool:
        return self.kind == kind and self.dim == dim


class Denoiser(nn.Module, ABC):
    """Predicts `prediction_type` from noisy latents.

    forward(z_t, t, cond=None, drop=None):
      z_t:  B x C x h x w noisy latents;
      t:    B timesteps, float, integer-valued in [0, T) of the run's schedule;
      cond: B x D (vector) or B x L x D (sequence) embeddings, or None for "no condition";
      drop: B bools; where True the condition is replaced by the denoiser's learned null
            token (classifier-free guidance trains and samples with it). cond=None is the
            same as drop all-True.
    Returns B x C x h x w.
    """

    in_channels: int
    out_channels: int
    prediction_type: PredictionType = "epsilon"
    conditioning: Conditioning = Conditioning()

    @abstractmethod
    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def to_diffusers(self, sample_size: int, class_embeddings: torch.Tensor | None = None) -> dict:
        """The same network as diffusers modules (`n2a export --format diffusers`):
        {"unet": model, "condition_projection": module or None, "null_condition": tensor or None}.
        `class_embeddings` (N x D), when the conditions are N class labels, lets the plugin fold
        its condition path into a class-embedding table (row N: no condition). Plugins without
        an equivalent keep this refusal."""
        raise SpecError(f"denoiser: '{type(self).__name__}' has no diffusers equivalent (its plugin "
                        "defines no to_diffusers)")
