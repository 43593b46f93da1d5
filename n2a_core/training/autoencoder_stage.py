"""Stage 1: train the autoencoder (reconstruction, perceptual, GAN losses come from its plugin).

The autoencoder's own `training_losses` decides what it optimizes; this stage only routes
the generator loss to the autoencoder's optimizer and the discriminator loss to the
discriminator's, saves reconstruction grids, and finally estimates the latent scale and
exports `weights.safetensors` for stage 2.

On several processes this stage does not use DistributedDataParallel: the GAN step sends
each loss to its own optimizer with `backward(inputs=...)`, the adaptive GAN weight takes
`torch.autograd.grad` of the decoder's last layer, and the discriminator only trains from
`disc_start` on — all of which DDP's bucketed hooks would need `find_unused_parameters`
and luck to follow. Instead the loop averages each optimizer's gradients over processes
(one coalesced all-reduce) after backward and before clipping: the same mean DDP takes,
for any routing. The adaptive weight itself is computed from each rank's own batch, as
under DDP in the original VQGAN code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from n2a_core.autoencoder import Autoencoder
from n2a_core.checkpoint import save_weights
from n2a_core.errors import CheckpointError
from n2a_core.specs import AutoencoderTrainingSpec
from n2a_core.training.loop import OptimizerSlot, Stage, adamw
from n2a_core.training.objective import EMA


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image mean SSIM (Wang et al. 2004) with a uniform window, images in [-1, 1]."""
    x, y = (x.float().clamp(-1, 1) + 1) / 2, (y.float().clamp(-1, 1) + 1) / 2
    window = min(window, x.shape[-1], x.shape[-2])
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda t: torch.nn.functional.avg_pool2d(t, window, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def discriminator_state_keys(model: Autoencoder) -> frozenset[str]:
    """State-dict keys of the sub-modules that hold only discriminator parameters (their
    buffers included), so an average of the autoencoder's weights can leave them out."""
    disc = {id(p) for p in model.discriminator_parameters()}
    prefixes = [f"{name}." for name, module in model.named_modules()
                if name and (params := list(module.parameters())) and all(id(p) in disc for p in params)]
    return frozenset(k for k in model.state_dict() if any(k.startswith(p) for p in prefixes))


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, model: Autoencoder, spec: AutoencoderTrainingSpec, device: torch.device,
                 preview: torch.Tensor, out_dir: Path, save_grid=None):
        self.model, self.spec, self.device = model, spec, device
        self.preview, self.out_dir, self.save_grid = preview.to(device), Path(out_dir), save_grid
        self._slots = {"autoencoder": adamw(model.autoencoder_parameters(), spec.lr, spec.weight_decay, (0.5, 0.9))}
        disc = model.discriminator_parameters()
        if disc:
            self._slots["discriminator"] = adamw(disc, spec.disc_lr or spec.lr, spec.weight_decay, (0.5, 0.9))
        self.ema = None
        if spec.ema_decay is not None:
            self.ema = EMA(model, spec.ema_decay, skip=discriminator_state_keys(model))

    def modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.model}

    def optimizers(self) -> dict[str, OptimizerSlot]:
        return self._slots

    def losses(self, batch: Any, step: float):
        self.model.train()
        out = self.model.training_losses(batch["image"].to(self.device, non_blocking=True), step)
        return {"autoencoder": out.loss, "discriminator": out.discriminator_loss}, dict(out.logs)

    def after_step(self, step: float) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step)

    def state(self):
        return ({"ema": self.ema.state_dict()}, {}) if self.ema is not None else ({}, {})

    def load_state(self, tensors, meta) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])

    def use_average(self) -> None:
        """Put the averaged weights into the model for good (the end of the stage: they are
        what is exported and what stage 2 encodes with)."""
        if self.ema is not None:
            self.ema.copy_to(self.model)

    @torch.no_grad()
    def periodic(self, step: int, final: bool) -> dict[str, float]:
        if step % self.spec.sample_every and not final:
            return {}
        self.model.eval()
        live = None
        if self.ema is not None:  # preview what would be exported, then train on
            live = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.ema.copy_to(self.model)
        recon = self.model.decode(self.model.encode(self.preview)).clamp(-1, 1)
        if live is not None:
            self.model.load_state_dict(live)
        if self.save_grid is not None:
            grids = self.out_dir / "grids"
            grids.mkdir(parents=True, exist_ok=True)
            # top row originals, bottom row reconstructions
            self.save_grid(torch.cat([self.preview, recon]), grids / f"recon-{step:08d}.png", len(self.preview))
        return {"preview/psnr": float(psnr(recon, self.preview).mean()),
                "preview/ssim": float(ssim(recon, self.preview).mean())}


@torch.no_grad()
def export_autoencoder(model: Autoencoder, calibration: torch.Tensor, path: Path, spec_digest: str) -> float:
    """Estimate latent_scale on `calibration` images and write the weights for stage 2."""
    model.eval()
    scale = model.estimate_latent_scale(calibration)
    if not math.isfinite(scale):
        raise CheckpointError("autoencoder latents are not finite; stage 1 diverged — lower its lr and retrain")
    save_weights(path, model.state_dict(), {"spec_digest": spec_digest, "latent_scale": f"{scale:.8g}"})
    return scale
