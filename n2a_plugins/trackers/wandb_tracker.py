"""`wandb`: a Weights & Biases run, offline unless asked otherwise.

The run lives in RUN/wandb/ (offline runs can be uploaded later with `wandb sync`). Its
id is kept in RUN/wandb/n2a-run-id, so training, a resume and a later `n2a eval` all log
to the same W&B run. WANDB_MODE, when set, wins over the spec's `mode`, as W&B users
expect. Each stage has its own step axis (`diffusion/step`), since both stages count
their steps from zero.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Literal

from n2a_core import ComponentSpec, PluginError, Tracker


class WandbSpec(ComponentSpec):
    type: Literal["wandb"] = "wandb"
    project: str = "n2a"
    entity: str | None = None
    name: str | None = None
    """Run name (None: the run folder's name)."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline needs no network or account; the WANDB_MODE environment variable overrides it."""


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, project: str = "n2a", entity: str | None = None, name: str | None = None,
                 mode: str = "offline"):
        try:
            import wandb
        except ImportError:
            raise PluginError("tracker wandb: the wandb package is not installed; pip install 'n2a[wandb]'") from None
        self.wandb = wandb
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "n2a-run-id"
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(project=project, entity=entity, name=name or Path(run_dir).resolve().name,
                              id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE") or mode, settings=wandb.Settings(silent=True))
        self.stages: set[str] = set()

    def _axis(self, stage: str) -> None:
        if stage not in self.stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)

    def log_metrics(self, stage, step, metrics):
        self._axis(stage)
        values = {f"{stage}/{k}": v for k, v in metrics.items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        self.run.log({**values, f"{stage}/step": step})

    def log_image(self, stage, tag, step, image):
        self._axis(stage)
        self.run.log({f"{stage}/{tag}": self.wandb.Image(image), f"{stage}/step": step})

    def close(self):
        self.run.finish()


def build_wandb(spec: WandbSpec, ctx) -> WandbTracker:
    return WandbTracker(Path(ctx.run_dir or "."), **spec.params())
