"""`n2a sample`: load a trained run and turn seeds and conditions into images.

Every image has its own seed and generator, so it does not depend on the batch it was
drawn in. Each PNG carries its seed, condition, sampler, steps, guidance and the run's
spec hash in a text chunk, repeated as one line of `samples.jsonl`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from n2a_core.checkpoint import latest_checkpoint, load_autoencoder_weights, load_checkpoint
from n2a_core.conditioner import Conditioner, check_labels
from n2a_core.device import resolve_device
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import CheckpointError, SpecError
from n2a_core.images import make_grid_image, tensor_to_image
from n2a_core.pipeline import Pipeline, RunDir, build_pipeline
from n2a_core.plugins import get_registry
from n2a_core.sampler import generators_for_seeds
from n2a_core.specs import RunSpecBase, resolve_run_spec


@dataclass
class LoadedRun:
    run: RunDir
    spec: RunSpecBase
    pipeline: Pipeline
    model: DiffusionModel
    device: torch.device
    step: int

    @property
    def conditioner(self) -> Conditioner | None:
        return self.model.any_conditioner


def load_run(root: Path, *, device: str = "auto", ema: bool = True) -> LoadedRun:
    """Build a run's components and load its autoencoder and latest (EMA) denoiser weights."""
    run = RunDir(root)
    spec = resolve_run_spec(run.read_spec_data())
    device_ = resolve_device(device if device != "auto" else spec.device)
    pipeline = build_pipeline(spec, vocabulary=run.read_labels(), device=device_, cache_dir=run.cache,
                              training=False)
    weights = Path(spec.autoencoder_weights) if spec.autoencoder_weights else run.autoencoder_weights
    weights = RunDir(weights).autoencoder_weights if weights.is_dir() else weights
    load_autoencoder_weights(pipeline.autoencoder, weights)
    checkpoint = latest_checkpoint(run.diffusion / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"{root}: stage 2 has no checkpoint yet; train it with `n2a train --out {root} --resume`")
    tensors, state = load_checkpoint(checkpoint)
    model = DiffusionModel(pipeline.denoiser, pipeline.conditioner)
    weights_group = tensors["stage.ema"] if ema else tensors["module.model"]
    try:
        model.load_state_dict(weights_group)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the run's spec ({str(exc).splitlines()[0]})") from None
    for module in (pipeline.autoencoder, model, pipeline.conditioner):
        if module is not None:
            module.to(device_).eval()
    return LoadedRun(run, spec, pipeline, model, device_, int(state["step"]))


def check_conditions(loaded: LoadedRun, conditions: list[str], field: str | None) -> None:
    """Refuse prompts for an unconditional run, or labels for a caption run (and vice versa)."""
    conditioner = loaded.conditioner
    if not any(conditions):
        return
    if conditioner is None:
        raise SpecError(f"{loaded.run.root}: this run was trained without a conditioner; "
                        "drop --prompt/--label or train with --conditioner")
    if field is not None and field != conditioner.field:
        option = "--prompt" if conditioner.field == "caption" else "--label"
        raise SpecError(f"{loaded.run.root}: the run's conditioner '{loaded.spec.conditioner.type}' reads "
                        f"{conditioner.field}s; use {option}")
    check_labels(conditioner, conditions, "--label")


@torch.no_grad()
def generate(loaded: LoadedRun, conditions: list[str], seeds: list[int], *, guidance: float = 0.0,
             sampler_spec=None, steps: int | None = None, batch_size: int = 16, progress=None) -> torch.Tensor:
    """Images (N x 3 x H x W in [-1, 1]) for one condition and seed each ('' = unconditional)."""
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    p = loaded.pipeline
    sampler = get_registry().build("sampler", sampler_spec) if sampler_spec is not None else p.sampler
    if sampler is None:
        raise SpecError("sampler: the run has no sampler; pass --sampler (see `n2a list-plugins --kind sampler`)")
    if p.denoiser.prediction_type not in sampler.supported_predictions:
        raise SpecError(f"--sampler: does not support {p.denoiser.prediction_type!r} prediction")
    size = loaded.spec.data.image_size // p.autoencoder.downsample_factor
    shape = (p.autoencoder.latent_channels, size, size)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk_conditions = conditions[start:start + batch_size]
        chunk_seeds = seeds[start:start + batch_size]
        cond, missing = loaded.model.embed(chunk_conditions)
        use_guidance = guidance
        if cond is not None:
            cond = cond.to(loaded.device)
            if bool(missing.all()):
                cond, use_guidance = None, 0.0
            # Mixed batches: rows without a condition get guidance 0 via the null token.
        generators = generators_for_seeds(chunk_seeds, "cpu")
        z = sampler.sample(loaded.model.denoiser, p.schedule, (len(chunk_seeds), *shape), cond=cond,
                           guidance=use_guidance, steps=steps, generator=generators)
        out.append(p.autoencoder.decode(z.to(loaded.device)).clamp(-1, 1).float().cpu())
        if progress:
            progress(min(start + batch_size, len(seeds)), len(seeds))
    return torch.cat(out)


def write_samples(images: torch.Tensor, records: list[dict], out_dir: Path, nrow: int | None = None) -> Path:
    """PNG per image with its metadata in a text chunk, samples.jsonl, and grid.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "a") as log:
        for image, record in zip(images, records, strict=True):
            info = PngInfo()
            info.add_text("n2a", json.dumps(record))
            name = f"{record['index']:04d}-seed{record['seed']}.png"
            tensor_to_image(image).save(out_dir / name, pnginfo=info)
            log.write(json.dumps({"file": name, **record}) + "\n")
    grid = out_dir / "grid.png"
    captions = [r.get("condition") or f"seed {r['seed']}" for r in records]
    make_grid_image(images, nrow=nrow, captions=captions).save(grid)
    return grid
