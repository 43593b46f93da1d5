"""Experiment trackers: where a run's scalars and image grids go while it trains.

A `Tracker` is a plugin (kind `tracker`, listed under `trackers: [...]` in the run spec or
given with `--tracker NAME`). The training loop and the grid writer hand everything to
one `Trackers` fan-out, which passes it to each tracker; only rank 0 has any. `jsonl`
(RUN/<stage>/metrics.jsonl, which `n2a report` reads) is always on, whatever the spec
lists, so it lives here in the core rather than behind a plugin that could be left out.

Stages log on their own step axes: a metric `loss/model` of stage `diffusion` at step s
is `diffusion/loss/model` at s in TensorBoard and W&B.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from n2a_core import strict_json
from n2a_core.component import BuildContext, ComponentSpec


class Tracker(ABC):
    """Receives a run's scalars and images (on rank 0 only)."""

    @abstractmethod
    def log_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """Scalars of `stage` ('autoencoder', 'diffusion') at optimizer step `step`."""

    def log_image(self, stage: str, tag: str, step: int, image: Image.Image) -> None:
        """An image grid ('samples', 'recon') of `stage` at `step`."""

    def close(self) -> None:
        """Flush and release files; called once at the end of a command."""


class JsonlSpec(ComponentSpec):
    type: Literal["jsonl"] = "jsonl"


class JsonlTracker(Tracker):
    """One JSON object per logged step in <root>/<stage>/metrics.jsonl (or, with
    `per_stage=False`, in <root>/metrics.jsonl)."""

    def __init__(self, root: Path, per_stage: bool = True):
        self.root, self.per_stage = Path(root), per_stage

    def log_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        folder = self.root / stage if self.per_stage else self.root
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.jsonl", "a") as fh:
            fh.write(strict_json.dumps({"step": step, **{k: v for k, v in metrics.items() if k != "step"}}) + "\n")


class Trackers:
    """The fan-out the training code talks to: every call goes to each tracker."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    def log_metrics(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(stage, step, metrics)

    def log_image(self, stage: str, tag: str, step: int, image: Image.Image) -> None:
        for tracker in self.trackers:
            tracker.log_image(stage, tag, step, image)

    def close(self) -> None:
        """Close every tracker once (a second call does nothing)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


def build_trackers(specs: list[ComponentSpec], run_dir: Path, registry, *, is_main: bool = True) -> Trackers:
    """The run's trackers: jsonl first (always), then those of `specs`, built from the
    registry; none at all on ranks other than 0."""
    if not is_main:
        return Trackers()
    context = BuildContext(run_dir=Path(run_dir))
    built: list[Tracker] = [JsonlTracker(run_dir)]
    built += [registry.build("tracker", spec, context) for spec in specs if spec.type != "jsonl"]
    return Trackers(built)
