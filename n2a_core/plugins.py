"""Plugin discovery and the one registry that holds every component kind.

Plugins are modules listed under the entry-point group ``n2a`` (built-ins included:
see pyproject.toml). Each module implements some of the hooks in `hookspecs` and calls
the `register` callback it receives (a `Registrar`) for every component it provides:
``register(MySpec, MyClass)`` or, when the factory needs the build context,
``register(name, MySpec, factory, description)``.

A plugin that fails to import, misspells a hook, or raises while registering does not
break n2a: it is recorded with status ``error`` and shown by ``n2a list-plugins``.

Environment switches (llm/datasette style):
- ``N2A_LOAD_PLUGINS=a,b``: load only these entry-point names ('' loads none).
- ``N2A_TRACE_PLUGINS=1``: print every hook call pluggy makes.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

import pluggy
from pydantic import Field, TypeAdapter, ValidationError

from n2a_core import hookspecs
from n2a_core.component import BuildContext, ComponentSpec
from n2a_core.errors import PluginError, did_you_mean
from n2a_core.kinds import KINDS
from n2a_core.spec_errors import format_validation_error

ENTRY_POINT_GROUP = "n2a"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin module came from: its entry point and distribution."""

    name: str
    package: str
    version: str


@dataclass
class PluginStatus:
    source: PluginSource
    status: str = "ok"
    error: str | None = None


@dataclass(frozen=True)
class Component:
    """One registered component: what `register(...)` was called with, plus its origin."""

    kind: str
    name: str
    spec: type
    factory: Callable[..., Any]
    description: str
    source: PluginSource


@dataclass
class Registry:
    """Every component of every kind, keyed by (kind, name)."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    plugins: dict[str, PluginStatus] = field(default_factory=dict)
    _adapters: dict[str, TypeAdapter] = field(default_factory=dict, init=False, repr=False, compare=False)
    """One validator per kind, built on first use and dropped when a plugin (un)registers."""

    # -- registration -------------------------------------------------------------
    def register(
        self,
        kind: str,
        name: str,
        spec: type,
        factory: Callable[..., Any],
        description: str | None = None,
        *,
        source: PluginSource,
    ) -> None:
        if kind not in KINDS:
            raise PluginError(f"plugin '{source.name}': unknown kind '{kind}'{did_you_mean(kind, KINDS)}")
        if not (isinstance(spec, type) and issubclass(spec, ComponentSpec)):
            raise PluginError(f"plugin '{source.name}': {kind} '{name}' spec must subclass n2a_core.ComponentSpec")
        tag = spec.model_fields["type"].default
        annotation = spec.model_fields["type"].annotation
        if tag != name or typing.get_origin(annotation) is not typing.Literal or typing.get_args(annotation) != (name,):
            raise PluginError(
                f"plugin '{source.name}': {kind} '{name}' has spec {spec.__name__} whose "
                f"type defaults to {tag!r}; declare `type: Literal[{name!r}] = {name!r}`"
            )
        existing = self.components[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{kind} '{name}' is registered twice: by plugin '{existing.source.name}' "
                f"({existing.source.package}) and by '{source.name}' ({source.package}); "
                "uninstall one or disable it with N2A_LOAD_PLUGINS"
            )
        if description is None:
            description = (inspect.getdoc(factory) or "").strip().splitlines()[0:1]
            description = description[0] if description else ""
        self.components[kind][name] = Component(kind, name, spec, factory, description, source)
        self._adapters.clear()

    def forget_plugin(self, plugin_name: str) -> None:
        """Remove every component a plugin registered (used when its hook fails midway)."""
        for kind in self.components:
            for name in [n for n, c in self.components[kind].items() if c.source.name == plugin_name]:
                del self.components[kind][name]
        self._adapters.clear()

    # -- lookup -------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            installed = ", ".join(self.names(kind)) or "none"
            raise PluginError(
                f"{kind}: unknown plugin '{name}'{did_you_mean(name, self.names(kind))}; "
                f"installed: {installed}"
            ) from None

    def all(self, kind: str | None = None) -> list[Component]:
        kinds = [kind] if kind else list(KINDS)
        return [self.components[k][n] for k in kinds for n in self.names(k)]

    # -- specs --------------------------------------------------------------------
    def _adapter(self, kind: str) -> TypeAdapter:
        if kind not in self._adapters:
            self._adapters[kind] = TypeAdapter(self.spec_type(kind))
        return self._adapters[kind]

    def spec_type(self, kind: str) -> Any:
        """The discriminated union of every registered spec of `kind` (open to plugins)."""
        specs = [c.spec for c in self.all(kind)]
        if not specs:
            raise PluginError(f"no {kind} plugin is installed; `n2a list-plugins` shows what loaded")
        if len(specs) == 1:
            return specs[0]
        return Annotated[Union[tuple(specs)], Field(discriminator="type")]  # noqa: UP007

    def validate_spec(self, kind: str, data: Any):
        """A component spec from a dict or a plugin name, with n2a's one-line errors."""
        if isinstance(data, str):
            data = {"type": data}
        if isinstance(data, dict):
            self.get(kind, data.get("type", KINDS[kind].default))  # unknown names: did-you-mean
            data = {"type": KINDS[kind].default, **data}
        try:
            return self._adapter(kind).validate_python(data)
        except ValidationError as e:
            raise format_validation_error(e, data=data, prefix=(kind,), registry=self) from None

    def build(self, kind: str, spec, context=None):
        """Instantiate a component from its validated spec."""
        component = self.get(kind, spec.type)
        return component.factory(spec, context or BuildContext())

    def __hash__(self) -> int:  # specs caches the run-spec model per registry
        return id(self)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    allow = os.environ.get("N2A_LOAD_PLUGINS")
    if allow is not None:
        wanted = {a.strip() for a in allow.split(",") if a.strip()}
        installed = sorted({ep.name for ep in eps})
        for name in sorted(wanted - set(installed)):  # a typo would otherwise load nothing, silently
            log.warning("N2A_LOAD_PLUGINS: no plugin '%s' is installed%s; installed: %s",
                        name, did_you_mean(name, installed), ", ".join(installed) or "none")
        eps = [ep for ep in eps if ep.name in wanted]
    # Distinct entry points only: an editable install can list the same one twice.
    unique = {(ep.name, ep.value): ep for ep in eps}
    return sorted(unique.values(), key=lambda ep: ep.name)


def _source_of(ep: importlib.metadata.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    return PluginSource(ep.name, dist.name if dist else "?", dist.version if dist else "?")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_plugins(
    extra: Iterable[tuple[object, PluginSource]] = (), *, entry_points: bool = True
) -> Registry:
    """Load every plugin (entry points, then `extra` objects) into a fresh Registry."""
    registry = Registry()
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    tracing = bool(os.environ.get("N2A_TRACE_PLUGINS"))

    candidates: list[tuple[Callable[[], object], PluginSource]] = []
    if entry_points:
        candidates += [(ep.load, _source_of(ep)) for ep in _entry_points()]
    candidates += [(lambda obj=obj: obj, source) for obj, source in extra]

    for load, source in candidates:
        if source.name in registry.plugins:
            first = registry.plugins[source.name].source
            registry.plugins[f"{source.name} ({source.package})"] = PluginStatus(
                source, "error",
                f"PluginError: plugin name '{source.name}' is already used by package '{first.package}'; "
                "rename the entry point")
            continue
        status = registry.plugins.setdefault(source.name, PluginStatus(source))
        try:
            pm.register(load(), name=source.name)
            # Misspelled hook names are only reported when asked for.
            pm.check_pending()
        except Exception as exc:  # a broken plugin must not take the CLI down
            if pm.has_plugin(source.name):
                pm.unregister(name=source.name)
            status.status, status.error = "error", _one_line(exc)

    for kind in KINDS.values():
        for impl in getattr(pm.hook, kind.hook).get_hookimpls():
            status = registry.plugins[impl.plugin_name]
            if status.status == "error":
                continue
            register = Registrar(registry, kind.name, status.source)
            if tracing:
                print(f"n2a: calling {impl.plugin_name}.{kind.hook}(register)", file=sys.stderr)
            try:
                impl.function(register=register)
            except Exception as exc:
                registry.forget_plugin(impl.plugin_name)
                status.status, status.error = "error", _one_line(exc)
    return registry


def literal_name(spec: type) -> str | None:
    """The name in a spec's `type: Literal["name"]`, or None when it declares no single one."""
    field = getattr(spec, "model_fields", {}).get("type")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def construct(cls: Callable[..., Any]) -> Callable[[ComponentSpec, BuildContext], Any]:
    """The factory of `register(Spec, Class)`: `Class(**spec.params())`, no build context."""
    def factory(spec: ComponentSpec, context: BuildContext) -> Any:
        return cls(**spec.params())

    factory.__qualname__ = f"construct({getattr(cls, '__qualname__', cls)!s})"
    return factory


@dataclass(frozen=True)
class Registrar:
    """The `register` callback a hook receives, bound to one kind and one plugin. Two forms:

    - ``register(MySpec, MyClass[, description])``: the name is the `type` literal of
      MySpec and the component is ``MyClass(**spec.params())``; the description defaults
      to the first line of MyClass's docstring.
    - ``register(name, MySpec, factory[, description])``: ``factory(spec, context)`` for
      components that need the `BuildContext` (device, label vocabulary, latent channels).
    """

    registry: Registry
    kind: str
    source: PluginSource

    def __call__(self, *args: Any, description: str | None = None) -> None:
        if len(args) in (3, 4) and isinstance(args[0], str):  # (name, Spec, factory[, description])
            name, spec, factory, *rest = args
        elif len(args) in (2, 3) and isinstance(args[0], type):  # (Spec, Class[, description])
            spec, cls, *rest = args
            name = self._name_of(spec)
            if not callable(cls):
                raise PluginError(f"plugin '{self.source.name}': register({spec.__name__}, {cls!r}): "
                                  "the second argument must be the component class")
            factory = construct(cls)
            if not rest and description is None:
                doc = (cls.__doc__ or "").strip().splitlines()
                description = doc[0] if doc else ""
        else:
            shown = ", ".join(a if isinstance(a, str) else getattr(a, "__name__", type(a).__name__) for a in args)
            raise PluginError(
                f"plugin '{self.source.name}': register({shown}) for a {self.kind}: expected "
                "register(MySpec, MyClass[, description]) or register(name, MySpec, factory[, description])")
        if rest:
            description = rest[0]
        self.registry.register(self.kind, name, spec, factory, description, source=self.source)

    def _name_of(self, spec: type) -> str:
        if not issubclass(spec, ComponentSpec):
            raise PluginError(f"plugin '{self.source.name}': {self.kind} spec {spec.__name__} must subclass "
                              "n2a_core.ComponentSpec")
        name = literal_name(spec)
        if name is None:
            raise PluginError(f"plugin '{self.source.name}': {self.kind} spec {spec.__name__} has no single `type` "
                              "literal to name it; declare `type: Literal['my-name'] = 'my-name'`")
        return name


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_plugins()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace (or with None, forget) the process-wide registry; tests use this."""
    global _REGISTRY
    _REGISTRY = registry
