"""The `n2a` command line (Typer). `cli.main:create_app` assembles the command groups."""

import os

# Before torch loads OpenMP: idle OpenMP threads otherwise spin, and when anything else
# shares the cores a training step ran 12-18x slower here (quickstart stage 2: 6.9 s vs
# 0.39 s per step with one other busy process on 2 cores). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
