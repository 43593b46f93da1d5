"""`n2a train` end to end: data, stage 1 (unless given a trained autoencoder), latent cache,
stage 2 — all in one run folder, every step resumable."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from n2a_core.checkpoint import latest_checkpoint
from n2a_core.data import collate_samples, make_grid_image, make_splits
from n2a_core.errors import CheckpointError, SpecError
from n2a_core.latent_cache import cache_key, encode_dataset, load_or_build
from n2a_core.loop import BatchStream, TrainingLoop
from n2a_core.pipeline import Pipeline, RunDir, build_pipeline, resolve_device
from n2a_core.plugins import get_registry
from n2a_core.progress import progress_bar
from n2a_core.specs import BuildContext, RunSpecBase, resolve_run_spec
from n2a_core.train_autoencoder import AutoencoderStage, export_autoencoder, load_autoencoder_weights
from n2a_core.train_diffusion import DiffusionModel, DiffusionStage

console = Console(stderr=True, highlight=False)

AUTOENCODER_FIELDS = ("autoencoder", "autoencoder_training", "data", "seed")
DIFFUSION_FIELDS = ("autoencoder", "denoiser", "schedule", "conditioner", "training", "data", "seed")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, captions: list[str] | None = None) -> None:
    make_grid_image(images.detach().float().cpu(), nrow=nrow, captions=captions).save(path)


@dataclass
class Session:
    """Everything `train_run` builds once and both stages share."""

    spec: RunSpecBase
    run: RunDir
    device: torch.device
    pipeline: Pipeline
    splits: object
    show_progress: bool


def prepare_run(spec: RunSpecBase, out: Path, *, resume: bool, show_progress: bool = True) -> Session:
    """Check the run folder, load data and build the components; nothing trains yet."""
    run = RunDir(out)
    if run.spec_file.is_file():
        if not resume:
            raise SpecError(f"{out}: a run already exists here; pass --resume to continue it or choose another --out")
        saved = resolve_run_spec(run.read_spec_data())
        if saved.digest() != spec.digest():
            raise SpecError(f"{out}: --resume with a spec that differs from the run's spec.yaml; "
                            f"resume with `--config {run.spec_file}` (you may still change step counts)")
    elif resume and out.exists() and any(out.iterdir()):
        raise SpecError(f"{out}: --resume but no spec.yaml in this folder; is it an n2a run?")
    device = resolve_device(spec.device)
    seed_everything(spec.seed)
    registry = get_registry()
    source = registry.build("data", spec.data, BuildContext(device=device))
    splits = make_splits(source, spec.data)
    labels = splits.vocabulary.labels if splits.vocabulary is not None else None
    if run.labels_file.is_file():
        labels = run.read_labels()  # the run's vocabulary is fixed at its start
    pipeline = build_pipeline(spec, vocabulary=labels, device=device, cache_dir=run.cache)
    for module in (pipeline.autoencoder, pipeline.denoiser, pipeline.conditioner):
        if module is not None:
            module.to(device)
    size = spec.data.image_size
    try:
        pipeline.autoencoder.check_image_size(size, size)
    except ValueError as exc:
        raise SpecError(f"data.image_size: {exc}") from None
    run.write_spec(spec)
    run.write_labels(labels)
    return Session(spec, run, device, pipeline, splits, show_progress)


def first_items(dataset, n: int) -> list[dict]:
    """Up to n readable items from the start of a map-style or streamed dataset."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        source = iter(dataset)
    else:
        source = (dataset[i] for i in range(len(dataset)))
    items = []
    for item in source:
        if item is not None:
            items.append(item)
        if len(items) == n:
            break
    return items


def has_items(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) > 0


def eval_split(splits):
    """The validation split, or the training split when validation is empty."""
    return splits.val if has_items(splits.val) else splits.train


def preview_images(dataset, n: int) -> torch.Tensor:
    return torch.stack([item["image"] for item in first_items(dataset, n)])


def train_autoencoder_stage(s: Session, max_steps: int | None = None) -> None:
    """Stage 1, resumed from its last checkpoint when there is one; exports weights."""
    spec, ae = s.spec, s.pipeline.autoencoder
    tspec = spec.autoencoder_training
    digest = spec.digest(*AUTOENCODER_FIELDS)
    preview = preview_images(eval_split(s.splits), 8)
    stage = AutoencoderStage(ae, tspec, s.device, preview, s.run.autoencoder, save_grid)
    stream = BatchStream(s.splits.train, tspec.batch_size // tspec.grad_accum, spec.seed,
                         collate_samples, tspec.num_workers)
    loop = TrainingLoop(stage, tspec, stream, s.run.autoencoder, device=s.device, spec_digest=digest)
    loop.resume()
    target = max_steps or tspec.max_steps
    if loop.step < target:
        with progress_bar("stage 1: autoencoder", target, loop.step, s.show_progress) as bar:
            loop.progress = bar
            loop.run(target)
    calibration = preview_images(s.splits.train, 64)
    scale = export_autoencoder(ae, calibration.to(s.device), s.run.autoencoder_weights, digest)
    console.print(f"stage 1 done: {s.run.autoencoder_weights} (latent scale {scale:.4f})")


def resolve_autoencoder(s: Session, train_if_missing: bool = True) -> None:
    """Give the session's autoencoder trained weights: from `autoencoder_weights`, from
    this run's stage 1, or by training stage 1 now."""
    given = s.spec.autoencoder_weights
    if given:
        path = Path(given)
        path = RunDir(path).autoencoder_weights if path.is_dir() else path
        load_autoencoder_weights(s.pipeline.autoencoder, path)
        return
    last = latest_checkpoint(s.run.autoencoder / "checkpoints")
    finished = last is not None and int(last.name.split("-")[1]) >= s.spec.autoencoder_training.max_steps
    if finished and s.run.autoencoder_weights.is_file():
        load_autoencoder_weights(s.pipeline.autoencoder, s.run.autoencoder_weights)
        return
    if not train_if_missing:
        raise CheckpointError(f"{s.run.root}: no trained autoencoder; run stage 1 first")
    train_autoencoder_stage(s)
    load_autoencoder_weights(s.pipeline.autoencoder, s.run.autoencoder_weights)


def latent_datasets(s: Session):
    """(train, val) datasets of latents from the cache, or of images when the cache is off."""
    ae = s.pipeline.autoencoder
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    if not s.spec.training.latent_cache:
        return s.splits.train, s.splits.val
    data_spec = s.spec.data.model_dump(mode="json")
    out = []
    for name, dataset, flip in (("train", s.splits.train, s.spec.data.random_flip), ("val", s.splits.val, False)):
        if not has_items(dataset):
            out.append(dataset)
            continue
        key = cache_key(ae, data_spec, name)

        def build(dataset=dataset, flip=flip, name=name):
            with progress_bar(f"latent cache ({name})", 1, 0, s.show_progress) as bar:
                # Flips happen inside the cache (both orientations), not in the image loader.
                unflipped = getattr(dataset, "without_flip", lambda: dataset)()
                return encode_dataset(ae, unflipped, collate_samples, s.device, flip=flip,
                                      progress=lambda i, n: bar(i, n))

        out.append(load_or_build(s.run.cache, key, build))
    return tuple(out)


def collate_latents(batch: list[dict]) -> dict:
    if "image" in batch[0]:
        return collate_samples(batch)
    return {"latent": torch.stack([b["latent"] for b in batch]), "label": [b["label"] for b in batch],
            "caption": [b["caption"] for b in batch], "key": [b["key"] for b in batch]}


def train_diffusion_stage(s: Session, max_steps: int | None = None) -> Path:
    spec, p = s.spec, s.pipeline
    tspec = spec.training
    train_data, val_data = latent_datasets(s)
    model = DiffusionModel(p.denoiser, p.conditioner)
    f = p.autoencoder.downsample_factor
    size = spec.data.image_size
    preview = preview_conditions(val_data if has_items(val_data) else train_data, p.conditioner)
    val_loader = None
    if has_items(val_data):
        val_loader = torch.utils.data.DataLoader(val_data, batch_size=tspec.batch_size // tspec.grad_accum,
                                                 shuffle=False, collate_fn=collate_latents)
    stage = DiffusionStage(model, p.autoencoder, p.schedule, p.sampler, tspec, s.device, spec.seed,
                           s.run.diffusion, (p.autoencoder.latent_channels, size // f, size // f),
                           val_data=val_loader, preview_conditions=preview, save_grid=save_grid)
    stream = BatchStream(train_data, tspec.batch_size // tspec.grad_accum, spec.seed, collate_latents,
                         tspec.num_workers if not tspec.latent_cache else 0)
    loop = TrainingLoop(stage, tspec, stream, s.run.diffusion, device=s.device,
                        spec_digest=spec.digest(*DIFFUSION_FIELDS))
    loop.resume()
    target = max_steps or tspec.max_steps
    if loop.step < target:
        with progress_bar("stage 2: diffusion", target, loop.step, s.show_progress) as bar:
            loop.progress = bar
            loop.run(target)
    return s.run.diffusion


def preview_conditions(dataset, conditioner, n: int = 8) -> list[str]:
    """Distinct conditions from the first records, for the periodic sample grids."""
    if conditioner is None:
        return [""] * n
    seen: list[str] = []
    for item in first_items(dataset, n * 20):
        value = item[conditioner.field]
        if value and value not in seen:
            seen.append(value)
        if len(seen) == n:
            break
    return seen or [""] * n


def train_run(spec: RunSpecBase, out: Path, *, resume: bool = False, max_steps: int | None = None,
              show_progress: bool = True) -> Session:
    """Train stage 1 (if needed) then stage 2 in `out`."""
    session = prepare_run(spec, Path(out), resume=resume, show_progress=show_progress)
    resolve_autoencoder(session)
    train_diffusion_stage(session, max_steps)
    return session
