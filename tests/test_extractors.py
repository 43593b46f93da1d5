"""Feature extractors (kind `extractor`) and the metrics on real features: the offline
random-conv network, the FID Inception graph with random weights, and degraded images
scoring worse than clean ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from n2a_core.component import BuildContext
from n2a_core.errors import CheckpointError
from n2a_core.evaluation.features import FeatureExtractor, extract_features
from n2a_core.evaluation.metrics import Gaussian, frechet_distance, kernel_inception_distance, precision_recall
from n2a_core.plugins import get_registry


def shapes(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """n images of one random-coloured ellipse or box on white, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        x1, y1 = x0 + w, y0 + h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour, outline="black")
        out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def blur(x: torch.Tensor) -> torch.Tensor:
    """Two passes of a 5 x 5 binomial filter (a Gaussian of sigma about 1.4 px)."""
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256).expand(3, 1, 5, 5)
    for _ in range(2):
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    return x


def noisy(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)


def build(name: str, **params) -> FeatureExtractor:
    registry = get_registry()
    return registry.build("extractor", registry.validate_spec("extractor", {"type": name, **params}), BuildContext())


def features(extractor, images):
    return extract_features(extractor, images.split(32))


def test_random_conv_is_the_same_network_on_every_build_and_depends_on_its_seed():
    images = shapes(4, seed=0)
    a, b = features(build("random-conv"), images), features(build("random-conv"), images)
    other = features(build("random-conv", seed=1), images)
    assert a.shape == (4, build("random-conv").dim) == (4, 2 * (32 + 64 + 128 + 256))
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)


@pytest.mark.parametrize("degrade", [blur, noisy], ids=["blurred", "noisy"])
def test_degraded_images_score_worse_than_the_images_themselves(degrade):
    extractor = build("random-conv")
    real, clean = shapes(96, seed=1), shapes(96, seed=2)  # two draws of one distribution
    real_f, clean_f = features(extractor, real), features(extractor, clean)
    degraded_f = features(extractor, degrade(clean))
    reference = Gaussian.fit(real_f)
    fd_clean = frechet_distance(reference, Gaussian.fit(clean_f))
    fd_degraded = frechet_distance(reference, Gaussian.fit(degraded_f))
    kid_clean = kernel_inception_distance(real_f, clean_f, subsets=20, subset_size=64)
    kid_degraded = kernel_inception_distance(real_f, degraded_f, subsets=20, subset_size=64)
    assert fd_degraded > 1.5 * fd_clean
    assert kid_degraded.mean - kid_clean.mean > 5 * (kid_degraded.standard_error + kid_clean.standard_error)
    assert abs(kid_clean.mean) < 4 * kid_clean.standard_error
    # Noise moves images off the real manifold (precision falls); blur shrinks the variety
    # of the set (recall falls). Either way the weaker of the two drops.
    clean_pr, degraded_pr = precision_recall(real_f, clean_f), precision_recall(real_f, degraded_f)
    assert min(degraded_pr.precision, degraded_pr.recall) < min(clean_pr.precision, clean_pr.recall) - 0.2


def test_extractor_kind_is_a_run_spec_field_with_an_offline_default():
    from n2a_core.specs import load_run_spec

    assert load_run_spec().extractor.type == "random-conv"
    assert load_run_spec(plugins={"extractor": "inception"}).extractor.type == "inception"


# -- inception --------------------------------------------------------------------------
def test_tf_average_pool_leaves_padding_out_of_the_mean():
    from n2a_plugins.extractors.inception import tf_avg_pool

    ones = torch.ones(1, 1, 4, 4)
    assert torch.equal(tf_avg_pool(ones), ones)  # torch's default would give 4/9 in a corner
    assert F.avg_pool2d(ones, 3, 1, 1)[0, 0, 0, 0] == pytest.approx(4 / 9)


def test_inception_has_the_layout_of_pytorch_fid_weights():
    # pytorch-fid's file loads strictly into torchvision's Inception3 with 1008 classes and no
    # auxiliary head; our graph must have exactly those tensors.
    from torchvision.models.inception import Inception3

    from n2a_plugins.extractors.inception import fid_inception_v3

    ours = {k: v.shape for k, v in fid_inception_v3().state_dict().items()}
    torchvision_net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    reference = {k: v.shape for k, v in torchvision_net.state_dict().items()}
    assert ours == reference
    assert ours["fc.weight"] == (1008, 2048)


def test_inception_loads_a_weights_file_and_gives_2048_features(tmp_path):
    from n2a_plugins.extractors.inception import InceptionExtractor, fid_inception_v3

    torch.manual_seed(0)
    net = fid_inception_v3()
    for module in net.modules():  # random weights that keep activations finite
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    net.eval()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    loaded = build("inception", weights=str(path))
    images = shapes(2, seed=3)
    got = features(loaded, images)
    assert got.shape == (2, 2048) and torch.isfinite(got).all()
    assert torch.allclose(got, features(InceptionExtractor(net), images), atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_inception_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match="pt_inception-2015-12-05-6726825d.pth not found in") as info:
        build("inception")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="extractor.weights: .*missing.pth not found"):
        build("inception", weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not pytorch-fid's Inception weights"):
        build("inception", weights=str(bad))
