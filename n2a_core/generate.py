"""`n2a sample`: load a trained run and turn seeds and conditions into images.

Every image has its own seed and generator, so it does not depend on the batch it was
drawn in. Each PNG carries its seed, condition, sampler, steps, guidance and the run's
spec hash in a text chunk, repeated as one line of `samples.jsonl`.

`SampleWriter` writes each image and its record as soon as its batch is decoded (the
grid last), so whatever fails later, computed images are on disk. It never overwrites:
several `n2a sample` calls may write into one folder at once.

`generate` also takes the creative options, which the core's `Sampler` gives every sampler:
an init image and `strength` (image-to-image), a `mask` (inpainting), `Between` seeds and
conditions (interpolation) and a `negative` condition. Images enter through the data
pipeline's transform (smallest side resized, centre-cropped).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo

from n2a_core import strict_json
from n2a_core.checkpoint import load_autoencoder_weights, load_latest_checkpoint
from n2a_core.components import Components, RunDir, build_components
from n2a_core.conditioner import Conditioner, check_labels
from n2a_core.device import resolve_device
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import CheckpointError, DataError, SpecError
from n2a_core.images import image_to_tensor, make_grid_image, open_image, tensor_to_image, to_rgb
from n2a_core.plugins import get_registry
from n2a_core.safe_files import FileLock, new_folder, open_new, write_first_free
from n2a_core.sampler import NoiseBetween, Sampler, StepCallback
from n2a_core.specs import RunSpecBase, resolve_run_spec


@dataclass
class LoadedRun:
    run: RunDir
    spec: RunSpecBase
    components: Components
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
    components = build_components(spec, vocabulary=run.read_labels(), device=device_, cache_dir=run.cache,
                              training=False)
    weights = Path(spec.autoencoder_weights) if spec.autoencoder_weights else run.autoencoder_weights
    weights = RunDir(weights).autoencoder_weights if weights.is_dir() else weights
    load_autoencoder_weights(components.autoencoder, weights)
    found = load_latest_checkpoint(run.diffusion / "checkpoints")  # skips a damaged newest one, with a warning
    if found is None:
        raise CheckpointError(f"{root}: stage 2 has no checkpoint yet; train it with `n2a train --out {root} --resume`")
    checkpoint, tensors, state = found
    model = DiffusionModel(components.denoiser, components.conditioner)
    group = "stage.ema" if ema else "module.model"
    if group not in tensors:
        raise CheckpointError(f"{checkpoint}: holds no {group} weights; is it a stage 2 checkpoint?"
                              + (" Try --no-ema" if ema and "module.model" in tensors else ""))
    try:
        model.load_state_dict(tensors[group])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the run's spec ({str(exc).splitlines()[0]})") from None
    for module in (components.autoencoder, model, components.conditioner):
        if module is not None:
            module.to(device_).eval()
    return LoadedRun(run, spec, components, model, device_, int(state["step"]))


def check_conditions(loaded: LoadedRun, conditions: list[str | Between], field: str | None) -> None:
    """Refuse prompts for an unconditional run, or labels for a caption run (and vice versa)."""
    conditioner = loaded.conditioner
    # an interpolation frame is checked by its two ends
    conditions = [end for c in conditions for end in ((c.start, c.end) if isinstance(c, Between) else (c,))]
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


class StepCount:
    """A sampler callback that keeps how many denoiser steps the chain took (the steps
    actually used: a sampler's default, or fewer than asked where its grid has fewer)."""

    def __init__(self) -> None:
        self.steps: int | None = None

    def __call__(self, done: int, total: int) -> None:
        self.steps = total


@dataclass(frozen=True)
class Between:
    """The point u in [0, 1] from `start` to `end`: two seeds (their noise is slerped, see
    `NoiseBetween`) or two conditions (their embeddings are interpolated linearly)."""

    start: int | str
    end: int | str
    u: float


def interpolation(start: int | str, end: int | str, frames: int) -> list[Between]:
    """`frames` evenly spaced points from `start` (u = 0) to `end` (u = 1)."""
    if frames < 2:
        raise SpecError(f"--frames: {frames}; an interpolation needs at least 2 frames")
    return [Between(start, end, k / (frames - 1)) for k in range(frames)]


ImageInput = str | os.PathLike | Image.Image | torch.Tensor
"""An image file, a PIL image, or a 3 x H x W tensor in [-1, 1] (used as it is)."""


@torch.no_grad()
def generate(loaded: LoadedRun, conditions: list[str | Between], seeds: list[int | Between], *,
             guidance: float = 0.0, sampler_spec=None, steps: int | None = None, batch_size: int = 16,
             progress=None, negative: str | None = None, init_image: ImageInput | None = None,
             strength: float = 1.0, mask: ImageInput | None = None,
             on_images: Callable[[torch.Tensor, int], None] | None = None,
             callback: StepCallback | None = None) -> torch.Tensor:
    """Images (N x 3 x H x W in [-1, 1]) for one condition and seed each ('' = unconditional).

    negative:   a caption or label to steer away from: (1 + w) eps(z, c) - w eps(z, negative)
                in place of the null condition (needs guidance > 0);
    init_image: start from this image (image-to-image, SDEdit) with `strength` in (0, 1]:
                1 ignores it (plain sampling), smaller keeps more of it;
    mask:       inpainting: an image the init image's size, white where to repaint and
                black where to keep the init image;
    Between(a, b, u) in `seeds` or `conditions`: a frame of an interpolation.
    `on_images(images, start)` receives each batch as soon as it is decoded (a
    SampleWriter, so that the images are on disk whatever happens next); `callback(done,
    total)` goes to the sampler (after each denoiser step of each batch)."""
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    p = loaded.components
    sampler = get_registry().build("sampler", sampler_spec) if sampler_spec is not None else p.sampler
    if sampler is None:
        raise SpecError("sampler: the run has no sampler; pass --sampler (see `n2a list-plugins --kind sampler`)")
    if p.denoiser.prediction_type not in sampler.supported_predictions:
        raise SpecError(f"--sampler: does not support {p.denoiser.prediction_type!r} prediction")
    size = loaded.spec.data.image_size // p.autoencoder.downsample_factor
    shape = (p.autoencoder.latent_channels, size, size)
    creative = _image_options(loaded, init_image, strength, mask)
    if negative and loaded.conditioner is None:
        raise SpecError(f"{loaded.run.root}: this run was trained without a conditioner; drop the negative condition")
    if (creative or negative) and type(sampler).sample is not Sampler.sample:
        raise SpecError(f"sampler: {type(sampler).__name__} overrides sample() instead of implementing the core's "
                        "solve(chain), so it cannot do image-to-image, inpainting or negative conditions")
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk_seeds = seeds[start:start + batch_size]
        cond, use_guidance, negative_cond = _guidance_inputs(loaded, conditions[start:start + batch_size], guidance,
                                                             negative)
        if negative_cond is not None:
            creative["negative"] = negative_cond
        z = sampler.sample(loaded.model.denoiser, p.schedule, (len(chunk_seeds), *shape), cond=cond,
                           guidance=use_guidance, steps=steps, generator=[_generator(s) for s in chunk_seeds],
                           callback=callback, **creative)
        out.append(p.autoencoder.decode(z.to(loaded.device)).clamp(-1, 1).float().cpu())
        if on_images:
            on_images(out[-1], start)
        if progress:
            progress(min(start + batch_size, len(seeds)), len(seeds))
    return torch.cat(out)


def _image_options(loaded: LoadedRun, init_image: ImageInput | None, strength: float,
                   mask: ImageInput | None) -> dict:
    """The sampler's init/strength/mask keywords, only those in use (plain sampling passes none)."""
    if strength != 1 and init_image is None:
        raise SpecError("strength: image-to-image needs an init image (--init-image)")
    if init_image is None:
        if mask is not None:
            raise SpecError("mask: inpainting needs the image to keep outside the mask (--init-image)")
        return {}
    autoencoder, image_size = loaded.components.autoencoder, loaded.spec.data.image_size
    image, canvas = load_init_image(init_image, image_size)
    options = {}
    if mask is not None:
        options["mask"] = latent_mask(load_mask(mask, image_size, canvas), autoencoder.downsample_factor)
    if strength < 1:
        options["strength"] = strength
    if options:
        options["init"] = autoencoder.encode(image[None].to(loaded.device)).float()
    return options


def _guidance_inputs(loaded: LoadedRun, conditions: list[str | Between], guidance: float, negative: str | None):
    """(cond, guidance, negative embeddings) for a batch: no guidance for a batch without
    conditions unless it steers away from a negative one."""
    cond, missing = _embed(loaded.model, conditions)
    negative_cond = _embed(loaded.model, [negative] * len(conditions))[0] if negative else None
    if negative_cond is not None:
        negative_cond = negative_cond.to(loaded.device)
    if cond is None or bool(missing.all()):
        return None, guidance if negative_cond is not None else 0.0, negative_cond
    # Mixed batches: rows without a condition get guidance 0 via the null token.
    return cond.to(loaded.device), guidance, negative_cond


def _generator(seed: int | Between) -> torch.Generator | NoiseBetween:
    """A CPU generator for a seed (the same images on every device), or a NoiseBetween."""
    if isinstance(seed, Between):
        if seed.start == seed.end:
            return _generator(int(seed.start))
        return NoiseBetween(_generator(int(seed.start)), _generator(int(seed.end)), seed.u)
    return torch.Generator().manual_seed(int(seed))


def _embed(model: DiffusionModel, conditions: list[str | Between]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(embeddings, missing) as `DiffusionModel.embed`, with Between rows interpolated linearly."""
    starts = [c.start if isinstance(c, Between) else c for c in conditions]
    cond, missing = model.embed(starts)
    if cond is None or not any(isinstance(c, Between) for c in conditions):
        return cond, missing
    if any(isinstance(c, Between) and not (c.start and c.end) for c in conditions):
        raise SpecError("--interpolate: both ends need a caption or label")
    ends, _ = model.embed([c.end if isinstance(c, Between) else c for c in conditions])
    u = torch.tensor([c.u if isinstance(c, Between) else 0.0 for c in conditions], device=cond.device)
    return torch.lerp(cond, ends.to(cond.dtype), u.view(-1, *[1] * (cond.ndim - 1)).to(cond.dtype)), missing


def load_init_image(source: ImageInput, size: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """(3 x size x size in [-1, 1], the source's width x height) through the data pipeline's
    transform: smallest side resized to `size`, centre-cropped. A tensor is used as it is."""
    if isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[0] != 3 or tuple(source.shape[1:]) != (size, size):
            raise SpecError(f"init image: a tensor must be 3 x {size} x {size} in [-1, 1], got {tuple(source.shape)}")
        return source.float(), (size, size)
    image = _open(source, "init image")
    return image_to_tensor(image, size), image.size


def load_mask(source: ImageInput, size: int, canvas: tuple[int, int] | None) -> torch.Tensor:
    """1 x size x size, 1 where to repaint (white, > 50% grey) and 0 where to keep. The mask
    must be the init image's size (`canvas`), so the same resize and crop fit it."""
    if isinstance(source, torch.Tensor):
        mask = source.float().reshape(-1, *source.shape[-2:])[:1]
        if tuple(mask.shape[1:]) != (size, size):
            raise SpecError(f"mask: a tensor must be {size} x {size}, got {tuple(source.shape)}")
        return (mask > 0.5).float()
    image = _open(source, "mask")
    if canvas is not None and image.size != canvas:
        name = source if isinstance(source, str | os.PathLike) else "the mask"
        raise SpecError(f"mask {name}: {image.size[0]}x{image.size[1]} pixels, but the init image is "
                        f"{canvas[0]}x{canvas[1]}; draw the mask on the init image's canvas")
    grey = image_to_tensor(to_rgb(image).convert("L").convert("RGB"), size)[:1]
    return (grey > 0).float()  # [-1, 1]: above mid-grey is white


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """1 x 1 x h x w: a latent cell is repainted when any of its factor x factor pixels is,
    so the repainted region covers all the mask (the autoencoder mixes pixels of a cell)."""
    return F.max_pool2d(mask[None], factor)


def _open(source: str | os.PathLike | Image.Image, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if not os.path.isfile(source):
        raise DataError(f"{what} {source}: no such file")
    image, reason = open_image(source)
    if image is None:
        raise DataError(f"{what} {source}: cannot read it as an image ({reason})")
    return image


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

    def __init__(self, out_dir: Path, records: list[dict], steps_used: StepCount | None = None):
        """`steps_used`, the StepCount given to `generate`, puts the steps the sampler took
        into each record (a batch is written after its chain, so the count is known)."""
        self.out_dir, self.records, self.steps_used = Path(out_dir), records, steps_used
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out_dir / "samples.jsonl"
        self.files: list[str] = []

    def __call__(self, images: torch.Tensor, start: int = 0) -> None:
        """Write `images`, the records from `start` on."""
        with FileLock(self.log_file):
            for image, record in zip(images, self.records[start:start + len(images)], strict=True):
                if self.steps_used is not None and self.steps_used.steps is not None:
                    record["steps"] = self.steps_used.steps
                name = self._write_png(image, record)
                with open(self.log_file, "a", encoding="utf-8") as log:
                    log.write(strict_json.dumps({"file": name, **record}, ensure_ascii=False) + "\n")
                self.files.append(name)

    def _next_number(self) -> int:
        numbers = [int(m.group(1)) for p in self.out_dir.iterdir() if (m := self._NUMBERED.match(p.name))]
        return max(numbers, default=-1) + 1

    def _write_png(self, image: torch.Tensor, record: dict) -> str:
        info = PngInfo()
        info.add_text("n2a", strict_json.dumps(record))
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
        captions = [f"u = {r['u']:.2f}" if "u" in r else r.get("condition") or f"seed {r['seed']}"
                    for r in self.records]
        sheet = make_grid_image(images, nrow=nrow, captions=captions)
        return write_first_free(self.out_dir, "grid", ".png", lambda fh: sheet.save(fh, format="PNG"))


def write_animation(images: torch.Tensor, out_dir: Path, name: str = "interpolation",
                    frame_ms: int = 125) -> list[Path]:
    """The images as a looping animated GIF and, where Pillow has WebP, a lossless animated WebP
    (NAME.gif, or NAME-2.gif, ... if taken: never over an existing file)."""
    frames = [tensor_to_image(image) for image in images]
    paths = []
    for suffix in [".gif"] + ([".webp"] if features.check("webp") else []):
        options = {"format": suffix[1:].upper(), "save_all": True, "append_images": frames[1:],
                   "duration": frame_ms, "loop": 0, **({"lossless": True} if suffix == ".webp" else {})}
        paths.append(write_first_free(out_dir, name, suffix, lambda fh, options=options: frames[0].save(fh, **options)))
    return paths
