"""The one path from a data source to training batches, shared by both stages.

- a train/validation split by a seeded hash of each record's key (`split_of`), so a
  record never changes sides when the dataset grows;
- a label vocabulary (sorted distinct labels) saved to and loaded from the run directory;
- map-style and streamed datasets of transformed images (`make_splits`, `collate_samples`);
- unreadable images are skipped, counted, and reported once per pass (`report_skipped`),
  never crashing a run;
- `BatchStream`: endless batches in a seeded order that resume from a saved position, and
  `RankBlocks`, each process's share of a stream.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from n2a_core import strict_json
from n2a_core.data_source import DataSource, DataSourceSpec, Record
from n2a_core.errors import DataError
from n2a_core.images import IMAGE_ERRORS, image_to_tensor

log = logging.getLogger("n2a.data")


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
        Path(path).write_text(strict_json.dumps({"labels": self.labels}, indent=1, ensure_ascii=False) + "\n")

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


def _skip_counter(dataset: Any) -> SkipCounter | None:
    """The dataset's counter, also through a Subset (a rank's share counts into its parent's)."""
    if isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    counter = getattr(dataset, "skipped", None)
    return counter if isinstance(counter, SkipCounter) else None


def start_pass(dataset: Any) -> None:
    """Forget skips counted outside a pass, so that the pass's report counts each of its
    unreadable images once: previews and calibration read a few items between passes, and
    a stage that stops mid-epoch leaves that epoch's count unreported."""
    counter = _skip_counter(dataset)
    if counter is not None:
        counter.reset()


def report_skipped(dataset: Any, what: str | None = None) -> str | None:
    """Log one warning line if `dataset` skipped unreadable images this pass, then reset.

    Returns the line (None when nothing was skipped). Call `start_pass` before a pass
    and this at its end (an epoch, an evaluation, a cache build); datasets without a
    `skipped` counter report nothing.
    """
    counter = _skip_counter(dataset)
    if counter is None or counter.count == 0:
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
    sides: dict[str, list[Record]] = {"train": [], "val": []}
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


# -- data with a position ------------------------------------------------------------------
class BatchStream:
    """Endless batches in a seeded order that can restart from a saved position.

    `batch_size` is this process's micro-batch. Map-style datasets are shuffled per epoch
    with a generator seeded by (seed, epoch); streamed datasets are read in order. Rank r of
    W takes the r-th block of `batch_size` samples in every run of W blocks of that global
    order. So the first k micro-batches of all ranks together are the first
    k * batch_size * W samples of the epoch, and the position (epoch, samples consumed)
    means the same on any number of processes. Within an epoch, W ranks also take the very
    micro-batches one process takes with W times the accumulation steps (an epoch keeps
    whole micro-batches, so its cut can differ between the two).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, collate: Callable | None = None,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.collate, self.num_workers = collate, num_workers
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch_index = 0, 0
        self.streamed = isinstance(dataset, IterableDataset)
        if self.streamed and world_size > 1 and num_workers:
            # The stream's own worker sharding would hide the items of other ranks' blocks.
            log.warning("streamed data on %d processes: num_workers %d ignored, items are read "
                        "in the training process", world_size, num_workers)
            self.num_workers = 0
        if not self.streamed and len(dataset) < batch_size * world_size:
            raise DataError(
                f"the training split has {len(dataset)} samples, fewer than one global batch of "
                f"{batch_size * world_size}; lower the batch size or add data")

    @property
    def samples(self) -> int:
        """Samples of the current epoch consumed by all ranks together."""
        return self.batch_index * self.batch_size * self.world_size

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples": self.samples}

    def restore(self, position: dict[str, int]) -> None:
        # "batch" is the per-process batch index of checkpoints written before "samples".
        samples = position["samples"] if "samples" in position else position["batch"] * self.batch_size
        per_micro_step = self.batch_size * self.world_size
        if samples % per_micro_step:
            # The batch size changed on resume: go back to the last whole micro-batch (a few
            # samples of this epoch are seen twice; the run is no longer exactly resumed).
            log.warning("batch size changed on resume: epoch %d continues from sample %d, not %d",
                        position["epoch"], samples // per_micro_step * per_micro_step, samples)
        self.epoch, self.batch_index = position["epoch"], samples // per_micro_step

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's sample indices for `epoch` (whole batches only, same count per rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        run = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [i for start in range(0, len(order) // run * run, run) for i in order[start:start + run][mine]]

    def _loader(self, indices: list[int] | None) -> DataLoader:
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG,
        # which would make a resumed run diverge from an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104729 + self.rank)
        if indices is None:
            dataset = self.dataset
            if hasattr(dataset, "skip"):
                # Always: skip(0) also undoes the skip of a resumed, earlier epoch.
                dataset = dataset.skip(self.samples)
            if self.world_size > 1:
                dataset = RankBlocks(dataset, self.batch_size, self.rank, self.world_size)
            return DataLoader(dataset, batch_size=self.batch_size, collate_fn=self.collate,
                              num_workers=self.num_workers, generator=generator)
        subset = torch.utils.data.Subset(self.dataset, indices)
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, drop_last=True,
                          generator=generator, pin_memory=torch.cuda.is_available())

    def __iter__(self) -> Iterator[Any]:
        while True:
            start_pass(self.dataset)
            if self.streamed:
                loader = self._loader(None)
            else:
                order = self.epoch_order(self.epoch)
                loader = self._loader(order[self.batch_index * self.batch_size:])
            for batch in loader:
                self.batch_index += 1
                yield batch
            if self.streamed and self.batch_index == 0:
                raise DataError("the streamed training split yielded no batch; check the data source")
            report_skipped(self.dataset, f"epoch {self.epoch}")
            self.epoch, self.batch_index = self.epoch + 1, 0


class RankBlocks(IterableDataset):
    """Rank r's share of a stream: the r-th block of `block` items in every run of
    `block * world_size` items. A last, incomplete run is dropped on every rank alike, so all
    ranks take the same number of batches (a collective never waits for a missing one)."""

    def __init__(self, dataset: IterableDataset, block: int, rank: int, world_size: int):
        self.dataset, self.block, self.rank, self.world_size = dataset, block, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        run = self.block * self.world_size
        mine: list[Any] = []
        for n, item in enumerate(self.dataset):
            if (n % run) // self.block == self.rank:
                mine.append(item)
            if n % run == run - 1:
                yield from mine
                mine = []
