"""Devices and the torch settings that depend on them, changed only inside a ``with`` block.

Training and visualization set cuDNN autotuning (CUDA) or deterministic algorithms (CPU) for their
duration and restore what was there before, so importing or calling brainfv never leaves global
torch state changed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["pick_device", "compute_settings"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else the CPU; otherwise the named device (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def compute_settings(device: str | torch.device, deterministic_cpu: bool = False) -> Iterator[None]:
    """On CUDA: ``cudnn.benchmark`` on (autotuned convolutions). On the CPU with ``deterministic_cpu``:
    deterministic algorithms (warn-only), so a resumed training ends bit-identical. Restored on exit."""
    device = torch.device(device)
    old_bench = torch.backends.cudnn.benchmark
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        elif deterministic_cpu:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield device
    finally:
        torch.backends.cudnn.benchmark = old_bench
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
