"""VQGAN's training losses besides L1: LPIPS, the PatchGAN discriminator, the GAN terms and
the adaptive weight that balances them (Esser et al. 2021, "Taming Transformers", sec. 3.1).

LPIPS weights are never downloaded: `load_lpips` finds torchvision's VGG16 file and the
LPIPS v0.1 linear-layer file on disk, checks their published sha256 and otherwise raises a
one-line CheckpointError that says where it looked and how to get them.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from n2a_core import CheckpointError

# -- LPIPS weight files ----------------------------------------------------------------------
VGG16_FILE = "vgg16-397923af.pth"
LPIPS_FILE = "vgg.pth"
LPIPS_SOURCES = {
    VGG16_FILE: ("torchvision's VGG16 ImageNet weights", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    LPIPS_FILE: (
        "the LPIPS v0.1 linear layers",
        "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    ),
}
LPIPS_SHA256 = {
    # torch.hub names carry the first 8 hex digits of the file's sha256.
    VGG16_FILE: "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    LPIPS_FILE: "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}
"""Expected sha256 of each file; tests swap in the hashes of fake files."""
DEFAULT_LPIPS_DIR = "~/.cache/n2a/lpips"

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, hash once


def _torch_hub_checkpoints() -> Path:
    # torch.hub.get_dir() honours TORCH_HOME and XDG_CACHE_HOME and downloads nothing.
    return Path(torch.hub.get_dir()) / "checkpoints"


def lpips_search_dirs(name: str, weights: str | os.PathLike | None) -> list[Path]:
    """Where `name` is looked for, in order: the user's path, n2a's cache, torch's hub cache."""
    dirs = []
    if weights is not None:
        weights = Path(weights).expanduser()
        dirs.append(weights.parent if weights.is_file() else weights)
    dirs.append(Path(DEFAULT_LPIPS_DIR).expanduser())
    if name == VGG16_FILE:
        dirs.append(_torch_hub_checkpoints())
    return list(dict.fromkeys(dirs))


def find_lpips_file(name: str, weights: str | os.PathLike | None = None) -> Path:
    """The verified local path of `name` (VGG16_FILE or LPIPS_FILE), or a CheckpointError.

    `weights` is the spec's `perceptual_weights`: a directory holding the files, or the
    path of the LPIPS linear-layer file itself (VGG16 is then looked for beside it).
    """
    if weights is not None and not Path(weights).expanduser().exists():
        raise CheckpointError(
            f"autoencoder.perceptual_weights: {weights} does not exist; give the directory that "
            f"holds {LPIPS_FILE} and {VGG16_FILE}, or use perceptual: none"
        )
    if weights is not None and name == LPIPS_FILE and Path(weights).expanduser().is_file():
        path = Path(weights).expanduser()
    else:
        dirs = lpips_search_dirs(name, weights)
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is None:
            what, url = LPIPS_SOURCES[name]
            raise CheckpointError(
                f"perceptual: lpips needs {name} ({what}), not found in "
                f"{', '.join(str(d) for d in dirs)}; n2a never downloads: fetch {url} into "
                f"{dirs[0]}, or set autoencoder.perceptual_weights, or use perceptual: none"
            )
    _verify_sha256(path, LPIPS_SHA256[name], name)
    return path


def _verify_sha256(path: Path, expected: str, name: str) -> None:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _verified[key] = digest.hexdigest()
    if _verified[key] != expected:
        what, url = LPIPS_SOURCES[name]
        raise CheckpointError(
            f"{path}: sha256 {_verified[key][:16]}... does not match {what} ({expected[:16]}...); "
            f"the file is corrupt or a different one: fetch {url} again, or use perceptual: none"
        )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch state dict ({type(exc).__name__})") from None


# -- LPIPS -----------------------------------------------------------------------------------
# VGG16's convolutional trunk ("D" configuration of Simonyan & Zisserman 2015) laid out
# exactly as torchvision's `vgg16().features`, so its state-dict keys load unchanged.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of
    Deep Features as a Perceptual Metric", eq. 1):

        d(x, y) = sum_l 1/(H_l W_l) sum_hw || w_l * (y^_l - x^_l) ||^2

    where x^_l are VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3,
    unit-normalised over channels, and w_l the learned per-channel weights (1x1 convs).
    Frozen: it only passes gradients to its inputs.
    """

    taps = (3, 8, 15, 22, 29)
    """Indices of the relu{1_2,2_2,3_3,4_3,5_3} layers in torchvision's vgg16().features."""
    channels = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        # LPIPS' ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.channels)
        self.requires_grad_(False).eval()

    def load_weights(self, vgg_state: dict, lin_state: dict) -> None:
        """Load torchvision's VGG16 state dict and the LPIPS v0.1 `lin{i}.model.1.weight`s."""
        features = {k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")}
        self.features.load_state_dict(features)
        for i, lin in enumerate(self.lins):
            lin.weight.copy_(lin_state[f"lin{i}.model.1.weight"])

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen (no dropout, no statistics)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """B distances between images x and y in [-1, 1]."""
        h = (torch.cat([x, y]) - self.shift) / self.scale
        d = x.new_zeros(x.shape[0])
        lin_iter = iter(self.lins)
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                hx, hy = h.chunk(2)
                # Eps as in the reference implementation: keeps zero activations finite.
                nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = d + next(lin_iter)((nx - ny).pow(2)).mean(dim=(1, 2, 3))
        return d


def load_lpips(weights: str | os.PathLike | None = None) -> LPIPS:
    """An LPIPS-VGG module from local, checksum-verified files (see `find_lpips_file`)."""
    vgg_path = find_lpips_file(VGG16_FILE, weights)
    lin_path = find_lpips_file(LPIPS_FILE, weights)
    model = LPIPS()
    try:
        with torch.no_grad():
            model.load_weights(_torch_load(vgg_path), _torch_load(lin_path))
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{lin_path.parent}: LPIPS files do not hold the expected tensors ({str(exc).splitlines()[0][:120]})"
        ) from None
    return model


# -- PatchGAN discriminator ------------------------------------------------------------------
def group_count(channels: int) -> int:
    """GroupNorm groups: 32 as usual, or the largest power of two dividing `channels`."""
    return math.gcd(32, channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, "pix2pix", sec. 3.2.2), VQGAN's patch-based D (sec. 3.1).

    n_layers stride-2 4x4 convolutions, then two stride-1 ones: a grid of real/fake logits,
    one per overlapping patch. Needs images of at least `min_size()` pixels a side.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        self.n_layers = n_layers

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(group_count(c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                norm_layer(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        # DCGAN init (Radford et al. 2016), as pix2pix and VQGAN use.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        # Each stride-2 conv halves, each of the two 4x4 stride-1 convs removes one pixel.
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each LeakyReLU, then the logits (for feature matching)."""
        out = []
        for layer in self.main:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return [*out, x]


# -- GAN objectives --------------------------------------------------------------------------
def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss, averaged over real and fake halves."""
    if kind == "hinge":  # Lim & Ye 2017, "Geometric GAN"
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non-saturating":  # Goodfellow et al. 2014, eq. 1 with D = sigmoid(logits)
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"disc_loss must be 'hinge' or 'non-saturating', got {kind!r}")


def generator_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (decoder's) adversarial loss L_GAN."""
    if kind == "hinge":  # Lim & Ye 2017
        return -logits_fake.mean()
    if kind == "non-saturating":  # Goodfellow et al. 2014, sec. 3: maximise log D(G(z))
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"disc_loss must be 'hinge' or 'non-saturating', got {kind!r}")


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, delta: float = 1e-4, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN eq. 7: lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta), detached.

    GL is the decoder's last layer; the graph is retained for the real backward pass.
    """
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0.0, max_weight).detach()


def gan_ramp(step: int, disc_start: int, disc_warmup: int) -> float:
    """Factor on the generator's GAN term: 0 before disc_start, then linear up to 1 over
    disc_warmup steps. Switching the full adversarial term on at once can wreck
    reconstructions while the fresh discriminator is still random; ramping it in is the
    usual remedy."""
    if step < disc_start:
        return 0.0
    if disc_warmup <= 0:
        return 1.0
    return min(1.0, (step - disc_start + 1) / disc_warmup)
