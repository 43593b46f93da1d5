"""Data sources and the one path from a source to training batches.

A data source lists lightweight `Record`s (key, label, caption, and whatever it needs to
find the image) without decoding anything, and decodes one record into a `Sample` on
demand. Everything else is shared here, so every source behaves the same:

- one image transform (`image_to_tensor`): RGB on white, smallest-side resize, centre
  crop, optional flip, 3xSxS float32 in [-1, 1];
- a train/validation split by a seeded hash of each record's key (`split_of`), so a
  record never changes sides when the dataset grows;
- a label vocabulary (sorted distinct labels) saved to and loaded from the run directory;
- unreadable images are skipped, counted, and reported once per pass (`report_skipped`),
  never crashing a run.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps
from pydantic import Field

from n2a_core.errors import DataError
from n2a_core.specs import ComponentSpec

log = logging.getLogger("n2a.data")

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for unreadable, truncated or hostile files (OSError covers
UnidentifiedImageError); anything else is a bug and keeps its traceback."""


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
    split_seed: int = 0
    """Seed of the hash-based train/validation split."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many records (handy for quick runs)."""
    license: str | None = None
    """Licence of the images as a Hub/SPDX id (e.g. cc-by-4.0), for model cards; None: what
    the source plugin declares, else unknown. A model trained on them is a derived work."""

    declared_license: ClassVar[str | None] = None
    """The licence a source plugin knows its data has (OpenMoji: cc-by-sa-4.0)."""

    def data_license(self) -> str | None:
        """The data's licence id: the spec's `license`, else the plugin's, else None (unknown)."""
        return self.license or self.declared_license


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


def open_image(source: str | os.PathLike | bytes) -> tuple[Image.Image | None, str | None]:
    """Open and fully decode an image file or bytes; (None, reason) when it is unreadable.

    Pillow decodes lazily, so a truncated file only fails on `load()`: force it here so
    the failure is caught and counted instead of surfacing inside a DataLoader worker.
    """
    try:
        if isinstance(source, bytes | bytearray):
            if not source:
                return None, "empty image bytes"
            image = Image.open(io.BytesIO(source))
        else:
            if os.path.getsize(source) == 0:
                return None, "zero-byte file"
            image = Image.open(source)
        image.load()
        return image, None
    except IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


# -- the transform ---------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; greyscale, palette, CMYK, 16-bit -> RGB."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation as a tag
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow's convert clips these to 0..255, which turns 16-bit greyscale white.
        a = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            peak = 65535.0
        elif image.mode == "F":
            peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        else:  # 32-bit "I": 16-bit data unless every value fits in 8 bits
            peak = 255.0 if a.max(initial=0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    transparent = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info
    if transparent:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_tensor(image: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """A 3 x size x size float32 tensor in [-1, 1]: smallest side resized to `size`, centre-cropped.

    Resize and crop are one resampling step: the centred square of side min(w, h) is
    mapped onto size x size with Pillow's antialiased bicubic filter (its kernel widens
    when downscaling, so no aliasing), which equals "resize smallest side, then centre
    crop" without rounding the intermediate size.
    """
    image = to_rgb(image)
    w, h = image.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    return x.flip(-1) if flip else x


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """The inverse of `image_to_tensor` for a 3xHxW (or 1xHxW) tensor in [-1, 1], clamped."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"tensor_to_image expects 3xHxW or 1xHxW, got shape {tuple(x.shape)}")
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if a.shape[0] == 1:
        return Image.fromarray(a[0].numpy(), "L").convert("RGB")
    return Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB")


def _caption_font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=height)  # Pillow's bundled font: no download
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def make_grid_image(
    images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None
) -> Image.Image:
    """A contact sheet of B x 3 x H x W images in [-1, 1], `nrow` images per row.

    `nrow` defaults to ceil(sqrt(B)), the squarest grid. With captions, small cells are
    enlarged (nearest neighbour, whole factors) to at least 96 px so the text is legible.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid_image expects B x 3 x H x W, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"make_grid_image got {b} images but {len(captions)} captions")
    ncol = max(1, min(b, nrow or math.ceil(math.sqrt(max(b, 1)))))
    nrows = max(1, math.ceil(b / ncol))
    scale = max(1, math.ceil(96 / w)) if captions is not None else 1
    cw, ch = w * scale, h * scale
    pad = 2
    text_h = 14 if captions is not None else 0
    sheet = Image.new("RGB", (ncol * (cw + pad) + pad, nrows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = _caption_font(11) if captions is not None else None
    for i in range(b):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        tile = tensor_to_image(images[i])
        if scale > 1:
            tile = tile.resize((cw, ch), Image.Resampling.NEAREST)
        sheet.paste(tile, (x0, y0))
        if captions is not None and captions[i]:
            draw.text((x0 + 1, y0 + ch + 1), _fit_text(draw, captions[i], font, cw - 2), fill="black", font=font)
    return sheet


# -- split and vocabulary -------------------------------------------------------------
def _unit_hash(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from the key alone (sha256: stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, val_fraction: float, seed: int) -> Literal["train", "val"]:
    """The split of a record: 'val' when the seeded hash of its key falls below val_fraction.

    Each record's side depends on its own key only, so adding or removing other records
    never moves it; the val share converges to val_fraction as the set grows.
    """
    return "val" if _unit_hash(key, seed) < val_fraction else "train"


@dataclass
class LabelVocabulary:
    """Sorted distinct class labels; index i is the label's class id everywhere in a run."""

    labels: list[str]

    def __post_init__(self):
        self.labels = sorted(set(self.labels))
        self._positions = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_labels(cls, labels: Iterable[str | None]) -> LabelVocabulary | None:
        """The vocabulary of the non-empty labels, or None when there are none."""
        distinct = {label for label in labels if label}
        return cls(sorted(distinct)) if distinct else None

    def index(self, label: str) -> int:
        try:
            return self._positions[label]
        except KeyError:
            raise DataError(f"label {label!r} is not in the vocabulary; known labels: {self._shown()}") from None

    def _shown(self, n: int = 20) -> str:
        shown = ", ".join(self.labels[:n])
        return shown + (f", … ({len(self.labels)} in all)" if len(self.labels) > n else "")

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self._positions

    def __iter__(self) -> Iterator[str]:
        return iter(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelVocabulary) and self.labels == other.labels

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"labels": self.labels}, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelVocabulary:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            labels = data["labels"]
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise TypeError("labels must be a list of strings")
        except FileNotFoundError:
            raise DataError(f"{path}: label vocabulary not found; training writes it into the run directory") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a label vocabulary ({type(exc).__name__}: {exc}); "
                            'expected {"labels": [...]}') from None
        return cls(labels)


# -- skipped images --------------------------------------------------------------------
class SkipCounter:
    """Counts unreadable images across DataLoader worker processes.

    The count and the first few names live in shared memory created in the main process,
    so worker copies (fork or spawn) add to the same counter that `report_skipped` reads.
    """

    _NAME_BYTES = 480

    def __init__(self):
        ctx = multiprocessing.get_context()
        self._count = ctx.Value("q", 0)
        self._names = ctx.Array("c", self._NAME_BYTES, lock=False)

    def add(self, key: str, error: str | None = None) -> None:
        with self._count.get_lock():
            self._count.value += 1
            current = bytes(self._names.value)
            entry = (key if not error else f"{key} ({error})").encode("utf-8", "replace")[:160]
            if len(current) + len(entry) + 1 < self._NAME_BYTES:
                self._names.value = current + (b"\n" if current else b"") + entry

    @property
    def count(self) -> int:
        return int(self._count.value)

    @property
    def names(self) -> list[str]:
        raw = bytes(self._names.value)
        return raw.decode("utf-8", "replace").split("\n") if raw else []

    def reset(self) -> None:
        with self._count.get_lock():
            self._count.value = 0
            self._names.value = b""

    def __getstate__(self) -> dict:
        # Shared memory can only go to a process being started (a DataLoader worker);
        # any other copy (deepcopy, pickle to disk) gets a private counter with the same state.
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"shared": (self._count, self._names)}
        return {"count": self.count, "names": self.names}

    def __setstate__(self, state: dict) -> None:
        if "shared" in state:
            self._count, self._names = state["shared"]
            return
        self.__init__()
        self._count.value = state["count"]
        self._names.value = "\n".join(state["names"]).encode()[: self._NAME_BYTES - 1]


def report_skipped(dataset: Any, what: str | None = None) -> str | None:
    """Log one warning line if `dataset` skipped unreadable images this pass, then reset.

    Returns the line (None when nothing was skipped). Call it at the end of an epoch or
    evaluation pass; datasets without a `skipped` counter report nothing.
    """
    counter = getattr(dataset, "skipped", None)
    if not isinstance(counter, SkipCounter) or counter.count == 0:
        return None
    names = counter.names
    shown = "; ".join(names[:3]) + ("; …" if counter.count > len(names[:3]) else "")
    where = what or getattr(dataset, "split", "data")
    line = f"{where}: skipped {counter.count} unreadable image{'s' * (counter.count != 1)}: {shown}"
    counter.reset()
    log.warning(line)
    return line


# -- datasets the trainers read ------------------------------------------------------
def _item(source: DataSource, record: Record, size: int, flip: bool, skipped: SkipCounter) -> dict | None:
    sample = source.load(record)
    if sample.image is not None:
        try:
            image = image_to_tensor(sample.image, size, flip=flip)
        except IMAGE_ERRORS as exc:  # e.g. a lazily decoded image that fails on first access
            sample.image, sample.error = None, f"{type(exc).__name__}: {exc}"
    if sample.image is None:
        skipped.add(sample.key, sample.error)
        return None
    return {"image": image, "label": sample.label or "", "caption": sample.caption or "", "key": sample.key}


class SampleDataset(torch.utils.data.Dataset):
    """Map-style split of a sized source: items are dicts, or None for an unreadable image."""

    def __init__(self, source: DataSource, records: Sequence[Record], image_size: int,
                 random_flip: bool = False, split: str = "train"):
        self.source, self.records = source, list(records)
        self.image_size, self.random_flip, self.split = image_size, random_flip, split
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        return _item(self.source, self.records[index], self.image_size, flip, self.skipped)

    def without_flip(self) -> SampleDataset:
        """The same records without random flips (e.g. for a latent cache that stores both
        orientations); it shares this dataset's skipped counter."""
        plain = copy.copy(self)
        plain.random_flip = False
        return plain


class StreamingSampleDataset(torch.utils.data.IterableDataset):
    """Iterable split of a streamed source, sharded over DataLoader workers.

    Item n of this split goes to worker n % num_workers; `start` (or `skip(n)`) drops the
    split's first items so a resumed run continues where it stopped. Only the worker that
    owns an item decodes it.
    """

    def __init__(self, source: DataSource, split: Literal["train", "val"], spec: DataSourceSpec,
                 random_flip: bool = False, start: int = 0):
        self.source, self.split, self.spec = source, split, spec
        self.image_size, self.random_flip = spec.image_size, random_flip
        self.start = start
        self.skipped = SkipCounter()

    def without_flip(self) -> StreamingSampleDataset:
        """The same stream without random flips; it shares this dataset's skipped counter."""
        plain = copy.copy(self)
        plain.random_flip = False
        return plain

    def skip(self, n: int) -> StreamingSampleDataset:
        """Start after the first `n` items of this split (returns self)."""
        self.start = int(n)
        return self

    def split_records(self) -> Iterator[Record]:
        for record in self.source.records():
            if split_of(record.key, self.spec.val_fraction, self.spec.split_seed) == self.split:
                yield record

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for n, record in enumerate(self.split_records()):
            if n < self.start or (n - self.start) % workers != worker:
                continue
            flip = self.random_flip and bool(torch.rand(()) < 0.5)
            yield _item(self.source, record, self.image_size, flip, self.skipped)


@dataclass
class DataSplits:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    vocabulary: LabelVocabulary | None
    source_name: str


def make_splits(source: DataSource, spec: DataSourceSpec) -> DataSplits:
    """Train and validation datasets of a source, and its label vocabulary.

    Raises DataError when a sized source has no records. For tiny sets whose hash split
    leaves validation empty although val_fraction > 0, the record with the smallest hash
    is moved to validation, so a validation pass always has something to read.
    """
    if source.streaming:
        vocab = source.label_vocabulary()
        return DataSplits(
            train=StreamingSampleDataset(source, "train", spec, random_flip=spec.random_flip),
            val=StreamingSampleDataset(source, "val", spec),
            vocabulary=LabelVocabulary(vocab) if vocab else None,
            source_name=source.name,
        )
    records = source.record_list()
    if not records:
        raise DataError(f"data ({source.name}): the dataset is empty; check its path, split and filters")
    sides = {"train": [], "val": []}
    for record in records:
        sides[split_of(record.key, spec.val_fraction, spec.split_seed)].append(record)
    if spec.val_fraction > 0 and not sides["val"] and len(records) >= 2:
        first = min(range(len(records)), key=lambda i: _unit_hash(records[i].key, spec.split_seed))
        sides["val"] = [records[first]]
        sides["train"] = records[:first] + records[first + 1:]
    return DataSplits(
        train=SampleDataset(source, sides["train"], spec.image_size, random_flip=spec.random_flip, split="train"),
        val=SampleDataset(source, sides["val"], spec.image_size, random_flip=False, split="val"),
        vocabulary=LabelVocabulary.from_labels(r.label for r in records),
        source_name=source.name,
    )


def collate_samples(batch: list[dict | None]) -> dict:
    """Stack dataset items, dropping None (unreadable images).

    Returns {"image": B x 3 x S x S, "label": [...], "caption": [...], "key": [...]};
    B may be smaller than the requested batch, and 0 (image shape 0x3x0x0) if every
    item was unreadable.
    """
    items = [item for item in batch if item is not None]
    if not items:
        return {"image": torch.empty(0, 3, 0, 0), "label": [], "caption": [], "key": []}
    return {
        "image": torch.stack([item["image"] for item in items]),
        "label": [item["label"] for item in items],
        "caption": [item["caption"] for item in items],
        "key": [item["key"] for item in items],
    }
