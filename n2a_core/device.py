"""The device a run asks for ('auto', 'cpu', 'cuda', 'cuda:1'), checked against what exists."""

from __future__ import annotations

import torch

from n2a_core.errors import SpecError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device: '{name}' requested but CUDA is not available; use device: auto or cpu")
    return device
