"""Built-in conditioners: a learned class-label embedding and two frozen text encoders."""

from __future__ import annotations

from n2a_core import hookimpl
from n2a_plugins.conditioners.class_label import ClassLabelConditioner, ClassLabelSpec, build_class_label
from n2a_plugins.conditioners.clip import ClipConditioner, ClipSpec
from n2a_plugins.conditioners.minilm import MiniLMConditioner, MiniLMSpec

__all__ = ["ClassLabelConditioner", "ClassLabelSpec", "ClipConditioner", "ClipSpec", "MiniLMConditioner",
           "MiniLMSpec"]


@hookimpl
def register_conditioners(register):
    register("class-label", ClassLabelSpec, build_class_label,
             "Learned embedding per class label of the data (trained with the denoiser)")
    register("minilm", MiniLMSpec, lambda spec, ctx: MiniLMConditioner(**spec.params()).to(ctx.device),
             "Frozen all-MiniLM-L6-v2 sentence embedding of the caption (384-d, normalised)")
    register("clip", ClipSpec, lambda spec, ctx: ClipConditioner(**spec.params()).to(ctx.device),
             "Frozen OpenCLIP text tower: pooled vector or token sequence of the caption")
