"""Assembling a run spec into components, the cross-component checks, and the run folder.

Order matters: the autoencoder and conditioner are built first so a denoiser spec that
leaves `in_channels` or its conditioning unset can take them from the BuildContext; then
`check_compatible` rejects what still does not fit, before any compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from n2a_core import strict_json
from n2a_core.autoencoder import Autoencoder
from n2a_core.component import BuildContext
from n2a_core.conditioner import Conditioner
from n2a_core.denoiser import Conditioning, Denoiser
from n2a_core.errors import SpecError
from n2a_core.plugins import Registry, get_registry
from n2a_core.safe_files import write_atomic
from n2a_core.sampler import Sampler
from n2a_core.schedule import NoiseSchedule
from n2a_core.specs import RunSpecBase, read_spec_file


@dataclass
class Pipeline:
    """The built components of a run (weights random until loaded or trained)."""

    spec: RunSpecBase
    autoencoder: Autoencoder
    denoiser: Denoiser
    schedule: NoiseSchedule
    conditioner: Conditioner | None
    sampler: Sampler | None


def build_pipeline(
    spec: RunSpecBase,
    *,
    vocabulary: list[str] | None = None,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
    registry: Registry | None = None,
    training: bool = True,
) -> Pipeline:
    """Build every model component of `spec` and check that they fit together."""
    registry = registry or get_registry()
    ctx = BuildContext(label_vocabulary=vocabulary, device=device, cache_dir=cache_dir, training=training)
    autoencoder = registry.build("autoencoder", spec.autoencoder, ctx)
    ctx.latent_channels = autoencoder.latent_channels
    conditioner = registry.build("conditioner", spec.conditioner, ctx) if spec.conditioner else None
    if conditioner is not None:
        ctx.conditioning = Conditioning(conditioner.output, conditioner.dim)
    denoiser = registry.build("denoiser", spec.denoiser, ctx)
    schedule = registry.build("schedule", spec.schedule, ctx)
    sampler = registry.build("sampler", spec.sampler, ctx) if spec.sampler else None
    pipeline = Pipeline(spec, autoencoder, denoiser, schedule, conditioner, sampler)
    check_compatible(pipeline)
    return pipeline


def check_compatible(p: Pipeline) -> None:
    """Raise SpecError with one line per mismatch between components."""
    problems = []
    latent = p.autoencoder.latent_channels
    for side in ("in_channels", "out_channels"):
        channels = getattr(p.denoiser, side)
        if channels != latent:
            problems.append(
                f"denoiser.{side}: {channels} does not match the autoencoder's {latent} latent channels; "
                f"set them equal or leave denoiser.{side} unset"
            )
    accepts = p.denoiser.conditioning
    if p.conditioner is None and accepts.kind != "none":
        problems.append(
            f"conditioner: the denoiser expects {accepts.kind} conditioning of dim {accepts.dim} but the run "
            "has no conditioner; choose one with --conditioner or set the denoiser's conditioning to none"
        )
    elif p.conditioner is not None and not accepts.accepts(p.conditioner.output, p.conditioner.dim):
        problems.append(
            f"conditioner: '{p.spec.conditioner.type}' gives a {p.conditioner.output} of dim {p.conditioner.dim} "
            f"but the denoiser accepts {accepts.kind} of dim {accepts.dim}; leave the denoiser's cond_dim unset "
            "or make them equal"
        )
    if p.sampler is not None and p.denoiser.prediction_type not in p.sampler.supported_predictions:
        problems.append(
            f"sampler: '{p.spec.sampler.type}' does not support {p.denoiser.prediction_type!r} prediction "
            f"(supports {', '.join(p.sampler.supported_predictions)}); pick another sampler"
        )
    if problems:
        raise SpecError("\n".join(problems))


class RunDir:
    """The layout of a run folder.

    RUN/spec.yaml            the resolved run spec
    RUN/labels.json          the label vocabulary of the training data (if it has labels)
    RUN/autoencoder/         stage 1: checkpoints/, metrics.jsonl, grids/, weights.safetensors
    RUN/diffusion/           stage 2: checkpoints/, metrics.jsonl, grids/
    RUN/cache/               latent cache, rendered data
    RUN/samples/             `n2a sample` output
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.spec_file = self.root / "spec.yaml"
        self.labels_file = self.root / "labels.json"
        self.autoencoder = self.root / "autoencoder"
        self.autoencoder_weights = self.autoencoder / "weights.safetensors"
        self.diffusion = self.root / "diffusion"
        self.cache = self.root / "cache"
        self.samples = self.root / "samples"

    def write_spec(self, spec: RunSpecBase) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.spec_file, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    def read_spec_data(self) -> dict:
        if not self.spec_file.is_file():
            raise SpecError(f"{self.root}: not an n2a run (no spec.yaml); pass a folder made by `n2a train`")
        return read_spec_file(self.spec_file)

    def write_labels(self, labels: list[str] | None) -> None:
        if labels is not None:
            write_atomic(self.labels_file, strict_json.dumps(labels, indent=1))

    def read_labels(self) -> list[str] | None:
        return json.loads(self.labels_file.read_text()) if self.labels_file.is_file() else None


def newest_run(runs_root: Path = Path("runs")) -> Path:
    """The most recently modified run folder under `runs_root`."""
    candidates = [p.parent for p in runs_root.glob("*/spec.yaml")]
    if not candidates:
        raise SpecError(f"no run found under {runs_root}/; train one with `n2a train` or pass RUN")
    return max(candidates, key=lambda p: p.stat().st_mtime)
