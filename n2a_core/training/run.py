"""`n2a train` end to end: data, stage 1 (unless given a trained autoencoder), latent cache,
stage 2 — all in one run folder, every step resumable.

Under torchrun every process runs all of this (see n2a_core.training.distributed and
docs/distributed.md): each trains on its share of every global batch, rank 0 writes the
run folder, and the others wait where they need what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console

from n2a_core.checkpoint import (
    STATE,
    latest_checkpoint,
    load_autoencoder_weights,
    remove_partial_saves,
    rng_state,
    set_rng_state,
    validate_state,
)
from n2a_core.component import BuildContext
from n2a_core.components import Components, RunDir, build_components
from n2a_core.conditioner import check_labels
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import CheckpointError, DataError, N2AError, RunLockedError, SpecError
from n2a_core.evaluation.generator import GeneratorEvaluator, tracker_metrics, write_result
from n2a_core.generate import LoadedRun
from n2a_core.images import make_grid_image
from n2a_core.plugins import get_registry
from n2a_core.progress import progress_bar
from n2a_core.report import write_report
from n2a_core.safe_files import RunLock, remove_leftovers
from n2a_core.specs import DiffusionTrainingSpec, RunSpecBase, resolve_run_spec
from n2a_core.tracking import Trackers, build_trackers
from n2a_core.training import distributed
from n2a_core.training.autoencoder_stage import AutoencoderStage, export_autoencoder
from n2a_core.training.batching import BatchStream, DataSplits, collate_samples, make_splits
from n2a_core.training.diffusion_stage import DiffusionStage
from n2a_core.training.distributed import SINGLE, Dist, DistributedError, local_batch
from n2a_core.training.latent_cache import cache_key, encode_dataset, load_or_build
from n2a_core.training.loop import TrainingLoop, autocast_dtype, seed_everything
from n2a_core.training.objective import diffusion_loss

console = Console(stderr=True, highlight=False)

AUTOENCODER_FIELDS = ("autoencoder", "autoencoder_training", "data", "seed")
DIFFUSION_FIELDS = ("autoencoder", "denoiser", "schedule", "conditioner", "training", "data", "seed")


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, captions: list[str] | None = None) -> None:
    make_grid_image(images.detach().float().cpu(), nrow=nrow, captions=captions).save(path)


def preview_saver(run: RunDir, trackers: Trackers):
    """The stages' `save_grid`: write the grid (RUN/<stage>/grids/<tag>-<step>.png), hand it
    to the trackers, then refresh RUN/report.html around it."""

    def save(images: torch.Tensor, path: Path, nrow: int | None = None, captions: list[str] | None = None) -> None:
        save_grid(images, path, nrow, captions)
        tag, _, step = path.stem.rpartition("-")
        with Image.open(path) as image:
            trackers.log_image(path.parent.parent.name, tag, int(step), image)
        write_report(run.root)

    return save


@dataclass
class Session:
    """Everything `train_run` builds once and both stages share."""

    spec: RunSpecBase
    run: RunDir
    device: torch.device
    pipeline: Components
    splits: DataSplits
    show_progress: bool
    dist: Dist = SINGLE
    """This process's place in a multi-process job (SINGLE for one process)."""
    lock: RunLock | None = None
    """The run folder's lock, held by rank 0 until `close()`."""
    trackers: Trackers = field(default_factory=Trackers)
    """Where metrics and grids go (jsonl and the spec's trackers on rank 0; none elsewhere)."""

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def close(self) -> None:
        """Close the trackers and release the run folder for other processes (the OS
        releases it if this one dies)."""
        self.trackers.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe_batch(s: Session, stage: str, tspec, batch: int) -> None:
    """One line on rank 0 saying how the global batch is shared (several processes only)."""
    if s.dist.active and s.is_main:
        console.print(f"{stage}: global batch {tspec.batch_size} = {s.dist.world_size} processes x {batch} "
                      f"x grad_accum {tspec.grad_accum} ({distributed.backend_for(s.device)})")


def check_batch_sizes(spec: RunSpecBase, world_size: int, stage1: bool = True, stage2: bool = True) -> None:
    """Refuse, before any work, a global batch the processes and grad_accum cannot share."""
    if stage1:
        t = spec.autoencoder_training
        local_batch(t.batch_size, t.grad_accum, world_size, "autoencoder_training.batch_size")
    if stage2:
        local_batch(spec.training.batch_size, spec.training.grad_accum, world_size, "training.batch_size")


def lock_run_folder(run: RunDir, dist: Dist, resume: bool) -> RunLock | None:
    """Take the run folder's lock (rank 0; every rank stops if it cannot) and clear what
    killed processes left in it. None on the other ranks."""
    lock, refusal = None, None
    if dist.is_main:
        lock = RunLock(run.root)
        try:
            lock.acquire()
        except RunLockedError as exc:
            lock, refusal = None, str(exc)
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise RunLockedError(refusal if dist.is_main else f"rank {dist.rank}: {refusal}")
    if resume and not run.spec_file.is_file():
        if lock is not None:
            lock.release()
        raise SpecError(f"{run.root}: --resume, but this folder holds no run (no spec.yaml); "
                        "drop --resume to start a new run here")
    if lock is not None:  # no other process writes here now: every leftover is debris
        for folder in (run.root, run.autoencoder, run.diffusion, run.cache):
            remove_leftovers(folder)
        for stage in (run.autoencoder, run.diffusion):
            remove_partial_saves(stage / "checkpoints")
    return lock


def prepare_run(spec: RunSpecBase, out: Path, *, resume: bool, show_progress: bool = True,
                stage2: bool = True) -> Session:
    """Lock and check the run folder, load data, build the components and check them on one
    batch (`preflight`); nothing trains yet, and a refused spec writes no spec.yaml.

    The returned Session holds the run folder's lock: `close()` it, or use it in a `with`
    block. Under torchrun this joins the process group first; every rank makes the same
    checks (so a refusal stops them all at once), rank 0 holds the lock and writes
    spec.yaml and labels.json. `stage2` False: only stage 1 will train (`n2a train-autoencoder`).
    """
    run = RunDir(out)
    _, world_size, _ = distributed.launch_env()
    stage1 = not spec.autoencoder_weights and not stage1_finished(spec, run)
    check_batch_sizes(spec, world_size, stage1=stage1, stage2=False)
    dist, device = distributed.init(spec.device)
    lock = lock_run_folder(run, dist, resume)
    try:
        return _prepare_locked(spec, run, dist, device, show_progress, resume, lock, stage1, stage2)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _prepare_locked(spec: RunSpecBase, run: RunDir, dist: Dist, device: torch.device, show_progress: bool,
                    resume: bool, lock: RunLock | None, stage1: bool, stage2: bool) -> Session:
    out = run.root
    if run.spec_file.is_file():
        if not resume:
            raise SpecError(f"{out}: a run already exists here; pass --resume to continue it or choose another --out")
        check_resumed_spec(spec, run)
    dist.barrier()  # every rank has looked before rank 0 writes spec.yaml
    seed_everything(spec.seed)  # the same on every rank: identical initial weights
    registry = get_registry()
    trackers = build_trackers(spec.trackers, run.root, registry, is_main=dist.is_main)  # a missing extra stops here
    with dist.main_first():  # rank 0 fills render and download caches, the others reuse them
        source = registry.build("data", spec.data, BuildContext(device=device))
        splits = make_splits(source, spec.data)
    labels = splits.vocabulary.labels if splits.vocabulary is not None else None
    if run.labels_file.is_file() and started_stages(run):
        labels = run.read_labels()  # the run's vocabulary is fixed once it trains
    pipeline = build_components(spec, vocabulary=labels, device=device, cache_dir=run.cache)
    for module in (pipeline.autoencoder, pipeline.denoiser, pipeline.conditioner):
        if module is not None:
            module.to(device)
    size = spec.data.image_size
    try:
        pipeline.autoencoder.check_image_size(size, size)
    except ValueError as exc:
        raise SpecError(f"data.image_size: {exc}") from None
    preflight(spec, pipeline, splits, device, stage1=stage1, stage2=stage2)
    if dist.is_main:
        run.write_spec(spec)
        run.write_labels(labels)
    dist.barrier()
    if not run.spec_file.is_file():
        raise DistributedError(f"rank {dist.rank}: cannot see {run.spec_file} that rank 0 wrote; the run folder "
                               "(--out) must be on a filesystem every node shares")
    return Session(spec, run, device, pipeline, splits, show_progress and dist.is_main, dist, lock, trackers)


def started_stages(run: RunDir) -> list[str]:
    """The stages of this run that have trained (a checkpoint or exported weights)."""
    started = []
    if latest_checkpoint(run.autoencoder / "checkpoints") is not None or run.autoencoder_weights.is_file():
        started.append("stage 1")
    if latest_checkpoint(run.diffusion / "checkpoints") is not None:
        started.append("stage 2")
    return started


def check_resumed_spec(spec: RunSpecBase, run: RunDir) -> None:
    """A resumed run may change anything a stage that has not trained yet uses (the fix a
    refusal asked for, say a denoiser that fits the latents), and step counts, batch sizes
    and logging anywhere; what a trained stage was made with stays."""
    saved = resolve_run_spec(run.read_spec_data())
    locked = {"stage 1": AUTOENCODER_FIELDS, "stage 2": (*DIFFUSION_FIELDS, "autoencoder_weights")}
    for stage in started_stages(run):
        changed = [f for f in locked[stage] if saved.digest(f) != spec.digest(f)]
        if changed:
            raise SpecError(
                f"{run.root}: --resume changes {', '.join(changed)}, which {stage} has already trained with; "
                f"resume with `--config {run.spec_file}` (you may change step counts, batch sizes and "
                "logging) or start a new --out")


# -- checks before any training --------------------------------------------------------------
def preflight(spec: RunSpecBase, p: Components, splits, device: torch.device, *, stage1: bool, stage2: bool) -> None:
    """What would otherwise stop a run after hours of stage 1, checked before its first
    optimizer step: the training split against both global batches, precision against the
    device, preview labels, and one tiny batch through autoencoder -> conditioner ->
    denoiser -> loss -> sampler.

    The modules run in eval mode without gradients and the global RNGs are restored, so a
    run trains exactly as it would without the check.
    """
    sections = ([("autoencoder_training", spec.autoencoder_training)] if stage1 else []) + (
        [("training", spec.training)] if stage2 else [])
    for name, tspec in sections:
        if has_items(splits.train) and not isinstance(splits.train, torch.utils.data.IterableDataset):
            if len(splits.train) < tspec.batch_size:
                raise DataError(f"{name}.batch_size: the training split has {len(splits.train)} samples, fewer "
                                f"than one global batch of {tspec.batch_size}; lower {name}.batch_size or add data")
        try:
            autocast_dtype(tspec.precision, device)
        except ValueError as exc:
            raise SpecError(f"{name}.precision: {exc}") from None
    if stage2 and p.conditioner is not None:
        check_labels(p.conditioner, spec.training.preview_labels, "training.preview_labels")
    modules = [m for m in (p.autoencoder, p.denoiser, p.conditioner) if m is not None]
    modes = [m.training for m in modules]
    rng = rng_state()
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            one_batch_through(spec, p, splits, device, stage2)
    finally:
        set_rng_state(*rng)
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def one_batch_through(spec: RunSpecBase, p: Components, splits, device: torch.device, stage2: bool) -> None:
    """Two training images through every component; an error names the component."""
    items = first_items(splits.train, 2)
    if not items:
        raise DataError(f"data ({splits.source_name}): no readable image in the training split")
    size = spec.data.image_size
    where, latents = "autoencoder", ""
    try:
        images = collate_samples(items)["image"].to(device)
        z = p.autoencoder.encode(images)
        latents = f" -> latents {'x'.join(map(str, z.shape[1:]))}"
        decoded = p.autoencoder.decode(z)
        if decoded.shape != images.shape:
            raise SpecError(f"decodes images of {tuple(images.shape[1:])} to {tuple(decoded.shape[1:])}; "
                            "check the autoencoder section")
        if not stage2:
            return
        where = "conditioner"
        model = DiffusionModel(p.denoiser, p.conditioner)
        cond, missing = model.embed([item[p.conditioner.field] for item in items] if p.conditioner else [])
        cond = cond.to(device) if cond is not None else None
        drop = missing.to(device) if missing is not None else None
        where = "denoiser"
        diffusion_loss(p.denoiser, p.schedule, z.float(), cond, drop, torch.Generator().manual_seed(0),
                       spec.training.min_snr_gamma)
        if p.sampler is not None:
            where = "sampler"  # two steps: the sampler fits the denoiser; the grids' length is no question
            guidance = spec.training.preview_guidance if cond is not None else 0.0
            p.sampler.sample(p.denoiser, p.schedule, (1, *z.shape[1:]), cond=cond[:1] if cond is not None else None,
                             guidance=guidance, steps=min(2, spec.training.sample_steps), generator=torch.Generator())
    except N2AError as exc:
        raise type(exc)(f"{where} (one batch checked before training, data.image_size {size}{latents}): "
                        f"{exc}") from None
    except (RuntimeError, ValueError) as exc:  # a plugin's shape mismatch inside torch
        first = (str(exc).splitlines() or [""])[0]
        raise SpecError(f"{where} (one batch checked before training, data.image_size {size}{latents}): "
                        f"{type(exc).__name__}: {first}; check the {where} section of the spec") from exc


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


def resume_and_run(loop: TrainingLoop, title: str, max_steps: int | None, budget_s: float | None,
                   show_progress: bool) -> None:
    """Continue `loop` from its last checkpoint (if any) up to step `max_steps` (None: the
    spec's) or, with a time budget, until `budget_s` seconds are spent; with a progress bar."""
    loop.budget_s = budget_s
    target = max_steps or (None if budget_s is not None else loop.spec.max_steps)
    loop.resume()
    if not loop.done(target):
        if budget_s is not None:
            title = f"{title} ({budget_s / 60:.1f} min budget, per mille)"
        done, total = loop.progress_position(target)
        with progress_bar(title, total, done, show_progress) as bar:
            loop.progress = bar
            loop.run(target)


def stage_budgets(spec: RunSpecBase, run: RunDir) -> tuple[float | None, float | None]:
    """Seconds for stage 1 and stage 2 (None, None without a time budget): stage 1 gets
    autoencoder_time_share of time_budget, stage 2 what stage 1 left (all of it when this run
    trains no autoencoder). The latent cache and the final grid come on top."""
    if spec.time_budget is None:
        return None, None
    if spec.autoencoder_weights:
        return 0.0, spec.time_budget
    stage1 = spec.time_budget * spec.autoencoder_time_share
    spent = checkpoint_spent_s(run.autoencoder / "checkpoints")
    return stage1, spec.time_budget - min(spent if spent is not None else stage1, spec.time_budget)


def checkpoint_spent_s(checkpoint_dir: Path) -> float | None:
    """Seconds the stage had trained at its latest checkpoint (None: no checkpoint)."""
    last = latest_checkpoint(checkpoint_dir)
    if last is None:
        return None
    state = last / STATE
    return float(validate_state(state, state.read_text()).get("spent_s", 0.0))


def train_autoencoder_stage(s: Session, max_steps: int | None = None) -> None:
    """Stage 1, resumed from its last checkpoint when there is one; exports weights."""
    spec, ae, dist = s.spec, s.pipeline.autoencoder, s.dist
    tspec = spec.autoencoder_training
    batch = local_batch(tspec.batch_size, tspec.grad_accum, dist.world_size, "autoencoder_training.batch_size")
    describe_batch(s, "stage 1", tspec, batch)
    digest = spec.digest(*AUTOENCODER_FIELDS)
    preview = preview_images(eval_split(s.splits), 8)
    stage = AutoencoderStage(ae, tspec, s.device, preview, s.run.autoencoder, preview_saver(s.run, s.trackers))
    dist.broadcast_module(ae)  # replicas start equal (the loop averages their gradients)
    stream = BatchStream(s.splits.train, batch, spec.seed, collate_samples, tspec.num_workers,
                         rank=dist.rank, world_size=dist.world_size)
    loop = TrainingLoop(stage, tspec, stream, s.run.autoencoder, device=s.device, spec_digest=digest,
                        earlier_digests=spec.earlier_digests(*AUTOENCODER_FIELDS),
                        dist=dist, trackers=s.trackers)
    resume_and_run(loop, "stage 1: autoencoder", max_steps, stage_budgets(spec, s.run)[0], s.show_progress)
    stage.use_average()
    calibrate_autoencoder(s)


def calibrate_autoencoder(s: Session) -> None:
    """Estimate the latent scale on training images and write the weights stage 2 reads."""
    if s.dist.is_main:
        s.run.autoencoder.mkdir(parents=True, exist_ok=True)  # no stage-1 folder yet for a pretrained one
        calibration = preview_images(s.splits.train, 64)
        scale = export_autoencoder(s.pipeline.autoencoder, calibration.to(s.device), s.run.autoencoder_weights,
                                   s.spec.digest(*AUTOENCODER_FIELDS))
        console.print(f"stage 1 done: {s.run.autoencoder_weights} (latent scale {scale:.4f})", markup=False)
    s.dist.barrier()


def stage1_finished(spec: RunSpecBase, run: RunDir) -> bool:
    """Has this run's stage 1 reached its max_steps (or spent its time budget) and exported
    its weights?"""
    last = latest_checkpoint(run.autoencoder / "checkpoints")
    if last is None or not run.autoencoder_weights.is_file():
        return False
    if spec.time_budget is not None:
        return checkpoint_spent_s(run.autoencoder / "checkpoints") >= stage_budgets(spec, run)[0]
    return int(last.name.split("-")[1]) >= spec.autoencoder_training.max_steps


def resolve_autoencoder(s: Session, train_if_missing: bool = True, max_steps: int | None = None) -> None:
    """Give the session's autoencoder trained weights: from `autoencoder_weights`, from
    this run's stage 1, or by training stage 1 now (up to `max_steps`, if given)."""
    given = s.spec.autoencoder_weights
    if given:
        path = Path(given)
        path = RunDir(path).autoencoder_weights if path.is_dir() else path
        load_autoencoder_weights(s.pipeline.autoencoder, path)
        return
    if stage1_finished(s.spec, s.run):
        load_autoencoder_weights(s.pipeline.autoencoder, s.run.autoencoder_weights)
        return
    if s.pipeline.autoencoder.pretrained:  # trained elsewhere: only its latent scale is estimated here
        if not s.run.autoencoder_weights.is_file():
            calibrate_autoencoder(s)
        load_autoencoder_weights(s.pipeline.autoencoder, s.run.autoencoder_weights)
        return
    if not train_if_missing:
        raise CheckpointError(f"{s.run.root}: no trained autoencoder; run stage 1 first")
    if latest_checkpoint(s.run.diffusion / "checkpoints") is not None and s.is_main:
        # A run first capped by --max-steps: stage 2 goes on from weights it learnt on the
        # latents of the earlier, shorter-trained autoencoder.
        console.print("stage 1 continues although stage 2 has started; stage 2 then resumes on the new latents")
    train_autoencoder_stage(s, max_steps)
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

        # Flips happen inside the cache (both orientations), not in the image loader.
        unflipped = getattr(dataset, "without_flip", lambda dataset=dataset: dataset)()

        def build(unflipped=unflipped, flip=flip, name=name):
            with progress_bar(f"latent cache ({name})", 1, 0, s.show_progress) as bar:
                return encode_dataset(ae, unflipped, collate_samples, s.device, flip=flip,
                                      progress=lambda i, n: bar(i, n), what=f"latent cache ({name})")

        def build_part(rank: int, world_size: int, unflipped=unflipped, flip=flip, name=name):
            n = len(unflipped)
            share = torch.utils.data.Subset(unflipped, range(n * rank // world_size, n * (rank + 1) // world_size))
            with progress_bar(f"latent cache ({name}, rank 0's share)", 1, 0, s.show_progress) as bar:
                return encode_dataset(ae, share, collate_samples, s.device, flip=flip,
                                      progress=lambda i, n: bar(i, n), what=f"latent cache ({name}), rank {rank}")

        sharded = not isinstance(unflipped, torch.utils.data.IterableDataset)
        out.append(load_or_build(s.run.cache, key, build, s.dist, build_part if sharded else None))
    return tuple(out)


def collate_latents(batch: list[dict]) -> dict:
    if "image" in batch[0]:
        return collate_samples(batch)
    return {"latent": torch.stack([b["latent"] for b in batch]), "label": [b["label"] for b in batch],
            "caption": [b["caption"] for b in batch], "key": [b["key"] for b in batch]}


def train_diffusion_stage(s: Session, max_steps: int | None = None) -> Path:
    spec, p, dist = s.spec, s.pipeline, s.dist
    tspec = spec.training
    batch = local_batch(tspec.batch_size, tspec.grad_accum, dist.world_size, "training.batch_size")
    describe_batch(s, "stage 2", tspec, batch)
    train_data, val_data = latent_datasets(s)
    model = DiffusionModel(p.denoiser, p.conditioner)
    f = p.autoencoder.downsample_factor
    size = spec.data.image_size
    preview = preview_conditions(val_data if has_items(val_data) else train_data, p.conditioner, tspec)
    val_loader = None
    if has_items(val_data):
        val_loader = torch.utils.data.DataLoader(val_data, batch_size=tspec.batch_size // tspec.grad_accum,
                                                 shuffle=False, collate_fn=collate_latents)
    stage = DiffusionStage(model, p.autoencoder, p.schedule, p.sampler, tspec, s.device, spec.seed,
                           s.run.diffusion, (p.autoencoder.latent_channels, size // f, size // f),
                           val_data=val_loader, preview_conditions=preview,
                           save_grid=preview_saver(s.run, s.trackers), dist=dist,
                           evaluate=generator_evaluation(s) if tspec.eval_every and dist.is_main else None)
    stream = BatchStream(train_data, batch, spec.seed, collate_latents,
                         tspec.num_workers if not tspec.latent_cache else 0, rank=dist.rank, world_size=dist.world_size)
    loop = TrainingLoop(stage, tspec, stream, s.run.diffusion, device=s.device,
                        spec_digest=spec.digest(*DIFFUSION_FIELDS),
                        earlier_digests=spec.earlier_digests(*DIFFUSION_FIELDS),
                        dist=dist, trackers=s.trackers)
    resume_and_run(loop, "stage 2: diffusion", max_steps, stage_budgets(spec, s.run)[1], s.show_progress)
    return s.run.diffusion


def generator_evaluation(s: Session):
    """`training.eval_every`'s callback: score the EMA model as `n2a eval` does, write
    RUN/eval/step-*.json, and return the numbers as `eval/*` logs. The reference features
    are computed at the first call and kept."""
    evaluator: GeneratorEvaluator | None = None

    def evaluate(model: DiffusionModel, step: int) -> dict[str, float]:
        nonlocal evaluator
        if evaluator is None:
            evaluator = GeneratorEvaluator(s.spec, device=s.device)
        loaded = LoadedRun(s.run, s.spec, s.pipeline, model, s.device, step)
        result = evaluator.evaluate(loaded, n=s.spec.training.eval_images, seed=s.spec.seed)
        write_result(result, s.run.root / "eval")
        return tracker_metrics(result)

    return evaluate


def preview_conditions(dataset, conditioner, tspec: DiffusionTrainingSpec, n: int = 8) -> list[str]:
    """The sample grids' conditions: the spec's captions or labels (whichever the conditioner
    reads), else distinct ones from the first records of `dataset`."""
    if conditioner is None:
        return [""] * n
    chosen = tspec.preview_captions if conditioner.field == "caption" else tspec.preview_labels
    if chosen:
        return list(chosen)
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
    """Train stage 1 (if needed) then stage 2 in `out` (on every process of a torchrun job).

    The returned Session still holds the run folder's lock (for final samples, say):
    `close()` it, or use it in a `with` block. `max_steps` stops each stage at that step (a
    smoke test); the learning-rate schedules still follow the spec's max_steps, so a later
    --resume without it goes on to them."""
    _, world_size, _ = distributed.launch_env()
    check_batch_sizes(spec, world_size, stage1=False)  # stage 1's in prepare_run
    session = prepare_run(spec, Path(out), resume=resume, show_progress=show_progress)
    try:
        resolve_autoencoder(session, max_steps=max_steps)
        train_diffusion_stage(session, max_steps)
    except BaseException:
        session.close()
        raise
    if session.is_main:
        write_report(session.run.root)  # with the last step's validation and eval numbers
    return session
