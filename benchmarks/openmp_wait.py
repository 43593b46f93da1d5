"""How OpenMP's idle threads should wait: a stage-2 training step, alone and beside a busy process.

The quickstart's UNet on 4x8x8 latents runs thousands of tiny parallel regions per step, so
the time OpenMP threads spin before sleeping matters: spinning forever (libgomp's default)
is fastest alone and 10x slower when another process wants a core; sleeping at once
(OMP_WAIT_POLICY=PASSIVE) is safe but pays a wake-up per region. Each setting runs in a
fresh process (OpenMP reads its environment once); settings alternate in every repeat.

    python -m benchmarks.openmp_wait [--repeats 3]

Prints a table and, as its last line, JSON with seconds per step (median over repeats) and
each setting's ratio to PASSIVE (< 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin-10k": {"GOMP_SPINCOUNT": "10000"},
            "default": {}}
STEP = """
import statistics, time, torch
from n2a_plugins.unet import UNet
torch.manual_seed(0)
model = UNet(base_channels=64, channel_mult=[1, 2], num_res_blocks=2, attention_levels=[1], num_heads=4,
             scale_shift=True, cond_mode="vector", cond_dim=384)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
z, t, c = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,)).float(), torch.randn(64, 384)
times = []
for _ in range(15):
    start = time.perf_counter()
    loss = (model(z, t, c) - z).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - start)
print(statistics.median(times[3:]))
"""


def step_time(setting: str, timeout: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    try:
        out = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True,
                             timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return float("inf")  # "more than the timeout": the spinning case beside a busy process
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds before a setting counts as stalled.")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    for situation in ("alone", "beside a busy process"):
        samples: dict[str, list[float]] = {name: [] for name in SETTINGS}
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if situation != "alone" else None
        try:
            for _ in range(args.repeats):
                for name in SETTINGS:
                    samples[name].append(step_time(name, args.timeout))
        finally:
            if busy is not None:
                busy.kill()
        results[situation] = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{'situation':<24}" + "".join(f"{name:>12}" for name in SETTINGS) + "   (s per step; ratio to passive)")
    for situation, row in results.items():
        cells = "".join(f"{row[n]:>7.3f} {row[n] / row['passive']:>4.2f}" for n in SETTINGS)
        print(f"{situation:<24}{cells}")
    def finite(x: float) -> float | None:  # None: stalled past --timeout
        return x if x != float("inf") else None

    print(json.dumps({situation: {name: {"s_per_step": finite(row[name]),
                                         "vs_passive": finite(row[name] / row["passive"])}
                                  for name in SETTINGS} for situation, row in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
