"""n2a core: plugin registry, specs, interfaces and the training/sampling machinery.

A plugin module writes::

    from n2a_core import ComponentSpec, hookimpl

    @hookimpl
    def register_schedules(register):
        register("sigmoid", SigmoidScheduleSpec, build_sigmoid, "Sigmoid schedule")
"""

from n2a_core.autoencoder import Autoencoder, AutoencoderLosses
from n2a_core.conditioner import Conditioner
from n2a_core.data_source import DataSource, DataSourceSpec, Sample
from n2a_core.denoiser import Conditioning, Denoiser
from n2a_core.errors import N2AError
from n2a_core.hookspecs import hookimpl
from n2a_core.plugins import get_registry, load_plugins
from n2a_core.sampler import Chain, Sampler, SamplerSpec
from n2a_core.schedule import NoiseSchedule
from n2a_core.component import BuildContext, ComponentSpec
from n2a_core.specs import load_run_spec

__all__ = [
    "Autoencoder", "AutoencoderLosses", "BuildContext", "Chain", "ComponentSpec", "Conditioner",
    "Conditioning", "DataSource", "DataSourceSpec", "Denoiser", "N2AError", "NoiseSchedule",
    "Sample", "Sampler", "SamplerSpec", "get_registry", "hookimpl", "load_plugins", "load_run_spec",
]
