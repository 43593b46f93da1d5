"""The `n2a` command line (Typer). `cli.main:create_app` assembles the command groups."""

import os

# Before torch loads OpenMP, how its idle threads wait. The quickstart's tiny UNet runs
# thousands of short parallel regions a step, and `python -m benchmarks.openmp_wait` measured a
# stage-2 step on 2 cores: libgomp's default endless spinning ran >10x slower beside one
# busy process; OMP_WAIT_POLICY=PASSIVE was safe there but 1.4x slower alone; a short spin
# (GOMP_SPINCOUNT=10000) is as fast as the default alone and 1.5x PASSIVE beside a busy
# process. KMP_BLOCKTIME does the same for LLVM/Intel OpenMP (macOS; not measured here).
# Set any of these yourself to override.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "10000"
os.environ.setdefault("KMP_BLOCKTIME", "1")
