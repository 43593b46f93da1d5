"""Pydantic validation errors as n2a's one-line-per-problem `SpecError`.

Each problem reads `field.path: what is wrong (got X)`; an unknown key lists the allowed
ones and suggests the closest. Component sections are looked up in the registry passed in,
so third-party specs get the same messages as built-ins.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from n2a_core.errors import SpecError, did_you_mean
from n2a_core.kinds import KINDS


def _loc_string(loc: tuple, data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        # Pydantic puts the union tag in the location ('schedule', 'cosine', 'foo'); drop it.
        if isinstance(node, dict) and item == node.get("type") and item not in node:
            continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def format_validation_error(
    error: ValidationError, *, registry, data: Any = None, prefix: tuple = (), model: type[BaseModel] | None = None
) -> SpecError:
    """A SpecError holding one line per problem: `field.path: what is wrong (got X)`.

    `model` is the spec class validated at the root (the run spec), None when `prefix`
    names the one component section that was validated; component sections are looked up
    in `registry`.
    """
    root = {prefix[0]: data} if prefix else (data if data is not None else {})
    lines = []
    for err in error.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        where = _loc_string(loc, root) or "spec"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1], root, registry, model)
            lines.append(f"{where}: unknown key{did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed)}")
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            lines.append(f"{where}: unknown type {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}")
        else:
            got = err.get("input")
            got_text = "" if isinstance(got, dict) or got is None else f" (got {_shortened(repr(got))})"
            lines.append(f"{where}: {err['msg']}{got_text}")
    return SpecError("\n".join(lines))


def _fields_at(loc: tuple, root: Any, registry, model: type[BaseModel] | None) -> list[str]:
    """Field names of the spec model found at `loc` (for 'allowed:' and did-you-mean)."""
    cls: Any = model
    node = root
    for depth, item in enumerate(loc):
        if isinstance(node, dict) and item == node.get("type") and item not in node:
            continue  # the union tag pydantic inserts
        node = node.get(item) if isinstance(node, dict) else None
        if depth == 0 and item in KINDS:  # a component section: its plugin's spec
            name = node.get("type", KINDS[item].default) if isinstance(node, dict) else None
            cls = registry.components[item].get(name)
            cls = cls.spec if cls else None
        elif cls is not None and item in getattr(cls, "model_fields", {}):
            annotation = cls.model_fields[item].annotation
            cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        else:
            cls = None
    return sorted(getattr(cls, "model_fields", {}))


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit - 1]}…"
