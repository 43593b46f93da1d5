"""Named run specs (`n2a train --preset NAME`): the built-in quickstart, plus the paper's
setups in the repository's `examples/` when n2a runs from a source checkout (the README's
`pip install -e .`); a wheel ships the quickstart alone."""

from __future__ import annotations

from pathlib import Path

from n2a_core.errors import SpecError, did_you_mean

PRESET_DIR = Path(__file__).parent
EXAMPLES_DIR = PRESET_DIR.parents[1] / "examples"


def _presets() -> dict[str, Path]:
    """name -> file; a built-in preset wins over an example of the same name."""
    found: dict[str, Path] = {}
    for folder in (EXAMPLES_DIR, PRESET_DIR):
        found.update({p.stem: p for p in folder.glob("*.yaml")} if folder.is_dir() else {})
    return found


def preset_names() -> list[str]:
    return sorted(_presets())


def preset_path(name: str) -> Path:
    path = _presets().get(name)
    if path is None:
        raise SpecError(f"--preset: unknown preset '{name}'{did_you_mean(name, preset_names())}; "
                        f"available: {', '.join(preset_names())}")
    return path
