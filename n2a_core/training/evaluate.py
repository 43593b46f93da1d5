"""`n2a eval-autoencoder`: reconstruction quality and codebook use on the validation split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from n2a_core.checkpoint import load_autoencoder_weights
from n2a_core.component import BuildContext
from n2a_core.device import resolve_device
from n2a_core.errors import DataError
from n2a_core.pipeline import RunDir, build_pipeline
from n2a_core.plugins import get_registry
from n2a_core.specs import resolve_run_spec
from n2a_core.training.autoencoder_stage import psnr, ssim
from n2a_core.training.batching import collate_samples, make_splits
from n2a_core.training.run import eval_split, has_items


@torch.no_grad()
def evaluate_autoencoder(root: Path, *, data: str | None = None, overrides: Sequence[str] = (),
                         max_batches: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """PSNR (dB), SSIM, L1 and, for quantizing autoencoders, the share of codes used on the
    split and the perplexity of their distribution (= codebook size when all are equally used)."""
    run = RunDir(root)
    spec = resolve_run_spec(run.read_spec_data(), plugins={"data": data}, overrides=list(overrides))
    device = resolve_device(spec.device)
    pipeline = build_pipeline(spec, vocabulary=run.read_labels(), device=device, training=False)
    model = pipeline.autoencoder.to(device).eval()
    load_autoencoder_weights(model, run.autoencoder_weights)
    splits = make_splits(get_registry().build("data", spec.data, BuildContext(device=device)), spec.data)
    dataset = eval_split(splits)
    if not has_items(dataset):
        raise DataError(f"{root}: the data has no images to evaluate on")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples)
    totals = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0}
    count = 0
    counts = None
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch["image"].to(device)
        recon = model.decode(model.encode(x)).clamp(-1, 1)
        totals["psnr"] += float(psnr(recon, x).sum())
        totals["ssim"] += float(ssim(recon, x).sum())
        totals["l1"] += float((recon - x).abs().flatten(1).mean(1).sum())
        count += len(x)
        if hasattr(model, "codebook_indices"):
            idx = model.codebook_indices(x).flatten().cpu()
            size = int(getattr(model, "codebook_size", int(idx.max()) + 1))
            counts = (counts if counts is not None else torch.zeros(size)) + torch.bincount(idx, minlength=size)
    metrics: dict[str, float] = {k: v / count for k, v in totals.items()}
    metrics["images"] = count
    if counts is not None:
        p = counts / counts.sum()
        metrics["codebook_usage"] = float((counts > 0).float().mean())
        metrics["perplexity"] = float(math.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return metrics
