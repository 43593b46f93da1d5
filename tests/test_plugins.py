"""The plugin registry: hooks, registration rules, broken plugins and the allow-list.

Every test builds its own Registry from fake plugin objects (`load_plugins(extra=...,
entry_points=False)`) or from a fake installed distribution on a temporary sys.path, so
none depends on which of n2a's own plugins exist yet.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Literal

import pytest
from pydantic import Field, create_model

from n2a_core import ComponentSpec, hookimpl, hookspecs
from n2a_core.errors import PluginError
from n2a_core.kinds import KINDS
from n2a_core.plugins import PluginSource, get_registry, load_plugins, set_registry

SRC_A = PluginSource("plugin_a", "pkg-a", "1.0")
SRC_B = PluginSource("plugin_b", "pkg-b", "2.0")


# -- fake plugins ---------------------------------------------------------------------------
def fake_spec(name: str) -> type[ComponentSpec]:
    """A component spec tagged `name` with one bounded parameter."""
    return create_model(
        f"Fake_{name}_Spec", __base__=ComponentSpec,
        type=(Literal[name], name), size=(int, Field(4, ge=1, le=64)),
    )


def fake_factory(spec, ctx):
    """Builds a fake component."""
    return types.SimpleNamespace(spec=spec, ctx=ctx)


def fake_plugin(components: dict[str, list[str]], *, raise_in: str | None = None, **extra_attrs):
    """A plugin object registering `components` ({kind: [names]}) through the kind's hook.

    With `raise_in=kind`, that kind's hook registers its components and then raises.
    """
    plugin = types.SimpleNamespace(**extra_attrs)

    def make_hook(kind: str, names: list[str]):
        def hook(register):
            for name in names:
                register(name, fake_spec(name), fake_factory, f"fake {kind} {name}")
            if kind == raise_in:
                raise RuntimeError(f"boom in {kind}")
        return hookimpl(hook)

    for kind, names in components.items():
        setattr(plugin, KINDS[kind].hook, make_hook(kind, names))
    return plugin


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A fake installed distribution 'fake-n2a-plugins' 2.5 with two n2a entry points.

    `fake_ok` registers the schedule 'fake_sched'; `fake_broken` fails to import.
    """
    site = tmp_path / "site"
    info = site / "fake_n2a_plugins-2.5.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-n2a-plugins\nVersion: 2.5\n")
    (info / "entry_points.txt").write_text(
        "[n2a]\nfake_ok = n2a_test_fake_ok\nfake_broken = n2a_test_fake_broken\n"
    )
    (site / "n2a_test_fake_ok.py").write_text(inspect.cleandoc('''
        from typing import Literal
        from n2a_core import ComponentSpec, hookimpl

        class FakeSchedSpec(ComponentSpec):
            type: Literal["fake_sched"] = "fake_sched"

        @hookimpl
        def register_schedules(register):
            register("fake_sched", FakeSchedSpec, lambda spec, ctx: None, "a fake schedule")
    '''))
    (site / "n2a_test_fake_broken.py").write_text('raise ImportError("needs libfoo, which is missing")\n')
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        for module in ("n2a_test_fake_ok", "n2a_test_fake_broken"):
            sys.modules.pop(module, None)
        importlib.invalidate_caches()


# -- the hooks ------------------------------------------------------------------------------
def test_every_hookspec_maps_to_a_kind():
    """Meta-test: the hookspecs and KINDS agree, so test_each_kind_registers covers every hook."""
    hooks = {name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "n2a_spec")}
    assert hooks == {kind.hook for kind in KINDS.values()}
    for kind in KINDS.values():
        module, _, cls = kind.interface.partition(":")
        assert isinstance(getattr(importlib.import_module(module), cls), type), kind.interface


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_registers_through_its_hook(kind):
    name = f"fake_{kind}"
    registry = load_plugins(extra=[(fake_plugin({kind: [name]}), SRC_A)], entry_points=False)

    assert registry.plugins["plugin_a"].status == "ok"
    assert registry.names(kind) == [name]
    assert all(registry.names(k) == [] for k in KINDS if k != kind)
    component = registry.get(kind, name)
    assert (component.kind, component.source, component.description) == (kind, SRC_A, f"fake {kind} {name}")

    spec = registry.validate_spec(kind, {"type": name, "size": 8})
    built = registry.build(kind, spec)
    assert built.spec is spec and built.spec.size == 8


def test_description_defaults_to_the_factory_docstring():
    class Plugin:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            register("quiet", fake_spec("quiet"), fake_factory)

    registry = load_plugins(extra=[(Plugin, SRC_A)], entry_points=False)
    assert registry.get("sampler", "quiet").description == "Builds a fake component."


def test_one_plugin_may_provide_several_kinds():
    plugin = fake_plugin({"schedule": ["s1", "s2"], "sampler": ["p1"]})
    registry = load_plugins(extra=[(plugin, SRC_A)], entry_points=False)
    assert registry.names("schedule") == ["s1", "s2"] and registry.names("sampler") == ["p1"]
    assert [c.name for c in registry.all()] == ["s1", "s2", "p1"]  # KINDS order, then by name


# -- registration rules ---------------------------------------------------------------------
def test_duplicate_name_is_refused_naming_both_plugins():
    registry = load_plugins(
        extra=[(fake_plugin({"schedule": ["dup"]}), SRC_A),
               (fake_plugin({"schedule": ["dup", "only_b"]}), SRC_B)],
        entry_points=False,
    )
    # The first registration wins; the second plugin is an error and keeps nothing.
    assert registry.get("schedule", "dup").source == SRC_A
    assert registry.names("schedule") == ["dup"]
    status = registry.plugins["plugin_b"]
    assert status.status == "error"
    assert "dup" in status.error and "plugin_a" in status.error and "plugin_b" in status.error
    assert "\n" not in status.error


class FakeSampler:
    """A fake sampler built from its spec's fields."""

    def __init__(self, size: int):
        self.size = size


def registered(*args, kind: str = "sampler", **kwargs):
    """A registry holding one plugin whose `kind` hook calls register(*args, **kwargs)."""
    def hook(register):
        register(*args, **kwargs)

    plugin = types.SimpleNamespace(**{KINDS[kind].hook: hookimpl(hook)})
    return load_plugins(extra=[(plugin, SRC_A)], entry_points=False)


def test_short_form_takes_the_name_from_the_literal_and_builds_the_class():
    registry = registered(fake_spec("short"), FakeSampler)
    assert registry.plugins["plugin_a"].status == "ok" and registry.names("sampler") == ["short"]
    component = registry.get("sampler", "short")
    assert component.description == "A fake sampler built from its spec's fields."
    built = registry.build("sampler", registry.validate_spec("sampler", {"type": "short", "size": 8}))
    assert isinstance(built, FakeSampler) and built.size == 8


def test_short_form_takes_a_description_positionally_or_by_keyword():
    assert registered(fake_spec("a"), FakeSampler, "one line").get("sampler", "a").description == "one line"
    by_keyword = registered(fake_spec("b"), FakeSampler, description="by keyword")
    assert by_keyword.get("sampler", "b").description == "by keyword"


def test_explicit_form_still_passes_the_build_context():
    from n2a_core import BuildContext

    registry = registered("ctx", fake_spec("ctx"), fake_factory, "needs the context", kind="schedule")
    context = BuildContext(label_vocabulary=["a", "b"])
    built = registry.build("schedule", registry.validate_spec("schedule", "ctx"), context)
    assert built.ctx is context and registry.get("schedule", "ctx").description == "needs the context"


@pytest.mark.parametrize("args, expected", [
    ((create_model("NoTag", __base__=ComponentSpec, type=(str, "x")), FakeSampler), "has no single `type` literal"),
    ((create_model("TwoTags", __base__=ComponentSpec, type=(Literal["x", "y"], "x")), FakeSampler),
     "has no single `type` literal"),
    ((create_model("Plain", type=(Literal["x"], "x")), FakeSampler), "must subclass n2a_core.ComponentSpec"),
    ((fake_spec("x"), 42), "the second argument must be the component class"),
    ((fake_spec("x"),), "expected register(MySpec, MyClass[, description])"),
    (("x", fake_spec("x")), "expected register(MySpec, MyClass[, description])"),
])
def test_register_mistakes_are_one_line_plugin_errors(args, expected):
    registry = registered(*args)
    status = registry.plugins["plugin_a"]
    assert status.status == "error" and registry.names("sampler") == []
    assert expected in status.error and "plugin 'plugin_a'" in status.error and "\n" not in status.error


def test_spec_whose_type_default_differs_from_the_name_is_refused():
    class Plugin:
        @staticmethod
        @hookimpl
        def register_schedules(register):
            register("bar", fake_spec("foo"), fake_factory)

    registry = load_plugins(extra=[(Plugin, SRC_A)], entry_points=False)
    assert registry.names("schedule") == []
    error = registry.plugins["plugin_a"].error
    assert "'bar'" in error and "'foo'" in error and "Literal['bar']" in error


def test_spec_must_subclass_component_spec():
    from pydantic import BaseModel

    class NotASpec(BaseModel):
        type: Literal["x"] = "x"

    registry = load_plugins(entry_points=False)
    with pytest.raises(PluginError, match="must subclass n2a_core.ComponentSpec"):
        registry.register("schedule", "x", NotASpec, fake_factory, source=SRC_A)
    with pytest.raises(PluginError, match=r"unknown kind 'schedul' \(did you mean 'schedule'\?\)"):
        registry.register("schedul", "x", fake_spec("x"), fake_factory, source=SRC_A)


def test_spec_with_a_non_literal_type_is_refused_at_registration():
    class StrTagSpec(ComponentSpec):
        type: str = "strtag"

    registry = load_plugins(extra=[(fake_plugin({"schedule": ["good"]}), SRC_A)], entry_points=False)
    with pytest.raises(PluginError, match="Literal"):
        registry.register("schedule", "strtag", StrTagSpec, fake_factory, source=SRC_B)
    registry.validate_spec("schedule", "good")  # the other schedules stay usable


def test_unknown_name_suggests_the_closest_and_lists_the_installed():
    plugin = fake_plugin({"schedule": ["cosine", "linear"]})
    registry = load_plugins(extra=[(plugin, SRC_A)], entry_points=False)
    with pytest.raises(PluginError) as info:
        registry.get("schedule", "cosin")
    message = str(info.value)
    assert "\n" not in message
    assert "'cosin'" in message and "did you mean 'cosine'" in message
    assert message.endswith("installed: cosine, linear")

    with pytest.raises(PluginError) as info:
        registry.get("sampler", "ddim")
    assert "did you mean" not in str(info.value) and "installed: none" in str(info.value)


def test_the_spec_union_is_rebuilt_when_a_plugin_registers():
    registry = load_plugins(extra=[(fake_plugin({"schedule": ["s1", "s2"]}), SRC_A)], entry_points=False)
    assert registry.validate_spec("schedule", "s1").type == "s1"
    registry.register("schedule", "late", fake_spec("late"), fake_factory, source=SRC_B)
    assert registry.validate_spec("schedule", {"type": "late", "size": 2}).size == 2


# -- broken plugins -------------------------------------------------------------------------
class RaisingHook:
    @staticmethod
    @hookimpl
    def register_schedules(register):
        raise RuntimeError("cannot find my weights")


class MisspelledHook:
    @staticmethod
    @hookimpl
    def register_schedule(register):  # singular: not a hook n2a defines
        register("never", fake_spec("never"), fake_factory)


class WrongArgument:
    @staticmethod
    @hookimpl
    def register_schedules(reg):  # the hook's argument is `register`
        reg("never", fake_spec("never"), fake_factory)


@pytest.mark.parametrize(("plugin", "words"), [
    (RaisingHook, ["RuntimeError", "cannot find my weights"]),
    (MisspelledHook, ["register_schedule"]),
    (WrongArgument, ["reg"]),
], ids=["hook-raises", "misspelled-hook", "wrong-argument"])
def test_a_broken_plugin_is_an_error_and_the_others_load(plugin, words):
    registry = load_plugins(
        extra=[(fake_plugin({"schedule": ["before"]}), SRC_A),
               (plugin, PluginSource("broken", "pkg-broken", "0.1")),
               (fake_plugin({"sampler": ["after"]}), SRC_B)],
        entry_points=False,
    )
    status = registry.plugins["broken"]
    assert status.status == "error"
    assert all(word in status.error for word in words), status.error
    assert "\n" not in status.error
    assert registry.names("schedule") == ["before"] and registry.names("sampler") == ["after"]
    assert registry.plugins["plugin_a"].status == registry.plugins["plugin_b"].status == "ok"


def test_a_hook_that_raises_midway_leaves_none_of_the_plugins_components():
    # Kinds run in KINDS order: the schedule hook succeeds, then the sampler hook
    # registers one sampler and raises. Neither kind may keep a component of it.
    plugin = fake_plugin({"schedule": ["half_s"], "sampler": ["half_p1", "half_p2"]}, raise_in="sampler")
    registry = load_plugins(
        extra=[(plugin, SRC_A), (fake_plugin({"schedule": ["other"]}), SRC_B)], entry_points=False
    )
    assert registry.plugins["plugin_a"].status == "error"
    assert "boom in sampler" in registry.plugins["plugin_a"].error
    assert [c.name for c in registry.all()] == ["other"]


def test_a_plugin_that_fails_to_import_is_an_error_and_the_others_load(fake_dist, monkeypatch):
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "fake_ok,fake_broken")
    registry = load_plugins()

    broken = registry.plugins["fake_broken"]
    assert broken.status == "error"
    assert broken.error == "ImportError: needs libfoo, which is missing"
    assert (broken.source.package, broken.source.version) == ("fake-n2a-plugins", "2.5")

    assert registry.plugins["fake_ok"].status == "ok"
    component = registry.get("schedule", "fake_sched")
    assert component.source == PluginSource("fake_ok", "fake-n2a-plugins", "2.5")


def test_a_plugin_name_clash_keeps_the_first_plugin():
    registry = load_plugins(
        extra=[(fake_plugin({"schedule": ["first"]}), SRC_A),
               (fake_plugin({"schedule": ["second"]}), PluginSource("plugin_a", "pkg-other", "9.9"))],
        entry_points=False,
    )
    assert registry.names("schedule") == ["first"]
    assert registry.plugins["plugin_a"].status == "ok"
    clash = [s for s in registry.plugins.values() if s.source.package == "pkg-other"]
    assert len(clash) == 1 and clash[0].status == "error" and "plugin_a" in clash[0].error


# -- environment switches -------------------------------------------------------------------
@pytest.mark.parametrize(("allow", "expected"), [
    ("fake_ok", {"fake_ok"}),
    (" fake_broken , ", {"fake_broken"}),
    ("fake_ok,fake_broken", {"fake_ok", "fake_broken"}),
    ("", set()),
])
def test_n2a_load_plugins_is_an_allow_list(fake_dist, monkeypatch, allow, expected):
    monkeypatch.setenv("N2A_LOAD_PLUGINS", allow)
    registry = load_plugins()
    assert set(registry.plugins) == expected
    assert registry.names("schedule") == (["fake_sched"] if "fake_ok" in expected else [])


def test_without_the_allow_list_every_entry_point_loads(fake_dist, monkeypatch):
    monkeypatch.delenv("N2A_LOAD_PLUGINS", raising=False)
    registry = load_plugins()
    assert {"fake_ok", "fake_broken", "schedules"} <= set(registry.plugins)
    assert registry.plugins["schedules"].source.package == "n2a"


def test_n2a_trace_plugins_prints_the_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("N2A_TRACE_PLUGINS", "1")
    load_plugins(extra=[(fake_plugin({"schedule": ["traced"]}), SRC_A)], entry_points=False)
    err = capsys.readouterr().err
    assert "register_schedules" in err and "plugin_a" in err


def test_set_registry_replaces_and_resets_the_process_wide_registry(monkeypatch):
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "")
    mine = load_plugins(extra=[(fake_plugin({"schedule": ["mine"]}), SRC_A)], entry_points=False)
    try:
        set_registry(mine)
        assert get_registry() is mine
        set_registry(None)
        fresh = get_registry()  # reloaded from (no) entry points
        assert fresh is not mine and fresh.names("schedule") == []
    finally:
        set_registry(None)
