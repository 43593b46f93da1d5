"""The JSON n2a writes (metrics.jsonl, samples.jsonl, state.json, labels, caches): strict.

Python's `json.dumps` writes NaN and Infinity by default, which no strict parser reads
(RFC 8259 has no such numbers). Inputs are refused when not finite (specs, CLI options),
so what can still be non-finite is a measurement, such as a diverged loss or the PSNR of
a perfect reconstruction: it is written as null, as JavaScript's JSON.stringify does.
"""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj, **kwargs)` with every non-finite float written as null."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
