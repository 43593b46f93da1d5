"""Score a run's autoencoder on the shared quality yardstick (../shared/yardstick): every
test image goes through decode(encode(x)), and the reconstructions are scored against the
real test split like samples are (FD, KID, precision, recall, clean rate, cond_acc).

    python -m benchmarks.yardstick RUN [--yardstick ../shared/yardstick] [--latent-noise 0.2]

The reconstructions land in RUN/yardstick/recon/<category>/ (recon-noise<σ>/ with
--latent-noise) with a metadata.jsonl, and score.py's JSON in score.json there (also the
last line printed). The samples' side of the protocol is the yardstick's own
`sample_score.sh`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import REPO

DEFAULT_YARDSTICK = REPO.parent / "shared" / "yardstick"


def load_image(path: Path) -> torch.Tensor:
    """3 x H x W in [-1, 1], RGBA composited on white as the yardstick's scorer does."""
    image = Image.open(path)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def save_image(x: torch.Tensor, path: Path) -> None:
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


@torch.no_grad()
def reconstruct_split(run: Path, split: Path, out: Path, batch_size: int = 64, latent_noise: float = 0.0) -> int:
    """decode(encode(x) + latent_noise * N(0, I)) of every PNG under split/<category>/ into
    out/<category>/. The noise is in stage 2's units (latents scaled to unit variance), so
    latent_noise > 0 asks how gracefully the decoder takes the small errors a denoiser
    leaves in its latents: a decoder that turns them into speckle caps sample quality."""
    from n2a_core.checkpoint import load_autoencoder_weights
    from n2a_core.components import RunDir, build_components
    from n2a_core.specs import resolve_run_spec

    run_dir = RunDir(run)
    spec = resolve_run_spec(run_dir.read_spec_data())
    model = build_components(spec, vocabulary=run_dir.read_labels(), device=torch.device("cpu"),
                             training=False).autoencoder.eval()
    load_autoencoder_weights(model, run_dir.autoencoder_weights)
    files = sorted(split.glob("*/*.png"))
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        latents = model.encode(torch.stack([load_image(f) for f in chunk]))
        if latent_noise:
            generator = torch.Generator().manual_seed(start)
            latents = latents + latent_noise * torch.randn(latents.shape, generator=generator)
        recon = model.decode(latents)
        for f, x in zip(chunk, recon, strict=True):
            (out / f.parent.name).mkdir(parents=True, exist_ok=True)
            save_image(x, out / f.parent.name / f.name)
            rows.append({"file": f"{f.parent.name}/{f.name}", "category": f.parent.name})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--yardstick", type=Path, default=DEFAULT_YARDSTICK)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent-noise", type=float, default=0.0,
                        help="std of Gaussian noise added to the unit-variance latents before decoding")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.run / "yardstick" / ("recon" if args.latent_noise == 0 else f"recon-noise{args.latent_noise:g}")
    count = reconstruct_split(args.run, args.yardstick / "data" / "test", out, latent_noise=args.latent_noise)
    print(f"{count} reconstructions in {out}", file=sys.stderr)
    score = subprocess.run(
        [sys.executable, str(args.yardstick / "score.py"), "--real", str(args.yardstick / "data" / "test"),
         "--fake", str(out), "--labels", "--threads", str(args.threads)],
        check=True, capture_output=True, text=True,
    ).stdout
    (out / "score.json").write_text(score)
    print(json.dumps(json.loads(score)))


if __name__ == "__main__":
    main()
