"""n2a core: the plugin API, the registry, specs, and the machinery that trains and samples.

Plugins import only from here (`from n2a_core import ...`, the names in `__all__`)::

    from n2a_core import ComponentSpec, NoiseSchedule, hookimpl

    @hookimpl
    def register_schedules(register):
        register(SigmoidScheduleSpec, SigmoidSchedule)  # name from the spec's `type` literal

Map of the package (each module's docstring says more):

  the eight interfaces a plugin implements
    autoencoder    Autoencoder: images <-> scaled latents, its own training losses
    denoiser       Denoiser: (z_t, t, condition) -> epsilon, v or z0 prediction
    schedule       NoiseSchedule: alpha_bar, betas, log-SNR, add_noise
    conditioner    Conditioner: labels or captions -> embeddings, a null embedding
    sampler        Sampler and the Chain the core sets up for it: timesteps, start, guidance,
                   inpainting, noise (a sampler writes only its update rule)
    data_source    DataSource: Records listed cheaply, Samples decoded on demand
    evaluation.features  FeatureExtractor: images -> feature vectors for the generator metrics
    tracking       Tracker: a run's scalars and grids (and the always-on jsonl tracker, the fan-out)
  plugins and specs
    hookspecs      the `register_*` hooks and `hookimpl`
    kinds          the eight kinds: spec field, hook and interface of each
    plugins        plugin loading and the Registry; `register(Spec, Class)`
    component      ComponentSpec (every plugin spec's base) and BuildContext
    specs          the run spec: training sections, loading, `--set` overrides
    spec_errors    pydantic errors as one line per problem
    presets        the paper presets (`--preset`)
    errors         N2AError and its kinds, did-you-mean
  using the components
    pipeline       Pipeline: a trained model (run, export or Hub id) called for images
    components     the components of a run built from its spec and checked together; RunDir
    diffusion_model the trainable part of stage 2 (denoiser + trainable conditioner)
    checkpoint     safetensors checkpoints and weights, written by training, read by generation;
                   validated metadata, fallback past a damaged one
    generate       `n2a sample`: load a run, sample, write PNGs (needs nothing from training)
    images         image decoding, the image transform, grids
    export         `n2a export`: the Hub-ready folder, and loading it
    export_diffusers  `n2a export --format diffusers`
    model_card     README.md with Hub front matter, licence from the data
    evaluation/    `n2a eval`: FD, KID, precision/recall on extractor features (metrics, generator)
    report         `n2a report`: RUN/report.html, one static page
    safe_files     what concurrent processes and kill -9 cannot break: the run lock,
                   atomic writes, exclusive names
    device, layout, progress   small shared helpers
  training/        everything `n2a train` runs (see n2a_core.training): the two stages,
                   the loop, batching, latent cache, distributed training, evaluation
"""

import importlib
from typing import TYPE_CHECKING

# The names below load on first use (PEP 562), so `import n2a_core.kinds` or `n2a --help` does
# not import torch. Type checkers and IDEs read the same imports here; tests/test_layering.py
# keeps this block, _EXPORTS and __all__ the same.
if TYPE_CHECKING:
    from n2a_core.autoencoder import Autoencoder, AutoencoderLosses
    from n2a_core.component import BuildContext, ComponentSpec
    from n2a_core.conditioner import Conditioner
    from n2a_core.data_source import DataSource, DataSourceSpec, Record, Sample
    from n2a_core.denoiser import Conditioning, Denoiser, PredictionType
    from n2a_core.errors import CheckpointError, DataError, N2AError, PluginError, SpecError, did_you_mean
    from n2a_core.evaluation.features import FeatureExtractor
    from n2a_core.hookspecs import hookimpl
    from n2a_core.images import open_image
    from n2a_core.layout import preferred_layout, prefers_channels_last
    from n2a_core.pipeline import Pipeline
    from n2a_core.plugins import get_registry, load_plugins
    from n2a_core.sampler import (
        EPSILON_MIN_LOG_SNR,
        Chain,
        Generators,
        NoiseBetween,
        Sampler,
        SamplerSpec,
        StepCallback,
        TimestepSpacing,
        guided_prediction,
        randn,
        sampling_timesteps,
        slerp,
        spaced_timesteps,
        to_epsilon_and_x0,
        usable_timesteps,
    )
    from n2a_core.schedule import NoiseSchedule, betas_from_alpha_bar
    from n2a_core.specs import load_run_spec
    from n2a_core.tracking import JsonlSpec, JsonlTracker, Tracker

_EXPORTS = {
    "n2a_core.autoencoder": ["Autoencoder", "AutoencoderLosses"],
    "n2a_core.component": ["BuildContext", "ComponentSpec"],
    "n2a_core.conditioner": ["Conditioner"],
    "n2a_core.data_source": ["DataSource", "DataSourceSpec", "Record", "Sample"],
    "n2a_core.denoiser": ["Conditioning", "Denoiser", "PredictionType"],
    "n2a_core.errors": ["CheckpointError", "DataError", "N2AError", "PluginError", "SpecError", "did_you_mean"],
    "n2a_core.evaluation.features": ["FeatureExtractor"],
    "n2a_core.hookspecs": ["hookimpl"],
    "n2a_core.images": ["open_image"],
    "n2a_core.layout": ["preferred_layout", "prefers_channels_last"],
    "n2a_core.pipeline": ["Pipeline"],
    "n2a_core.plugins": ["get_registry", "load_plugins"],
    "n2a_core.sampler": ["EPSILON_MIN_LOG_SNR", "Chain", "Generators", "NoiseBetween", "Sampler", "SamplerSpec",
                         "StepCallback", "TimestepSpacing", "guided_prediction", "randn", "sampling_timesteps", "slerp",
                         "spaced_timesteps", "to_epsilon_and_x0", "usable_timesteps"],
    "n2a_core.schedule": ["NoiseSchedule", "betas_from_alpha_bar"],
    "n2a_core.specs": ["load_run_spec"],
    "n2a_core.tracking": ["JsonlSpec", "JsonlTracker", "Tracker"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    # writing a plugin
    "hookimpl", "ComponentSpec", "BuildContext",
    # the eight interfaces and what they exchange
    "Autoencoder", "AutoencoderLosses",
    "Denoiser", "Conditioning", "PredictionType",
    "NoiseSchedule", "betas_from_alpha_bar",
    "Conditioner",
    "Sampler", "SamplerSpec", "Chain", "Generators", "NoiseBetween", "StepCallback", "TimestepSpacing",
    "EPSILON_MIN_LOG_SNR", "sampling_timesteps", "spaced_timesteps", "usable_timesteps", "randn", "slerp",
    "guided_prediction", "to_epsilon_and_x0",
    "DataSource", "DataSourceSpec", "Record", "Sample", "open_image",
    "FeatureExtractor",
    "Tracker", "JsonlSpec", "JsonlTracker",
    # errors a plugin raises (one line each, shown by the CLI)
    "N2AError", "SpecError", "PluginError", "DataError", "CheckpointError", "did_you_mean",
    # tensor layout helpers
    "preferred_layout", "prefers_channels_last",
    # using n2a from Python
    "Pipeline", "load_plugins", "get_registry", "load_run_spec",
]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'n2a_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
