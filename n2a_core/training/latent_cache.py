"""Encode a dataset once with the frozen autoencoder and train stage 2 from the result.

The cache file is keyed by a hash of the autoencoder's weights and the data spec
(transform, split, source), so retraining the autoencoder or changing `image_size`
builds a new cache instead of silently reusing a stale one. With random flips on, both
orientations are encoded, and each read picks one at random, as on-the-fly training would.

On several processes the cache is built once for all: each rank encodes a contiguous
share of the dataset, rank 0 joins the shares in order (the file one process would
write) and every rank reads it. The run folder must be on a filesystem all nodes share.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from n2a_core import strict_json
from n2a_core.autoencoder import Autoencoder
from n2a_core.safe_files import temp_path, write_atomic
from n2a_core.training.batching import report_skipped, start_pass
from n2a_core.training.distributed import SINGLE, Dist, DistributedError


def weights_digest(module: torch.nn.Module, skip: Sequence[str] = ()) -> str:
    """sha256 over the module's tensors (names, shapes, bytes), ignoring sub-modules in `skip`."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    return h.hexdigest()[:16]


def cache_key(autoencoder: Autoencoder, data_spec: dict, split: str) -> str:
    data = json.dumps(data_spec, sort_keys=True)
    weights = weights_digest(autoencoder, autoencoder.inference_modules())
    return hashlib.sha256(f"{weights}|{data}|{split}".encode()).hexdigest()[:16]


class LatentDataset(Dataset):
    """Cached latents with their labels and captions; items look like image items with
    a `latent` instead of an `image`."""

    def __init__(self, latents: torch.Tensor, flipped: torch.Tensor | None, meta: dict):
        self.latents, self.flipped = latents, flipped
        self.labels, self.captions, self.keys = meta["label"], meta["caption"], meta["key"]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        latent = self.latents[i]
        if self.flipped is not None and bool(torch.rand(()) < 0.5):
            latent = self.flipped[i]
        return {"latent": latent, "label": self.labels[i], "caption": self.captions[i], "key": self.keys[i]}


@torch.no_grad()
def encode_dataset(
    autoencoder: Autoencoder, dataset: Dataset, collate, device: torch.device, batch_size: int = 64,
    flip: bool = False, progress=None, what: str = "latent cache",
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Latents of every readable image of `dataset` (in order), plus metadata lists; one
    warning line (headed `what`) counts the unreadable images it skipped."""
    autoencoder.eval()
    start_pass(dataset)
    latents, flipped = [], []
    meta: dict[str, list] = {"label": [], "caption": [], "key": []}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for i, batch in enumerate(loader):
        images = batch["image"].to(device)
        latents.append(autoencoder.encode(images).float().cpu())
        if flip:
            flipped.append(autoencoder.encode(images.flip(-1)).float().cpu())
        for k in meta:
            meta[k].extend(batch[k])
        if progress:
            progress(i + 1, len(loader))
    report_skipped(dataset, what)
    if not latents:  # nothing readable (e.g. one rank's share of a few broken files)
        return torch.empty(0), (torch.empty(0) if flip else None), meta
    return torch.cat(latents), (torch.cat(flipped) if flip else None), meta


def _paths(path_dir: Path, key: str) -> tuple[Path, Path]:
    return path_dir / f"latents-{key}.safetensors", path_dir / f"latents-{key}.json"


def _write(path_dir: Path, key: str, latents: torch.Tensor, flipped: torch.Tensor | None, meta: dict) -> None:
    tensors_path, meta_path = _paths(path_dir, key)
    tensors = {"latents": latents.contiguous()}
    if flipped is not None:
        tensors["flipped"] = flipped.contiguous()
    tmp = temp_path(tensors_path)
    save_file(tensors, str(tmp))
    write_atomic(meta_path, strict_json.dumps(meta))
    os.replace(tmp, tensors_path)  # the tensors last: their presence marks a complete cache


def _read(path_dir: Path, key: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    tensors_path, meta_path = _paths(path_dir, key)
    tensors = load_file(str(tensors_path))
    return tensors["latents"], tensors.get("flipped"), json.loads(meta_path.read_text())


def _join(parts: list[tuple[torch.Tensor, torch.Tensor | None, dict]]):
    """The parts' latents, flipped latents and metadata concatenated in order."""
    full = [p for p in parts if len(p[0])]
    latents = torch.cat([p[0] for p in full]) if full else torch.empty(0)
    flipped = torch.cat([p[1] for p in full]) if full and full[0][1] is not None else None
    meta = {k: [v for p in parts for v in p[2][k]] for k in parts[0][2]}
    return latents, flipped, meta


def load_or_build(path_dir: Path, key: str, build, dist: Dist = SINGLE, build_part=None) -> LatentDataset:
    """The cached LatentDataset for `key`, building and saving it with `build()` if absent.

    Several processes: `build_part(rank, world_size)` encodes one rank's share (see the
    module's docstring); without it rank 0 runs `build()` while the others wait.
    """
    path_dir.mkdir(parents=True, exist_ok=True)
    tensors_path, meta_path = _paths(path_dir, key)
    # Rank 0 decides, so that no rank starts building while another reads.
    if dist.broadcast_object(tensors_path.is_file() and meta_path.is_file()):
        return LatentDataset(*_read(path_dir, key))
    if not dist.active:
        built = build()
        _write(path_dir, key, *built)
        return LatentDataset(*built)
    if build_part is None:
        if dist.is_main:
            _write(path_dir, key, *build())
    else:
        part = f"{key}.part{dist.rank}of{dist.world_size}"
        _write(path_dir, part, *build_part(dist.rank, dist.world_size))
        dist.barrier()
        if dist.is_main:
            names = [f"{key}.part{r}of{dist.world_size}" for r in range(dist.world_size)]
            unseen = [str(_paths(path_dir, n)[0]) for n in names if not _paths(path_dir, n)[0].is_file()]
            if unseen:
                raise DistributedError(f"rank 0: cannot see {unseen[0]} another rank wrote; the run folder "
                                       "(--out) must be on a filesystem every node shares")
            _write(path_dir, key, *_join([_read(path_dir, name) for name in names]))
            for name in names:
                for path in _paths(path_dir, name):
                    path.unlink()
    dist.barrier()
    if not tensors_path.is_file():
        raise DistributedError(f"rank {dist.rank}: cannot see the latent cache {tensors_path} rank 0 wrote; the "
                               "run folder (--out) must be on a filesystem every node shares")
    return LatentDataset(*_read(path_dir, key))
