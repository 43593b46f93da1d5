"""A learned embedding per class label (the class-conditional LDM's embedder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from n2a_core import ComponentSpec, Conditioner, SpecError, did_you_mean


class ClassLabelSpec(ComponentSpec):
    type: Literal["class-label"] = "class-label"
    dim: int = Field(128, ge=1, le=16384)
    """Embedding size D of each class."""
    labels: list[str] | None = None
    """The class vocabulary in index order; None: the sorted labels of the training data. A
    saved spec that lists them can be rebuilt without the data."""

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels):
        if labels is not None:
            if not labels:
                raise ValueError("is empty; list the class labels or leave it unset to take them from the data")
            duplicates = sorted({x for x in labels if labels.count(x) > 1})
            if duplicates:
                raise ValueError(f"lists {', '.join(map(repr, duplicates[:5]))} more than once")
        return labels


def _listing(labels: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(labels[:limit])
    return f"{shown}, … ({len(labels) - limit} more)" if len(labels) > limit else shown


class ClassLabelConditioner(Conditioner):
    """Label -> row of a trainable nn.Embedding over the vocabulary (B x dim).

    Trained with the denoiser and saved with it. The vocabulary (`labels`) is a plain
    attribute, not a tensor: the run keeps it beside the checkpoint (or in the spec's
    `labels`) and the module is rebuilt from it before the weights load.
    """

    field = "label"
    output = "vector"

    def __init__(self, labels: Sequence[str], dim: int = 128):
        super().__init__()
        self.labels: list[str] = list(labels)
        self.dim = dim
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.embedding = nn.Embedding(len(self.labels), dim)

    def indices(self, labels: Sequence[str]) -> torch.Tensor:
        unknown = next((x for x in labels if x not in self.index), None)
        if unknown is not None:
            raise SpecError(f"label: unknown label {unknown!r}{did_you_mean(unknown, self.labels)}; "
                            f"the {len(self.labels)} known labels are: {_listing(self.labels)}")
        return torch.tensor([self.index[x] for x in labels], dtype=torch.long, device=self.device)

    def embed(self, conditions: Sequence[str]) -> torch.Tensor:
        return self.embedding(self.indices([str(c) for c in conditions]))


def build_class_label(spec: ClassLabelSpec, ctx) -> ClassLabelConditioner:
    """A trainable embedding per class label of the data."""
    labels, data_labels = spec.labels, ctx.label_vocabulary
    if labels is None:
        if not data_labels:
            raise SpecError(
                "conditioner: 'class-label' needs class labels but the data has none; pick a data source "
                "(or its options) that yields a label per image (`n2a list-plugins --kind data`), list them "
                "in conditioner.labels, or use a caption conditioner (minilm, clip)")
        labels = data_labels
    elif data_labels is not None and list(data_labels) != list(labels):
        extra = sorted(set(data_labels) - set(labels))
        raise SpecError(
            f"conditioner.labels: the {len(labels)} listed labels differ from the data's {len(data_labels)}"
            + (f" (the data also has {_listing(extra, 5)})" if extra else " (order or subset)")
            + "; remove conditioner.labels to use the data's, or train a new run")
    return ClassLabelConditioner(labels, spec.dim).to(ctx.device)
