"""The six component kinds: the run-spec field, hook and interface each one maps to.

This table is the single place that knows the kinds; the registry, the run spec and the
CLI all iterate over it, so adding a kind is one line here plus its interface.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    """Field of the run spec and the `--kind` value of `n2a list-plugins`."""
    hook: str
    """The hookspec in `n2a_core.hookspecs` that plugins implement to register it."""
    interface: str
    """Dotted path of the interface class the factory must return."""
    default: str | None
    """The plugin used when a run spec leaves the field out (None: optional, off)."""


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("autoencoder", "register_autoencoders", "n2a_core.autoencoder:Autoencoder", "vqgan"),
        Kind("denoiser", "register_denoisers", "n2a_core.denoiser:Denoiser", "unet"),
        Kind("schedule", "register_schedules", "n2a_core.schedule:NoiseSchedule", "cosine"),
        Kind("conditioner", "register_conditioners", "n2a_core.conditioner:Conditioner", None),
        Kind("sampler", "register_samplers", "n2a_core.sampler:Sampler", "ddim"),
        Kind("data", "register_data_sources", "n2a_core.data_source:DataSource", "openmoji"),
    )
}
