"""The seeds n2a takes (a leaf: the CLI reads the bound without importing torch)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

SEED_MAX = 2**32 - 1
"""The largest seed n2a takes (numpy's range). Seeds n2a derives from it (seed * 1_000_003 +
epoch for the data order, seed + i for image i) then stay inside torch's 64-bit seeds."""

Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
"""A spec field holding a seed: 0..SEED_MAX."""
