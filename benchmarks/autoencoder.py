"""Autoencoder: n2a's VQGAN vs diffusers' VQModel, encode + decode throughput.

The two are built to the same size (n2a's default VQGAN: channels 64, 128, 128, one
ResNet block per level, f = 4, n_z = 4, 512 codes; VQModel with the same blocks): their
parameter counts differ only by VQModel's two 1x1 quant convs. One case is
`decode(encode(x))` of a batch of images in inference mode, as the latent cache and
`n2a sample` use them.

A third row times n2a's VQGAN fed channels_last tensors, the change proposed for
n2a_plugins/vqgan (see README): diffusers' VQModel ends up in channels_last after its
first attention block (its attention output is a transposed view), and oneDNN's
convolutions and nearest upsampling are faster in that layout on the CPU.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    R64,
    SIZES,
    Row,
    Size,
    base_parser,
    check_matched,
    default_clock,
    diffusers_vqmodel,
    emit,
    headline,
    interleave,
    machine,
    n2a_vqgan,
    parameter_count,
    require_diffusers,
    setup_torch,
    speedup,
    time_rows,
)


def images(size: Size, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size.batch, 3, size.image_size, size.image_size, generator=g) * 2 - 1).to(device)


def n2a_round_trip(model, x: torch.Tensor):
    return torch.no_grad()(lambda: model.decode(model.encode(x)))


def n2a_round_trip_channels_last(model, x: torch.Tensor):
    """What VQGAN.encode / decode would do with the proposed change: NHWC inputs to the
    encoder and the decoder (the quantizer in between is unchanged)."""
    nhwc = torch.channels_last

    @torch.no_grad()
    def run():
        z = model.encoder(x.contiguous(memory_format=nhwc)) * model.latent_scale
        z_q, _ = model.quantizer.quantize(z / model.latent_scale)
        return model.decoder(z_q.contiguous(memory_format=nhwc))

    return run


def diffusers_round_trip(model, x: torch.Tensor):
    return torch.no_grad()(lambda: model.decode(model.encode(x).latents).sample)


def run(size: Size = R64, repeats: int = 7, device: torch.device | None = None, quick: bool = False,
        clock: str | None = None) -> dict:
    device = device or torch.device("cpu")
    clock = clock or default_clock(device)
    torch.manual_seed(0)
    n_model = n2a_vqgan(size).to(device).eval()
    d_model = diffusers_vqmodel(size).to(device).eval()
    n_params = parameter_count(n_model, n_model.inference_modules())
    d_params = parameter_count(d_model)
    check_matched("autoencoder", n_params, d_params, 0.10)
    x = images(size, device)
    same = (n2a_round_trip(n_model, x)() - n2a_round_trip_channels_last(n_model, x)()).abs().max().item()

    cases = {"n2a vqgan": n2a_round_trip(n_model, x), "diffusers VQModel": diffusers_round_trip(d_model, x),
             "n2a vqgan channels_last (proposed)": n2a_round_trip_channels_last(n_model, x)}
    t = interleave(cases, repeats, warmup=1, device=device)
    metrics = {"clock": clock, "ae_params": n_params, "ae_params_diffusers": d_params,
               "ae_channels_last_max_abs_diff": same}
    ratio = headline(metrics, "ae_ratio", speedup(t["n2a vqgan"], t["diffusers VQModel"]), clock)
    proposed = headline(metrics, "ae_ratio_channels_last",
                        speedup(t["n2a vqgan channels_last (proposed)"], t["diffusers VQModel"]), clock)
    seconds = (lambda v: v.median) if clock == "wall" else (lambda v: v.cpu_median)
    metrics["ae_images_per_s"] = size.batch / seconds(t["n2a vqgan"])
    metrics["ae_images_per_s_diffusers"] = size.batch / seconds(t["diffusers VQModel"])
    rows = time_rows(t)
    rows += [
        Row("autoencoder parameters n2a / diffusers", n_params / d_params, "x", f"{n_params:,} vs {d_params:,}"),
        Row("ae_ratio (encode+decode images/s)", ratio, "x",
            f"{metrics['ae_images_per_s']:.1f} vs {metrics['ae_images_per_s_diffusers']:.1f} images/s; "
            f"wall {metrics['ae_ratio_wall']:.3f}x"),
        Row("with channels_last (proposed vqgan change)", proposed, "x",
            f"max |difference| {same:.1e}; wall {metrics['ae_ratio_channels_last_wall']:.3f}x"),
    ]
    return {"benchmark": "autoencoder", "size": size.name, "batch": size.batch, "repeats": repeats, "clock": clock,
            "metrics": metrics, "rows": rows, "timings_ms": {k: v.median * 1e3 for k, v in t.items()}}


def main(argv=None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    require_diffusers()
    device = setup_torch(args.threads, args.device)
    result = run(SIZES[args.size], args.repeats or (5 if args.quick else 9), device, args.quick, args.clock)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    emit(result, rows, f"autoencoder encode+decode, {result['batch']} images of {SIZES[args.size].image_size} px")


if __name__ == "__main__":
    main()
