"""The text tower of an OpenCLIP model (Radford et al. 2021; Cherti et al. 2023) as a caption
embedding: the pooled vector, or the token sequence for cross-attention (as in Stable Diffusion)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from n2a_core import ComponentSpec, SpecError, did_you_mean
from n2a_plugins.conditioners.frozen import FrozenTextConditioner, hub_offline

SCHEMAS = ("local-dir:", "hf-hub:")


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "") or "none"


class ClipSpec(ComponentSpec):
    type: Literal["clip"] = "clip"
    model: str = "ViT-B-32"
    """An OpenCLIP architecture (`open_clip.list_models()`), 'local-dir:FOLDER' (a folder with
    open_clip_config.json and its weights), or 'hf-hub:ORG/NAME' already in the local cache."""
    pretrained: str | None = "openai"
    """Weights of a named architecture: an OpenCLIP tag whose file is in the local Hugging Face
    cache (n2a never downloads), or a checkpoint file. None: random weights (tests; warns).
    local-dir:/hf-hub: models bring their own weights and take no tag."""
    output: Literal["vector", "sequence"] = "vector"
    """vector: the pooled, projected, L2-normalised text embedding (B x embed_dim), CLIP's
    matching space; sequence: the final-layer token states (B x context_length x width) for
    cross-attention."""
    cache_size: int = Field(4096, ge=0)
    """Captions whose embeddings are kept in memory (LRU)."""

    @model_validator(mode="after")
    def _no_tag_with_schema(self):
        if self.model.startswith(SCHEMAS) and "pretrained" in self.model_fields_set and self.pretrained:
            raise ValueError(f"pretrained {self.pretrained!r} cannot be combined with model {self.model!r}, "
                             "which carries its own weights; remove pretrained")
        return self


class ClipConditioner(FrozenTextConditioner):
    """Caption -> OpenCLIP text embedding; the model is built (and checked) at construction."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai",
                 output: Literal["vector", "sequence"] = "vector", cache_size: int = 4096):
        super().__init__(cache_size)
        self.model_name = model
        self.pretrained = None if model.startswith(SCHEMAS) else pretrained
        self.output = output
        probe = self.embed([""])
        self._cache.clear()
        self.dim = probe.shape[-1]
        self.context_length = self._tokenizer.context_length

    def _load(self):
        import open_clip

        model, pretrained = self.model_name, self.pretrained
        tag = None
        if model.startswith("local-dir:"):
            folder = Path(model.removeprefix("local-dir:")).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise SpecError(f"conditioner.model: {folder} has no open_clip_config.json; "
                                "give a folder saved by open_clip or a built-in architecture name")
            if not any(next(folder.glob(f"*{ext}"), None) for ext in (".safetensors", ".bin", ".pth")):
                warnings.warn(f"clip: {folder} holds no weights; the text tower is random", stacklevel=4)
        elif not model.startswith("hf-hub:"):
            names = open_clip.list_models()
            if model not in names:
                raise SpecError(f"conditioner.model: unknown OpenCLIP architecture {model!r}"
                                f"{did_you_mean(model, names)}; see open_clip.list_models()")
            if pretrained is None:
                warnings.warn(f"clip: pretrained is None, so the {model} text tower has random weights "
                              "(fine for tests, useless for real conditioning)", stacklevel=4)
            elif not Path(pretrained).expanduser().is_file():
                tags = open_clip.list_pretrained_tags_by_model(model)
                if pretrained not in tags:
                    raise SpecError(f"conditioner.pretrained: {pretrained!r} is neither a checkpoint file nor a "
                                    f"tag of {model}{did_you_mean(pretrained, tags)}; tags: {_listing(tags)}")
                tag = pretrained
            else:
                pretrained = str(Path(pretrained).expanduser())
        with hub_offline():
            try:
                clip = open_clip.create_model(model, pretrained=pretrained, force_custom_text=True)
                tokenizer = open_clip.get_tokenizer(model)
            except Exception as exc:
                if tag is not None:
                    # 'org/repo/' or 'org/repo/file': the repo id is what comes before the last '/'
                    repo = os.path.split(open_clip.get_pretrained_cfg(model, tag).get("hf_hub", ""))[0]
                    raise SpecError(f"conditioner.pretrained: the {model} '{tag}' weights are not in the local "
                                    f"Hugging Face cache and n2a never downloads; fetch them once with "
                                    f"`hf download {repo}` or set pretrained to a checkpoint file") from None
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise SpecError(f"conditioner.model: cannot build OpenCLIP {model!r} "
                                f"(pretrained={pretrained!r}) offline: {type(exc).__name__}: {first}") from None
        tower = clip.text  # CustomTextCLIP keeps the text tower as one module; drop the rest
        tower.output_tokens = True  # forward returns (pooled, token states)
        self._tokenizer = tokenizer
        return tower.to(self.device)

    def _encode(self, tower, texts: list[str]) -> torch.Tensor:
        pooled, tokens = tower(self._tokenizer(texts).to(self.device))
        return F.normalize(pooled, dim=-1) if self.output == "vector" else tokens

    def null_embedding(self, batch_size: int) -> torch.Tensor:
        shape = (batch_size, self.dim) if self.output == "vector" else (batch_size, self.context_length, self.dim)
        return torch.zeros(shape, device=self.device)
