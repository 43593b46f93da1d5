"""Named run specs shipped with n2a (`n2a train --preset NAME`)."""

from __future__ import annotations

from pathlib import Path

from n2a_core.errors import SpecError, did_you_mean

PRESET_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"--preset: unknown preset '{name}'{did_you_mean(name, preset_names())}; "
                        f"available: {', '.join(preset_names())}")
    return path
