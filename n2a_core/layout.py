"""Memory-layout choice shared by the convolutional plugins."""

import torch


def prefers_channels_last(x: torch.Tensor) -> bool:
    """Whether conv nets run faster on `x` in channels_last (NHWC) memory layout.

    Measured here (benchmarks/README.md): on the CPU in float32, oneDNN's convolutions are
    10-30% faster in NHWC at our sizes (UNet training step +1-4%, VQGAN encode+decode
    0.89x -> 1.05x diffusers' VQModel), while under bf16 autocast NHWC made the UNet step
    30% slower. On CUDA it is unmeasured, so the caller's layout is kept. The layout changes
    no value beyond float rounding.
    """
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def preferred_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` in channels_last where `prefers_channels_last` says so, else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if prefers_channels_last(x) else x
