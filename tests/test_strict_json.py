"""Every JSON file n2a writes is strict JSON: a non-finite measurement is null, never NaN."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from n2a_core import strict_json

ROOT = Path(__file__).resolve().parents[1]


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_null_everywhere_in_the_structure():
    record = {"loss": math.nan, "grad": [1.0, math.inf, (-math.inf, 2)], "ok": 0.5, "nested": {"psnr": math.inf}}
    text = strict_json.dumps(record, indent=1)
    assert strict_loads(text) == {"loss": None, "grad": [1.0, None, [None, 2]], "ok": 0.5, "nested": {"psnr": None}}
    assert json.loads(strict_json.dumps({"x": 1e308, "n": 3, "s": "NaN"})) == {"x": 1e308, "n": 3, "s": "NaN"}


def test_every_json_writer_goes_through_strict_json():
    """A JSON text that is written, printed or embedded (not a hash key or a copy) uses strict_json
    (plugins, which see only the public API, pass allow_nan=False)."""
    writes = re.compile(r"write|add_text|echo|print")
    offenders = [f"{path.relative_to(ROOT)}:{number}"
                 for folder in ("n2a_core", "n2a_plugins", "cli") for path in sorted((ROOT / folder).rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bjson\.dumps?\(", line) and writes.search(line) and "allow_nan=False" not in line]
    assert offenders == []
