"""n2a as a user installs it: the CLI answers --help without torch, the package's lazy
exports match its import block, and a wheel works outside the source tree."""

from __future__ import annotations

import ast
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HELP_PROBE = """
import resource, sys
from cli.main import main
sys.argv = ["n2a", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
usage = resource.getrusage(resource.RUSAGE_SELF)
print("\\nPROBE", code, "torch" in sys.modules, usage.ru_utime + usage.ru_stime)
"""


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["sample", "--help"], ["spec", "show", "--help"]],
                         ids=" ".join)
def test_help_answers_without_importing_torch(args, tmp_path):
    """Importing torch costs seconds; `n2a --help` must not pay them (options come from
    n2a_core.kinds and the preset files, which need no torch)."""
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert "PROBE" in done.stdout, done.stderr
    _, code, torch_loaded, cpu_seconds = done.stdout.strip().splitlines()[-1].split()
    assert code in ("0", "None") and "Usage" in done.stdout
    assert torch_loaded == "False"
    assert float(cpu_seconds) < 2.0  # ~0.6 s measured; importing torch alone takes longer than 2 s


def test_lazy_exports_match_the_import_block_and_all():
    """n2a_core loads its public names on first use; the TYPE_CHECKING imports (what type
    checkers and IDEs see), `_EXPORTS` (what loads) and `__all__` must list the same names."""
    import n2a_core

    tree = ast.parse((ROOT / "n2a_core" / "__init__.py").read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {node.module: [alias.name for alias in node.names] for node in guarded.body}
    assert imported == n2a_core._EXPORTS
    assert sorted(n2a_core.__all__) == sorted(n2a_core._MODULE_OF)
    for name in n2a_core.__all__:
        assert getattr(n2a_core, name) is getattr(sys.modules[n2a_core._MODULE_OF[name]], name)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        n2a_core.NoSuchThing  # noqa: B018


# -- the wheel -----------------------------------------------------------------------------------
TINY_RUN = [
    "data.image_size=16", "data.limit=24", "data.val_fraction=0.25",
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1,2]",
    "autoencoder_training.max_steps=3", "autoencoder_training.batch_size=4",
    "denoiser.base_channels=16", "denoiser.channel_mult=[1]", "denoiser.num_res_blocks=1",
    "denoiser.attention_levels=[]", "denoiser.num_heads=2", "denoiser.norm_groups=8",
    "schedule.num_timesteps=50", "sampler.steps=2",
    "training.max_steps=3", "training.batch_size=4", "training.warmup_steps=1", "training.sample_steps=2",
]


def _run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    """Build a wheel from a copy of the source, install it (not editable) into a fresh virtual
    environment, and use `n2a` from a folder that is not the checkout."""
    import setuptools

    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.fail(f"building the wheel offline needs setuptools >= 70.1 (has {setuptools.__version__}): "
                    "pip install -e '.[dev]'")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp_path / "dist", source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("n2a-*.whl"))

    # The dependencies (torch, ...) come from this interpreter's environment; n2a from the wheel.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    venv_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                          cwd=tmp_path).stdout.strip())
    here = {*site.getsitepackages(), sysconfig.get_path("purelib")}
    (venv_site / "_n2a_test_deps.pth").write_text("\n".join(sorted(here)) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
         cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ""}
    where = _run(python, "-c", "import cli, n2a_core, n2a_plugins; print(n2a_core.__file__, cli.__file__, "
                               "n2a_plugins.__file__)", cwd=work, env=env).stdout.split()
    assert all(Path(path).is_relative_to(venv_site) for path in where), where

    n2a = bin_dir / "n2a"
    rows = json.loads(_run(n2a, "list-plugins", "--json", cwd=work, env=env).stdout)
    assert {"vqgan", "unet", "cosine", "ddim", "minilm", "openmoji"} <= {r["name"] for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows

    shown = _run(n2a, "spec", "show", "--preset", "wikiart-style", cwd=work, env=env).stdout
    assert "path: huggan/wikiart" in shown and "label_column: style" in shown

    sets = [arg for s in TINY_RUN for arg in ("--set", s)]
    _run(n2a, "train", "--conditioner", "none", "--out", "run", *sets, cwd=work, env=env)
    metrics = [json.loads(line) for line in (work / "run" / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 3
    assert (work / "run" / "samples" / "final" / "grid.png").is_file()
