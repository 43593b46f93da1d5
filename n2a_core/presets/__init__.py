"""Named run specs (`n2a train --preset NAME`): the quickstart and the paper's setups.

They ship inside the package, so a wheel has them too; `examples/*.yaml` in the repository
are links to these files, there for readers (tests/test_examples.py keeps the two the same).
"""

from __future__ import annotations

from pathlib import Path

from n2a_core.errors import SpecError, did_you_mean

PRESET_DIR = Path(__file__).parent


def _presets() -> dict[str, Path]:
    """name -> file."""
    return {p.stem: p for p in PRESET_DIR.glob("*.yaml")}


def preset_names() -> list[str]:
    return sorted(_presets())


def preset_path(name: str) -> Path:
    path = _presets().get(name)
    if path is None:
        raise SpecError(f"--preset: unknown preset '{name}'{did_you_mean(name, preset_names())}; "
                        f"available: {', '.join(preset_names())}")
    return path
