"""Denoiser training step: n2a's UNet vs diffusers' UNet2DModel at a matched size.

One step is what stage 2 does per batch: draw t and eps, noise the clean latents
(DDPM eq. 4), predict, MSE loss, backward, AdamW. Each side uses its own library's
pieces (n2a: `diffusion_loss`; diffusers: `DDPMScheduler.add_noise`); both use the same
AdamW settings (`n2a_core.training.loop.adamw`). n2a starts from diffusers' weights, so both
compute the same function and their first losses agree.

Also measured in the same rounds: a large fp32 matmul (the machine's achievable
GFLOP/s), the step under bf16 autocast, and (opt-in) the step under torch.compile.
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (convolutions,
matmuls and, where torch has a formula, attention; element-wise work is not counted).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

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

MATMUL_N = 2048
"""Side of the square fp32 matmul that stands for the machine's peak (2 N^3 FLOPs)."""


def latents(size: Size, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size.batch, *size.latent_shape, generator=g).to(device)


def n2a_step(model, z0: torch.Tensor, bf16: bool = False, fused: bool = False, forward=None):
    """One n2a training step closure (returns the loss tensor)."""
    from n2a_core.training.loop import adamw
    from n2a_core.training.objective import diffusion_loss
    from n2a_plugins.schedules import LinearSchedule

    schedule = LinearSchedule()
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:  # the change proposed for loop.adamw on the CPU
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    else:
        optimizer = adamw(params, lr=1e-4, weight_decay=0.01).optimizer
    generator = torch.Generator().manual_seed(1)
    forward = model if forward is None else forward

    def step():
        with torch.autocast(z0.device.type, torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(forward, schedule, z0, None, None, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def diffusers_step(model, z0: torch.Tensor, bf16: bool = False):
    """One diffusers training step closure, as its train_unconditional example does it."""
    from diffusers import DDPMScheduler

    from n2a_core.training.loop import adamw

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    optimizer = adamw(list(model.parameters()), lr=1e-4, weight_decay=0.01).optimizer
    generator = torch.Generator().manual_seed(1)

    def step():
        t = torch.randint(0, 1000, (z0.shape[0],), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        with torch.autocast(z0.device.type, torch.bfloat16, enabled=bf16):
            z_t = scheduler.add_noise(z0, noise, t)
            loss = F.mse_loss(model(z_t, t).sample.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def matmul(device: torch.device, n: int = MATMUL_N):
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    return lambda: torch.mm(a, b, out=out)


def count_flops(step) -> int:
    """FLOPs of one training step as FlopCounterMode counts them (forward + backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def run(size: Size = R64, repeats: int = 7, device: torch.device | None = None, quick: bool = False,
        compile: bool = False, fused: bool = True, matmul_n: int = MATMUL_N, clock: str | None = None) -> dict:
    """Time the training step; returns {"metrics": ..., "rows": [...], ...}."""
    device = device or torch.device("cpu")
    clock = clock or default_clock(device)
    torch.manual_seed(0)
    d_model = diffusers_unet(size).to(device).train()
    n_model = n2a_unet(size).to(device).train()
    n_params, d_params = parameter_count(n_model), parameter_count(d_model)
    check_matched("UNet", n_params, d_params, 0.05)
    load_diffusers_unet_into_n2a(n_model, d_model)
    z0 = latents(size, device)
    # Same weights, same t and eps draws: the first losses must agree.
    first_n = n2a_step(copy.deepcopy(n_model), z0)().item()
    first_d = diffusers_step(copy.deepcopy(d_model), z0)().item()

    # Every case trains its own copy (own weights and optimizer state).
    cases = {
        "n2a fp32": n2a_step(n_model, z0),
        "diffusers fp32": diffusers_step(d_model, z0),
        "n2a bf16-autocast": n2a_step(copy.deepcopy(n_model), z0, bf16=True),
        "diffusers bf16-autocast": diffusers_step(copy.deepcopy(d_model), z0, bf16=True),
        f"matmul fp32 {matmul_n}": matmul(device, matmul_n),
    }
    if fused:
        cases["n2a fp32 fused-AdamW"] = n2a_step(copy.deepcopy(n_model), z0, fused=True)
    compile_s = None
    if compile:
        c_model = copy.deepcopy(n_model)
        cases["n2a fp32 torch.compile"] = n2a_step(c_model, z0, forward=torch.compile(c_model))
        start = time.perf_counter()
        cases["n2a fp32 torch.compile"]()  # the first call compiles forward and backward
        compile_s = time.perf_counter() - start

    flops_n = count_flops(cases["n2a fp32"])
    flops_d = count_flops(cases["diffusers fp32"])
    timings = interleave(cases, repeats, warmup=1 if quick else 2, device=device)

    n32, d32 = timings["n2a fp32"], timings["diffusers fp32"]
    mm = timings[f"matmul fp32 {matmul_n}"]
    seconds = {"wall": lambda t: t.median, "cpu": lambda t: t.cpu_median}[clock]
    matmul_gflops = 2 * matmul_n**3 / seconds(mm) / 1e9
    step_gflops = flops_n / seconds(n32) / 1e9
    metrics = {"clock": clock}
    train_ratio = headline(metrics, "train_ratio", speedup(n32, d32), clock)
    bf16_ratio = headline(metrics, "train_ratio_bf16", speedup(timings["n2a bf16-autocast"], d32), clock)
    headline(metrics, "train_ratio_bf16_vs_diffusers_bf16",
             speedup(timings["n2a bf16-autocast"], timings["diffusers bf16-autocast"]), clock)
    metrics.update({
        "flop_efficiency": step_gflops / matmul_gflops,
        "flop_efficiency_wall": (flops_n / n32.median) / (2 * matmul_n**3 / mm.median),
        "flop_efficiency_cpu": (flops_n / n32.cpu_median) / (2 * matmul_n**3 / mm.cpu_median),
        "train_samples_per_s": size.batch / seconds(n32),
        "train_samples_per_s_diffusers": size.batch / seconds(d32),
        "step_gflop": flops_n / 1e9, "step_gflop_diffusers": flops_d / 1e9,
        "step_gflops": step_gflops, "matmul_gflops": matmul_gflops,
        "params": n_params, "params_diffusers": d_params,
        "first_loss": first_n, "first_loss_diffusers": first_d,
    })
    if fused:
        headline(metrics, "train_ratio_fused_adamw", speedup(timings["n2a fp32 fused-AdamW"], d32), clock)
    if compile:
        headline(metrics, "train_ratio_compile", speedup(timings["n2a fp32 torch.compile"], d32), clock)
        metrics["compile_s"] = compile_s

    rows = time_rows(timings)
    rows += [
        Row("UNet parameters n2a / diffusers", n_params / d_params, "x", f"{n_params:,} vs {d_params:,}"),
        Row("first loss n2a / diffusers (same weights)", first_n / first_d, "x", f"{first_n:.5f} vs {first_d:.5f}"),
        Row("train_ratio (fp32, latent samples/s)", train_ratio, "x",
            f"{metrics['train_samples_per_s']:.1f} vs {metrics['train_samples_per_s_diffusers']:.1f}/s; "
            f"wall {metrics['train_ratio_wall']:.3f}x"),
        Row("train_ratio_bf16 (n2a bf16 vs diffusers fp32)", bf16_ratio, "x",
            f"wall {metrics['train_ratio_bf16_wall']:.3f}x"),
        Row("n2a bf16 vs diffusers bf16", metrics["train_ratio_bf16_vs_diffusers_bf16"], "x"),
        Row("step GFLOP (FlopCounterMode)", flops_n / 1e9, "GFLOP", f"diffusers {flops_d / 1e9:.2f}"),
        Row("flop_efficiency", metrics["flop_efficiency"], "",
            f"{step_gflops:.1f} GFLOP/s vs matmul {matmul_gflops:.1f} GFLOP/s; "
            f"wall {metrics['flop_efficiency_wall']:.3f}"),
    ]
    if fused:
        rows.append(Row("with fused AdamW (proposed loop.py change)", metrics["train_ratio_fused_adamw"], "x"))
    if compile:
        rows.append(Row("with torch.compile", metrics["train_ratio_compile"], "x", f"compiled in {compile_s:.0f} s"))
    return {"benchmark": "train", "size": size.name, "batch": size.batch, "repeats": repeats, "clock": clock,
            "metrics": metrics, "rows": rows, "timings_ms": {k: t.median * 1e3 for k, t in timings.items()}}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (minutes on a CPU)")
    args = parser.parse_args(argv)
    require_diffusers()
    device = setup_torch(args.threads, args.device)
    result = run(SIZES[args.size], args.repeats or (5 if args.quick else 9), device, args.quick, args.compile,
                 clock=args.clock)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    emit(result, rows, f"training step, {result['size']}, batch {result['batch']}")


if __name__ == "__main__":
    main()
