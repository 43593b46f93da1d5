"""Built-in experiment trackers: jsonl (always on), TensorBoard and Weights & Biases."""

from n2a_core import JsonlSpec, JsonlTracker, hookimpl
from n2a_plugins.trackers.tensorboard import TensorBoardSpec, build_tensorboard
from n2a_plugins.trackers.wandb_tracker import WandbSpec, build_wandb


@hookimpl
def register_trackers(register):
    register("jsonl", JsonlSpec, lambda spec, ctx: JsonlTracker(ctx.run_dir),
             "RUN/<stage>/metrics.jsonl, one JSON object per logged step (always on)")
    register("tensorboard", TensorBoardSpec, build_tensorboard,
             "TensorBoard event files: scalars and sample/reconstruction grids (optional extra: tensorboard)")
    register("wandb", WandbSpec, build_wandb,
             "Weights & Biases run, offline by default; WANDB_MODE respected (optional extra: wandb)")
