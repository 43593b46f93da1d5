"""The third-party example plugin, examples/third_party_plugin (n2a-sigmoid-schedule).

One test installs it the way a user would and runs the `n2a` command; the others load
its module straight from the example directory into a private registry.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from n2a_core import NoiseSchedule
from n2a_core.errors import SpecError
from n2a_core.plugins import PluginSource, load_plugins
from n2a_core.specs import resolve_run_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"
DIST = "n2a-sigmoid-schedule"


def sigmoid_alpha_bar(u, start=-3.0, end=3.0, tau=1.0):
    """Chen 2023, Algorithm 1 (without its 1e-9 clip), written out independently."""
    def v(x):
        return 1 / (1 + math.exp(-x / tau))
    return (v(end) - v(u * (end - start) + start)) / (v(end) - v(start))


@pytest.fixture(scope="module")
def registry():
    name = "n2a_sigmoid_schedule_example"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / "n2a_sigmoid_schedule.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the spec's annotations through it
    try:
        spec.loader.exec_module(module)
        registry = load_plugins(extra=[(module, PluginSource("sigmoid", DIST, "0.1.0"))], entry_points=False)
        assert registry.plugins["sigmoid"].status == "ok", registry.plugins["sigmoid"].error
        yield registry
    finally:
        sys.modules.pop(name, None)


def build(registry, **params):
    return registry.build("schedule", registry.validate_spec("schedule", {"type": "sigmoid", **params}))


def test_the_example_is_a_complete_package():
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    assert f'name = "{DIST}"' in pyproject
    assert '[project.entry-points.n2a]\nsigmoid = "n2a_sigmoid_schedule"' in pyproject
    assert (EXAMPLE / "README.md").is_file()


def test_the_plugin_imports_only_n2a_core():
    tree = ast.parse((EXAMPLE / "n2a_sigmoid_schedule.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    n2a_modules = {name for name in imported if name.split(".")[0].startswith("n2a")}
    assert n2a_modules and all(name.split(".")[0] == "n2a_core" for name in n2a_modules), n2a_modules


@pytest.mark.parametrize("params", [{}, {"tau": 0.7}, {"start": 0.0, "end": 3.0, "tau": 0.9, "num_timesteps": 50}])
def test_sigmoid_alpha_bar_is_monotone_in_0_1_and_matches_its_closed_form(registry, params):
    schedule = build(registry, **params)
    assert isinstance(schedule, NoiseSchedule)
    T = schedule.num_timesteps
    shape = {k: params[k] for k in ("start", "end", "tau") if k in params}

    table = schedule.alpha_bar(torch.arange(T)).numpy()
    assert np.all((table > 0) & (table < 1))
    assert np.all(np.diff(table) < 0)

    # betas telescope: the table is the closed form on the grid u = (t + 1) / T, wherever
    # the last betas were not clipped at max_beta.
    closed = np.array([sigmoid_alpha_bar((t + 1) / T, **shape) for t in range(T)])
    unclipped = (schedule.betas < 0.999).numpy()
    assert unclipped[:-1].all() and not unclipped[-1]  # only alpha_bar(1) = 0 needs the clip
    np.testing.assert_allclose(table[unclipped], closed[unclipped], rtol=1e-9)

    u = np.array([0.0, 0.1, 0.5, 0.93, 1.0])
    continuous = schedule.alpha_bar_continuous(torch.tensor(u)).numpy()
    np.testing.assert_allclose(continuous[:-1], [sigmoid_alpha_bar(x, **shape) for x in u[:-1]], rtol=1e-9)
    assert continuous[0] == 1.0 and 0 < continuous[-1] <= 1e-9  # clipped as in Chen 2023


def test_tau_changes_the_shape(registry):
    # Chen 2023: a smaller tau concentrates the change around mid-way, so at u = 1/4
    # there is less noise and at u = 3/4 more than with a larger tau.
    sharp, soft = build(registry, tau=0.5), build(registry, tau=2.0)
    quarter, three_quarters = torch.tensor([0.25]), torch.tensor([0.75])
    assert sharp.alpha_bar_continuous(quarter) > soft.alpha_bar_continuous(quarter)
    assert sharp.alpha_bar_continuous(three_quarters) < soft.alpha_bar_continuous(three_quarters)


def test_the_sigmoid_spec_validates_in_the_run_spec(registry):
    spec = resolve_run_spec({}, plugins={"schedule": "sigmoid"}, overrides=["schedule.tau=0.7"], registry=registry)
    schedule = spec.schedule
    assert (schedule.type, schedule.tau, schedule.start, schedule.end) == ("sigmoid", 0.7, -3.0, 3.0)
    for override, words in [("schedule.tau=0", "schedule.tau: Input should be greater than 0"),
                            ("schedule.end=-4", "schedule: Value error, end (-4.0) must be greater than start"),
                            ("schedule.tua=1", "schedule.tua: unknown key (did you mean 'tau'?)")]:
        with pytest.raises(SpecError) as info:
            resolve_run_spec({"schedule": "sigmoid"}, overrides=[override], registry=registry)
        assert str(info.value).startswith(words)


def run(*args, env=None, check=True):
    return subprocess.run(args, capture_output=True, text=True, env=env, check=check, timeout=300)


@pytest.mark.slow
def test_install_the_example_like_a_user_and_see_it_in_n2a(tmp_path):
    """pip-install the example into this environment, use it through `n2a`, uninstall it."""
    # --no-build-isolation builds with this environment's setuptools (no network needed).
    assert importlib.util.find_spec("setuptools"), "the install test needs setuptools: pip install setuptools"
    installed = run(sys.executable, "-m", "pip", "show", DIST, check=False).returncode == 0
    if installed:
        pytest.fail(f"{DIST} is already installed; this test would uninstall it: `pip uninstall {DIST}` first")
    # Build from a copy: the build writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(EXAMPLE, tmp_path / "third_party_plugin",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    n2a = Path(sysconfig.get_path("scripts")) / "n2a"
    env = {k: v for k, v in os.environ.items() if not k.startswith("N2A_")}
    try:
        run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
            "--quiet", str(source))

        listed = run(str(n2a), "list-plugins", "--json", env=env)
        rows = [r for r in json.loads(listed.stdout) if r["name"] == "sigmoid"]
        assert len(rows) == 1, listed.stdout
        assert (rows[0]["kind"], rows[0]["package"], rows[0]["version"], rows[0]["status"]) == \
            ("schedule", DIST, "0.1.0", "ok")

        shown = run(str(n2a), "spec", "show", "--json", "--schedule", "sigmoid", "--set", "schedule.tau=0.7",
                    env=env, check=False)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["schedule"] == {"type": "sigmoid", "num_timesteps": 1000, "start": -3.0,
                                                       "end": 3.0, "tau": 0.7, "max_beta": 0.999}
    finally:
        run(sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", DIST, check=False)
    assert run(sys.executable, "-m", "pip", "show", DIST, check=False).returncode != 0
