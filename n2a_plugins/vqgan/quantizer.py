"""The vector quantizer of VQ-VAE / VQGAN.

van den Oord et al. 2017 ("Neural Discrete Representation Learning"), as used by Esser et
al. 2021 ("Taming Transformers", sec. 3.1): every encoder output vector z is replaced by
its nearest codebook entry e_k (VQGAN eq. 2), gradients pass straight through, and the
codebook part of the loss is (VQ-VAE eq. 3; VQGAN eq. 4 writes it with beta = 1)

    L_VQ = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2

beta weights the *commitment* term, the one whose gradient reaches the encoder; some
public implementations put it on the codebook term instead, which is the wrong way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    """What one pass of the quantizer returns."""

    z_q: torch.Tensor
    """B x D x h x w codes, with the straight-through gradient to z."""
    indices: torch.Tensor
    """B x h x w code indices (long)."""
    codebook_loss: torch.Tensor
    """||sg[z] - e||^2 (mean over elements): moves the codes towards the encoder outputs."""
    commitment: torch.Tensor
    """||z - sg[e]||^2 (mean over elements), unweighted: `VectorQuantizer.loss` applies beta."""
    usage: torch.Tensor
    """Fraction of the K codes used in this batch."""
    perplexity: torch.Tensor
    """exp(entropy) of the batch's code histogram: K when uniform, 1 when collapsed."""


class VectorQuantizer(nn.Module):
    """K codes of dimension D (= n_z) with nearest-code lookup and dead-code re-seeding.

    Dead codes: a code no encoder output picked for `dead_code_after` consecutive training
    steps is replaced by a random encoder output of the current batch (the "random
    restarts" of Jukebox, Dhariwal et al. 2020). The draw uses torch's global RNG, so
    training stays deterministic under a fixed seed. Under torch.distributed the usage
    counts are summed over processes and rank 0's re-seeded codes are broadcast, so every
    replica keeps the same codebook.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        l2_normalize: bool = False,
        dead_code_reseed: bool = True,
        dead_code_after: int = 100,
    ):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.l2_normalize = l2_normalize
        self.dead_code_reseed, self.dead_code_after = dead_code_reseed, dead_code_after
        self.embedding = nn.Embedding(num_codes, dim)
        # Taming's init: uniform in +-1/K keeps all codes close to the origin, where a
        # freshly initialised encoder puts its outputs.
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        # Training steps since each code was last picked; saved so a resumed run keeps it.
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))

    # -- lookup --------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """K x D codes as used for lookup (unit-normalised when l2_normalize)."""
        e = self.embedding.weight
        return F.normalize(e, dim=1) if self.l2_normalize else e

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """argmin_k ||z - e_k||^2 for N x D vectors (VQGAN eq. 2), in fp32.

        Expanded as ||z||^2 - 2 z.e_k + ||e_k||^2 so memory is N x K, never N x K x D.
        Autocast is off: bf16 dot products would pick wrong codes among close ones.
        """
        with torch.no_grad(), torch.autocast(z_flat.device.type, enabled=False):
            z = z_flat.float()
            e = self.codebook().float()
            if self.l2_normalize:
                z = F.normalize(z, dim=1)
            d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None, :]
            return d.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices B x h x w -> codes B x D x h x w."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    # -- forward -------------------------------------------------------------------------
    def _check(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"quantizer expects B x {self.dim} x h x w latents, got {tuple(z.shape)}")

    def _snap(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z as compared, i.e. normalised when l2_normalize; its codes e; indices B x h x w)."""
        self._check(z)
        B, D, h, w = z.shape
        indices = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)
        z_in = F.normalize(z, dim=1) if self.l2_normalize else z
        return z_in, self.lookup(indices).to(z.dtype), indices

    @staticmethod
    def _straight_through(z_in: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # VQ-VAE sec. 3.1: the forward value is exactly e, the gradient w.r.t. z is identity,
        # and the decoder's gradient never reaches the codebook (only L_VQ moves the codes).
        return e.detach() + (z_in - z_in.detach())

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes with straight-through gradient, indices): no losses, no usage bookkeeping."""
        z_in, e, indices = self._snap(z)
        return self._straight_through(z_in, e), indices

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantize B x D x h x w encoder outputs for training (re-seeds dead codes first)."""
        self._check(z)
        if self.training and self.dead_code_reseed:
            self._reseed_dead_codes(z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim))
        z_in, e, indices = self._snap(z)
        codebook_loss = F.mse_loss(e, z_in.detach())
        commitment = F.mse_loss(z_in, e.detach())

        counts = torch.bincount(indices.flatten(), minlength=self.num_codes)
        if self.training:
            self._count_usage(counts)
        p = counts.float() / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        usage = (counts > 0).float().mean()
        return Quantized(self._straight_through(z_in, e), indices, codebook_loss, commitment, usage, perplexity)

    def loss(self, q: Quantized) -> torch.Tensor:
        """L_VQ = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (beta on the encoder's side)."""
        return q.codebook_loss + self.beta * q.commitment

    def recent_usage(self) -> torch.Tensor:
        """Fraction of codes picked within the last `dead_code_after` training steps."""
        return (self.steps_unused < self.dead_code_after).float().mean()

    # -- dead codes ----------------------------------------------------------------------
    @torch.no_grad()
    def _count_usage(self, counts: torch.Tensor) -> None:
        counts = counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _reseed_dead_codes(self, z_flat: torch.Tensor) -> None:
        dead = (self.steps_unused >= self.dead_code_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Fresh encoder outputs: each lands on its own new code at once, so it is used.
        pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)
        weight = self.embedding.weight
        weight[dead] = z_flat[pick].to(weight.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(weight.data, src=0)
        self.steps_unused[dead] = 0
