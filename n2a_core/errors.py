"""User-facing errors: one line that names the field, file or plugin and says what to do.

The CLI prints an `N2AError` as a short bullet and exits 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class N2AError(Exception):
    """A mistake in the user's input (spec, file, plugin name), not a bug in n2a."""


class SpecError(N2AError):
    """A run spec or component spec that does not validate."""


class PluginError(N2AError):
    """An unknown plugin name, a duplicate registration or a plugin that failed to load."""


class CheckpointError(N2AError):
    """A checkpoint that is missing, corrupt or belongs to a different spec."""


class RunLockedError(N2AError):
    """A run folder another process is training in."""


class DataError(N2AError):
    """A data source that is missing, empty or lacks a requested column."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'cosine'?)' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
