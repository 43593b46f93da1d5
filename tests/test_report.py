"""`n2a report`: the static run page, its hand-drawn SVG charts, and how it renders in a
real headless Chromium (Debian's `chromium` package; skipped when it is not installed)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import create_app
from n2a_core.report import line_chart, render_report, series_of, spread, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CURVE_BLUE = (0x1F, 0x77, 0xB4)


def grid_png(path, colour) -> None:
    image = Image.new("RGB", (96, 48), "white")
    image.paste(Image.new("RGB", (40, 40), colour), (4, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def run(tmp_path):
    """A run folder as training leaves it: both stages' logs (stage 2 resumed once), grids,
    an eval result, a model card and the spec."""
    root = tmp_path / "my-run"
    (root / "autoencoder").mkdir(parents=True)
    (root / "diffusion").mkdir()
    (root / "spec.yaml").write_text("seed: 0\ndata: {type: openmoji}\n")
    (root / "README.md").write_text("# Model card\nTrained on <OpenMoji>.\n")
    with open(root / "autoencoder" / "metrics.jsonl", "w") as fh:
        for step in range(10, 210, 10):
            fh.write(json.dumps({"step": step, "loss/autoencoder": 1 / step, "perceptual": 0.0}) + "\n")
    with open(root / "diffusion" / "metrics.jsonl", "w") as fh:
        for step in [*range(10, 110, 10), *range(60, 160, 10)]:  # resumed from step 50
            fh.write(json.dumps({"step": step, "loss/model": 0.5 - step / 1000}) + "\n")
            if step % 50 == 0:
                fh.write(json.dumps({"step": step, "val/loss": 0.6 - step / 1000}) + "\n")
        fh.write('{"step": 160, "loss/mo')  # a line cut by a crash
    for step in (50, 100, 150):
        grid_png(root / "diffusion" / "grids" / f"samples-{step:08d}.png", (200, 30, 30))
        grid_png(root / "autoencoder" / "grids" / f"recon-{step:08d}.png", (30, 160, 30))
    (root / "eval").mkdir()
    (root / "eval" / "step-00000150-random-conv.json").write_text(json.dumps({
        "step": 150, "images": 100, "extractor": {"type": "random-conv"}, "reference": {"split": "val", "images": 20},
        "metrics": {"fd": 12.5, "kid": 0.0123, "kid_se": 0.0004, "precision": 0.7, "recall": 0.4}}))
    return root


def test_a_resumed_log_draws_each_curve_forward_once():
    records = [{"step": s, "loss": float(s)} for s in (10, 20, 30, 20, 30, 40)]
    records[3]["loss"] = -1.0  # the resumed run's own value at step 20 wins
    assert series_of(records)["loss"] == [(10, 10), (20, -1), (30, 30), (40, 40)]


def test_line_chart_is_valid_svg_with_one_point_per_step():
    svg = line_chart("loss", {"train": [(0, 1.0), (10, 0.5), (20, 0.25)], "val": [(10, 0.6)]})
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    polyline = root.find(f"{ns}polyline")
    points = [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]
    assert len(points) == 3
    xs, ys = zip(*points, strict=True)
    assert xs[0] < xs[1] < xs[2] and ys[0] < ys[1] < ys[2]  # falling loss: larger SVG y
    assert len(root.findall(f"{ns}circle")) == 4  # short series also get dots
    assert {t.text for t in root.iter(f"{ns}text")} >= {"loss", "train", "val", "step"}


def test_spread_keeps_first_and_last():
    assert spread(list(range(100)), 5) == [0, 25, 50, 74, 99]


def test_report_is_one_self_contained_page(run):
    page = render_report(run)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1]))).verify()
    assert "loss: train and validation" in page and "loss/autoencoder" in page
    assert "constant throughout: perceptual" in page
    assert "12.5" in page and "0.01230 ± 0.00040" in page  # the eval table
    assert "Trained on &lt;OpenMoji&gt;." in page  # the model card, escaped
    assert "step 150" in page and "stage 2: step 150" in page


def test_n2a_report_writes_the_page_and_refuses_a_non_run(run, tmp_path):
    result = CliRunner().invoke(create_app(), ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file() and not list(run.glob("*.tmp"))
    bad = CliRunner().invoke(create_app(), ["report", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "not an n2a run" in bad.output


def render(page, tmp_path):
    """(screenshot as an array, console lines) of a page rendered by headless Chromium."""
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
         "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return np.asarray(Image.open(shot).convert("RGB")), console


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    pixels, console = render(write_report(run), tmp_path)
    assert console == []
    assert pixels.std() > 10  # not a blank page
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert CURVE_BLUE in colours  # the curves were drawn
    assert (200, 30, 30) in colours and (30, 160, 30) in colours  # sample and reconstruction grids shown
    # The console check can fail: a page that logs an error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<p>x</p><script>console.error('boom')</script>")
    assert any("boom" in line for line in render(broken, tmp_path)[1])


def test_step_ticks_are_whole_numbers_even_for_a_one_point_chart():
    from n2a_core.report import _nice_ticks

    # one eval at step 1500 spans 1499..1501: half-step ticks would all print as "1500"
    assert _nice_ticks(1499, 1501, whole=True) == [1499, 1500, 1501]
    assert _nice_ticks(0, 1500, whole=True) == [0, 500, 1000, 1500]
