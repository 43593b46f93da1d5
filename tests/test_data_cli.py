"""`n2a data show` through Typer's CliRunner: summary, contact sheet, one-line errors."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import create_app

runner = CliRunner()


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


def run(*args, env=None):
    return runner.invoke(create_app(), ["data", "show", *args], env=env)


def test_show_default_is_openmoji_and_writes_a_png(tmp_path, cache_home):
    out = tmp_path / "sheet.png"
    result = run("--set", "data.image_size=32", "--n", "9", "--out", str(out),
                 env={"XDG_CACHE_HOME": str(cache_home)})
    assert result.exit_code == 0, result.output
    assert "openmoji" in result.output and "train / val" in result.output
    assert "people-body" in result.output and "captions" in result.output
    sheet = Image.open(out)
    sheet.load()
    # 9 cells of 32 px enlarged to 96 px for legible captions, 3 per row.
    assert sheet.width == 3 * (96 + 2) + 2
    assert list((cache_home / "n2a" / "openmoji" / "32").iterdir()), "renders into the cache"


def test_show_imagefolder_with_labels(tmp_path):
    for label, colour in (("ink", "black"), ("sky", "blue")):
        for i in range(3):
            (tmp_path / "art" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 30), colour).save(tmp_path / "art" / label / f"{i}.png")
    out = tmp_path / "folder.png"
    result = run("--data", "imagefolder", "--set", f"data.path={tmp_path / 'art'}", "--set", "data.image_size=16",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "records" in result.output and "ink" in result.output and "sky" in result.output
    assert "6" in result.output and out.is_file()


@pytest.mark.parametrize("args, message", [
    (["--data", "imagefolder", "--set", "data.path=/no/such/folder"], "data.path: /no/such/folder does not exist"),
    (["--set", "data.groups=[food]"], "unknown OpenMoji group 'food'"),
    (["--data", "hf", "--set", "data.path=someone/not-cached"], "data.path:"),
])
def test_show_errors_are_one_line(tmp_path, args, message):
    result = run(*args, "--out", str(tmp_path / "x.png"), env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()
