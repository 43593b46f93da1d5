"""Which device a run or a sampling call uses: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`.

`check_device_name` is the spec's syntax check (a spec may be written on another machine);
`resolve_device` is the one place that turns a name into a `torch.device` on this machine,
refusing one that is not here with a one-line error rather than a traceback from torch.
"""

from __future__ import annotations

import torch

from n2a_core.errors import SpecError

SUPPORTED = ("cpu", "cuda", "mps")


def check_device_name(name: str, option: str = "device") -> torch.device | None:
    """The parsed device (None for 'auto'); SpecError for a name n2a cannot run on."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in SUPPORTED:
        raise SpecError(f"{option}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def mps_available() -> bool:
    """Apple silicon's Metal backend is built into this torch and usable now."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str, option: str = "device") -> torch.device:
    """`name` as a device of this machine; auto picks CUDA, else MPS, else the CPU."""
    device = check_device_name(name, option)
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SpecError(f"{option}: {name!r} requested but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise SpecError(f"{option}: {name!r} requested but this machine has {count} CUDA device"
                            f"{'s' * (count != 1)} (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not mps_available():
        raise SpecError(f"{option}: 'mps' requested but Apple's MPS backend is not available here; "
                        "use auto or cpu")
    return device
