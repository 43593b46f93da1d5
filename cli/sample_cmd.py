"""`n2a sample`: images from a trained run, with prompts or labels and guidance; image-to-image,
inpainting, interpolation and negative conditions (see `n2a_core.generate.generate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli.common import console, user_errors
from cli.options import finite
from n2a_core.seeds import SEED_MAX

MAX_IMAGES = 1_000_000
"""Per prompt or label: enough for an FID over 50,000 images, few enough to list the seeds."""


def sample(
    run: Annotated[str | None, typer.Argument(
        help="Run folder, folder made by `n2a export`, or Hub id (default: the newest run under ./runs).",
        show_default=False)] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Caption to draw (repeatable).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="Class label to draw (repeatable).")] = None,
    conditioner: Annotated[str | None, typer.Option(help="Must match the run's conditioner (a check).")] = None,
    guidance: Annotated[float, typer.Option(help="Guidance weight w: (1+w)·ε(z,c) − w·ε(z,∅); scale s = 1 + w.",
                                            min=0.0, callback=finite)] = 3.0,
    sampler: Annotated[str | None, typer.Option(help="Sampler plugin (default: the run's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the sampler's).", min=1)] = None,
    guidance_interval: Annotated[tuple[float, float] | None, typer.Option(
        help="Guide only at steps whose log-SNR lies in [LO, HI] (default: the sampler's guidance_log_snr).",
        callback=finite, show_default=False)] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt/label (or in all, unconditionally).", min=1,
                                   max=MAX_IMAGES)] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed + i.", min=0,
                                      max=SEED_MAX)] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: a new RUN/samples/<time>); "
                                             "files already in it are kept, new ones numbered after them.",
                                             show_default=False)] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 16,
    device: Annotated[str, typer.Option(help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")] = "auto",
    negative_prompt: Annotated[str | None, typer.Option(help="Caption to steer away from: "
                                                        "(1+w)·ε(z,c) − w·ε(z,c⁻).", show_default=False)] = None,
    negative_label: Annotated[str | None, typer.Option(help="Class label to steer away from.",
                                                       show_default=False)] = None,
    init_image: Annotated[Path | None, typer.Option(help="Image to start from (image-to-image, SDEdit); "
                                                    "resized and centre-cropped.", show_default=False)] = None,
    strength: Annotated[float | None, typer.Option(help="With --init-image: how much to change it, in (0, 1]; "
                                                   "1 ignores it. Default 0.8, or 1 with --mask.",
                                                   callback=finite, show_default=False)] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask the size of --init-image: white = repaint, "
                                              "black = keep.", show_default=False)] = None,
    interpolate: Annotated[tuple[str, str] | None, typer.Option(
        help="Two prompts (or labels) to morph between, in --frames images.", show_default=False)] = None,
    interpolate_seeds: Annotated[tuple[int, int] | None, typer.Option(
        help="Two seeds whose noise to morph between (slerp).", show_default=False)] = None,
    frames: Annotated[int, typer.Option(help="Frames of an --interpolate/--interpolate-seeds animation.",
                                        min=2, max=MAX_IMAGES)] = 8,
) -> None:
    """Draw images from a trained run, an exported folder or a Hub id.

    Writes PNGs (with metadata), samples.jsonl and a grid; interpolations also write an
    animated GIF (and WebP). A thin layer over `n2a_core.Pipeline`."""
    from n2a_core.components import newest_run
    from n2a_core.errors import SpecError
    from n2a_core.export import is_exported
    from n2a_core.generate import SampleWriter, StepCount, check_conditions, new_samples_folder, write_animation
    from n2a_core.pipeline import Pipeline
    from n2a_core.progress import progress_bar

    with user_errors():
        if prompt and label:
            raise SpecError("--prompt and --label: give one kind of condition per call")
        if negative_prompt and negative_label:
            raise SpecError("--negative-prompt and --negative-label: give one")
        wanted = list(prompt or label or [])
        if (interpolate and wanted) or (interpolate_seeds and len(wanted) > 1):
            raise SpecError("--interpolate: give the two ends there, not with --prompt/--label")
        if mask is not None and init_image is None:
            raise SpecError("--mask: inpainting needs --init-image, the picture to keep outside the mask")
        if strength is not None and init_image is None:
            raise SpecError("--strength: needs --init-image, the picture to start from")
        animated = interpolate is not None or interpolate_seeds is not None
        conditions, seeds = _frames_or_images(wanted, n, seed, interpolate, interpolate_seeds, frames)
        if not animated and seeds[-1] > SEED_MAX:
            raise SpecError(f"--seed: image i uses seed + i, so {len(seeds)} images need a seed of at most "
                            f"{SEED_MAX - len(seeds) + 1} (got {seed})")
        source = run or newest_run()
        pipe = Pipeline.from_pretrained(source, device=device, ema=ema)
        loaded = pipe.loaded
        if conditioner is not None:
            actual = loaded.spec.conditioner.type if loaded.spec.conditioner else "none"
            if conditioner != actual:
                raise SpecError(f"--conditioner: the run was trained with '{actual}', not '{conditioner}'")
        field = "caption" if prompt else "label" if label else None
        negative = negative_prompt or negative_label
        check_conditions(loaded, wanted + list(interpolate or ()), field)
        if negative:
            check_conditions(loaded, [negative], "caption" if negative_prompt else "label")
        if init_image is not None and strength is None:
            strength = 1.0 if mask is not None else 0.8
        sampler_spec = _sampler_spec(sampler, guidance_interval, loaded.spec.sampler)
        if sampler and steps is None and hasattr(sampler_spec, "steps"):
            steps = sampler_spec.steps
        # Guidance needs a condition to steer by: an unconditional call uses (and records) none.
        guidance = guidance if wanted or interpolate or negative else 0.0
        sampler_name = sampler or (loaded.spec.sampler.type if loaded.spec.sampler else None)
        interval = getattr(sampler_spec or loaded.spec.sampler, "guidance_log_snr", None)  # as used, on record
        options = {key: value for key, value in (
            ("negative", negative), ("init_image", str(init_image) if init_image else None),
            ("strength", strength), ("mask", str(mask) if mask else None),
            ("guidance_log_snr", interval and list(interval))) if value is not None}
        field = field or (loaded.conditioner.field if interpolate else None)
        records = [{"index": i, **_seed_and_condition(s, c), "field": field, "guidance": guidance,
                    "sampler": sampler_name, "steps": steps, "ema": ema, "step": loaded.step,
                    "spec_digest": loaded.spec.digest(), **options}
                   for i, (s, c) in enumerate(zip(seeds, conditions, strict=True))]
        # A folder of our own (never another call's), and every image on disk as soon as it exists.
        # An export (maybe in the Hub cache) stays as shipped: its samples go under ./samples.
        exported = is_exported(loaded.run.root)
        out_dir = out or new_samples_folder(Path("samples") / Path(str(source)).name if exported
                                            else loaded.run.samples)
        evaluations = StepCount()
        writer = SampleWriter(out_dir, records, steps_used=evaluations)
        with progress_bar("sampling", len(seeds)) as bar:
            # conditions and seeds are already one per image (or frame): n=1 each.
            images = pipe(conditions, seeds=seeds, n=1, guidance=guidance, sampler=sampler_spec, steps=steps,
                          batch_size=batch_size, progress=lambda done, total: bar(done, total), output_type="pt",
                          negative=negative, init_image=init_image, strength=strength or 1.0, mask=mask,
                          on_images=writer, callback=evaluations)
        grid = writer.write_grid(images, nrow=frames if animated else n if wanted else None)
        animations = write_animation(images, out_dir) if animated else []
    also = "".join(f"; {path.suffix[1:]}: {escape(str(path))}" for path in animations)
    console.print(f"{len(images)} images in [bold]{escape(str(out_dir))}[/bold]; grid: {escape(str(grid))}{also}")


def _sampler_spec(name: str | None, guidance_interval: tuple[float, float] | None, run_sampler):
    """The sampler spec --sampler and --guidance-interval ask for (None: the run's own sampler)."""
    from n2a_core.errors import SpecError
    from n2a_core.plugins import get_registry

    spec = get_registry().validate_spec("sampler", name) if name else None
    if guidance_interval is None:
        return spec
    base = spec or run_sampler
    if base is None:
        raise SpecError("--guidance-interval: the run has no sampler; name one with --sampler")
    return get_registry().validate_spec("sampler", {**base.model_dump(), "guidance_log_snr": list(guidance_interval)})


def _frames_or_images(wanted: list[str], n: int, seed: int, interpolate, interpolate_seeds, frames: int):
    """(conditions, seeds): n images per condition, or the frames of an interpolation."""
    from n2a_core.generate import interpolation

    if interpolate is None and interpolate_seeds is None:
        conditions = [c for c in wanted for _ in range(n)] if wanted else [""] * n
        return conditions, [seed + i for i in range(len(conditions))]
    conditions = interpolation(*interpolate, frames) if interpolate else [wanted[0] if wanted else ""] * frames
    return conditions, interpolation(*interpolate_seeds, frames) if interpolate_seeds else [seed] * frames


def _seed_and_condition(seed, condition) -> dict:
    """A record's seed and condition; an interpolation frame's ends and u as well."""
    from n2a_core.generate import Between

    record = {}
    for key, value in (("seed", seed), ("condition", condition)):
        if isinstance(value, Between):
            record.update({key: value.start, f"{key}_end": value.end, "u": round(value.u, 6)})
        else:
            record[key] = value
    return record
