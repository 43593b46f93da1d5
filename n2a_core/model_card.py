"""The model card: a README.md with the Hugging Face Hub's YAML front matter.

Written at the end of every `n2a train` (RUN/README.md) and by `n2a export`. The licence
comes from the data: a model trained on images is a derived work of them, so the data's
licence (OpenMoji: CC BY-SA 4.0) is the weights' licence, and an undeclared one is said
to be unknown rather than guessed. The front matter keys are the Hub's model-card
metadata (https://huggingface.co/docs/hub/model-cards).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from n2a_core.checkpoint import latest_checkpoint
from n2a_core.components import RunDir
from n2a_core.specs import RunSpecBase

CARD = "README.md"


def n2a_version() -> str:
    try:
        return importlib.metadata.version("n2a")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class StageRecord:
    """What a stage of a run reached: its last checkpoint step and its last logged metrics."""

    steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    first_metrics: dict[str, float] = field(default_factory=dict)


def read_stage(folder: Path, keys: tuple[str, ...]) -> StageRecord:
    """Steps and the first and last logged value of each of `keys` from a stage folder."""
    record = StageRecord()
    checkpoint = latest_checkpoint(folder / "checkpoints")
    if checkpoint is not None:
        record.steps = int(checkpoint.name.split("-")[1])
    log = folder / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            for key in keys:
                if key in row:
                    record.first_metrics.setdefault(key, row[key])
                    record.metrics[key] = row[key]
    return record


@dataclass
class CardFacts:
    """Everything a card states, gathered from a run folder (an export keeps a copy)."""

    spec: RunSpecBase
    stage1: StageRecord
    stage2: StageRecord
    grid: str | None
    """Path of the sample grid relative to the card."""
    name: str
    files: list[str] = field(default_factory=list)
    library_name: str = "n2a"
    """n2a, or diffusers for `n2a export --format diffusers`."""

    @classmethod
    def from_run(cls, root: Path, spec: RunSpecBase, grid: str | None, files: list[str] | None = None) -> CardFacts:
        run = RunDir(root)
        stage1 = read_stage(run.autoencoder, ("preview/psnr", "preview/ssim"))
        stage2 = read_stage(run.diffusion, ("val/loss",))
        return cls(spec, stage1, stage2, grid, Path(root).resolve().name, files or [])


def tags(spec: RunSpecBase) -> list[str]:
    field_ = _condition_field(spec)
    task = {"caption": "text-to-image", "label": "class-conditional-image-generation"}.get(
        field_, "unconditional-image-generation")
    return ["n2a", "latent-diffusion", "vqgan", task, f"data:{spec.data.type}"]


def _condition_field(spec: RunSpecBase) -> str | None:
    if spec.conditioner is None:
        return None
    return "label" if spec.conditioner.type == "class-label" else "caption"


def _yaml_block(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100).strip()


def render(facts: CardFacts) -> str:
    """The card's text: front matter, then what the model is, how it was trained, how to use it."""
    spec = facts.spec
    license_id = spec.data.data_license()
    front = {
        "license": license_id or "unknown",
        "library_name": facts.library_name,
        # The Hub has no class-conditional task; the unconditional one is the closest.
        "pipeline_tag": "text-to-image" if _condition_field(spec) == "caption" else "unconditional-image-generation",
        "tags": tags(spec),
    }
    if getattr(spec.data, "path", None) and spec.data.type == "hf":
        front["datasets"] = [spec.data.path]
    field_ = _condition_field(spec)
    conditioner = spec.conditioner.type if spec.conditioner else "none"
    lines = ["---", _yaml_block(front), "---", "", f"# {facts.name}", ""]
    lines += [
        f"A latent-diffusion image generator trained with n2a (Noise2Art) "
        f"{n2a_version()}: a `{spec.autoencoder.type}` autoencoder, a `{spec.denoiser.type}` denoiser "
        f"on a `{spec.schedule.type}` schedule, conditioned on "
        + (f"{field_}s through `{conditioner}`." if field_ else "nothing (unconditional)."),
        f"{spec.data.image_size}×{spec.data.image_size} px images. Spec digest `{spec.digest()}`.", "",
    ]
    if facts.grid:
        lines += [f"![samples]({facts.grid})", "", "*Samples from these weights (seeds 0–3 per row).*", ""]
    lines += ["## Licence", ""]
    if license_id:
        lines += [f"The training data (`{spec.data.type}`) is licensed **{license_id}**. These weights and the "
                  f"images they generate are derived works of that data and carry its licence: `{license_id}`."]
    else:
        lines += ["The licence of the training data is **unknown**: the data source declares none and the spec "
                  "sets no `data.license`. Find out the data's licence before sharing these weights or their images; "
                  "they are derived works of it."]
    lines += ["", "## Use", ""] + (_diffusers_usage() if facts.library_name == "diffusers" else _n2a_usage(field_))
    lines += ["## Data", "", "```yaml", _yaml_block({"data": spec.data.model_dump(mode="json")}), "```", ""]
    lines += _stage_section("Stage 1: autoencoder", facts.stage1, spec.autoencoder_training.max_steps,
                            {"autoencoder": spec.autoencoder.model_dump(mode="json"),
                             "autoencoder_training": spec.autoencoder_training.model_dump(mode="json")},
                            taken_from=spec.autoencoder_weights)
    sections = {"denoiser": spec.denoiser, "schedule": spec.schedule, "conditioner": spec.conditioner,
                "sampler": spec.sampler, "training": spec.training}
    lines += _stage_section("Stage 2: diffusion", facts.stage2, spec.training.max_steps,
                            {k: v.model_dump(mode="json") if v is not None else None for k, v in sections.items()})
    if facts.files:
        lines += ["## Files", "", *[f"- `{f}`" for f in facts.files], ""]
    lines += ["## Provenance", "", f"- n2a version: {n2a_version()}", f"- spec digest: `{spec.digest()}`",
              f"- seed: {spec.seed}", ""]
    return "\n".join(lines)


def _n2a_usage(field_: str | None) -> list[str]:
    example = {"caption": '["red apple"]', "label": '["LABEL"]'}.get(field_, "None")
    return ["```python", "from n2a_core import Pipeline", "", 'pipe = Pipeline.from_pretrained("PATH-OR-HUB-ID")',
            f"images = pipe({example}, seeds=[0], guidance=3.0)", 'images[0].save("sample.png")', "```", "",
            "or `n2a sample PATH` on the command line, with n2a installed.", ""]


def _diffusers_usage() -> list[str]:
    return ["```python", "from diffusers import DDIMScheduler, UNet2DModel, VQModel", "",
            'vqvae = VQModel.from_pretrained("PATH-OR-HUB-ID", subfolder="vqvae")',
            'unet = UNet2DModel.from_pretrained("PATH-OR-HUB-ID", subfolder="unet")',
            'scheduler = DDIMScheduler.from_pretrained("PATH-OR-HUB-ID", subfolder="scheduler")', "```", "",
            "`n2a.json` says how to condition: class labels index the UNet's class embedding (index "
            "`null_class` is \"no condition\", for classifier-free guidance); a caption model takes "
            "`condition_projection` of the caption embedding as `class_labels`. Decode `latents / "
            "vqvae.config.scaling_factor`. diffusers' guidance_scale is n2a's 1 + w.", ""]


def _stage_section(title: str, record: StageRecord, max_steps: int, settings: dict,
                   taken_from: str | None = None) -> list[str]:
    lines = [f"## {title}", ""]
    if taken_from:
        lines += [f"Not trained in this run: weights taken from `{taken_from}`.", ""]
    elif record.steps is not None:
        lines += [f"Trained for {record.steps:,} steps (of {max_steps:,} planned).", ""]
    if record.metrics:
        lines += ["| validation metric | first | last |", "|---|---|---|"]
        lines += [f"| {k} | {record.first_metrics[k]:.4f} | {v:.4f} |" for k, v in record.metrics.items()]
        lines += [""]
    lines += ["```yaml", _yaml_block(settings), "```", ""]
    return lines


def write_model_card(folder: Path, facts: CardFacts) -> Path:
    path = Path(folder) / CARD
    path.write_text(render(facts))
    return path


def read_front_matter(path: Path) -> dict:
    """The YAML front matter of a card (for tests and tools)."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
