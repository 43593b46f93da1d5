"""The conditioner interface: a label or caption per image -> an embedding tensor."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from n2a_core.errors import SpecError, did_you_mean


class Conditioner(nn.Module, ABC):
    """Embeds one condition per image.

    `field` says which metadata of a data sample it reads ('label' or 'caption').
    `embed` returns B x D (output 'vector') or B x L x D ('sequence'), float32.
    `null_embedding(B)` is the placeholder fed where a sample has no condition; the
    denoiser replaces it by its learned null token wherever `drop` is set, so the two
    stay consistent. Frozen conditioners (text models) have no trainable parameters;
    trainable ones (class embeddings) are optimized and saved with the denoiser.
    """

    field: Literal["label", "caption"]
    output: Literal["vector", "sequence"] = "vector"
    dim: int

    @abstractmethod
    def embed(self, conditions: Sequence[str]) -> torch.Tensor:
        """B conditions -> B x D or B x L x D."""

    def null_embedding(self, batch_size: int) -> torch.Tensor:
        """Zeros shaped like `embed`'s output (overridable)."""
        probe = self.embed([""]) if self.output == "sequence" else None
        shape = (batch_size, self.dim) if probe is None else (batch_size, *probe.shape[1:])
        return torch.zeros(shape, device=self.device)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")


def check_labels(conditioner: Conditioner, conditions: Sequence[str], where: str) -> None:
    """Refuse labels the conditioner does not know, naming `where` they came from."""
    labels = getattr(conditioner, "labels", None)
    if conditioner.field != "label" or labels is None:
        return
    for c in conditions:
        if c and c not in labels:
            raise SpecError(f"{where}: unknown label '{c}'{did_you_mean(c, labels)}; known: "
                            f"{', '.join(labels[:30])}{' …' if len(labels) > 30 else ''}")
