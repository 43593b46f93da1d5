"""What stage 2 trains and generation loads: the denoiser plus a trainable conditioner.

A frozen conditioner (a pretrained text encoder) is used but never checkpointed: it is
reloaded from its own path.
"""

from __future__ import annotations

import torch
from torch import nn

from n2a_core.conditioner import Conditioner
from n2a_core.denoiser import Denoiser


class DiffusionModel(nn.Module):
    """The trainable part of stage 2: the denoiser and, if trainable, the conditioner."""

    def __init__(self, denoiser: Denoiser, conditioner: Conditioner | None):
        super().__init__()
        self.denoiser = denoiser
        self.conditioner = conditioner if conditioner is not None and conditioner.trainable else None
        # A frozen conditioner is used but not registered, so it never enters the state_dict.
        object.__setattr__(self, "frozen_conditioner", conditioner if self.conditioner is None else None)

    @property
    def prediction_type(self):
        return self.denoiser.prediction_type

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction (so that DDP can wrap the whole trainable model)."""
        return self.denoiser(z_t, t, cond, drop)

    @property
    def any_conditioner(self) -> Conditioner | None:
        return self.conditioner if self.conditioner is not None else self.frozen_conditioner

    def embed(self, conditions: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(embeddings, missing) for B conditions; '' (no label or caption) is missing and
        is always dropped to the null token."""
        conditioner = self.any_conditioner
        if conditioner is None:
            return None, None
        missing = torch.tensor([not c for c in conditions], dtype=torch.bool)
        present = [c for c in conditions if c]
        cond = conditioner.null_embedding(len(conditions)).clone()
        if present:
            idx = (~missing).nonzero().flatten().to(cond.device)
            cond[idx] = conditioner.embed(present).to(cond.dtype)
        return cond, missing
