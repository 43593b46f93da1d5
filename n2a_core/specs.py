"""Pydantic specs: the training sections and the run spec, whose component fields come from the registry.

A run spec names one plugin per kind plus its parameters, and the training settings of
both stages. Its component fields are open unions built from the registry, so a
third-party spec validates exactly like a built-in one. Specs load from YAML, TOML or
JSON; CLI overrides (`--schedule cosine`, `--set denoiser.base_channels=128`) apply on
top; every mistake is reported as one line naming the field, before any compute.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from n2a_core.component import ComponentSpec, N2ASpec
from n2a_core.device import check_device_name
from n2a_core.errors import PluginError, SpecError
from n2a_core.kinds import KINDS
from n2a_core.plugins import Registry, get_registry
from n2a_core.seeds import Seed
from n2a_core.spec_errors import format_validation_error

# -- training sections -------------------------------------------------------------------
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class OptimSpec(N2ASpec):
    max_steps: int = Field(2000, ge=1)
    """Optimizer steps to train for."""
    batch_size: int = Field(32, ge=1)
    """Global batch size (summed over processes and gradient-accumulation micro-steps)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step; the per-step micro-batch is batch_size / (world * grad_accum)."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    """Linear learning-rate warm-up from 0 to lr."""
    lr_decay: Literal["constant", "cosine", "linear"] = "cosine"
    """Decay after warm-up, down to 10% of lr at max_steps."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (None: off)."""
    precision: Precision = "auto"
    """Autocast dtype; auto picks bf16 where the device supports it fast, else fp32."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(500, ge=1)
    """Save an image grid every N steps (and at the end)."""
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted after a new one is safely written."""

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self


class AutoencoderTrainingSpec(OptimSpec):
    lr: float = Field(1e-4, gt=0)
    disc_lr: float | None = Field(None, gt=0)
    """Discriminator learning rate (None: same as lr)."""
    warmup_steps: int = Field(0, ge=0)
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"
    batch_size: int = Field(16, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the encoder and decoder weights (not the
    discriminator's) with this decay, warmed up as min(ema_decay, k / (k + 10)) at step k,
    and export the average to stage 2 (None: export the last weights). Under a GAN loss the
    last weights carry the adversarial game's latest swing; the average does not
    (docs/quality.md measures it)."""


class DiffusionTrainingSpec(OptimSpec):
    weight_decay: float = Field(0.01, ge=0)
    p_uncond: float = Field(0.1, ge=0, le=1)
    """Per-sample probability that the condition is replaced by the learned null token."""
    min_snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023); None: the plain DDPM loss."""
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: int = Field(10, ge=0)
    """EMA decay at step k is min(ema_decay, k / (k + ema_warmup)): early weights fade fast."""
    val_every: int = Field(500, ge=1)
    val_batches: int = Field(4, ge=1)
    latent_cache: bool = True
    """Encode the dataset once with the frozen autoencoder and train from the cache."""
    compile: bool = False
    """torch.compile the denoiser."""
    sample_steps: int = Field(50, ge=1)
    """Sampler steps for the periodic sample grid."""
    preview_captions: list[str] = Field(default_factory=list, max_length=64)
    """Captions of the sample grids (during training and at the end) when the conditioner
    reads captions ([]: the first distinct ones of the validation split)."""
    preview_labels: list[str] = Field(default_factory=list, max_length=64)
    """The same for a conditioner that reads labels."""
    preview_guidance: float = Field(3.0, ge=0)
    """Guidance weight w of the sample grids."""
    eval_every: int | None = Field(None, ge=1)
    """Score the generator as `n2a eval` does every N steps and at the end, with the run's
    `extractor` (None: off; it costs `eval_images` sampled images each time)."""
    eval_images: int = Field(1000, ge=2)
    """Images generated per evaluation during training."""


class RunSpecBase(N2ASpec):
    """The run spec. Component fields are added per registry by `run_spec_model`."""

    seed: Seed = 0
    """Seed of the initial weights and of every random stream in training (0..2**32-1)."""
    device: str = "auto"
    """auto (CUDA, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or mps."""
    autoencoder_weights: str | None = None
    """A trained autoencoder: a run folder or a weights.safetensors file (None: stage 1
    trains in this run). Its spec must match the `autoencoder` section."""
    autoencoder_training: AutoencoderTrainingSpec = Field(default_factory=AutoencoderTrainingSpec)
    training: DiffusionTrainingSpec = Field(default_factory=DiffusionTrainingSpec)
    time_budget: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Train for this long instead of to the stages' max_steps: seconds, or a string such as
    '30m', '2h', '1h30m', '90s'. Learning-rate warm-up and decay, EMA warm-up and the
    discriminator start then follow the fraction of the budget used (max_steps only gives
    their shape); each stage ends with a checkpoint and its grids when its share is spent,
    and --resume counts the time already spent. None: steps, as before."""
    autoencoder_time_share: float = Field(0.4, gt=0, lt=1)
    """Stage 1's share of time_budget; stage 2 gets the rest (all of it when the autoencoder
    is given). 0.4 is the quickstart's measured split (7 of 18 minutes)."""

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        check_device_name(name)
        return name

    if TYPE_CHECKING:  # type checkers cannot see the fields run_spec_model adds (one per kind)
        def __getattr__(self, name: str) -> Any: ...

    def component(self, kind: str) -> ComponentSpec | list[ComponentSpec] | None:
        return getattr(self, KINDS[kind].field)

    def digest(self, *fields: str, operational: frozenset[str] | None = None,
               added: dict[str, Any] | None = None) -> str:
        """A short stable hash of the given fields (all when none), for cache keys and
        checkpoint checks. Operational fields (step counts, batch sizes, logging cadence) are
        left out, so a run can be resumed for longer, with another batch or logged differently,
        and so are fields added in later versions while they hold the value that keeps the old
        behaviour (ADDED_FIELDS), so a run made before they existed still resumes.
        `operational`, `added`: other sets to leave out (see `earlier_digests`)."""
        data = _without(self.model_dump(mode="json", include=set(fields) if fields else None),
                        OPERATIONAL_FIELDS if operational is None else operational,
                        ADDED_FIELDS if added is None else added)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def earlier_digests(self, *fields: str) -> tuple[str, ...]:
        """The digests earlier versions computed for the same fields, which their checkpoints
        carry: before batch sizes could change on resume, and before ADDED_FIELDS were left out."""
        unknown_then = {k: v for k, v in ADDED_FIELDS.items() if k not in FIRST_ADDED_FIELDS}
        return (self.digest(*fields, operational=FORMER_OPERATIONAL_FIELDS),
                self.digest(*fields, added=unknown_then))


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '30m', '2h', '1h30m' or '1.5h'."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                         text.lower())
    if not text.strip() or parts is None or not any(parts.groups()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 30m, 2h or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


OPERATIONAL_FIELDS = frozenset({
    "max_steps", "log_every", "sample_every", "checkpoint_every", "keep_last", "num_workers",
    "val_every", "val_batches", "sample_steps", "preview_captions", "preview_labels", "preview_guidance", "device",
    "eval_every", "eval_images", "extractor", "trackers",
    # how the global batch is split (processes x accumulation) and its size may change on
    # resume (an error may ask for it); a resume with another batch size is no longer exact
    "grad_accum", "batch_size",
    "time_budget", "autoencoder_time_share",
    # metadata for model cards, not training
    "license",
})
FORMER_OPERATIONAL_FIELDS = OPERATIONAL_FIELDS - {"batch_size"}
"""What digests left out before batch sizes could change on resume: checkpoints written
then carry digests with them, and still resume."""


ADDED_FIELDS: dict[str, Any] = {
    "feature_matching_weight": 0.0,  # the autoencoders' discriminator feature matching
    "ema_decay": None,  # autoencoder_training's (the denoiser's is a number, never None)
    "latent_noise": 0.0,  # the KL autoencoder's decoder noise
    "log_snr_shift": 0.0,  # the cosine schedule's
    "guidance_log_snr": None,  # the samplers' guidance interval
}
"""Fields added after runs were already being made, with the value that behaves as before
they existed: digests leave them out while they hold it. Add each new field that changes
nothing at its default here."""
FIRST_ADDED_FIELDS = ("feature_matching_weight", "ema_decay")
"""The ones a version wrote into its digests before ADDED_FIELDS were left out."""


def _without(data: Any, keys: frozenset[str], added: dict[str, Any]) -> Any:
    if isinstance(data, dict):
        return {k: _without(v, keys, added) for k, v in data.items()
                if k not in keys and not (k in added and v == added[k])}
    return data


@functools.cache
def _run_spec_model(registry) -> type[RunSpecBase]:
    fields: dict[str, Any] = {}
    for kind in KINDS.values():
        if kind.many:
            item = registry.spec_type(kind.name) if registry.names(kind.name) else Any
            fields[kind.field] = (list[item], Field(default_factory=list))  # type: ignore[valid-type]
            continue
        if not registry.names(kind.name):
            fields[kind.name] = (Any, None)
            continue
        spec_type = registry.spec_type(kind.name)
        if kind.default is None or kind.default not in registry.names(kind.name):
            fields[kind.name] = (spec_type | None, None)
        else:
            default = functools.partial(registry.validate_spec, kind.name, kind.default)
            fields[kind.name] = (spec_type, Field(default_factory=default))
    return create_model("RunSpec", __base__=RunSpecBase, **fields)


def run_spec_model(registry: Registry | None = None) -> type[RunSpecBase]:
    """The RunSpec class for the installed plugins (`registry`, default: the process-wide one)."""
    return _run_spec_model(registry or get_registry())


# -- loading, overrides and errors -----------------------------------------------------
def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec file (YAML, TOML or JSON, by extension) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                        "save the spec as UTF-8 YAML, TOML or JSON") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec file ({exc.strerror or exc})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:  # every parser has its own error type
        language = {".toml": "TOML", ".json": "JSON"}.get(path.suffix, "YAML")
        raise SpecError(f"{path}: not valid {language}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of spec fields, got {type(data).__name__}")
    return data


def apply_set(data: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {assignment!r}: expected KEY=VALUE, e.g. denoiser.base_channels=128")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception:  # not YAML (or an int too long to convert): take the text as it is
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):  # `conditioner: minilm` shorthand
            child = {"type": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: '{part}' is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def choose_plugin(data: dict[str, Any], kind: str, name: str | list[str] | None) -> None:
    """Apply `--<kind> NAME`: keep the section's params if the plugin stays the same. For a
    list kind (`--tracker A --tracker B`) each name missing from the list is added."""
    if name is None:
        return
    if KINDS[kind].many:
        entries = data.setdefault(KINDS[kind].field, [])
        present = {e if isinstance(e, str) else e.get("type") for e in entries}
        entries += [{"type": n} for n in ([name] if isinstance(name, str) else name) if n not in present]
        return
    if name in ("none", "null") and KINDS[kind].default is None:
        data[kind] = None
        return
    current = data.get(kind)
    if isinstance(current, dict) and current.get("type", KINDS[kind].default) == name:
        return
    data[kind] = {"type": name}


def _check_list_kinds(data: dict[str, Any], registry: Registry) -> None:
    """`trackers: [tensorboard, {type: wandb}]`: names become sections; unknown ones are refused."""
    for kind in (k for k in KINDS.values() if k.many):
        entries = data.get(kind.field)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise SpecError(f"{kind.field}: expected a list of {kind.name} plugins, e.g. [tensorboard]")
        entries = data[kind.field] = [{"type": e} if isinstance(e, str) else e for e in entries]
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and "type" in entry:
                try:
                    registry.get(kind.name, entry["type"])
                except Exception as exc:
                    raise SpecError(f"{kind.field}[{i}].type: {str(exc).split(': ', 1)[1]}") from None


def resolve_run_spec(
    data: dict[str, Any],
    *,
    plugins: dict[str, str | None] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    registry: Registry | None = None,
) -> RunSpecBase:
    """Validate a spec dict after `--<kind>` choices and `--set` overrides."""
    registry = registry or get_registry()
    data = json.loads(json.dumps(data))  # a private deep copy
    for kind, name in (plugins or {}).items():
        choose_plugin(data, kind, name)
    for assignment in overrides:
        apply_set(data, assignment)
    _check_list_kinds(data, registry)
    for kind in (k for k in KINDS if not KINDS[k].many):  # unknown plugin names first: the clearest error there is
        section = data.get(kind)
        if isinstance(section, str):
            section = data[kind] = {"type": section}
        if isinstance(section, dict) and "type" not in section and KINDS[kind].default:
            section["type"] = KINDS[kind].default
        if isinstance(section, dict) and "type" in section:
            name = section["type"]
            if not isinstance(name, str):
                raise SpecError(f"{kind}.type: expected a plugin name, got {type(name).__name__} {name!r}; "
                                f"installed: {', '.join(registry.names(kind)) or 'none'}")
            try:
                registry.get(kind, name)
            except PluginError as exc:
                raise SpecError(f"{kind}.type: {str(exc).split(': ', 1)[1]}") from None
    model = run_spec_model(registry)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, data=data, registry=registry, model=model) from None


def load_run_spec(path: str | Path | None = None, **kwargs) -> RunSpecBase:
    """Read, override and validate a run spec; `path=None` starts from the defaults."""
    return resolve_run_spec(read_spec_file(path) if path else {}, **kwargs)
