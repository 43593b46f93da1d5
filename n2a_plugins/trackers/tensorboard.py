"""`tensorboard`: scalars and image grids as TensorBoard event files, via torch.utils.tensorboard.

`tensorboard --logdir RUN/tensorboard` shows them; each stage's metrics sit under its
name (`diffusion/loss/model`, `autoencoder/rec_loss`), each on its own step axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from n2a_core import ComponentSpec, PluginError, Tracker


class TensorBoardSpec(ComponentSpec):
    type: Literal["tensorboard"] = "tensorboard"
    log_dir: str | None = None
    """Folder of the event files (None: RUN/tensorboard)."""
    flush_secs: int = Field(30, ge=1)
    """How often pending events are written to disk."""


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path, flush_secs: int = 30):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PluginError("tracker tensorboard: the tensorboard package is not installed; "
                              "pip install 'n2a[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs)

    def log_metrics(self, stage, step, metrics):
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{stage}/{key}", value, step)

    def log_image(self, stage, tag, step, image):
        self.writer.add_image(f"{stage}/{tag}", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self):
        self.writer.close()


def build_tensorboard(spec: TensorBoardSpec, ctx) -> TensorBoardTracker:
    log_dir = Path(spec.log_dir) if spec.log_dir else Path(ctx.run_dir or ".") / "tensorboard"
    return TensorBoardTracker(log_dir, spec.flush_secs)
