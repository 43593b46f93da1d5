"""`n2a export RUN --format diffusers`: the trained models as diffusers models, in diffusers' layout.

    DIR/vqvae/       the autoencoder (VQModel or AutoencoderKL, LDMPipeline's folder name;
                     config.scaling_factor = n2a's latent scale)
    DIR/unet/        the denoiser (UNet2DModel; class labels through its class embedding)
    DIR/scheduler/   DDIMScheduler config: the run's betas, prediction type, trailing spacing
    DIR/model_index.json            LDMPipeline, for unconditional models only (it passes no labels)
    DIR/condition_projection.safetensors  caption models: the projection into the UNet's class
                                    embedding (diffusers' TimestepEmbedding) and the null condition
    DIR/n2a.json     how to condition and guide: labels and the null class, the conditioner
    DIR/README.md    model card

Each component is loaded with its class's `from_pretrained(DIR, subfolder=...)`. The
conversions themselves live with the plugins (`to_diffusers`), since only a plugin knows
its network; a plugin or option without a diffusers equivalent is refused in one line.
Guidance: diffusers' guidance_scale s is n2a's 1 + w.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from n2a_core import strict_json
from n2a_core.errors import SpecError
from n2a_core.export import DTYPES, ExportReport, folder_size, load_for_export
from n2a_core.model_card import CardFacts, write_model_card

FORMAT = "n2a-diffusers/1"
PROJECTION = "condition_projection.safetensors"
PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def export_diffusers(run_root: Path, out: Path, *, dtype: str = "fp32", device: str = "cpu") -> ExportReport:
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    run_root, out = Path(run_root), Path(out)
    loaded = load_for_export(run_root, out, dtype, device)
    spec, components, conditioner = loaded.spec, loaded.components, loaded.conditioner
    size = spec.data.image_size
    latent_size = size // components.autoencoder.downsample_factor
    labels = getattr(conditioner, "labels", None) if conditioner is not None else None
    if conditioner is not None and conditioner.field == "label" and labels is None:
        raise SpecError(f"conditioner: '{spec.conditioner.type}' has no fixed label list to fold into a class table")
    class_embeddings = conditioner.embed(labels).detach() if labels is not None else None
    vqvae = components.autoencoder.to_diffusers(size)
    parts = components.denoiser.to_diffusers(latent_size, class_embeddings)
    scheduler = DDIMScheduler(
        num_train_timesteps=components.schedule.num_timesteps,
        trained_betas=components.schedule.betas.double().tolist(),  # any schedule plugin, exactly
        prediction_type=PREDICTION[components.denoiser.prediction_type],
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
    )
    conditioning = ("none" if conditioner is None else "class-labels" if labels is not None else "caption-vector")
    info = {
        "format": FORMAT, "conditioning": conditioning, "conditioner": spec.conditioner.model_dump(mode="json")
        if spec.conditioner else None, "labels": labels, "null_class": len(labels) if labels is not None else None,
        "guidance": "n2a's w: (1+w) eps(z,c) - w eps(z,null); diffusers' guidance_scale = 1 + w",
        "latent_shape": [components.autoencoder.latent_channels, latent_size, latent_size],
        "encoder": f"{type(vqvae).__name__}.encode pads its down-sampling on the right/bottom only (diffusers' "
                   "fixed choice); "
                   "n2a's encoder pads all sides, so encode differs while decode is the same function",
        "step": loaded.step, "spec_digest": spec.digest(), "license": spec.data.data_license() or "unknown",
    }
    torch_dtype = DTYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, model in (("vqvae", vqvae), ("unet", parts["unet"])):
            (model.to(torch_dtype) if dtype != "fp32" else model).save_pretrained(tmp / name)
        scheduler.save_pretrained(tmp / "scheduler")
        files = ["vqvae/", "unet/", "scheduler/", "n2a.json"]
        if parts["condition_projection"] is not None:
            tensors = {k: v.detach().to(torch_dtype).contiguous() for k, v in
                       parts["condition_projection"].state_dict().items()}
            tensors["null_condition"] = parts["null_condition"].to(torch_dtype)
            save_file(tensors, str(tmp / PROJECTION), {"format": FORMAT})
            files.append(PROJECTION)
        if conditioning == "none":
            _write_json(tmp / "model_index.json", {
                "_class_name": "LDMPipeline", "vqvae": ["diffusers", type(vqvae).__name__],
                "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]})
            files.append("model_index.json")
        _write_json(tmp / "n2a.json", info)
        facts = CardFacts.from_run(run_root, spec, None, files=files)
        facts.name, facts.library_name = out.name, "diffusers"
        write_model_card(tmp, facts)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out, folder_size(run_root), folder_size(out))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(strict_json.dumps(data, indent=1) + "\n")
