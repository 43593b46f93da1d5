"""Stage 2: train the denoiser on autoencoder latents (see n2a_core.training.objective for the math).

What is trained and saved together is a `DiffusionModel`: the denoiser plus the
conditioner when it has trainable parameters (a class-label embedding). Frozen text
conditioners stay outside: they are reloaded from their own path, never checkpointed.

On several processes the model trains inside DistributedDataParallel (gradients are
averaged in buckets while backward still runs); each rank draws its own noise from a
generator seeded by (run seed, rank); rank 0 alone keeps the EMA and evaluates.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from n2a_core.autoencoder import Autoencoder
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.sampler import Sampler, generators_for_seeds
from n2a_core.schedule import NoiseSchedule
from n2a_core.specs import DiffusionTrainingSpec
from n2a_core.training.distributed import SINGLE, Dist, find_unused_parameters, rank_seed
from n2a_core.training.loop import OptimizerSlot, Stage, adamw
from n2a_core.training.objective import EMA, diffusion_loss, draw_condition_drop


class TrainingForward:
    """The callable the loss trains through (the denoiser, or the model inside DDP and/or
    torch.compile) with the denoiser's prediction type, which DDP does not pass through."""

    def __init__(self, forward, prediction_type):
        self.forward, self.prediction_type = forward, prediction_type

    def __call__(self, *args):
        return self.forward(*args)


class DiffusionStage(Stage):
    name = "diffusion"

    def __init__(self, model: DiffusionModel, autoencoder: Autoencoder, schedule: NoiseSchedule,
                 sampler: Sampler | None, spec: DiffusionTrainingSpec, device: torch.device, seed: int,
                 out_dir: Path, latent_shape: tuple[int, int, int], val_data=None,
                 preview_conditions: list[str] | None = None, save_grid=None, dist: Dist = SINGLE):
        self.model, self.autoencoder, self.schedule, self.sampler = model, autoencoder, schedule, sampler
        self.spec, self.device, self.out_dir, self.seed = spec, device, Path(out_dir), seed
        self.val_data, self.save_grid = val_data, save_grid
        self.preview_conditions = preview_conditions or [""] * 8
        self.generator = torch.Generator().manual_seed(rank_seed(seed, dist.rank))
        params = [p for p in model.parameters() if p.requires_grad]
        self._slots = {"model": adamw(params, spec.lr, spec.weight_decay)}
        self.ema = EMA(model, spec.ema_decay, spec.ema_warmup) if dist.is_main else None
        self.ema_model: DiffusionModel | None = None
        self.ddp = None
        forward = model.denoiser
        if dist.active:
            # DDP broadcasts rank 0's weights now and averages gradients during backward.
            # A class embedding is left out of the graph by a batch without labels, so it
            # needs DDP's search for unused parameters; a text conditioner never does.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters(model.conditioner is not None))
            self._slots["model"].ddp = True
            forward = self.ddp
        if spec.compile:
            forward = torch.compile(forward)
        self.forward_model = TrainingForward(forward, model.denoiser.prediction_type)
        self.latent_shape = tuple(latent_shape)

    def no_sync(self):
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, OptimizerSlot]:
        return self._slots

    def latents_of(self, batch: dict) -> torch.Tensor:
        if "latent" in batch:
            return batch["latent"].to(self.device, non_blocking=True)
        with torch.no_grad():
            return self.autoencoder.encode(batch["image"].to(self.device, non_blocking=True)).float()

    def conditions_of(self, batch: dict) -> list[str]:
        conditioner = self.model.any_conditioner
        return list(batch[conditioner.field]) if conditioner is not None else []

    def batch_loss(self, batch: dict, generator: torch.Generator, p_uncond: float) -> torch.Tensor:
        z0 = self.latents_of(batch)
        cond, missing = self.model.embed(self.conditions_of(batch))
        drop = None
        if cond is not None:
            drop = (draw_condition_drop(len(z0), p_uncond, generator) | missing).to(self.device)
            cond = cond.to(self.device)
        denoiser = self.forward_model if self.model.training else self.model.denoiser
        return diffusion_loss(denoiser, self.schedule, z0, cond, drop, generator, self.spec.min_snr_gamma)

    def losses(self, batch: Any, step: float):
        self.model.train()
        loss = self.batch_loss(batch, self.generator, self.spec.p_uncond)
        return {"model": loss}, {}

    def after_step(self, step: float) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step)

    def state(self):
        return {"ema": self.ema.state_dict()}, {}

    def load_state(self, tensors, meta) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])
        if "generator" in tensors:  # checkpoints from before per-rank generator states
            self.generator.set_state(tensors["generator"]["state"])

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_rank_state(self, tensors, seed: int) -> None:
        if tensors is None:
            self.generator.manual_seed(seed)
        else:
            self.generator.set_state(tensors["generator"])

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss on the first `val_batches` validation batches, with fixed noise so the
        figure is comparable across steps (the conditions are never dropped)."""
        if self.val_data is None:
            return None
        self.model.eval()
        generator = torch.Generator().manual_seed(self.seed + 12345)
        total, count = 0.0, 0
        for i, batch in enumerate(self.val_data):
            if i >= self.spec.val_batches:
                break
            total += float(self.batch_loss(batch, generator, 0.0)) * len(batch["key"])
            count += len(batch["key"])
        return total / count if count else None

    @torch.no_grad()
    def sample_grid(self, step: int) -> None:
        if self.sampler is None or self.save_grid is None:
            return
        ema = self.ema_copy()
        ema.eval()
        conditions = self.preview_conditions
        cond, _ = ema.embed(conditions)
        cond = cond.to(self.device) if cond is not None else None
        z = self.sampler.sample(ema.denoiser, self.schedule, (len(conditions), *self.latent_shape),
                                cond=cond, guidance=self.spec.preview_guidance if cond is not None else 0.0,
                                steps=self.spec.sample_steps,
                                generator=generators_for_seeds(range(len(conditions))))
        images = self.autoencoder.decode(z.to(self.device)).clamp(-1, 1)
        grids = self.out_dir / "grids"
        grids.mkdir(parents=True, exist_ok=True)
        self.save_grid(images, grids / f"samples-{step:08d}.png", None, conditions)

    def ema_copy(self) -> DiffusionModel:
        """A module holding the EMA weights (made once, refreshed on each call)."""
        if self.ema_model is None:
            trainable = self.model.conditioner
            self.ema_model = DiffusionModel(
                copy.deepcopy(self.model.denoiser),
                copy.deepcopy(trainable) if trainable is not None else self.model.frozen_conditioner,
            )
        self.ema.copy_to(self.ema_model)
        return self.ema_model

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        logs = {}
        if step % self.spec.val_every == 0 or final:
            val = self.validation_loss()
            if val is not None:
                logs["val/loss"] = val
        if step % self.spec.sample_every == 0 or final:
            self.sample_grid(step)
        return logs
