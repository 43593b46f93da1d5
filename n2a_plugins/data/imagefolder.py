"""A directory of images, searched recursively, with optional labels and captions.

Labels come from the top-level sub-folder (`root/<label>/.../img.png`) or a
`metadata.jsonl` `label`; captions from a sidecar `img.txt` next to the image or from
`metadata.jsonl` (`file_name` relative to that file's folder, plus `caption` or `text`),
as Hugging Face's imagefolder reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from n2a_core import BuildContext, DataError, DataSource, DataSourceSpec, Record, Sample, open_image

IMAGE_EXTENSIONS = ["bmp", "gif", "jfif", "jpeg", "jpg", "png", "ppm", "tga", "tif", "tiff", "webp"]


class ImageFolderSpec(DataSourceSpec):
    type: Literal["imagefolder"] = "imagefolder"
    path: Path
    """The folder of images (searched recursively; hidden files and folders are ignored)."""
    label_from_folder: bool = True
    """Label each image by its top-level sub-folder (root/<label>/...); images directly
    in the root have none. A `label` in metadata.jsonl is used either way and wins."""
    captions: bool = True
    """Read captions from a sidecar .txt with the image's name, else from metadata.jsonl."""
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS), min_length=1)
    """File extensions (case-insensitive, without the dot) that count as images."""


def _read_metadata(path: Path) -> dict[Path, dict]:
    """metadata.jsonl rows by the absolute image path they describe."""
    rows = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: expected a JSON object with a 'file_name' on each line") from None
            rows[(path.parent / name).resolve()] = row
    return rows


class ImageFolderSource(DataSource):
    """Images under a folder; keys are their paths relative to it (POSIX style)."""

    def __init__(self, spec: ImageFolderSpec):
        super().__init__(spec)
        root = spec.path.expanduser()
        if not root.exists():
            raise DataError(f"data.path: {root} does not exist; point it at a folder of images")
        if not root.is_dir():
            raise DataError(f"data.path: {root} is a file; imagefolder needs a folder "
                            "(the hf source reads parquet and arrow files)")
        self.root = root

    def _files(self) -> Iterator[Path]:
        extensions = {"." + e.lower().lstrip(".") for e in self.spec.extensions}
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                    yield Path(folder) / name

    def scan(self) -> Iterator[Record]:
        spec: ImageFolderSpec = self.spec
        metadata: dict[Path, dict] = {}
        for meta in sorted(self.root.rglob("metadata.jsonl")):
            metadata.update(_read_metadata(meta))
        found = False
        for path in self._files():
            found = True
            relative = path.relative_to(self.root)
            row = metadata.get(path.resolve(), {})
            label = row.get("label")
            if label is None and spec.label_from_folder and len(relative.parts) > 1:
                label = relative.parts[0]
            caption = None
            if spec.captions:
                sidecar = path.with_suffix(".txt")
                if sidecar.is_file():
                    caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() or None
                else:
                    caption = row.get("caption") or row.get("text")
            yield Record(relative.as_posix(), None if label is None else str(label),
                         None if caption is None else str(caption), ref=path)
        if not found:
            raise DataError(f"data.path: no images ({', '.join(spec.extensions)}) under {self.root}; "
                            "add images or set data.extensions")

    def load(self, record: Record) -> Sample:
        image, error = open_image(record.ref)
        return Sample(record.key, image, record.label, record.caption, error)


def build_imagefolder(spec: ImageFolderSpec, ctx: BuildContext) -> ImageFolderSource:
    return ImageFolderSource(spec)
