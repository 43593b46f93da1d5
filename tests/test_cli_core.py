"""The `n2a` CLI through typer's CliRunner: exit codes and the text a user sees."""

from __future__ import annotations

import importlib.metadata
import json
import types
import typing

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cli.main import create_app
from n2a_core import hookimpl
from n2a_core.kinds import KINDS
from n2a_core.plugins import PluginSource, load_plugins, set_registry

ROW_KEYS = {"kind", "name", "package", "version", "description", "status"}


@pytest.fixture
def n2a(monkeypatch):
    """Run `n2a ARGS...` in-process; the registry is reloaded per test and reset after it.

    By default only the built-in schedules load (N2A_LOAD_PLUGINS=schedules), so these
    tests do not depend on which other plugins exist yet.
    """
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "schedules")
    set_registry(None)
    runner = CliRunner()
    try:
        yield lambda *args: runner.invoke(create_app(), list(args))
    finally:
        set_registry(None)


@pytest.fixture
def n2a_all(monkeypatch):
    """`n2a ARGS...` in-process with every installed plugin (what the quickstart preset names)."""
    monkeypatch.delenv("N2A_LOAD_PLUGINS", raising=False)
    set_registry(None)
    runner = CliRunner()
    try:
        yield lambda *args: runner.invoke(create_app(), list(args))
    finally:
        set_registry(None)


def rows_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    return rows


def assert_one_line_user_error(result, *words):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # typer.Exit(1), not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert result.stdout == ""


# -- list-plugins ---------------------------------------------------------------------------
def test_list_plugins_json_lists_the_built_in_schedules(n2a, monkeypatch):
    monkeypatch.delenv("N2A_LOAD_PLUGINS")  # everything installed, as a user sees it
    rows = rows_of(n2a("list-plugins", "--json"))
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert all(row["status"] in ("ok", "error") for row in rows)
    version = importlib.metadata.version("n2a")
    schedules = {row["name"]: row for row in rows if row["kind"] == "schedule"}
    for name in ("linear", "cosine"):
        assert schedules[name]["package"] == "n2a" and schedules[name]["version"] == version
        assert schedules[name]["status"] == "ok" and schedules[name]["description"]


def test_list_plugins_kind_filters(n2a):
    rows = rows_of(n2a("list-plugins", "--kind", "schedule", "--json"))
    assert sorted(row["name"] for row in rows) == ["cosine", "linear"]
    assert rows_of(n2a("list-plugins", "--kind", "sampler", "--json")) == []

    table = n2a("list-plugins", "--kind", "schedule")
    assert table.exit_code == 0
    assert "cosine" in table.stdout and "linear" in table.stdout and "ok" in table.stdout


@pytest.mark.parametrize(("kind", "words"), [
    ("bogus", ["--kind", "'bogus'", ", ".join(KINDS)]),
    ("schedul", ["did you mean 'schedule'"]),
])
def test_list_plugins_unknown_kind_is_one_line(n2a, kind, words):
    assert_one_line_user_error(n2a("list-plugins", "--kind", kind), *words)


def test_a_broken_plugin_shows_as_error_and_does_not_break_list_plugins(n2a, monkeypatch):
    class Broken:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            raise RuntimeError("missing compiled extension")

    good = types.SimpleNamespace(register_schedules=hookimpl(lambda register: None))
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "schedules")
    set_registry(load_plugins(extra=[(Broken, PluginSource("broken_one", "pkg-broken", "0.9")),
                                     (good, PluginSource("good_one", "pkg-good", "1.0"))]))
    rows = rows_of(n2a("list-plugins", "--json"))
    errors = [row for row in rows if row["status"] == "error"]
    assert [(r["name"], r["package"], r["version"]) for r in errors] == [("broken_one", "pkg-broken", "0.9")]
    assert "RuntimeError: missing compiled extension" in errors[0]["description"]
    assert {"linear", "cosine"} <= {row["name"] for row in rows if row["status"] == "ok"}

    table = n2a("list-plugins")
    assert table.exit_code == 0 and "broken_one" in table.stdout and "error" in table.stdout


# -- spec show ------------------------------------------------------------------------------
def test_spec_show_unknown_plugin_is_one_line_with_a_suggestion(n2a_all):
    n2a = n2a_all
    assert_one_line_user_error(n2a("spec", "show", "--schedule", "cosin"), "schedule.type", "'cosine'")


def test_spec_show_unknown_key_and_bad_value(n2a_all):
    n2a = n2a_all
    assert_one_line_user_error(n2a("spec", "show", "--set", "schedule.num_timestep=10"),
                               "schedule.num_timestep", "did you mean 'num_timesteps'")
    assert_one_line_user_error(n2a("spec", "show", "-s", "schedule.num_timesteps=0"),
                               "schedule.num_timesteps", "(got 0)", "greater than or equal to 2")
    assert_one_line_user_error(n2a("spec", "show", "--set", "nokey"), "--set", "KEY=VALUE")


def test_spec_show_missing_config_is_one_line(n2a, tmp_path):
    assert_one_line_user_error(n2a("spec", "show", "--config", str(tmp_path / "missing.yaml")),
                               "missing.yaml", "not found")


def test_spec_show_applies_set_and_kind(n2a_all):
    n2a = n2a_all
    result = n2a("spec", "show", "--set", "schedule.num_timesteps=10")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["schedule"] == {"type": "cosine", "num_timesteps": 10,
                                                         "offset": 0.008, "max_beta": 0.999, "log_snr_shift": 0.0}

    result = n2a("spec", "show", "--json", "--schedule", "linear", "-s", "schedule.num_timesteps=20", "-s", "seed=3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schedule"]["type"] == "linear" and data["schedule"]["num_timesteps"] == 20 and data["seed"] == 3


def test_spec_show_reads_a_config_file(n2a, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("seed = 11\n[schedule]\ntype = 'linear'\nbeta_end = 0.03\n")
    result = n2a("spec", "show", "-c", str(config), "--set", "schedule.num_timesteps=30")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["seed"] == 11
    assert (data["schedule"]["type"], data["schedule"]["beta_end"], data["schedule"]["num_timesteps"]) == \
        ("linear", 0.03, 30)


# -- help -----------------------------------------------------------------------------------
def command_paths() -> list[list[str]]:
    """Every command and group of the app, as argument lists (found, not hard-coded)."""
    paths: list[list[str]] = [[]]

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(create_app()), [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "n2a")
def test_help_exits_zero(n2a, path):
    result = n2a(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout


def test_the_core_commands_exist_and_spec_show_offers_every_kind(n2a):
    paths = command_paths()
    for path in (["list-plugins"], ["spec"], ["spec", "show"], ["spec", "schema"]):
        assert path in paths
    help_text = n2a("spec", "show", "--help").stdout
    assert all(f"--{kind}" in help_text for kind in KINDS)


# -- hardening: what a careless argument must never do ---------------------------------------
def float_options() -> list[tuple[list[str], str, int]]:
    """(command path, option, nargs) for every float option of every command (found, not listed)."""
    found = []

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*prefix, name])
        for param in getattr(command, "params", []):
            annotation = param.type_descriptor.annotation
            if float in (annotation, *typing.get_args(annotation)) and param.opts[0].startswith("--"):
                found.append((prefix, param.opts[0], param.nargs))

    walk(typer.main.get_command(create_app()), [])
    return found


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_every_float_option_refuses_non_finite_numbers(n2a, value):
    options = float_options()
    assert (["sample"], "--guidance", 1) in options and (["sample"], "--guidance-interval", 2) in options
    for path, option, nargs in options:
        result = n2a(*path, f"{option}={value}") if nargs == 1 else n2a(*path, option, *[value] * nargs)
        assert result.exit_code == 2 and option in result.output, (path, option, result.output)
        # -inf and nan may meet a lower bound first; inf passes every lower bound
        assert value not in ("inf", "1e400") or "finite number" in result.output, result.output


@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999"])
def test_sample_seed_out_of_range_is_a_usage_error(n2a, seed):
    result = n2a("sample", "--seed", seed)
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output


def test_sample_seeds_of_all_images_must_be_in_range(n2a, tmp_path):
    """Image i uses seed + i: the last one must still be a valid seed (checked before the run is read)."""
    assert_one_line_user_error(n2a("sample", str(tmp_path), "--seed", "4294967295", "--n", "2"),
                               "--seed", "at most 4294967294")


def test_markup_in_user_input_is_printed_as_text(n2a_all):
    assert_one_line_user_error(n2a_all("spec", "show", "--set", "[/x]=1"), "[/x]: unknown key")
    result = n2a_all("spec", "show", "--set", "training.preview_captions=[\"[/b] a [red]cat\"]")
    assert result.exit_code == 0 and '"[/b] a [red]cat"' in result.stdout.replace("'", '"'), result.output


def test_a_bad_device_is_one_line(n2a_all, tmp_path):
    assert_one_line_user_error(n2a_all("spec", "show", "--set", "device=gpu"), "device: unknown device 'gpu'")
    from n2a_core.device import resolve_device
    from n2a_core.errors import SpecError

    for name, words in (("mps", "MPS backend is not available"), ("cuda:0", "CUDA is not available"),
                        ("meta", "unknown device"), ("cuda:x", "unknown device")):
        with pytest.raises(SpecError, match=words):
            resolve_device(name)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    import torch

    from n2a_core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") and resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_a_plugin_allow_list_naming_nothing_installed_warns(monkeypatch, caplog):
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "schedule,samplers")
    with caplog.at_level("WARNING", logger="n2a_core.plugins"):
        registry = load_plugins()
    assert registry.names("sampler") and not registry.names("schedule")
    [message] = [r.getMessage() for r in caplog.records]
    assert "N2A_LOAD_PLUGINS: no plugin 'schedule' is installed (did you mean 'schedules'?)" in message
    assert "installed: " in message and "schedules" in message.split("installed: ")[1]
