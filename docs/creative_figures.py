"""Draw the README's "Creative sampling" figures from a trained quickstart run, through the CLI.

    python docs/creative_figures.py RUN [--out docs]

Writes creative-img2img.png, creative-inpaint.png, creative-interpolate.gif and
creative-negative.png (32 px samples shown 4x larger). Samples go to a temporary folder,
so RUN is only read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from n2a_core.generate import load_run
from n2a_core.images import image_to_tensor, make_grid_image, tensor_to_image
from n2a_plugins.data.openmoji import Renderer, font_path

SHOWN = 4  # each 32 px sample drawn as 4 x 4 pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        face, mask = work / "red-circle.png", work / "mask-top.png"
        Renderer(font_path(), 128).render((0x1F534,)).save(face)  # 128 px: sampling resizes it
        mask_image = Image.new("L", (128, 128), 0)  # black: keep
        mask_image.paste(255, (0, 0, 128, 64))  # repaint the top half
        mask_image.save(mask)

        def sample(name: str, *options: str) -> list[torch.Tensor]:
            out = work / name
            command = [sys.executable, "-m", "cli", "sample", str(args.run), "--out", str(out), *options]
            print(" ".join(command[2:]), flush=True)
            subprocess.run(command, check=True)
            records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
            return [image_to_tensor(Image.open(out / r["file"]), 32) for r in records]

        def grid(images, captions, nrow, name):
            big = F.interpolate(torch.stack(images), scale_factor=SHOWN, mode="nearest")
            make_grid_image(big, nrow=nrow, captions=captions).save(args.out / name)

        init = image_to_tensor(Image.open(face), 32)
        autoencoder = load_run(args.run, device="cpu").components.autoencoder
        with torch.no_grad():  # what the model can keep of the init: its autoencoder's reconstruction
            reconstruction = autoencoder.decode(autoencoder.encode(init[None])).clamp(-1, 1)[0]
        shots = [sample(f"i2i-{s}", "--prompt", "large blue circle", "--init-image", str(face), "--strength", str(s),
                        "--n", "1")[0] for s in (0.4, 0.6, 0.8)]
        grid([init, reconstruction, *shots], ["init", "reconstructed", "strength 0.4", "0.6", "0.8"], 5,
             "creative-img2img.png")

        shots = sample("inpaint", "--prompt", "large blue circle", "--init-image", str(face), "--mask", str(mask),
                       "--n", "3", "--seed", "1")
        grid([init, image_to_tensor(Image.open(mask), 32).clamp(-0.9, 1), *shots],
             ["init", "mask (white)", "seed 1", "seed 2", "seed 3"], 5, "creative-inpaint.png")

        frames = sample("morph", "--interpolate", "grinning face", "cat face", "--frames", "8", "--seed", "3")
        big = [tensor_to_image(x) for x in F.interpolate(torch.stack(frames), scale_factor=SHOWN, mode="nearest")]
        big[0].save(args.out / "creative-interpolate.gif", save_all=True, append_images=big[1:] + big[-2:0:-1],
                    duration=150, loop=0)  # there and back

        plain = sample("plain", "--prompt", "face", "--n", "4", "--seed", "10")
        steered = sample("negative", "--prompt", "face", "--negative-prompt", "grinning face", "--n", "4",
                         "--seed", "10")
        grid(plain + steered, ["face"] * 4 + ["face, not grinning"] * 4, 4, "creative-negative.png")


if __name__ == "__main__":
    main()
