"""Stage-2 epoch time with and without the latent cache, with n2a's own training pieces.

A folder of PNG images is read by the `imagefolder` data source (decode, resize, crop),
and one epoch of stage 2 runs through `TrainingLoop.train_step` of a `DiffusionStage`
(R64 UNet, AdamW, gradient clipping, EMA), either
- encoding every batch on the fly with the frozen VQGAN (`training.latent_cache: false`), or
- reading latents that `encode_dataset` / `load_or_build` cached once beforehand.
Both epochs train the same model on the same batches in the same process, alternately.
The one-off cost of building the cache is reported beside the speed-up.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    R64,
    SIZES,
    Row,
    Size,
    base_parser,
    default_clock,
    emit,
    headline,
    interleave,
    machine,
    n2a_unet,
    n2a_vqgan,
    setup_torch,
    speedup,
    time_rows,
)


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` PNG files of smooth colour fields with a few ellipses (deterministic)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        w = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) % 1.0
        pixels = (c0[None, None] * (1 - w[..., None]) + c1[None, None] * w[..., None]).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            a, b = sorted(rng.uniform(0, size, 2)), sorted(rng.uniform(0, size, 2))
            draw.ellipse([a[0], b[0], a[1] + 1, b[1] + 1], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
        image.save(folder / f"{i:05d}.png")


def run(size: Size = R64, images: int = 64, repeats: int = 3, device: torch.device | None = None,
        quick: bool = False, clock: str | None = None) -> dict:
    from n2a_core import BuildContext, get_registry
    from n2a_core.diffusion_model import DiffusionModel
    from n2a_core.specs import DiffusionTrainingSpec
    from n2a_core.training.batching import BatchStream, collate_samples, make_splits
    from n2a_core.training.diffusion_stage import DiffusionStage
    from n2a_core.training.latent_cache import cache_key, encode_dataset, load_or_build
    from n2a_core.training.loop import TrainingLoop
    from n2a_core.training.run import collate_latents

    device = device or torch.device("cpu")
    clock = clock or default_clock(device)
    registry = get_registry()
    with tempfile.TemporaryDirectory(prefix="n2a-bench-cache-") as tmp:
        root = Path(tmp)
        write_images(root / "images", images, size.image_size)
        data_spec = registry.validate_spec("data", {"type": "imagefolder", "path": str(root / "images"),
                                                    "image_size": size.image_size, "random_flip": False,
                                                    "val_fraction": 0.0})
        splits = make_splits(registry.build("data", data_spec, BuildContext(device=device)), data_spec)
        torch.manual_seed(0)
        autoencoder = n2a_vqgan(size).to(device).eval()
        for p in autoencoder.parameters():  # frozen in stage 2, as `n2a train` makes it
            p.requires_grad_(False)
        schedule = registry.build("schedule", registry.validate_spec("schedule", {"type": "cosine"}))
        spec = DiffusionTrainingSpec(batch_size=size.batch, max_steps=10**6, warmup_steps=0)

        wall0, cpu0 = time.perf_counter(), time.process_time()
        key = cache_key(autoencoder, data_spec.model_dump(mode="json"), "train")
        cached = load_or_build(root / "cache", key,
                               lambda: encode_dataset(autoencoder, splits.train, collate_samples, device))
        build = {"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}

        steps = len(splits.train) // size.batch
        denoiser = n2a_unet(size).to(device)
        epochs = {}
        for name, dataset in (("epoch, encoding images on the fly", splits.train),
                              ("epoch, cached latents", cached)):
            # Each side trains its own copy (same start), so both do identical work.
            stage = DiffusionStage(DiffusionModel(copy.deepcopy(denoiser), None), autoencoder, schedule, None,
                                   spec, device, 0, root / "run", size.latent_shape)
            stream = BatchStream(dataset, size.batch, 0, collate_latents)
            loop = TrainingLoop(stage, spec, stream, root / "run", device=device, spec_digest="benchmark")
            batches = iter(stream)

            def epoch(loop=loop, batches=batches):
                for _ in range(steps):
                    loop.train_step(batches)

            epochs[name] = epoch

        t = interleave(epochs, repeats, warmup=1, device=device)
    on_the_fly, from_cache = t["epoch, encoding images on the fly"], t["epoch, cached latents"]
    build_s = build[clock]
    metrics = {"clock": clock, "cache_build_s": build_s, "cache_images": len(splits.train),
               "cache_steps_per_epoch": steps}
    ratio = headline(metrics, "cache_speedup", speedup(from_cache, on_the_fly), clock)
    seconds = (lambda v: v.median) if clock == "wall" else (lambda v: v.cpu_median)
    saved = seconds(on_the_fly) - seconds(from_cache)
    metrics["cache_break_even_epochs"] = build_s / saved if saved > 0 else None
    rows = time_rows(t, 1.0, "s")
    rows += [
        Row("cache_speedup (stage-2 epoch)", ratio, "x", f"wall {metrics['cache_speedup_wall']:.3f}x; "
            f"{len(splits.train)} images, {steps} steps of {size.batch}"),
        Row("cache build (one-off: decode + encode + write)", build_s, "s",
            f"pays for itself after {metrics['cache_break_even_epochs'] or float('inf'):.2f} epochs"),
    ]
    return {"benchmark": "cache", "size": size.name, "batch": size.batch, "repeats": repeats, "clock": clock,
            "metrics": metrics, "rows": rows, "timings_s": {k: v.median for k, v in t.items()}}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images in the data set (one epoch)")
    args = parser.parse_args(argv)
    device = setup_torch(args.threads, args.device)
    result = run(SIZES[args.size], args.images, args.repeats or 3, device, args.quick, args.clock)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    emit(result, rows, f"stage-2 epoch with and without the latent cache, {result['size']}")


if __name__ == "__main__":
    main()
