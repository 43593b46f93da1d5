"""The base every plugin spec subclasses, and what a factory receives besides its spec.

A leaf: it imports nothing from n2a_core, so the registry, the run spec and every
plugin can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


class N2ASpec(BaseModel):
    """Base of every n2a spec: unknown keys are errors, field docstrings become docs, and no
    float may be NaN or infinite (YAML's .inf, JSON's NaN: an lr of inf trains nothing)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class ComponentSpec(N2ASpec):
    """Base of a plugin's spec. Subclasses declare `type: Literal["name"] = "name"`."""

    type: str

    def params(self) -> dict[str, Any]:
        """The fields as plain keyword arguments for the component's constructor."""
        return self.model_dump(exclude={"type"})


@dataclass
class BuildContext:
    """What a factory may need beyond its spec, supplied by the pipeline assembler."""

    label_vocabulary: list[str] | None = None
    """Sorted class labels of the training data (class-label conditioners need it)."""
    device: torch.device | str = "cpu"
    training: bool = True
    """False when a component is built only to sample or evaluate: plugins may then skip
    what only training needs (a perceptual network, a discriminator's weights on disk)."""
    cache_dir: Path | None = None
    """Where a plugin may keep derived files (rendered images, embedding caches)."""
    latent_channels: int | None = None
    """The autoencoder's latent channels, for denoiser specs that leave theirs unset."""
    conditioning: Any = None
    """The conditioner's output as an `n2a_core.Conditioning` (kind, dim), or None when the
    run is unconditional; for denoiser specs that leave their conditioning unset."""
