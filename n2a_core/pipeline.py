"""`Pipeline`: a trained model as a Python object that turns conditions and seeds into images.

    from n2a_core import Pipeline
    pipe = Pipeline.from_pretrained("runs/my-run")   # a run folder, an exported folder or a Hub id
    images = pipe(["red apple", "cat face"], seeds=[0, 1], guidance=3.0, sampler="dpmpp-2m", steps=20)

Its options are those of `n2a sample`, which is a thin layer over it: the call hands them
to `n2a_core.generate.generate`, the one generation function, so whatever that function
learns to do arrives here unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from n2a_core.component import ComponentSpec
from n2a_core.errors import CheckpointError, SpecError
from n2a_core.export import is_exported, load_exported
from n2a_core.generate import LoadedRun, check_conditions, generate, load_run
from n2a_core.images import tensor_to_image
from n2a_core.plugins import get_registry
from n2a_core.specs import RunSpecBase

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""`user/name` as the Hugging Face Hub spells a repository id."""


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, else a Hub repository id downloaded (or taken from the cache)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(str(source)):
        raise SpecError(f"{source}: no such folder; pass a run folder, an exported folder or a Hub id 'user/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(source), revision=revision))
    except Exception as exc:  # offline, unknown repo, no access, network: all the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{source}: not a local folder and could not be downloaded from the Hugging Face "
                              f"Hub ({type(exc).__name__}: {reason}); check the id, or go online") from None


class Pipeline:
    """A trained n2a model loaded for sampling: call it with conditions to get PIL images."""

    def __init__(self, loaded: LoadedRun):
        self.loaded = loaded

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str = "auto", ema: bool = True,
                        revision: str | None = None) -> Pipeline:
        """Load a run folder (its latest checkpoint, EMA weights unless `ema=False`), a folder
        written by `n2a export`, or a Hub repository holding one (downloaded once, then cached)."""
        root = resolve_source(source, revision)
        if is_exported(root):
            if not ema:
                raise SpecError(f"{source}: ema=False needs a run folder; an export holds only the EMA weights")
            return cls(load_exported(root, device=device))
        return cls(load_run(root, device=device, ema=ema))

    # -- what the model is ------------------------------------------------------------------
    @property
    def spec(self) -> RunSpecBase:
        return self.loaded.spec

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def condition_field(self) -> Literal["label", "caption"] | None:
        """What the conditions are: 'caption' (prompts), 'label' (class labels) or None."""
        conditioner = self.loaded.conditioner
        return conditioner.field if conditioner is not None else None

    @property
    def labels(self) -> list[str] | None:
        """The class labels a label-conditioned model knows (None otherwise)."""
        return getattr(self.loaded.conditioner, "labels", None)

    def __repr__(self) -> str:
        conditioner = self.spec.conditioner.type if self.spec.conditioner else "none"
        return (f"Pipeline({self.loaded.run.root}, step {self.loaded.step}, conditioner {conditioner}, "
                f"{self.spec.data.image_size} px, {self.device})")

    # -- drawing ----------------------------------------------------------------------------
    def __call__(
        self,
        conditions: str | Sequence[str] | None = None,
        *,
        seeds: Sequence[int] | None = None,
        n: int = 1,
        seed: int = 0,
        guidance: float = 3.0,
        sampler: str | dict | ComponentSpec | None = None,
        steps: int | None = None,
        batch_size: int = 16,
        progress=None,
        output_type: Literal["pil", "pt"] = "pil",
        **options: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Images for `conditions` (prompts or labels, whichever the model reads; None draws
        unconditionally), `n` per condition.

        seeds: one per image (default seed, seed + 1, ...); an image depends on its seed only.
        guidance: w of (1+w)·ε(z,c) − w·ε(z,∅) (other tools' scale s = 1 + w).
        sampler: a sampler plugin name or spec dict (default: the model's); steps likewise.
        output_type: 'pil' (list of PIL images) or 'pt' (N x 3 x H x W tensor in [-1, 1]).
        Further keyword options go to `n2a_core.generate.generate` as they are.
        """
        if output_type not in ("pil", "pt"):
            raise SpecError(f"output_type: {output_type!r}; use 'pil' or 'pt'")
        wanted = [conditions] if isinstance(conditions, str) else list(conditions or [])
        check_conditions(self.loaded, wanted, None)
        expanded = [c for c in wanted for _ in range(n)] if wanted else [""] * (len(seeds) if seeds else n)
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(expanded))]
        if len(seeds) != len(expanded):
            raise SpecError(f"seeds: {len(seeds)} seeds for {len(expanded)} images "
                            f"({len(wanted) or 1} condition(s) x n={n}); give one seed per image")
        sampler_spec = get_registry().validate_spec("sampler", sampler) if sampler is not None else None
        if sampler_spec is not None and steps is None:
            steps = getattr(sampler_spec, "steps", None)
        images = generate(self.loaded, expanded, seeds, guidance=guidance, sampler_spec=sampler_spec,
                          steps=steps, batch_size=batch_size, progress=progress, **options)
        return images if output_type == "pt" else [tensor_to_image(image) for image in images]
