"""`n2a sample`: load a trained run and turn seeds and conditions into images.

Every image has its own seed and generator, so it does not depend on the batch it was
drawn in. Each PNG carries its seed, condition, sampler, steps, guidance and the run's
spec hash in a text chunk, repeated as one line of `samples.jsonl`.

`generate` also takes the creative options, which the core's `Sampler` gives every sampler:
an init image and `strength` (image-to-image), a `mask` (inpainting), `Between` seeds and
conditions (interpolation) and a `negative` condition. Images enter through the data
pipeline's transform (smallest side resized, centre-cropped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo

from n2a_core.checkpoint import latest_checkpoint, load_autoencoder_weights, load_checkpoint
from n2a_core.conditioner import Conditioner, check_labels
from n2a_core.device import resolve_device
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import CheckpointError, DataError, SpecError
from n2a_core.images import image_to_tensor, make_grid_image, open_image, tensor_to_image, to_rgb
from n2a_core.pipeline import Pipeline, RunDir, build_pipeline
from n2a_core.plugins import get_registry
from n2a_core.sampler import NoiseBetween, Sampler
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
             strength: float = 1.0, mask: ImageInput | None = None) -> torch.Tensor:
    """Images (N x 3 x H x W in [-1, 1]) for one condition and seed each ('' = unconditional).

    negative:   a caption or label to steer away from: (1 + w) eps(z, c) - w eps(z, negative)
                in place of the null condition (needs guidance > 0);
    init_image: start from this image (image-to-image, SDEdit) with `strength` in (0, 1]:
                1 ignores it (plain sampling), smaller keeps more of it;
    mask:       inpainting: an image the init image's size, white where to repaint and
                black where to keep the init image;
    Between(a, b, u) in `seeds` or `conditions`: a frame of an interpolation.
    """
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    p = loaded.pipeline
    sampler = get_registry().build("sampler", sampler_spec) if sampler_spec is not None else p.sampler
    if sampler is None:
        raise SpecError("sampler: the run has no sampler; pass --sampler (see `n2a list-plugins --kind sampler`)")
    if p.denoiser.prediction_type not in sampler.supported_predictions:
        raise SpecError(f"--sampler: does not support {p.denoiser.prediction_type!r} prediction")
    image_size = loaded.spec.data.image_size
    size = image_size // p.autoencoder.downsample_factor
    shape = (p.autoencoder.latent_channels, size, size)
    if negative and loaded.conditioner is None:
        raise SpecError(f"{loaded.run.root}: this run was trained without a conditioner; drop the negative condition")
    if strength != 1 and init_image is None:
        raise SpecError("strength: image-to-image needs an init image (--init-image)")
    init, repaint = None, None
    if init_image is not None:
        image, canvas = load_init_image(init_image, image_size)
        init = p.autoencoder.encode(image[None].to(loaded.device)).float()
        if mask is not None:
            repaint = latent_mask(load_mask(mask, image_size, canvas), p.autoencoder.downsample_factor)
    elif mask is not None:
        raise SpecError("mask: inpainting needs the image to keep outside the mask (--init-image)")
    creative = {key: value for key, value in (("init", init if strength < 1 or repaint is not None else None),
                                              ("strength", strength if strength < 1 else None), ("mask", repaint))
                if value is not None}
    if (creative or negative) and type(sampler).sample is not Sampler.sample:
        raise SpecError(f"sampler: {type(sampler).__name__} overrides sample() instead of implementing the core's "
                        "solve(chain), so it cannot do image-to-image, inpainting or negative conditions")
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk_conditions = conditions[start:start + batch_size]
        chunk_seeds = seeds[start:start + batch_size]
        cond, missing = _embed(loaded.model, chunk_conditions)
        negative_cond = _embed(loaded.model, [negative] * len(chunk_seeds))[0] if negative else None
        use_guidance = guidance
        if cond is not None:
            cond = cond.to(loaded.device)
            if bool(missing.all()):
                cond, use_guidance = None, guidance if negative_cond is not None else 0.0
            # Mixed batches: rows without a condition get guidance 0 via the null token.
        if negative_cond is not None:
            creative["negative"] = negative_cond.to(loaded.device)
        z = sampler.sample(loaded.model.denoiser, p.schedule, (len(chunk_seeds), *shape), cond=cond,
                           guidance=use_guidance, steps=steps, generator=[_generator(s) for s in chunk_seeds],
                           **creative)
        out.append(p.autoencoder.decode(z.to(loaded.device)).clamp(-1, 1).float().cpu())
        if progress:
            progress(min(start + batch_size, len(seeds)), len(seeds))
    return torch.cat(out)


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
    captions = [f"u = {r['u']:.2f}" if "u" in r else r.get("condition") or f"seed {r['seed']}" for r in records]
    make_grid_image(images, nrow=nrow, captions=captions).save(grid)
    return grid


def write_animation(images: torch.Tensor, out_dir: Path, name: str = "interpolation",
                    frame_ms: int = 125) -> list[Path]:
    """The images as a looping animated GIF and, where Pillow has WebP, a lossless animated WebP."""
    frames = [tensor_to_image(image) for image in images]
    paths = [out_dir / f"{name}.gif"] + ([out_dir / f"{name}.webp"] if features.check("webp") else [])
    for path in paths:
        extra = {"lossless": True} if path.suffix == ".webp" else {}
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, **extra)
    return paths
