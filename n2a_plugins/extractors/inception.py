"""`inception`: the Inception-v3 network of FID papers (pool3 features, 2048-d).

FID and KID in papers are computed with the TensorFlow Inception graph of 2015-12-05
(Heusel et al. 2017's reference code); pytorch-fid ported its weights to PyTorch as
`pt_inception-2015-12-05-6726825d.pth`. That graph differs from torchvision's Inception-v3
in four blocks: TensorFlow's average pools leave padding out of the mean
(`count_include_pad=False`), and the last block pools with max instead of average. This
module rebuilds exactly that network on torchvision's blocks, so that a state dict in
pytorch-fid's format loads strictly and the features match theirs.

Nothing is downloaded: the weights come from `weights` or from torch's hub cache (where
pytorch-fid puts them); when absent, one line says which file to fetch and where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from n2a_core import CheckpointError, ComponentSpec, FeatureExtractor

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 'SAME' average pool: padded zeros are not counted in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class TFInceptionA(InceptionA):
    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(tf_avg_pool(x))]


class TFInceptionC(InceptionC):
    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(tf_avg_pool(x))]


class TFInceptionE(InceptionE):
    def __init__(self, in_channels: int, pool=tf_avg_pool):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))]


def fid_inception_v3() -> Inception3:
    """The FID Inception graph with uninitialised (random) weights: torchvision's layout
    with 1008 classes and no auxiliary head, four blocks swapped for their TF variants."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = TFInceptionA(192, pool_features=32)
    net.Mixed_5c = TFInceptionA(256, pool_features=64)
    net.Mixed_5d = TFInceptionA(288, pool_features=64)
    net.Mixed_6b = TFInceptionC(768, channels_7x7=128)
    net.Mixed_6c = TFInceptionC(768, channels_7x7=160)
    net.Mixed_6d = TFInceptionC(768, channels_7x7=160)
    net.Mixed_6e = TFInceptionC(768, channels_7x7=192)
    net.Mixed_7b = TFInceptionE(1280)
    net.Mixed_7c = TFInceptionE(2048, pool=max_pool)  # the TF graph's quirk: max, not average
    return net


class InceptionSpec(ComponentSpec):
    type: Literal["inception"] = "inception"
    weights: str | None = None
    """Path of pt_inception-2015-12-05-6726825d.pth (None: torch's hub cache,
    $TORCH_HOME/hub/checkpoints/, where pytorch-fid stores it)."""


class InceptionExtractor(FeatureExtractor):
    """Pool3 features: images resized to 299 x 299 (bilinear), up to the global average pool."""

    dim = 2048

    def __init__(self, net: Inception3 | None = None):
        super().__init__()
        self.net = net or fid_inception_v3()
        self.net.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # pytorch-fid resizes [0, 1] images then maps them to [-1, 1]; both steps are linear,
        # so resizing our [-1, 1] images gives the same input.
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return x.mean((2, 3))


def weights_path(given: str | None) -> Path:
    """The weights file, or a CheckpointError naming the file and where to put it."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise CheckpointError(f"extractor.weights: {path} not found; download {WEIGHTS_URL} there "
                                  "or use --extractor random-conv (offline)")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"extractor inception: {WEIGHTS_FILE} not found in {path.parent}; download "
                              f"{WEIGHTS_URL} there or pass --set extractor.weights=PATH "
                              "(or use --extractor random-conv, offline)")
    return path


def build_inception(spec: InceptionSpec, ctx) -> InceptionExtractor:
    path = weights_path(spec.weights)
    net = fid_inception_v3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # a truncated download, another network's weights
        reason = str(exc).splitlines()[0][:160]
        raise CheckpointError(f"{path}: not pytorch-fid's Inception weights ({reason})") from None
    return InceptionExtractor(net).to(ctx.device)



