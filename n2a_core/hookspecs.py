"""The pluggy markers and hook specifications of n2a.

Every hook receives a `register` callback (simonw/llm style) and calls it once per
component: ``register(MySpec, MyClass)`` (the name is MySpec's `type` literal), or
``register(name, MySpec, factory, description=None)`` when the factory needs the build
context (see `n2a_core.plugins.Registrar`). One hook per component kind keeps plugin
modules readable; all of them feed the same `Registry`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("n2a")
hookimpl = pluggy.HookimplMarker("n2a")


@hookspec
def register_autoencoders(register):
    """Register first-stage autoencoders (images <-> latents)."""


@hookspec
def register_denoisers(register):
    """Register denoising networks (z_t, t, cond -> prediction)."""


@hookspec
def register_schedules(register):
    """Register noise schedules (alpha_bar, betas, log-SNR)."""


@hookspec
def register_conditioners(register):
    """Register conditioners (label or caption -> embedding)."""


@hookspec
def register_samplers(register):
    """Register samplers (noise -> latents)."""


@hookspec
def register_data_sources(register):
    """Register data sources (yield images with optional label and caption)."""
