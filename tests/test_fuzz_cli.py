"""Property-based fuzzing of what a user types: spec files, `--set` overrides, CLI arguments.

Whatever the input, n2a exits 0 (it was valid), 1 (a user error, printed as `✗` lines) or 2
(Typer's usage error), and never with a traceback. Nothing trains: `n2a train`'s runner is
replaced by one that only records the spec it was given, and `n2a sample` draws from a tiny
random-weight pipeline (T = 20) in place of a trained run. The examples are derandomized and
bounded, so the module takes seconds and fails the same way on every machine.
"""

from __future__ import annotations

import contextlib
import json
import string
import traceback
import types
from pathlib import Path

import pytest
import torch
import typer
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import create_app
from n2a_core.kinds import KINDS
from n2a_core.presets import preset_path

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
runner = CliRunner()
COMMAND = typer.main.get_command(create_app())


@pytest.fixture(autouse=True, scope="module")
def _one_command():
    """Typer rebuilds the Click command on every invoke (0.1 s, most of a `spec show`); the
    app is the same for every example here, so build it once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", lambda app: COMMAND)
        yield


def invoke(*args: str):
    return runner.invoke(create_app(), [str(a) for a in args])


def assert_clean_exit(result, *, bullets_only: bool = True) -> None:
    """Exit 0, 1 or 2, and a crash never: a user error is `✗` lines on stderr."""
    crash = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crash, "".join(traceback.format_exception(result.exception))
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert lines and any(line.startswith("✗") for line in lines), result.stderr
        if bullets_only:  # nothing but the error: one bullet per problem
            assert all(line.startswith("✗") for line in lines), result.stderr


# -- what users type -----------------------------------------------------------------------------
QUICKSTART = yaml.safe_load(preset_path("quickstart").read_text())


def _paths(data, prefix=()):
    for key, value in data.items():
        yield ".".join((*prefix, key))
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


FIELD_PATHS = sorted(_paths(QUICKSTART)) + ["sampler.lower_order_final", "sampler.eta", "sampler.type"]
"""Every field the quickstart names: where a wrong value does the most harm."""

TRICKY = [
    "", " ", "0", "1", "-1", "2", "3", "4.5", ".inf", "-.inf", ".nan", "inf", "-inf", "nan", "NaN", "Infinity",
    "1e400", "-1e400", "1e-400", "4294967295", "4294967296", "9223372036854775808", "99999999999999999999",
    "1" + "0" * 5000, "null", "~", "true", "false", "[]", "{}", "[1, 2]", "[[1]]", "{a: 1}", "{type: nope}",
    "'", '"', "[", "{", "]", "- a\n- b", "a: b: c", "&a [*a]", "!!python/object/apply:os.system ['true']",
    "!!binary aGk=", "[/x]", "[/]", "[b]x[/i]", "[bold]", "line\nbreak", "\t", "é", "🎨",
    "cosine", "ddim", "dpmpp-2m", "minilm",
    "none", "auto", "cpu", "cuda", "mps", "cuda:7", "meta", "quickstart",
]
scalar_text = st.one_of(st.sampled_from(TRICKY), st.sampled_from(TRICKY),
                        st.text(string.printable, max_size=12),
                        st.text(max_size=8).filter(lambda s: "\x00" not in s))
"""Text a user might put in a value: the tricky ones above, printable noise, any Unicode (argv
cannot hold NUL)."""

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def mutated_quickstart(draw) -> dict:
    """The quickstart spec with one field replaced, removed or added."""
    data = json.loads(json.dumps(QUICKSTART))
    *parents, leaf = draw(st.sampled_from(FIELD_PATHS)).split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if draw(st.booleans()) and leaf in node:
        del node[leaf]
    else:
        node[leaf] = draw(json_values)
    return data


@st.composite
def spec_files(draw) -> tuple[str, bytes]:
    """(suffix, content): bytes, text in some encoding, or a (mutated) spec in YAML or JSON."""
    suffix = draw(st.sampled_from([".yaml", ".yml", ".json", ".toml", ".txt", ""]))
    kind = draw(st.sampled_from(["bytes", "text", "yaml", "yaml", "json", "json"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=64))
    if kind == "text":
        encoding = draw(st.sampled_from(["utf-8", "utf-16", "latin-1"]))
        return suffix, draw(st.text(max_size=64)).encode(encoding, errors="replace")
    data = draw(mutated_quickstart() if draw(st.integers(0, 3)) else json_values)
    if kind == "yaml":
        return suffix, yaml.safe_dump(data, allow_unicode=draw(st.booleans())).encode()
    return suffix, json.dumps(data).encode()


keys = st.one_of(st.sampled_from(FIELD_PATHS), scalar_text,
                 st.builds(lambda path, part: f"{path}.{part}", st.sampled_from(FIELD_PATHS), scalar_text))
assignments = st.one_of(st.builds(lambda key, value: f"{key}={value}", keys, scalar_text), scalar_text)
"""`--set` arguments: mostly KEY=VALUE on real fields, sometimes anything at all."""

plugin_choices = st.lists(st.tuples(st.sampled_from([f"--{kind}" for kind in KINDS]), scalar_text), max_size=2)


def flat(pairs) -> list[str]:
    return [item for pair in pairs for item in pair]


# -- spec show -----------------------------------------------------------------------------------
@FUZZ
@given(spec=spec_files(), overrides=st.lists(assignments, max_size=3), choices=plugin_choices)
def test_spec_show_never_crashes(spec, overrides, choices, tmp_path):
    suffix, content = spec
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(content)
    for args in (["-c", path], [*flat(("--set", o) for o in overrides), *flat(choices)]):
        assert_clean_exit(invoke("spec", "show", *args))


@FUZZ
@given(args=st.lists(st.one_of(st.sampled_from(["--json", "--preset", "--set", "-s", "--config",
                                                *[f"--{k}" for k in KINDS]]), scalar_text), max_size=5))
def test_spec_show_any_arguments(args):
    assert_clean_exit(invoke("spec", "show", *args))


# -- train (the runner replaced: nothing trains) ------------------------------------------------
@pytest.fixture
def recorded_train(monkeypatch, tmp_path):
    """`n2a train` up to the point where it would start: the specs it would have trained."""
    import n2a_core.training.run

    started = []
    monkeypatch.setattr(n2a_core.training.run, "train_run", lambda spec, out, resume, max_steps:
                        started.append(spec) or contextlib.nullcontext(types.SimpleNamespace(is_main=False)))
    monkeypatch.chdir(tmp_path)  # relative --out folders land here
    return started


TRAIN_OPTIONS = ["--set", "-s", "--config", "--out", "--max-steps", "--resume", "--preset", *[f"--{k}" for k in KINDS]]


@FUZZ
@given(spec=spec_files(), overrides=st.lists(assignments, max_size=3),
       args=st.lists(st.one_of(st.sampled_from(TRAIN_OPTIONS), scalar_text), max_size=5))
def test_train_never_crashes_before_it_starts(spec, overrides, args, recorded_train, tmp_path):
    suffix, content = spec
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(content)
    assert_clean_exit(invoke("train", "-c", path, "--out", tmp_path / "run-a", *flat(("--set", o) for o in overrides)))
    assert_clean_exit(invoke("train", *[a for a in args if not Path(a).is_absolute()]))


def test_spec_show_is_what_train_would_run(recorded_train):
    shown = invoke("spec", "show", "--json")
    assert shown.exit_code == 0, shown.output
    assert invoke("train").exit_code == 0
    assert json.loads(shown.stdout) == recorded_train[0].model_dump(mode="json")
    assert recorded_train[0].conditioner.type == "minilm" and recorded_train[0].data.image_size == 32


# -- sample (a tiny random-weight run) ------------------------------------------------------------
LABELS = ["cat", "dog"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A LoadedRun of random weights at 16 px with a class-label conditioner and T = 20."""
    from n2a_core.diffusion_model import DiffusionModel
    from n2a_core.generate import LoadedRun
    from n2a_core.pipeline import RunDir, build_pipeline
    from n2a_core.specs import resolve_run_spec

    root = tmp_path_factory.mktemp("fuzz") / "run"
    spec = resolve_run_spec({
        "device": "cpu", "data": {"type": "openmoji", "image_size": 16},
        "autoencoder": {"type": "vqgan", "base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                        "codebook_size": 16, "perceptual": "none"},
        "denoiser": {"type": "unet", "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                     "attention_levels": [], "norm_groups": 4},
        "schedule": {"type": "cosine", "num_timesteps": 20}, "conditioner": {"type": "class-label"},
        "sampler": {"type": "ddim", "steps": 4},
    })
    pipeline = build_pipeline(spec, vocabulary=LABELS, training=False)
    model = DiffusionModel(pipeline.denoiser, pipeline.conditioner).eval()
    RunDir(root).write_spec(spec)
    return LoadedRun(RunDir(root), spec, pipeline, model, torch.device("cpu"), 0)


@pytest.fixture
def sample_from_tiny_run(monkeypatch, tiny_run, tmp_path):
    import n2a_core.generate

    real_load_run = n2a_core.generate.load_run
    monkeypatch.setattr(n2a_core.generate, "load_run",
                        lambda root, **kw: tiny_run if Path(root) == tiny_run.run.root else real_load_run(root, **kw))
    monkeypatch.chdir(tmp_path)
    return tiny_run.run.root


SAMPLE_VALUES = {
    "--prompt": st.one_of(st.sampled_from(["cat", "a red apple"]), scalar_text),
    "--label": st.one_of(st.sampled_from(LABELS + ["Cat", "bird"]), scalar_text),
    "--guidance": st.sampled_from(["0", "1.5", "3", "-1", "inf", "-inf", "nan", "1e309", "x", ""]),
    "--steps": st.sampled_from(["1", "3", "20", "21", "0", "-2", "99999999999999999999", "x"]),
    "--n": st.sampled_from(["1", "2", "0", "-1", "1000001", "1e3", "x"]),
    "--seed": st.sampled_from(["0", "7", "-1", "4294967295", "4294967296", "99999999999999999999", "x"]),
    "--sampler": st.one_of(st.sampled_from(["ddim", "ddpm", "dpmpp-2m", "dpm", "none"]), scalar_text),
    "--conditioner": st.one_of(st.sampled_from(["class-label", "minilm", "none"]), scalar_text),
    "--batch-size": st.sampled_from(["1", "3", "0", "x"]),
    "--device": st.one_of(st.sampled_from(["auto", "cpu", "cuda", "mps", "cuda:3", "tpu", ""]), scalar_text),
    "--out": st.one_of(st.just("out"), st.text(string.ascii_letters + "[]/ .-", min_size=1, max_size=8)
                       .filter(lambda s: not s.startswith("/") and ".." not in s)),
}


@st.composite
def sample_arguments(draw) -> list[str]:
    args: list[str] = []
    for option in draw(st.lists(st.sampled_from([*SAMPLE_VALUES, "--ema", "--no-ema"]), max_size=5)):
        args.append(option)
        if option in SAMPLE_VALUES:
            args.append(draw(SAMPLE_VALUES[option]))
    return args


@FUZZ
@given(args=sample_arguments(), run=st.sampled_from(["tiny", "tiny", "tiny", "missing", "."]))
def test_sample_never_crashes(args, run, sample_from_tiny_run):
    where = {"tiny": sample_from_tiny_run, "missing": "no-such-run", ".": "."}[run]
    result = invoke("sample", where, *args)
    assert_clean_exit(result, bullets_only=False)  # a progress bar may precede the error
    for log in [*Path.cwd().rglob("samples.jsonl"), *sample_from_tiny_run.rglob("samples.jsonl")]:
        records = [json.loads(line, parse_constant=_refuse) for line in log.read_text().splitlines()]
        assert all(isinstance(r["steps"], int) and r["steps"] >= 1 for r in records), records


def _refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")
