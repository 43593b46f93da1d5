"""Peak memory of a training step, a sampling run and an autoencoder round trip, n2a vs diffusers.

What is measured (tracemalloc cannot see torch's allocations):
- CPU: each case runs in a fresh subprocess. After the model, optimizer and inputs are
  built, Linux's resident-set high-water mark is reset (`echo 5 > /proc/self/clear_refs`);
  the case then runs a few times and the figure is VmHWM minus the resident set at the
  reset: the extra resident memory the work needs on top of the model (activations,
  gradients, AdamW moments, oneDNN scratch, allocator slack). Where clear_refs cannot be
  written the baseline is ru_maxrss instead, which can only under-count (said in `method`).
- CUDA: in-process `torch.cuda.max_memory_allocated` over the same work, minus what was
  allocated before it (tensor memory only; the caching allocator's reserve is not counted).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import (
    R64,
    REPO,
    SIZES,
    Row,
    Size,
    base_parser,
    emit,
    machine,
    require_diffusers,
    setup_torch,
)

CASES = ("train", "sample", "ae")
SAMPLE_STEPS = 5
"""Sampling memory peaks within every step alike, so a few steps show it."""


def workload(case: str, impl: str, size: Size, device: torch.device):
    """The closure whose memory is measured (built here, outside the measurement)."""
    if case == "train":
        from benchmarks.common import diffusers_unet, n2a_unet
        from benchmarks.train import diffusers_step, latents, n2a_step

        z0 = latents(size, device)
        if impl == "n2a":
            return n2a_step(n2a_unet(size).to(device).train(), z0)
        return diffusers_step(diffusers_unet(size).to(device).train(), z0)
    if case == "sample":
        from benchmarks.common import diffusers_unet, n2a_unet
        from benchmarks.sample import diffusers_sampling, n2a_sampling

        if impl == "n2a":
            return n2a_sampling(n2a_unet(size).to(device).eval(), "ddim", SAMPLE_STEPS, size, device)
        return diffusers_sampling(diffusers_unet(size).to(device).eval(), "ddim", SAMPLE_STEPS, size, device)
    if case == "ae":
        from benchmarks.autoencoder import diffusers_round_trip, images, n2a_round_trip
        from benchmarks.common import diffusers_vqmodel, n2a_vqgan

        x = images(size, device)
        if impl == "n2a":
            return n2a_round_trip(n2a_vqgan(size).to(device).eval(), x)
        return diffusers_round_trip(diffusers_vqmodel(size).to(device).eval(), x)
    raise ValueError(f"unknown case {case!r}; one of {', '.join(CASES)}")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure_here(case: str, impl: str, size: Size, device: torch.device, iterations: int = 3) -> dict:
    """Peak extra memory of `iterations` runs of the case, in this process (see module doc)."""
    work = workload(case, impl, size, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iterations):
            work()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "method": "cuda.max_memory_allocated"}
    try:
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss delta (may under-count)"
    for _ in range(iterations):
        work()
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": max(peak - base, 0) * 1024, "method": method}


def measure(case: str, impl: str, size: Size, device: torch.device, threads: int) -> dict:
    """`measure_here` in a fresh Python process (CPU), so earlier work cannot hide a peak."""
    if device.type == "cuda":
        return measure_here(case, impl, size, device)
    command = [sys.executable, "-m", "benchmarks.memory", "--child", f"{case}:{impl}", "--size", size.name,
               "--threads", str(threads), "--device", str(device)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory case {case}:{impl} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(size: Size = R64, device: torch.device | None = None, quick: bool = False,
        cases: tuple[str, ...] | None = None, repeats: int = 3) -> dict:
    """Median peak of `repeats` fresh processes per side and case (the allocator's choices
    vary a little from process to process), n2a and diffusers alternating."""
    device = device or torch.device("cpu")
    cases = cases or (("train",) if quick else CASES)
    threads = torch.get_num_threads()
    metrics, rows, method = {}, [], None
    for case in cases:
        peaks = {"n2a": [], "diffusers": []}
        for _ in range(repeats):
            for impl, values in peaks.items():
                result = measure(case, impl, size, device, threads)
                values.append(result["peak_bytes"])
                method = result["method"]
        n, d = statistics.median(peaks["n2a"]), statistics.median(peaks["diffusers"])
        key = "peak_mem_ratio" if case == "train" else f"peak_mem_ratio_{case}"
        metrics[key] = n / max(d, 1)
        metrics[f"peak_mem_mib_{case}"] = n / 2**20
        metrics[f"peak_mem_mib_{case}_diffusers"] = d / 2**20
        ranges = ", ".join(f"{impl} {min(v) / 2**20:.0f}-{max(v) / 2**20:.0f}" for impl, v in peaks.items())
        rows.append(Row(f"{key} (n2a / diffusers, lower is better)", metrics[key], "x",
                        f"{n / 2**20:.0f} vs {d / 2**20:.0f} MiB (median of {repeats}; {ranges})"))
    metrics["peak_mem_method"] = method
    return {"benchmark": "memory", "size": size.name, "batch": size.batch, "metrics": metrics, "rows": rows}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS, default=None)
    args = parser.parse_args(argv)
    require_diffusers()
    device = setup_torch(args.threads, args.device)
    if args.child:  # one measurement, for `measure`
        case, impl = args.child.split(":")
        print(json.dumps(measure_here(case, impl, SIZES[args.size], device)))
        return
    result = run(SIZES[args.size], device, args.quick, repeats=args.repeats or 3)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    method = result["metrics"]["peak_mem_method"]
    emit(result, rows, f"peak memory, {result['size']}, batch {result['batch']} ({method})")


if __name__ == "__main__":
    main()
