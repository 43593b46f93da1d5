"""`n2a export`: a trained run as a self-contained, Hub-ready folder with only what sampling needs.

    DIR/README.md          model card (Hub front matter; licence of the training data)
    DIR/model.safetensors  EMA weights: `autoencoder.*` (no training-only parts such as the
                           discriminator) and `diffusion.*` (the denoiser and a trainable
                           conditioner); metadata: format, step, dtype, spec digest, licence
    DIR/spec.yaml          the run's resolved spec
    DIR/labels.json        the label vocabulary (when the data has labels)
    DIR/grid.png           samples drawn from the exported weights themselves

A run folder also holds optimizer state, non-EMA weights, older checkpoints, the
discriminator and the latent cache; none of that is needed to draw. Frozen conditioners
(MiniLM, CLIP) are not copied: they come with their own packages.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from n2a_core.checkpoint import load_weights, save_weights
from n2a_core.components import RunDir, build_components
from n2a_core.device import resolve_device
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import CheckpointError, SpecError
from n2a_core.generate import LoadedRun, generate, load_run
from n2a_core.images import make_grid_image
from n2a_core.model_card import CardFacts, write_model_card
from n2a_core.specs import resolve_run_spec

FORMAT = "n2a-export/1"
WEIGHTS = "model.safetensors"
GRID = "grid.png"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRID_SEEDS = 4


def is_exported(root: Path) -> bool:
    return (Path(root) / WEIGHTS).is_file() and (Path(root) / "spec.yaml").is_file()


def inference_state(autoencoder) -> dict[str, torch.Tensor]:
    """The autoencoder's state without the sub-modules only training needs."""
    skip = tuple(f"{name}." for name in autoencoder.inference_modules())
    return {k: v for k, v in autoencoder.state_dict().items() if not k.startswith(skip)}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Scalars (the latent scale) stay float32: they are a few bytes and fp16 would round them.
    return {k: v.to(dtype) if v.is_floating_point() and v.ndim > 0 else v for k, v in tensors.items()}


def folder_size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class ExportReport:
    out: Path
    run_bytes: int
    export_bytes: int

    def summary(self) -> str:
        mb = 1024 * 1024
        return (f"{self.out}: {self.export_bytes / mb:.1f} MB, {self.run_bytes / max(self.export_bytes, 1):.1f}x "
                f"smaller than the run ({self.run_bytes / mb:.1f} MB)")


def load_for_export(run_root: Path, out: Path, dtype: str, device: str) -> LoadedRun:
    """The run to export, once the options are checked (both formats: a fresh --out, a dtype)."""
    if dtype not in DTYPES:
        raise SpecError(f"--dtype: {dtype!r}; use one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"--out: {out} already exists and is not an empty folder; choose a new one")
    if is_exported(run_root):
        raise SpecError(f"{run_root}: already an exported folder; export the run folder made by `n2a train`")
    return load_run(run_root, device=device)


def export_run(run_root: Path, out: Path, *, dtype: str = "fp32", device: str = "cpu") -> ExportReport:
    """Write the export folder of a trained run (into a temporary folder, renamed at the end)."""
    run_root, out = Path(run_root), Path(out)
    loaded = load_for_export(run_root, out, dtype, device)
    spec = loaded.spec.model_copy(update={"autoencoder_weights": None})  # the weights travel in WEIGHTS
    license_id = spec.data.data_license() or "unknown"
    tensors = {**{f"autoencoder.{k}": v for k, v in inference_state(loaded.components.autoencoder).items()},
               **{f"diffusion.{k}": v for k, v in loaded.model.state_dict().items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_weights(tmp / WEIGHTS, _cast(tensors, DTYPES[dtype]),
                     {"format": FORMAT, "step": str(loaded.step), "dtype": dtype, "spec_digest": spec.digest(),
                      "license": license_id})
        run = RunDir(tmp)
        run.write_spec(spec)
        run.write_labels(RunDir(run_root).read_labels())
        exported = load_exported(tmp, device=device)  # what a user will load, rounding included
        write_grid(exported, tmp / GRID)
        facts = CardFacts.from_run(run_root, spec, GRID, files=[WEIGHTS, "spec.yaml", GRID]
                                   + (["labels.json"] if run.labels_file.is_file() else []))
        facts.name = out.name
        write_model_card(tmp, facts)
        if out.exists():
            out.rmdir()
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out, folder_size(run_root), folder_size(out))


def showcase_conditions(loaded: LoadedRun, count: int = 8) -> list[str]:
    """The spec's preview captions or labels, else its first labels, else unconditional."""
    conditioner, training = loaded.conditioner, loaded.spec.training
    if conditioner is None:
        return [""]
    if conditioner.field == "caption":
        return list(training.preview_captions)[:count] or [""]
    return list(training.preview_labels or getattr(conditioner, "labels", None) or [])[:count] or [""]


def write_grid(loaded: LoadedRun, path: Path) -> Path:
    """A row of GRID_SEEDS seeds for each showcase condition, at the spec's preview guidance."""
    conditions = [c for c in showcase_conditions(loaded) for _ in range(GRID_SEEDS)]
    seeds = list(range(GRID_SEEDS)) * (len(conditions) // GRID_SEEDS)
    guidance = loaded.spec.training.preview_guidance if any(conditions) else 0.0
    images = generate(loaded, conditions, seeds, guidance=guidance)
    captions = [c or f"seed {s}" for c, s in zip(conditions, seeds, strict=True)]
    make_grid_image(images, nrow=GRID_SEEDS, captions=captions).save(path)
    return path


def load_exported(root: Path, *, device: str = "auto") -> LoadedRun:
    """Build the components of an exported folder and load its weights (in float32)."""
    run = RunDir(root)
    spec = resolve_run_spec(run.read_spec_data())
    device_ = resolve_device(device if device != "auto" else spec.device)
    components = build_components(spec, vocabulary=run.read_labels(), device=device_, training=False)
    tensors = load_weights(root / WEIGHTS)
    groups: dict[str, dict[str, torch.Tensor]] = {"autoencoder": {}, "diffusion": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = value.float() if value.is_floating_point() else value
    model = DiffusionModel(components.denoiser, components.conditioner)
    expected_ae = set(inference_state(components.autoencoder))
    try:
        if set(groups["autoencoder"]) != expected_ae:
            missing = sorted(expected_ae - set(groups["autoencoder"]))[:3]
            raise RuntimeError(f"autoencoder keys differ (missing {missing})")
        components.autoencoder.load_state_dict(groups["autoencoder"], strict=False)
        model.load_state_dict(groups["diffusion"])
    except RuntimeError as exc:
        raise CheckpointError(f"{root / WEIGHTS}: weights do not fit the folder's spec.yaml "
                              f"({str(exc).splitlines()[0]})") from None
    for module in (components.autoencoder, model, components.conditioner):
        if module is not None:
            module.to(device_).eval()
    with safe_open(str(root / WEIGHTS), "pt") as f:
        step = int((f.metadata() or {}).get("step", 0))
    return LoadedRun(run, spec, components, model, device_, step)
