"""`n2a eval`: draw images from a trained generator and score them against the validation split.

The reference is the run's validation split (its training split only when validation is
empty). Generated images take their conditions from it: N records are drawn with
replacement by a seeded generator, so conditions follow the split's own distribution,
and image i has seed `seed + i`. Both sets are rounded to 8 bits, as saved PNGs are,
before features are extracted.

Scores: Fréchet distance and KID on the extractor's features, precision and recall
(k = 3), and for runs whose data has labels, the share of generated images that a k-NN
classifier (trained on the labelled training split's features) puts in the class of
the record their condition came from; its accuracy on the real validation images is
reported beside it as the ceiling the generator is measured against.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from n2a_core import strict_json
from n2a_core.component import BuildContext
from n2a_core.errors import DataError
from n2a_core.evaluation.features import FeatureExtractor, extract_features
from n2a_core.evaluation.metrics import (
    Gaussian,
    conditional_accuracy,
    frechet_distance,
    kernel_inception_distance,
    knn_classify,
    precision_recall,
)
from n2a_core.generate import LoadedRun, generate
from n2a_core.plugins import get_registry
from n2a_core.safe_files import write_atomic
from n2a_core.specs import RunSpecBase
from n2a_core.training.batching import collate_samples, make_splits

CLASSIFIER_IMAGES = 2000
"""Labelled training images the k-NN classifier of conditional accuracy is fitted on."""


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 256 levels a PNG keeps."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _items(dataset, limit: int | None = None) -> list[dict]:
    """Readable items of a dataset (map-style or streamed), at most `limit`."""
    source = iter(dataset) if isinstance(dataset, torch.utils.data.IterableDataset) else (
        dataset[i] for i in range(len(dataset)))
    items = []
    for item in source:
        if item is not None:
            items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def _batches(items: list[dict], size: int = 64):
    for start in range(0, len(items), size):
        yield quantize(collate_samples(items[start:start + size])["image"])


@dataclass
class Reference:
    """What a generator is scored against, computed once per extractor (also during training)."""

    split: str
    items: list[dict]
    features: torch.Tensor
    gaussian: Gaussian
    classifier_features: torch.Tensor | None
    classifier_labels: list[str] | None


class GeneratorEvaluator:
    """Scores generated images against a run's validation split with one feature extractor."""

    def __init__(self, spec: RunSpecBase, extractor_spec=None, *, device: torch.device | str = "cpu",
                 max_reference: int | None = None):
        registry = get_registry()
        self.extractor_spec = extractor_spec if extractor_spec is not None else spec.extractor
        self.extractor: FeatureExtractor = registry.build("extractor", self.extractor_spec, BuildContext(device=device))
        splits = make_splits(registry.build("data", spec.data, BuildContext(device=device)), spec.data)
        split, items = "val", _items(splits.val, max_reference)
        if len(items) < 2:
            split, items = "train", _items(getattr(splits.train, "without_flip", lambda: splits.train)(), max_reference)
        if len(items) < 2:
            raise DataError(f"data ({spec.data.type}): fewer than 2 readable images to score a generator against")
        features = extract_features(self.extractor, _batches(items))
        classifier_features = classifier_labels = None
        if all(item["label"] for item in items):
            train = _items(getattr(splits.train, "without_flip", lambda: splits.train)(), CLASSIFIER_IMAGES)
            labelled = [item for item in train if item["label"]]
            if len({item["label"] for item in labelled}) >= 2:
                classifier_features = extract_features(self.extractor, _batches(labelled))
                classifier_labels = [item["label"] for item in labelled]
        self.reference = Reference(split, items, features, Gaussian.fit(features), classifier_features,
                                   classifier_labels)

    def draw_conditions(self, loaded: LoadedRun, n: int, seed: int) -> tuple[list[str], list[str | None]]:
        """(conditions, target labels) of n records drawn from the reference with replacement."""
        items = self.reference.items
        picks = torch.randint(len(items), (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        conditioner = loaded.conditioner
        conditions = [items[i][conditioner.field] or "" for i in picks] if conditioner is not None else [""] * n
        return conditions, [items[i]["label"] for i in picks]

    @torch.no_grad()
    def evaluate(self, loaded: LoadedRun, *, n: int = 1000, seed: int = 0, guidance: float | None = None,
                 steps: int | None = None, batch_size: int = 64, progress=None) -> dict[str, Any]:
        """Generate n images and score them; returns the JSON-ready result (see `write_result`)."""
        start = time.perf_counter()
        guidance = loaded.spec.training.preview_guidance if guidance is None else guidance
        conditions, targets = self.draw_conditions(loaded, n, seed)
        conditioned = loaded.conditioner is not None and any(conditions)
        images = generate(loaded, conditions, [seed + i for i in range(n)],
                          guidance=guidance if conditioned else 0.0, steps=steps, batch_size=batch_size,
                          progress=progress)
        fake = extract_features(self.extractor, quantize(images).split(batch_size))
        ref = self.reference
        kid = kernel_inception_distance(ref.features, fake, seed=seed)
        pr = precision_recall(ref.features, fake, k=3) if min(len(fake), len(ref.features)) > 3 else None
        metrics: dict[str, float | None] = {
            "fd": frechet_distance(ref.gaussian, Gaussian.fit(fake)),
            "kid": kid.mean, "kid_std": kid.std, "kid_se": kid.standard_error,
            "precision": pr.precision if pr else None, "recall": pr.recall if pr else None,
        }
        if conditioned and ref.classifier_features is not None:
            metrics["conditional_accuracy"] = conditional_accuracy(
                ref.classifier_features, ref.classifier_labels, fake, targets)
            real_predicted = knn_classify(ref.classifier_features, ref.classifier_labels, ref.features)
            real_labels = [item["label"] for item in ref.items]
            hits = sum(p == t for p, t in zip(real_predicted, real_labels, strict=True))
            metrics["real_accuracy"] = hits / len(real_labels)
        sampler = loaded.spec.sampler.type if loaded.spec.sampler else None
        return {
            "step": loaded.step,
            "metrics": {k: (None if v is None or not math.isfinite(v) else v) for k, v in metrics.items()},
            "images": n, "seed": seed, "guidance": guidance if conditioned else 0.0, "sampler": sampler,
            "steps": steps or getattr(loaded.spec.sampler, "steps", None),
            "extractor": self.extractor_spec.model_dump(mode="json"),
            "reference": {"split": ref.split, "images": len(ref.items)},
            "kid_subsets": {"subsets": kid.subsets, "subset_size": kid.subset_size},
            "precision_recall_k": 3,
            "seconds": round(time.perf_counter() - start, 2),
        }


def write_result(result: dict[str, Any], eval_dir: Path) -> Path:
    """RUN/eval/step-<step>-<extractor>.json (strict JSON: no NaN or Infinity)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"step-{result['step']:08d}-{result['extractor']['type']}.json"
    write_atomic(path, strict_json.dumps(result, indent=2) + "\n")
    return path


def tracker_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The result's numbers as `eval/<name>` scalars, for metrics.jsonl and the trackers."""
    return {f"eval/{k}": v for k, v in result["metrics"].items() if v is not None}


def read_results(eval_dir: Path) -> list[dict[str, Any]]:
    """Every eval result of a run, oldest step first."""
    return [json.loads(p.read_text()) for p in sorted(eval_dir.glob("step-*.json"))]
