"""Draw docs/quality.md's sample panels from yardstick sample folders, side by side.

    python docs/quality_figures.py OUT.png FOLDER [FOLDER ...] [--per-class 8]

Each FOLDER is one `sample_score.sh` output (RUN/yardstick/A: one subfolder of PNGs per
class). The panel shows, for every FOLDER left to right, the first samples of each class
in the yardstick's category order, one class per row; the same seeds line up across
folders, so columns differ only by what changed between the runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

CLASSES = (
    "smileys-emotion", "people-body", "animals-nature", "food-drink", "travel-places",
    "activities", "objects", "symbols", "flags",
)
SHOWN = 2  # each 32 px sample drawn as 2 x 2 pixels
GAP = 16  # white pixels between folders


def panel(folders: list[Path], per_class: int) -> Image.Image:
    tile = 32 * SHOWN
    width = len(folders) * per_class * tile + (len(folders) - 1) * GAP
    canvas = Image.new("RGB", (width, len(CLASSES) * tile), "white")
    for column, folder in enumerate(folders):
        left = column * (per_class * tile + GAP)
        for row, name in enumerate(CLASSES):
            samples = sorted((folder / name).glob("*.png"))[:per_class]
            if len(samples) < per_class:
                raise SystemExit(f"{folder / name}: {len(samples)} samples, need {per_class}")
            for i, path in enumerate(samples):
                image = Image.open(path).convert("RGB").resize((tile, tile), Image.NEAREST)
                canvas.paste(image, (left + i * tile, row * tile))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--per-class", type=int, default=8)
    args = parser.parse_args()
    panel(args.folders, args.per_class).save(args.out)


if __name__ == "__main__":
    main()
