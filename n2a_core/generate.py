"""`n2a sample`: load a trained run and turn seeds and conditions into images.

Every image has its own seed and generator, so it does not depend on the batch it was
drawn in. Each PNG carries its seed, condition, sampler, steps, guidance and the run's
spec hash in a text chunk, repeated as one line of `samples.jsonl`.

`SampleWriter` writes each image and its record as soon as its batch is decoded (the
grid last), so whatever fails later, computed images are on disk. It never overwrites:
several `n2a sample` calls may write into one folder at once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from n2a_core.checkpoint import load_autoencoder_weights, load_latest_checkpoint
from n2a_core.conditioner import Conditioner, check_labels
from n2a_core.device import resolve_device
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import CheckpointError, SpecError
from n2a_core.images import make_grid_image, tensor_to_image
from n2a_core.pipeline import Pipeline, RunDir, build_pipeline
from n2a_core.plugins import get_registry
from n2a_core.safe_files import FileLock, new_folder, open_new
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
    found = load_latest_checkpoint(run.diffusion / "checkpoints")  # skips a damaged newest one, with a warning
    if found is None:
        raise CheckpointError(f"{root}: stage 2 has no checkpoint yet; train it with `n2a train --out {root} --resume`")
    checkpoint, tensors, state = found
    model = DiffusionModel(pipeline.denoiser, pipeline.conditioner)
    group = "stage.ema" if ema else "module.model"
    if group not in tensors:
        raise CheckpointError(f"{checkpoint}: holds no {group} weights; is it a stage 2 checkpoint?"
                              + (" Try --no-ema" if ema and "module.model" in tensors else ""))
    try:
        model.load_state_dict(tensors[group])
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
             sampler_spec=None, steps: int | None = None, batch_size: int = 16, progress=None,
             on_images: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Images (N x 3 x H x W in [-1, 1]) for one condition and seed each ('' = unconditional).

    `on_images(images, start)` receives each batch as soon as it is decoded (a
    SampleWriter, so that the images are on disk whatever happens next)."""
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
        if on_images:
            on_images(out[-1], start)
        if progress:
            progress(min(start + batch_size, len(seeds)), len(seeds))
    return torch.cat(out)


def new_samples_folder(parent: Path) -> Path:
    """A fresh folder under `parent`, named for the time, that no other call gets."""
    return new_folder(parent, time.strftime("%Y%m%d-%H%M%S"))


class SampleWriter:
    """Writes samples into `out_dir` as they come, never over an existing file.

    Each image becomes `NNNN-seedS.png` (its record in a PNG text chunk) and, once that file
    is complete, one line of `samples.jsonl` naming it. NNNN continues after the highest
    number already in the folder, so writers that share a folder (one after another, or at
    once: they take turns under a lock on samples.jsonl) never reuse a name.
    """

    _NUMBERED = re.compile(r"^(\d+)-.*\.png$")

    def __init__(self, out_dir: Path, records: list[dict]):
        self.out_dir, self.records = Path(out_dir), records
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out_dir / "samples.jsonl"
        self.files: list[str] = []

    def __call__(self, images: torch.Tensor, start: int = 0) -> None:
        """Write `images`, the records from `start` on."""
        with FileLock(self.log_file):
            for image, record in zip(images, self.records[start:start + len(images)], strict=True):
                name = self._write_png(image, record)
                with open(self.log_file, "a", encoding="utf-8") as log:
                    log.write(json.dumps({"file": name, **record}, ensure_ascii=False) + "\n")
                self.files.append(name)

    def _next_number(self) -> int:
        numbers = [int(m.group(1)) for p in self.out_dir.iterdir() if (m := self._NUMBERED.match(p.name))]
        return max(numbers, default=-1) + 1

    def _write_png(self, image: torch.Tensor, record: dict) -> str:
        info = PngInfo()
        info.add_text("n2a", json.dumps(record))
        number = self._next_number()
        while True:  # another program may add files while we hold the lock: skip their names
            name = f"{number:04d}-seed{record['seed']}.png"
            try:
                fh = open_new(self.out_dir / name)
                break
            except FileExistsError:
                number += 1
        try:
            with fh:
                tensor_to_image(image).save(fh, format="PNG", pnginfo=info)
        except BaseException:
            (self.out_dir / name).unlink(missing_ok=True)
            raise
        return name

    def write_grid(self, images: torch.Tensor, nrow: int | None = None) -> Path:
        """The contact sheet of `images` as grid.png (grid-2.png, ... if taken)."""
        captions = [r.get("condition") or f"seed {r['seed']}" for r in self.records]
        sheet = make_grid_image(images, nrow=nrow, captions=captions)
        for n in range(1, 1_000_000):
            path = self.out_dir / ("grid.png" if n == 1 else f"grid-{n}.png")
            try:
                fh = open_new(path)
            except FileExistsError:
                continue
            try:
                with fh:
                    sheet.save(fh, format="PNG")
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            return path
        raise SpecError(f"{self.out_dir}: no free grid-N.png name; clean up the folder")

