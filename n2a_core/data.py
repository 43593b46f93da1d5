"""The data-source interface: records of an image with optional label and caption."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image
from pydantic import Field

from n2a_core.specs import ComponentSpec


@dataclass
class Sample:
    """One record of a data source."""

    key: str
    """Stable identity (file path, row id, code point): the train/val split hashes it, so
    adding data never moves an existing record to the other split."""
    image: Image.Image | None
    """The decoded image, or None when it could not be read (it is then skipped and counted)."""
    label: str | None = None
    caption: str | None = None
    error: str | None = None
    """Why `image` is None."""


class DataSourceSpec(ComponentSpec):
    """Fields every data source shares; plugins subclass it."""

    image_size: int = Field(256, ge=8, le=4096)
    """Images are resized (smallest side) and centre-cropped to this square size."""
    random_flip: bool = True
    """Random horizontal flips during training."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of records held out for validation (paper: 5%)."""
    split_seed: int = 0
    """Seed of the hash-based train/validation split."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many records (handy for quick runs)."""


class DataSource(ABC):
    """Yields `Sample`s. Sources that can, also report their size and label vocabulary."""

    @abstractmethod
    def __iter__(self) -> Iterator[Sample]: ...

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} is streamed and has no known length")

    def label_vocabulary(self) -> list[str] | None:
        """Sorted distinct labels without decoding images, or None if records have none."""
        return None
