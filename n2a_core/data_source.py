"""The data-source interface plugins implement: `Record`s listed cheaply, `Sample`s decoded on demand.

A data source lists lightweight `Record`s (key, label, caption, and whatever it needs to
find the image) without decoding anything, and decodes one record into a `Sample` on
demand. Splitting, transforming and batching are shared by every source
(`n2a_core.training.batching`), so every source behaves the same.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import Field

from n2a_core.component import ComponentSpec
from n2a_core.seeds import Seed


# -- records and samples ---------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """A data-source entry before decoding: cheap to list, split and count."""

    key: str
    """Stable identity (relative path, row id, code points); the split hashes it."""
    label: str | None = None
    caption: str | None = None
    ref: Any = None
    """Whatever the source needs to load the image (a path, a row number, raw bytes)."""


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
    split_seed: Seed = 0
    """Seed of the hash-based train/validation split."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many records (handy for quick runs)."""


class DataSource(ABC):
    """Lists `Record`s cheaply and decodes one into a `Sample` on demand.

    A source implements `scan()` (every record, in a stable order, nothing decoded) and
    `load(record)`. Sized sources (`streaming = False`) are listed once and then read by
    index; streamed ones are scanned afresh on every pass.
    """

    streaming: bool = False
    """True when the records cannot be listed up front (e.g. a streamed hub dataset)."""

    def __init__(self, spec: DataSourceSpec):
        self.spec = spec
        self._records: list[Record] | None = None

    @property
    def name(self) -> str:
        return self.spec.type

    @abstractmethod
    def scan(self) -> Iterator[Record]:
        """Every record in a stable order, without decoding images."""

    @abstractmethod
    def load(self, record: Record) -> Sample:
        """Decode one record; an unreadable image gives `Sample(image=None, error=...)`."""

    def records(self) -> Iterator[Record]:
        """The records this run uses: `scan()` capped at `spec.limit`."""
        return itertools.islice(self.scan(), self.spec.limit)

    def record_list(self) -> list[Record]:
        """All records of a sized source, listed once and kept."""
        if self.streaming:
            raise TypeError(f"data source '{self.name}' is streamed and cannot be listed")
        if self._records is None:
            self._records = list(self.records())
        return self._records

    def __iter__(self) -> Iterator[Sample]:
        for record in self.records():
            yield self.load(record)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"data source '{self.name}' is streamed and has no known length")
        return len(self.record_list())

    def label_vocabulary(self) -> list[str] | None:
        """Sorted distinct labels without decoding images, or None if records have none."""
        if self.streaming:
            return None
        labels = sorted({r.label for r in self.record_list() if r.label})
        return labels or None
