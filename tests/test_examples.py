"""Every example spec, preset and benchmark spec validates, and its pipeline assembles at a tiny size."""

from pathlib import Path

import pytest

from n2a_core.components import build_components
from n2a_core.presets import preset_names, preset_path
from n2a_core.specs import load_run_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BENCHMARK_SPECS = sorted((ROOT / "benchmarks" / "specs").glob("*.yaml"))

# Shrink the models, keep every plugin choice and every structural option of the file.
TINY = ["autoencoder.base_channels=8", "denoiser.base_channels=16", "denoiser.num_heads=2",
        "denoiser.norm_groups=8"]


def spec_files():
    return sorted({*EXAMPLES, *BENCHMARK_SPECS, *(preset_path(n) for n in preset_names())})


def test_presets_are_the_quickstart_and_the_examples():
    """`--preset` offers the paper setups from the package itself, so a wheel has them too."""
    assert preset_names() == sorted({"quickstart", *(p.stem for p in EXAMPLES)})
    assert preset_path("wikiart-style") == ROOT / "n2a_core" / "presets" / "wikiart-style.yaml"
    assert preset_path("quickstart").parent.name == "presets"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_each_example_is_its_packaged_preset(example):
    """examples/ is for readers; the files the package ships must not drift from it."""
    assert example.read_bytes() == preset_path(example.stem).read_bytes()


def test_there_are_examples_for_the_papers_setups():
    names = {p.name for p in EXAMPLES}
    assert {"wikiart-style.yaml", "laion-art-minilm.yaml", "openmoji-clip.yaml"} <= names


@pytest.mark.parametrize("path", spec_files(), ids=lambda p: p.name)
def test_example_spec_assembles(path):
    overrides = list(TINY)
    spec = load_run_spec(path)
    if spec.conditioner is not None and spec.conditioner.type == "clip":
        overrides.append("conditioner.pretrained=null")  # no CLIP weights offline: random init
    if hasattr(spec.autoencoder, "codebook_size"):
        overrides.append("autoencoder.codebook_size=16")
    spec = load_run_spec(path, overrides=overrides)
    vocabulary = ["impressionism", "cubism", "baroque"]
    # training=False: the LPIPS weights the paper setups train with are not on this machine
    # (their error is tested in test_vqgan); everything else is built as for training.
    pipeline = build_components(spec, vocabulary=vocabulary, training=False)
    assert pipeline.denoiser.in_channels == pipeline.autoencoder.latent_channels
    if spec.conditioner is not None:
        assert pipeline.denoiser.conditioning.dim == pipeline.conditioner.dim


def test_wikiart_example_is_the_papers_setup():
    spec = load_run_spec(ROOT / "examples" / "wikiart-style.yaml")
    assert spec.data.path == "huggan/wikiart" and spec.data.image_size == 256
    assert len(spec.autoencoder.channel_mult) == 4 and spec.autoencoder.z_channels == 4  # f=8, n_z=4
    assert spec.schedule.type == "linear" and spec.schedule.num_timesteps == 1000
    assert spec.conditioner.type == "class-label" and spec.training.p_uncond == 0.1


def test_laion_example_keeps_the_papers_filters():
    spec = load_run_spec(ROOT / "examples" / "laion-art-minilm.yaml")
    assert set(spec.data.filters) == {"pwatermark < 0.8", "punsafe < 0.5"}
    assert spec.conditioner.type == "minilm"


def test_plugin_template_registers_and_passes_its_own_test(monkeypatch):
    import importlib

    from n2a_core.plugins import PluginSource, load_plugins

    template = ROOT / "examples" / "plugin-template"
    monkeypatch.syspath_prepend(str(template))
    monkeypatch.syspath_prepend(str(template / "tests"))
    module = importlib.import_module("n2a_euler_sampler")
    registry = load_plugins([(module, PluginSource("euler", "n2a-euler-sampler", "0.1.0"))], entry_points=False)
    assert registry.names("sampler") == ["euler"]
    sampler = registry.build("sampler", registry.validate_spec("sampler", {"type": "euler", "steps": 5}))
    assert sampler.steps == 5
    importlib.import_module("test_euler").test_euler_reproduces_gaussian_data()
    importlib.import_module("test_euler").test_euler_gets_img2img_and_inpainting_from_the_core()
