"""Built-in data sources: OpenMoji (the embedded default), an image folder, and HF datasets."""

from __future__ import annotations

from n2a_core import hookimpl
from n2a_plugins.data.hf import HFSpec, build_hf
from n2a_plugins.data.imagefolder import ImageFolderSpec, build_imagefolder
from n2a_plugins.data.openmoji import OpenMojiSpec, build_openmoji


@hookimpl
def register_data_sources(register):
    register("openmoji", OpenMojiSpec, build_openmoji,
             "OpenMoji emoji artworks (CC BY-SA 4.0) rendered from the bundled font; label = emoji group")
    register("imagefolder", ImageFolderSpec, build_imagefolder,
             "A folder of images; labels from sub-folders, captions from .txt sidecars or metadata.jsonl")
    register("hf", HFSpec, build_hf,
             "A Hugging Face dataset: hub name or local parquet/arrow/image folder, with row filters")
