"""Run every benchmark: a table per benchmark, a summary against the targets, and as the
last line one JSON object with every figure (ratios are n2a over diffusers throughput, so
> 1 means n2a is faster; memory is n2a over diffusers, so < 1 means n2a needs less).

    python -m benchmarks.run --quick     # under 5 minutes on a 2-core CPU
    python -m benchmarks.run             # everything, with the fp32 / bf16 loss curves
    python -m benchmarks.run --compile   # adds a torch.compile row (minutes to compile)

Exit status: 0 when every benchmark ran (targets missed or not), 1 when one failed, 2
when diffusers is not installed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from benchmarks.common import (
    SIZES,
    Row,
    base_parser,
    machine,
    require_diffusers,
    setup_torch,
    table,
)

# (key, comparison, target, what): the targets for this 2-core CPU.
TARGETS = [
    ("train_ratio", ">=", 1.05, "fp32 training step vs UNet2DModel"),
    ("flop_efficiency", ">=", 0.90, "training GFLOP/s over fp32 matmul GFLOP/s"),
    ("train_ratio_bf16", ">=", 1.5, "bf16-autocast step vs diffusers fp32"),
    ("sample_ratio_20", ">=", 1.05, "DDIM 20 steps vs diffusers DDIM 20"),
    ("sample_ratio_50", ">=", 1.05, "DDIM 50 steps vs diffusers DDIM 50"),
    ("fast_sampler_ratio", ">=", 2.5, "n2a dpmpp-2m 20 vs diffusers DDIM 50"),
    ("guided_forwards_per_step", "==", 1.0, "batched forwards per guided step"),
    ("ae_ratio", ">=", 1.0, "VQGAN encode+decode vs VQModel"),
    ("cache_speedup", ">=", 5.0, "stage-2 epoch, cached vs on the fly"),
    ("peak_mem_ratio", "<=", 1.0, "training-step peak memory vs diffusers; no target in the issue"),
    ("loss_max_smoothed_gap", "<=", 0.05, "bf16 tracks fp32; the 5% threshold is ours"),
]
BENCHMARKS = ("train", "sample", "autoencoder", "memory", "cache", "loss_curve")


def verdict(value: float, comparison: str, target: float) -> str:
    if comparison == "==":
        return "met" if value == target else "MISSED"
    ok = value >= target if comparison == ">=" else value <= target
    if ok:
        return "met"
    return f"MISSED by {abs(value - target) / target:.0%}"


def summary(metrics: dict) -> list[Row]:
    rows = []
    for key, comparison, target, what in TARGETS:
        if metrics.get(key) is None:
            continue
        rows.append(Row(key, metrics[key], "", f"target {comparison} {target:g}: "
                        f"{verdict(metrics[key], comparison, target)} ({what})"))
    return rows


def run_one(name: str, args, device) -> dict:
    size = SIZES[args.size]
    quick = args.quick
    if name == "train":
        from benchmarks import train

        return train.run(size, args.repeats or (5 if quick else 9), device, quick, args.compile, clock=args.clock)
    if name == "sample":
        from benchmarks import sample

        return sample.run(size, args.repeats or (3 if quick else 5), device, quick, clock=args.clock)
    if name == "autoencoder":
        from benchmarks import autoencoder

        return autoencoder.run(size, args.repeats or (3 if quick else 9), device, quick, args.clock)
    if name == "memory":
        from benchmarks import memory

        return memory.run(size, device, quick)
    if name == "cache":
        from benchmarks import cache

        return cache.run(size, 32 if quick else 64, args.repeats or (3 if quick else 5), device, quick, args.clock)
    if name == "loss_curve":
        from benchmarks import loss_curve

        result = loss_curve.run(size, args.steps, device)
        result.pop("curves")
        return result
    raise ValueError(name)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="add the torch.compile training row")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--steps", type=int, default=300, help="steps of each loss curve (full run only)")
    args = parser.parse_args(argv)
    require_diffusers()
    device = setup_torch(args.threads, args.device)
    names = args.only.split(",") if args.only else [b for b in BENCHMARKS if not (args.quick and b == "loss_curve")]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    start = time.perf_counter()
    info = machine(device)
    print(f"n2a benchmarks vs diffusers {info.get('diffusers')}: {info['cpu']}, {info['cores']} cores, "
          f"torch {info['torch']}, {info['threads']} thread(s), {info['device']}, load {info['load']}", flush=True)
    metrics: dict = {}
    errors: dict[str, str] = {}
    for name in names:
        began = time.perf_counter()
        try:
            result = run_one(name, args, device)
        except Exception as exc:  # noqa: BLE001 -- report it and go on: one failure must not hide the rest
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        metrics.update(result["metrics"])
        title = f"{name} ({time.perf_counter() - began:.0f} s, load {machine(device)['load']})"
        print(table(result["rows"], title), flush=True)
    print(table(summary(metrics), "summary against the targets"), flush=True)
    load_at_start, info = info["load"], machine(device)
    info["load_at_start"] = load_at_start
    out = {**metrics, "quick": args.quick, "size": args.size, "seconds": time.perf_counter() - start,
           "machine": info}
    if errors:
        out["errors"] = errors
    print(json.dumps(out, sort_keys=True, default=str), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
