"""Run specs: one-line errors before any compute, --set/--<kind> overrides, file formats,
the open union for third-party specs, the JSON Schema and the digest.

The registry holds n2a's built-in schedules (entry point `schedules` only, through
N2A_LOAD_PLUGINS) plus, where a test says so, a fake third-party schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from n2a_core import ComponentSpec, hookimpl
from n2a_core.errors import SpecError
from n2a_core.plugins import PluginSource, load_plugins, set_registry
from n2a_core.seeds import SEED_MAX
from n2a_core.specs import apply_set, choose_plugin, load_run_spec, read_spec_file, resolve_run_spec, run_spec_model


class FancyScheduleSpec(ComponentSpec):
    """A third-party schedule's spec, defined outside n2a."""

    type: Literal["fancy"] = "fancy"
    gamma: float = Field(0.5, gt=0, lt=1)
    """A parameter with bounds, as a built-in would have."""
    steps: int = Field(100, ge=2)


built = []


class FancyPlugin:
    @staticmethod
    @hookimpl
    def register_schedules(register):
        def factory(spec, ctx):
            built.append(spec)  # a build would be the first compute
        register("fancy", FancyScheduleSpec, factory, "a third-party schedule")


@pytest.fixture
def registry(monkeypatch):
    """The built-in schedules plus the third-party 'fancy', as the process-wide registry."""
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "schedules")
    registry = load_plugins(extra=[(FancyPlugin, PluginSource("fancy", "n2a-fancy", "0.3"))])
    assert registry.names("schedule") == ["cosine", "fancy", "linear"]
    built.clear()
    try:
        set_registry(registry)
        yield registry
    finally:
        set_registry(None)


def one_line_error(**kwargs) -> str:
    with pytest.raises(SpecError) as info:
        resolve_run_spec(kwargs.pop("data", {}), **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- errors ---------------------------------------------------------------------------------
def test_unknown_plugin_name_is_one_line_naming_the_field_with_a_suggestion(registry):
    message = one_line_error(plugins={"schedule": "cosin"})
    assert message.startswith("schedule.type: unknown plugin 'cosin'")
    assert "did you mean 'cosine'" in message and "installed: cosine, fancy, linear" in message
    assert built == []


def test_unknown_plugin_name_wins_over_other_mistakes_in_the_same_section(registry):
    # The name decides which fields exist, so it is reported first and alone.
    message = one_line_error(data={"schedule": {"type": "cosin", "offst": 1}})
    assert message.startswith("schedule.type:") and "offst" not in message


def test_unknown_plugin_name_in_a_kind_with_nothing_installed(registry):
    message = one_line_error(plugins={"sampler": "ddim"})
    assert message == "sampler.type: unknown plugin 'ddim'; installed: none"


def test_unknown_key_suggests_the_closest(registry):
    message = one_line_error(overrides=["schedule.num_timestep=10"])
    assert message.startswith("schedule.num_timestep: unknown key (did you mean 'num_timesteps'?)")
    assert message.endswith("allowed: log_snr_shift, max_beta, num_timesteps, offset, type")

    message = one_line_error(overrides=["trainin.lr=1"])
    assert message.startswith("trainin: unknown key (did you mean 'training'?)")


@pytest.mark.parametrize(("override", "field", "got", "bound"), [
    ("schedule.num_timesteps=1", "schedule.num_timesteps", "(got 1)", "greater than or equal to 2"),
    ("schedule.max_beta=1.5", "schedule.max_beta", "(got 1.5)", "less than 1"),
    ("training.p_uncond=2", "training.p_uncond", "(got 2)", "less than or equal to 1"),
    ("training.lr=-0.1", "training.lr", "(got -0.1)", "greater than 0"),
    ("schedule.offset=abc", "schedule.offset", "(got 'abc')", "valid number"),
])
def test_bad_value_names_field_value_and_bound(registry, override, field, got, bound):
    message = one_line_error(overrides=[override])
    assert message.startswith(f"{field}: ")
    assert got in message and bound in message


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("field", ["training.lr", "autoencoder_training.weight_decay", "schedule.max_beta",
                                   "schedule.gamma"])
def test_no_float_field_takes_nan_or_infinity(registry, field, value):
    """Built-in sections, a built-in plugin and a third-party plugin ('fancy') alike."""
    data = {"schedule": {"type": "fancy"}} if field.startswith("schedule.gamma") else {}
    message = one_line_error(data=data, overrides=[f"{field}={value}"])
    assert message.startswith(f"{field}: ") and "finite number" in message


def test_every_spec_class_refuses_non_finite_floats_through_the_base(registry):
    """One mechanism: the config of the base class every spec inherits."""
    model = run_spec_model(registry)
    sections = [model, *(f.annotation for f in model.model_fields.values() if isinstance(f.annotation, type))]
    specs = [c.spec for c in registry.all()] + [c for c in sections if issubclass(c, BaseModel)]
    assert FancyScheduleSpec in specs and len(specs) >= 6
    assert all(spec.model_config["allow_inf_nan"] is False for spec in specs)


@pytest.mark.parametrize(("name", "text"), [
    ("run.json", '{"training": {"lr": NaN}}'),
    ("run.json", '{"training": {"lr": Infinity}}'),
    ("run.toml", "[training]\nlr = inf\n"),
    ("run.yaml", "training: {lr: .nan}\n"),
])
def test_non_finite_numbers_in_any_file_format_are_refused(registry, tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(SpecError, match=r"^training\.lr: Input should be a finite number"):
        load_run_spec(tmp_path / name)


@pytest.mark.parametrize(("override", "field"), [
    ("seed=4294967296", "seed"), ("seed=-1", "seed"), ("seed=99999999999999999999", "seed"),
])
def test_seeds_are_bounded(registry, override, field):
    message = one_line_error(overrides=[override])
    assert message.startswith(f"{field}: ")
    assert resolve_run_spec({}, overrides=[f"{field}={SEED_MAX}"]).seed == SEED_MAX


def test_an_integer_too_long_to_convert_is_one_line(registry):
    message = one_line_error(overrides=["seed=1" + "0" * 5000])
    assert message.startswith("seed: ") and len(message) < 200


def test_a_device_name_torch_cannot_run_is_refused_in_the_spec(registry):
    expected = "device: unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"
    assert one_line_error(overrides=["device=tpu"]) == expected
    assert resolve_run_spec({}, overrides=["device=mps"]).device == "mps"  # may be run on another machine


def test_cross_field_rule_names_its_section(registry):
    message = one_line_error(overrides=["training.batch_size=10", "training.grad_accum=3"])
    assert message.startswith("training: ") and "not divisible" in message
    message = one_line_error(data={"schedule": {"type": "linear", "beta_start": 0.1, "beta_end": 0.01}})
    assert message.startswith("schedule: ") and "beta_end" in message


def test_several_mistakes_give_one_line_each(registry):
    with pytest.raises(SpecError) as info:
        resolve_run_spec({}, overrides=["schedule.offset=2", "training.lr=0", "seed=x"])
    lines = str(info.value).splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["schedule.offset", "seed", "training.lr"]


# -- --set and --<kind> ---------------------------------------------------------------------
@pytest.mark.parametrize(("assignment", "expected"), [
    ("a=3", {"a": 3}),
    ("a=0.25", {"a": 0.25}),
    ("a=-2", {"a": -2}),
    ("a=[1, 2.5, x]", {"a": [1, 2.5, "x"]}),
    ("a=true", {"a": True}),
    ("a=false", {"a": False}),
    ("a=null", {"a": None}),
    ("a=", {"a": None}),
    ("a=hello world", {"a": "hello world"}),
    ("a=x=y", {"a": "x=y"}),
    ("a={b: 1}", {"a": {"b": 1}}),
    ("a.b.c=1", {"a": {"b": {"c": 1}}}),
    (" a.b = 7", {"a": {"b": 7}}),
])
def test_set_parses_values_as_yaml(assignment, expected):
    data: dict = {}
    apply_set(data, assignment)
    assert data == expected


def test_set_merges_into_existing_sections():
    data = {"training": {"lr": 1.0, "max_steps": 5}, "conditioner": "minilm"}
    apply_set(data, "training.lr=0.5")
    apply_set(data, "conditioner.dim=3")  # `conditioner: minilm` shorthand becomes a section
    assert data == {"training": {"lr": 0.5, "max_steps": 5}, "conditioner": {"type": "minilm", "dim": 3}}


@pytest.mark.parametrize("assignment", ["novalue", "=3", " =3"])
def test_set_without_key_or_value_is_refused(assignment):
    with pytest.raises(SpecError, match=r"^--set .*expected KEY=VALUE"):
        apply_set({}, assignment)


def test_set_into_a_plain_value_is_refused():
    with pytest.raises(SpecError, match=r"^--set seed\.x: 'seed' is a value, not a section$"):
        apply_set({"seed": 3}, "seed.x=1")


def test_set_values_reach_the_resolved_spec_with_their_types(registry):
    spec = resolve_run_spec({}, overrides=[
        "training.lr=1e-4", "training.latent_cache=false", "schedule.num_timesteps=10", "seed=7",
        "training.min_snr_gamma=5",
    ])
    assert spec.training.lr == pytest.approx(1e-4) and isinstance(spec.training.lr, float)
    assert spec.training.latent_cache is False
    assert spec.schedule.num_timesteps == 10 and spec.seed == 7 and spec.training.min_snr_gamma == 5.0


def test_choose_plugin_keeps_params_when_the_type_stays_and_drops_them_when_it_changes():
    data = {"schedule": {"type": "linear", "num_timesteps": 10}}
    choose_plugin(data, "schedule", "linear")
    assert data == {"schedule": {"type": "linear", "num_timesteps": 10}}
    choose_plugin(data, "schedule", "cosine")
    assert data == {"schedule": {"type": "cosine"}}

    data = {"schedule": {"num_timesteps": 10}}  # type left to the default, cosine
    choose_plugin(data, "schedule", "cosine")
    assert data == {"schedule": {"num_timesteps": 10}}

    data = {"schedule": {"num_timesteps": 10}}
    choose_plugin(data, "schedule", None)  # option not given: nothing changes
    assert data == {"schedule": {"num_timesteps": 10}}

    data = {"conditioner": {"type": "minilm"}}
    choose_plugin(data, "conditioner", "none")  # optional kinds can be switched off
    assert data == {"conditioner": None}


def test_kind_option_then_set_apply_in_that_order(registry):
    spec = resolve_run_spec({"schedule": {"type": "cosine", "offset": 0.01}},
                            plugins={"schedule": "linear"}, overrides=["schedule.num_timesteps=10"])
    assert spec.schedule.model_dump() == {"type": "linear", "num_timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02}

    spec = resolve_run_spec({"schedule": {"type": "cosine", "offset": 0.01}}, plugins={"schedule": "cosine"})
    assert spec.schedule.offset == 0.01


def test_resolve_does_not_modify_its_input(registry):
    data = {"schedule": "linear", "training": {"lr": 0.1}}
    resolve_run_spec(data, plugins={"schedule": "cosine"}, overrides=["training.lr=0.2"])
    assert data == {"schedule": "linear", "training": {"lr": 0.1}}


# -- files ----------------------------------------------------------------------------------
SPEC_TEXTS = {
    "spec.yaml": "seed: 5\nschedule:\n  type: linear\n  num_timesteps: 50\ntraining:\n  lr: 0.001\n  max_steps: 7\n",
    "spec.toml": "seed = 5\n[schedule]\ntype = 'linear'\nnum_timesteps = 50\n[training]\nlr = 0.001\nmax_steps = 7\n",
    "spec.json": json.dumps({"seed": 5, "schedule": {"type": "linear", "num_timesteps": 50},
                             "training": {"lr": 0.001, "max_steps": 7}}),
    "spec.yml": "{seed: 5, schedule: {type: linear, num_timesteps: 50}, training: {lr: 0.001, max_steps: 7}}",
}


def test_yaml_toml_and_json_files_load_to_the_same_spec(registry, tmp_path):
    specs = []
    for name, text in SPEC_TEXTS.items():
        (tmp_path / name).write_text(text)
        specs.append(load_run_spec(tmp_path / name))
    first = specs[0]
    assert (first.seed, first.schedule.type, first.schedule.num_timesteps) == (5, "linear", 50)
    assert (first.training.lr, first.training.max_steps) == (0.001, 7)
    assert all(s.model_dump() == first.model_dump() for s in specs)
    assert len({s.digest() for s in specs}) == 1


def test_no_file_means_the_defaults(registry, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_run_spec(tmp_path / "empty.yaml").model_dump() == load_run_spec(None).model_dump()
    assert load_run_spec(None).schedule.type == "cosine"  # KINDS default


@pytest.mark.parametrize(("name", "text", "what"), [
    ("bad.yaml", "schedule: [unclosed\n", "not valid YAML"),
    ("bad.toml", "schedule = {\n", "not valid TOML"),
    ("bad.json", '{"seed": 1,', "not valid JSON"),
    ("list.yaml", "- 1\n- 2\n", "expected a mapping of spec fields, got list"),
])
def test_a_broken_file_gives_one_line_naming_the_file(tmp_path, name, text, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and what in message and "\n" not in message


@pytest.mark.parametrize("content", [b"seed: 1\n# caf\xe9\n", b"\xff\xfeseed: 1", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text") and "\n" not in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: spec file not found$"):
        load_run_spec(tmp_path / "nope.yaml")


# -- the open union -------------------------------------------------------------------------
def test_a_third_party_spec_validates_like_a_built_in(registry):
    spec = resolve_run_spec({"schedule": {"type": "fancy", "gamma": 0.25}})
    assert isinstance(spec.schedule, FancyScheduleSpec) and spec.schedule.gamma == 0.25
    assert resolve_run_spec({}, plugins={"schedule": "fancy"}).schedule == FancyScheduleSpec()
    assert built == []  # validating builds nothing

    # The same mistakes read the same for the third-party spec and for a built-in one.
    for name, field, typo in [("fancy", "steps", "step"), ("linear", "num_timesteps", "num_timestep")]:
        unknown = one_line_error(plugins={"schedule": name}, overrides=[f"schedule.{typo}=3"])
        assert unknown.startswith(f"schedule.{typo}: unknown key (did you mean '{field}'?); allowed: ")
        bad = one_line_error(plugins={"schedule": name}, overrides=[f"schedule.{field}=1"])
        assert bad == f"schedule.{field}: Input should be greater than or equal to 2 (got 1)"
    assert one_line_error(overrides=["schedule.type=fancy", "schedule.gamma=1"]) == \
        "schedule.gamma: Input should be less than 1 (got 1)"


def test_the_union_only_admits_the_registered_specs(monkeypatch):
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "schedules")
    without_fancy = load_plugins()
    with pytest.raises(SpecError, match=r"^schedule\.type: unknown plugin 'fancy'"):
        resolve_run_spec({"schedule": {"type": "fancy"}}, registry=without_fancy)


# -- schema and digest ----------------------------------------------------------------------
def test_spec_schema_is_valid_json_schema_with_every_schedule(registry):
    import jsonschema  # a dev dependency: the schema is only worth checking with a real validator
    from typer.testing import CliRunner

    from cli.main import create_app

    result = CliRunner().invoke(create_app(), ["spec", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    validator = jsonschema.Draft202012Validator
    validator.check_schema(schema)

    refs = json.dumps(schema["properties"]["schedule"])
    for spec_class in ("LinearScheduleSpec", "CosineScheduleSpec", "FancyScheduleSpec"):
        assert f"#/$defs/{spec_class}" in refs
    assert schema["$defs"]["FancyScheduleSpec"]["properties"]["gamma"]["description"]

    # The schema accepts what the model accepts and rejects what it rejects.
    good = resolve_run_spec({}, plugins={"schedule": "fancy"}).model_dump(mode="json")
    validator(schema).validate(good)
    for bad in ({"schedule": {"type": "fancy", "gamma": 2}}, {"schedule": {"type": "cosin"}}, {"sed": 1}):
        assert not validator(schema).is_valid(bad), bad


def test_digest_is_stable_and_changes_with_a_field(registry):
    a = resolve_run_spec({"seed": 1, "schedule": {"type": "linear", "num_timesteps": 10}})
    b = resolve_run_spec({"schedule": {"num_timesteps": 10, "type": "linear"}, "seed": 1})
    assert a.digest() == b.digest() and len(a.digest()) == 16
    int(a.digest(), 16)

    c = resolve_run_spec({"seed": 1, "schedule": {"type": "linear", "num_timesteps": 11}})
    assert c.digest() != a.digest() and c.digest("schedule") != a.digest("schedule")
    assert c.digest("training") == a.digest("training")

    d = resolve_run_spec({"seed": 1, "schedule": {"type": "linear", "num_timesteps": 10}},
                         overrides=["training.lr=0.5"])
    assert d.digest() != a.digest() and d.digest("schedule") == a.digest("schedule")
    assert a.digest("schedule", "seed") != a.digest("schedule")


def test_batch_sizes_may_change_on_resume_and_old_digests_stay_known(registry):
    from n2a_core.specs import FORMER_OPERATIONAL_FIELDS

    a = resolve_run_spec({}, overrides=["training.batch_size=32"])
    b = resolve_run_spec({}, overrides=["training.batch_size=64", "autoencoder_training.batch_size=8"])
    assert a.digest() == b.digest() and a.digest("training") == b.digest("training")
    # the digests runs started before carry in their checkpoints still tell the batch sizes apart
    old = [s.digest("training", operational=FORMER_OPERATIONAL_FIELDS) for s in (a, b)]
    assert old[0] != old[1] and old[0] != a.digest("training")


def test_fields_added_later_keep_old_runs_digests():
    """A run made before feature_matching_weight, autoencoder_training.ema_decay,
    latent_noise and log_snr_shift existed resumes: the digests its checkpoints carry
    (recorded then) are still this spec's, and setting a new field away from its old
    behaviour still tells the specs apart."""
    from n2a_core.specs import read_spec_file
    from n2a_core.training.run import AUTOENCODER_FIELDS, DIFFUSION_FIELDS

    old = resolve_run_spec(read_spec_file(Path(__file__).parent / "data" / "spec_14cbb99.yaml"))
    assert old.autoencoder.feature_matching_weight == 0.0 and old.autoencoder_training.ema_decay is None
    assert old.digest(*AUTOENCODER_FIELDS) == "eb794a2fbf3956fc"
    assert old.digest(*DIFFUSION_FIELDS) == "1d70f404919a3912"
    # the form the previous version wrote (the new fields in, at their defaults) stays accepted
    assert old.digest(*AUTOENCODER_FIELDS, added={}) in old.earlier_digests(*AUTOENCODER_FIELDS)
    assert old.digest(*AUTOENCODER_FIELDS, added={}) != old.digest(*AUTOENCODER_FIELDS)
    for change in ("autoencoder.feature_matching_weight=1.0", "autoencoder_training.ema_decay=0.999"):
        changed = resolve_run_spec(old.model_dump(mode="json"), overrides=[change])
        assert changed.digest(*AUTOENCODER_FIELDS) != old.digest(*AUTOENCODER_FIELDS), change
    changed = resolve_run_spec(old.model_dump(mode="json"), overrides=["schedule.log_snr_shift=1.0"])
    assert changed.digest(*DIFFUSION_FIELDS) != old.digest(*DIFFUSION_FIELDS)
    # latent_noise (session 10): a KL run made before it keeps the digest recorded then
    kl = resolve_run_spec({"autoencoder": {"type": "kl-vae"}})
    assert kl.digest(*AUTOENCODER_FIELDS) == "0d06bb3eeca2e175"
    noisy = resolve_run_spec({"autoencoder": {"type": "kl-vae", "latent_noise": 0.2}})
    assert noisy.digest(*AUTOENCODER_FIELDS) != kl.digest(*AUTOENCODER_FIELDS)


def test_time_budget_reads_durations_and_refuses_the_rest(registry):
    from n2a_core.specs import parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1h30m", "1.5h")] == [
        90, 90, 1800, 7200, 5400, 5400]
    assert resolve_run_spec({}, overrides=["time_budget=30m"]).time_budget == 1800
    assert resolve_run_spec({"time_budget": 600}).time_budget == 600
    for bad in ("soon", "5x", "inf", "-3", "0"):
        with pytest.raises(SpecError, match="time_budget"):
            resolve_run_spec({}, overrides=[f"time_budget={bad}"])
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(" ")
    # a budget may be set or changed on resume: the digest leaves it out
    assert resolve_run_spec({}, overrides=["time_budget=1h"]).digest() == resolve_run_spec({}).digest()


def test_stage_budgets_split_the_time_and_stage_two_gets_what_stage_one_left(tmp_path, registry):
    from n2a_core.checkpoint import save_checkpoint
    from n2a_core.components import RunDir
    from n2a_core.training.run import stage_budgets

    run = RunDir(tmp_path)
    spec = resolve_run_spec({"time_budget": 1000})
    assert stage_budgets(resolve_run_spec({}), run) == (None, None)
    assert stage_budgets(spec, run) == (400, 600)  # the documented default share, 0.4
    save_checkpoint(run.autoencoder / "checkpoints", 7, {}, {
        "spec_digest": "d", "stage": "autoencoder", "optimizers": {}, "data": {"epoch": 0, "samples": 0},
        "spent_s": 350.0})
    assert stage_budgets(spec, run) == (400, 650)
    shared = resolve_run_spec({"time_budget": 1000, "autoencoder_time_share": 0.25})
    assert stage_budgets(shared, run)[0] == 250
    given = resolve_run_spec({"time_budget": 1000, "autoencoder_weights": "ae.safetensors"})
    assert stage_budgets(given, run) == (0, 1000)


def test_digest_is_the_same_in_another_process(registry):
    """Cache keys outlive the process: no hash randomization may leak into the digest."""
    overrides = ["schedule.num_timesteps=10", "training.lr=0.125"]
    code = ("from n2a_core.specs import load_run_spec; "
            f"print(load_run_spec(None, overrides={overrides!r}).digest())")
    env = {**os.environ, "N2A_LOAD_PLUGINS": "schedules", "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = load_run_spec(None, overrides=overrides, registry=load_plugins(extra=[], entry_points=True))
    assert out.stdout.strip() == here.digest()


def test_run_spec_model_is_built_once_per_registry(registry):
    assert run_spec_model(registry) is run_spec_model(registry)
    other = load_plugins(extra=[(types.SimpleNamespace(), PluginSource("empty", "x", "0"))])
    assert run_spec_model(other) is not run_spec_model(registry)
