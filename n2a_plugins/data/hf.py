"""Hugging Face `datasets`: a hub name or a local parquet/arrow/CSV/JSON file or folder.

Images are never decoded while listing: the image column is read raw (bytes or path)
and decoded one record at a time, so listing, filtering and splitting LAION-sized
tables costs only their small columns. Row filters are parsed, never evaluated as code.
"""

from __future__ import annotations

import operator
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from PIL import Image
from pydantic import field_validator

from n2a_core import BuildContext, DataError, DataSource, DataSourceSpec, Record, Sample, open_image

BUILDERS = ("parquet", "arrow", "csv", "json", "imagefolder")
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt}
FILTER = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(<=|>=|==|!=|<|>)\s*(.+?)\s*$")


@dataclass(frozen=True)
class RowFilter:
    """`column op value`, e.g. `pwatermark < 0.8`; a row whose value is missing fails it."""

    column: str
    op: str
    value: Any
    text: str

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        match = FILTER.match(text)
        if not match:
            raise ValueError(f"filter {text!r} is not `column op value` with op one of {' '.join(OPS)}")
        column, op, raw = match.groups()
        return cls(column, op, _literal(raw), text)

    def __call__(self, x: Any) -> bool:
        if x is None:
            return False
        try:
            return bool(OPS[self.op](x, self.value))
        except TypeError:
            raise DataError(f"data.filters: {self.text!r}: column '{self.column}' holds {type(x).__name__} "
                            f"values, which do not compare with {self.value!r}") from None


def _literal(raw: str) -> Any:
    """A number, true/false/null, or a string (quotes optional)."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


class HFSpec(DataSourceSpec):
    type: Literal["hf"] = "hf"
    path: str
    """A hub dataset (user/name), a local folder (images, parquet/arrow files, or a
    save_to_disk dataset), a .parquet/.arrow/.csv/.json(l) file, or a builder name
    (parquet, arrow, csv, json, imagefolder) together with data_files or data_dir."""
    config: str | None = None
    """The dataset configuration (load_dataset's `name`)."""
    split: str = "train"
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """Files to load (globs allowed), e.g. data/*.parquet."""
    data_dir: str | None = None
    """A sub-folder of path to load from."""
    image_column: str | None = None
    """Column of the images; None: the first Image column, else 'image'."""
    label_column: str | None = None
    """Class labels (e.g. genre, style, artist): strings, or ClassLabel ints mapped to names."""
    caption_column: str | None = None
    key_column: str | None = None
    """A unique id per row (e.g. url) that keeps the split stable if rows are inserted; None:
    the image file path when every row has a distinct one, else the row number."""
    filters: list[str] = []
    """Rows to keep, as `column op value` (op: < <= > >= == !=), all must hold,
    e.g. [pwatermark < 0.8, punsafe < 0.5] for LAION-Art."""
    streaming: bool = False
    """Stream rows instead of downloading and listing the whole dataset first."""

    @field_validator("filters")
    @classmethod
    def _parse_filters(cls, filters: list[str]) -> list[str]:
        for text in filters:
            RowFilter.parse(text)
        return filters


def _offline() -> bool:
    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover - datasets depends on it
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, host
    except OSError:
        return False, host


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_hf(spec: HFSpec, cache_dir: Path | None = None):
    """The Dataset (or IterableDataset when streaming) a spec names, with one-line errors:
    a saved dataset, a file or a folder on disk, a packaged builder, or a hub name."""
    import datasets

    kwargs = _load_kwargs(spec, cache_dir)
    path = Path(spec.path).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _load_saved(spec, path)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"data.path: {path}: unsupported file type; use a folder or a "
                            f"{', '.join(FILE_BUILDERS)} file")
        return _call(datasets.load_dataset, spec, builder, **{**kwargs, "data_files": str(path)})
    if path.is_dir():
        return _call(datasets.load_dataset, spec, str(path), **kwargs)
    if spec.path in BUILDERS:
        if spec.data_files is None and spec.data_dir is None:
            raise DataError(f"data.data_files: the '{spec.path}' builder needs data_files or data_dir")
        return _call(datasets.load_dataset, spec, spec.path, **kwargs)
    if not HUB_ID.match(spec.path) or spec.path.startswith((".", "~", "/")):
        raise DataError(f"data.path: {path} does not exist; give an existing folder or file, "
                        "or a hub name like user/dataset")
    return _load_from_hub(spec, kwargs)


def _load_kwargs(spec: HFSpec, cache_dir: Path | None) -> dict[str, Any]:
    """`datasets.load_dataset` keyword arguments from the spec's optional fields."""
    kwargs: dict[str, Any] = {"split": spec.split, "streaming": spec.streaming}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if spec.config:
        kwargs["name"] = spec.config
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    if spec.data_dir is not None:
        kwargs["data_dir"] = spec.data_dir
    return kwargs


def _load_saved(spec: HFSpec, path: Path):
    """A dataset written by `save_to_disk` (a Dataset, or a DatasetDict holding the split)."""
    import datasets

    ds = _call(datasets.load_from_disk, spec, str(path))
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise DataError(f"data.split: no split '{spec.split}' in {path}; splits: {', '.join(ds)}")
        ds = ds[spec.split]
    return ds.to_iterable_dataset() if spec.streaming else ds


def _load_from_hub(spec: HFSpec, kwargs: dict[str, Any]):
    """A hub dataset (or its cached copy), failing fast when the hub cannot be reached."""
    import datasets

    hint = ("pass a local path (parquet, arrow or an image folder), or download it once with network "
            "access and set HF_HUB_OFFLINE=1 to use the cache")
    if not _offline():
        reachable, host = _hub_reachable()
        if not reachable:
            raise DataError(f"data.path: '{spec.path}' is not a local path and {host} cannot be reached; {hint}")
    try:
        return datasets.load_dataset(spec.path, **kwargs)
    except Exception as exc:  # hub errors have many types; all mean the same to the user
        if _offline():
            raise DataError(f"data.path: '{spec.path}' is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                            "is set; pass a local path (parquet, arrow or an image folder), or unset "
                            f"HF_HUB_OFFLINE once with network access to download it ({_one_line(exc)})") from None
        raise DataError(f"data.path: could not load '{spec.path}' from the hub: {_one_line(exc)}; {hint}") from None


def _call(fn, spec: HFSpec, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # a broken local file, a wrong split or config
        field = "data.split" if "split" in str(exc).lower() else "data.path"
        raise DataError(f"{field}: could not load {spec.path} (split {spec.split}): {_one_line(exc)}") from None


class HFSource(DataSource):
    """Rows of a Hugging Face dataset: image, optional label and caption, optional filters."""

    def __init__(self, spec: HFSpec, cache_dir: Path | None = None):
        import datasets

        super().__init__(spec)
        self.streaming = spec.streaming
        self.filters = [RowFilter.parse(text) for text in spec.filters]
        ds = load_hf(spec, cache_dir)
        features = ds.features
        self.columns = list(features) if features is not None else None
        self.image_column = spec.image_column or self._find_image_column(features)
        for field, column in (("image_column", self.image_column), ("label_column", spec.label_column),
                              ("caption_column", spec.caption_column), ("key_column", spec.key_column),
                              *(("filters", f.column) for f in self.filters)):
            self._check_column(field, column)
        self.class_names = None
        if features is not None and isinstance(features.get(spec.label_column), datasets.ClassLabel):
            self.class_names = features[spec.label_column].names
        if features is not None and isinstance(features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds = ds
        base = Path(spec.path).expanduser()
        self.base_dir = base if base.is_dir() else base.parent
        if not self.streaming:
            self.images = ds.select_columns([self.image_column])

    def _find_image_column(self, features) -> str:
        import datasets

        if features is not None:
            for name, feature in features.items():
                if isinstance(feature, datasets.Image):
                    return name
        if self.columns is None or "image" in self.columns:
            return "image"
        raise DataError(f"data.image_column: no image column in {self.spec.path}; columns: "
                        f"{', '.join(self.columns)}; set data.image_column")

    def _check_column(self, field: str, column: str | None) -> None:
        if column is not None and self.columns is not None and column not in self.columns:
            raise DataError(f"data.{field}: column '{column}' not found in {self.spec.path}; "
                            f"columns: {', '.join(self.columns)}")

    def _label(self, value: Any) -> str | None:
        if value is None:
            return None
        if self.class_names is not None:
            return self.class_names[value] if 0 <= value < len(self.class_names) else None
        return str(value)

    def _keep(self, row: dict) -> bool:
        for f in self.filters:
            if f.column not in row:  # streamed sets without declared features
                raise DataError(f"data.filters: column '{f.column}' not found; columns: {', '.join(row)}")
            if not f(row[f.column]):
                return False
        return True

    def _record(self, i: int, row: dict, key: str | None, ref: Any) -> Record:
        spec: HFSpec = self.spec
        caption = row.get(spec.caption_column) if spec.caption_column else None
        label = self._label(row.get(spec.label_column)) if spec.label_column else None
        if spec.key_column:
            key = str(row.get(spec.key_column))
        return Record(key or str(i), label, None if caption is None else str(caption), ref=ref)

    def _path_keys(self) -> list[str] | None:
        """Image file paths (relative to a local dataset folder) when all rows have distinct ones."""
        import pyarrow.compute as pc

        if getattr(self.ds, "_indices", None) is not None:
            return None
        column = self.ds.data.column(self.image_column)
        try:
            paths = pc.struct_field(column, "path").to_pylist()
        except Exception:  # not an {bytes, path} struct (plain strings or bytes)
            return None
        if not paths or None in paths or "" in paths or len(set(paths)) != len(paths):
            return None
        root = str(self.base_dir.resolve()) + os.sep
        return [p[len(root):] if p.startswith(root) else p for p in paths]

    def scan(self) -> Iterator[Record]:
        spec: HFSpec = self.spec
        small = [c for c in dict.fromkeys([spec.label_column, spec.caption_column, spec.key_column,
                                           *(f.column for f in self.filters)]) if c]
        if self.streaming:
            for i, row in enumerate(self.ds):
                if self._keep(row):
                    yield self._record(i, row, None, ref=row.get(self.image_column))
            return
        table = self.ds.select_columns(small).to_dict() if small else {}
        keys = None if spec.key_column else self._path_keys()
        for i in range(len(self.ds)):
            row = {c: table[c][i] for c in small}
            if self._keep(row):
                yield self._record(i, row, keys[i] if keys else None, ref=i)

    def load(self, record: Record) -> Sample:
        value = record.ref if self.streaming else self.images[record.ref][self.image_column]
        image, error = self._decode(value)
        return Sample(record.key, image, record.label, record.caption, error)

    def _decode(self, value: Any) -> tuple[Image.Image | None, str | None]:
        if isinstance(value, Image.Image):
            return value, None
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray):
            return open_image(value)
        if isinstance(value, str) and value:
            if value.startswith(("http://", "https://")):
                return None, "a URL: n2a does not download images; fetch them first (e.g. with img2dataset)"
            path = Path(value)
            return open_image(path if path.is_absolute() else self.base_dir / path)
        return None, "no image in this row"

    def label_vocabulary(self) -> list[str] | None:
        if self.streaming:
            return sorted(set(self.class_names)) if self.class_names else None
        return super().label_vocabulary()


def build_hf(spec: HFSpec, ctx: BuildContext) -> HFSource:
    return HFSource(spec, cache_dir=Path(ctx.cache_dir) / "hf" if ctx.cache_dir else None)
