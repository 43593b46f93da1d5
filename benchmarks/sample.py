"""Sampling: n2a's samplers driving n2a's UNet vs diffusers' schedulers driving UNet2DModel.

Both sides draw `batch` latents (16 at R64) from the same noise, with a linear schedule
(T = 1000, betas 1e-4..0.02) and trailing timesteps. diffusers runs the loop its
pipelines run (scale_model_input, UNet, scheduler.step); with guidance both make one
batched forward of 2B per step (n2a: `guided_prediction`; diffusers: the class-embedding
table's extra "no class" row). n2a's guidance w = 3 is diffusers' scale s = 1 + w = 4.

The unguided UNets share weights (n2a's is loaded from diffusers'), so the DDIM and
DPM-Solver++(2M) samples of the two must agree: their largest difference is reported.
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.common import (
    R64,
    SIZES,
    Row,
    Size,
    base_parser,
    check_matched,
    default_clock,
    diffusers_unet,
    emit,
    headline,
    interleave,
    load_diffusers_unet_into_n2a,
    machine,
    n2a_unet,
    parameter_count,
    require_diffusers,
    setup_torch,
    speedup,
    time_rows,
)

GUIDANCE = 3.0
"""n2a's w (paper form); diffusers' guidance scale is 1 + w."""


def n2a_components(kind: str, steps: int):
    from n2a_core import get_registry

    registry = get_registry()
    # From t = T-1 like diffusers' schedulers: n2a's default epsilon floor (log-SNR -5) would
    # start at t = 701 of this schedule, a different (and shorter) chain.
    spec = {"type": kind, "steps": steps, "min_log_snr": None}
    sampler = registry.build("sampler", registry.validate_spec("sampler", spec))
    schedule = registry.build("schedule", registry.validate_spec("schedule", {"type": "linear"}))
    return sampler, schedule


def diffusers_scheduler(kind: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
              "timestep_spacing": "trailing", "prediction_type": "epsilon"}
    if kind == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)


def noise(size: Size, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def n2a_sampling(model, kind: str, steps: int, size: Size, device, cond=None, guidance: float = 0.0):
    sampler, schedule = n2a_components(kind, steps)
    shape = (size.batch, *size.latent_shape)

    def sample():
        return sampler.sample(model, schedule, shape, cond=cond, guidance=guidance, steps=steps,
                              generator=noise(size))

    return sample


def diffusers_sampling(model, kind: str, steps: int, size: Size, device, labels=None, scale: float = 1.0):
    scheduler = diffusers_scheduler(kind)
    shape = (size.batch, *size.latent_shape)
    both = None
    if labels is not None:  # conditional rows first, then the "no class" row for each image
        both = torch.cat([labels, torch.full_like(labels, size.classes)])

    @torch.no_grad()
    def sample():
        scheduler.set_timesteps(steps, device=device)
        z = torch.randn(shape, generator=noise(size)).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            if both is None:
                eps = model(scheduler.scale_model_input(z, t), t).sample
            else:
                z_in = scheduler.scale_model_input(torch.cat([z, z]), t)
                eps_c, eps_u = model(z_in, t, class_labels=both).sample.chunk(2)
                eps = eps_u + scale * (eps_c - eps_u)
            z = scheduler.step(eps, t, z).prev_sample
        return z

    return sample


class ForwardCounter:
    """Counts a module's forward calls and the batch sizes it saw."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.batches.append(args[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


def run(size: Size = R64, repeats: int = 5, device: torch.device | None = None, quick: bool = False,
        steps: tuple[int, ...] = (20, 50), clock: str | None = None) -> dict:
    """Time whole sampling runs; returns {"metrics": ..., "rows": [...], ...}."""
    device = device or torch.device("cpu")
    clock = clock or default_clock(device)
    lo, hi = steps
    torch.manual_seed(0)
    d_model = diffusers_unet(size).to(device).eval()
    n_model = n2a_unet(size).to(device).eval()
    check_matched("UNet", parameter_count(n_model), parameter_count(d_model), 0.05)
    load_diffusers_unet_into_n2a(n_model, d_model)

    cases = {}
    for s in (lo, hi):
        cases[f"n2a ddim {s}"] = n2a_sampling(n_model, "ddim", s, size, device)
        cases[f"diffusers ddim {s}"] = diffusers_sampling(d_model, "ddim", s, size, device)
    cases[f"n2a dpmpp-2m {lo}"] = n2a_sampling(n_model, "dpmpp-2m", lo, size, device)
    if not quick:  # --quick times the headline pairs only
        cases[f"diffusers dpmpp-2m {lo}"] = diffusers_sampling(d_model, "dpmpp-2m", lo, size, device)

    # Same weights, same noise: the samples must agree (a check that the comparison is fair;
    # two images are enough for it).
    few = dataclasses.replace(size, batch=2)
    diffs = {}
    for kind in ("ddim", "dpmpp-2m"):
        a = n2a_sampling(n_model, kind, lo, few, device)()
        b = diffusers_sampling(d_model, kind, lo, few, device)()
        diffs[kind] = (a - b).abs().max().item()

    # Guidance: class-conditional twins (n2a reads a class embedding, diffusers its table).
    dc_model = diffusers_unet(size, conditional=True).to(device).eval()
    nc_model = n2a_unet(size, conditional=True).to(device).eval()
    check_matched("class-conditional UNet", parameter_count(nc_model), parameter_count(dc_model), 0.05)
    labels = torch.arange(size.batch, device=device) % size.classes
    class_embedding = torch.nn.Embedding(size.classes, size.cond_dim).to(device)
    with torch.no_grad():
        cond = class_embedding(labels)
    counter = ForwardCounter(nc_model)
    n2a_sampling(nc_model, "ddim", 3, few, device, cond[:few.batch], GUIDANCE)()
    counter.close()
    forwards_per_step = len(counter.batches) / 3
    guided_batch = max(counter.batches)
    for s in () if quick else (lo, hi):  # guided timings: the full run only
        cases[f"n2a ddim {s} guided"] = n2a_sampling(nc_model, "ddim", s, size, device, cond, GUIDANCE)
        cases[f"diffusers ddim {s} guided"] = diffusers_sampling(dc_model, "ddim", s, size, device, labels,
                                                                 1 + GUIDANCE)

    t = interleave(cases, repeats, warmup=0 if quick else 1, device=device)
    metrics = {"clock": clock, "ddim_max_abs_diff": diffs["ddim"], "dpmpp_2m_max_abs_diff": diffs["dpmpp-2m"],
               "guided_forwards_per_step": forwards_per_step, "guided_forward_batch": guided_batch}
    headline(metrics, f"sample_ratio_{lo}", speedup(t[f"n2a ddim {lo}"], t[f"diffusers ddim {lo}"]), clock)
    headline(metrics, f"sample_ratio_{hi}", speedup(t[f"n2a ddim {hi}"], t[f"diffusers ddim {hi}"]), clock)
    headline(metrics, "fast_sampler_ratio", speedup(t[f"n2a dpmpp-2m {lo}"], t[f"diffusers ddim {hi}"]), clock)
    if f"diffusers dpmpp-2m {lo}" in t:
        headline(metrics, f"sample_ratio_dpmpp_{lo}",
                 speedup(t[f"n2a dpmpp-2m {lo}"], t[f"diffusers dpmpp-2m {lo}"]), clock)
    for s in (lo, hi):
        if f"n2a ddim {s} guided" in t:
            headline(metrics, f"sample_ratio_guided_{s}",
                     speedup(t[f"n2a ddim {s} guided"], t[f"diffusers ddim {s} guided"]), clock)

    rows = time_rows(t, 1.0, "s")
    for key in sorted(k for k in metrics if k.startswith(("sample_ratio", "fast_sampler")) and
                      not k.endswith(("_wall", "_cpu"))):
        rows.append(Row(key, metrics[key], "x", f"wall {metrics[key + '_wall']:.3f}x"))
    rows += [
        Row("ddim: max |n2a - diffusers| (same weights, noise)", diffs["ddim"], ""),
        Row("dpmpp-2m: max |n2a - diffusers|", diffs["dpmpp-2m"], ""),
        Row("guided: denoiser forwards per step", forwards_per_step, "",
            f"batch {guided_batch} for {few.batch} images"),
    ]
    return {"benchmark": "sample", "size": size.name, "batch": size.batch, "repeats": repeats, "clock": clock,
            "metrics": metrics, "rows": rows, "timings_s": {k: v.median for k, v in t.items()}}


def main(argv=None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    require_diffusers()
    device = setup_torch(args.threads, args.device)
    result = run(SIZES[args.size], args.repeats or (3 if args.quick else 5), device, args.quick, clock=args.clock)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    emit(result, rows, f"sampling {result['batch']} images, {result['size']}")


if __name__ == "__main__":
    main()
