"""Devices and the torch settings that depend on them, changed only inside a ``with`` block.

Training and visualization set cuDNN autotuning (CUDA) or deterministic algorithms (CPU) for their
duration and restore what was there before, so importing or calling brainfv never leaves global
torch state changed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["pick_device", "compute_settings", "autocast_default"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else the CPU; otherwise the named device (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_default(device: str | torch.device) -> bool:
    """bf16 autocast in the visualization loop unless asked otherwise (``featviz.amp: null``): on CUDA only.

    On the CPU fp32 is now as fast and exact: with the first convolution's input gradient computed as a depthwise
    convolution in fp32 (:class:`~brainfv.featviz.simplify.OneChannelConv3d`; oneDNN's bf16 gradient stays slow),
    the default study's class logits to the plateau (``benchmarks/precision.py``, one thread, AMD EPYC with
    AVX512-BF16, lesion and sex networks, 8 seeds x 3 presets) took 79.9 s of loop time in fp32 and 85.9 s in bf16
    (per element-step fp32 faster in 5 of 6 task x preset cells, 0.97-1.24x); before that rewrite bf16 saved a
    quarter (142 vs 188 s), which is why the CPU ran bf16 until this release. CPUs with AMX were not measured:
    ``featviz.amp: true`` asks for bf16 anywhere. Training does not use this default
    (:func:`brainfv.training.step_autocast`)."""
    return torch.device(device).type == "cuda"


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
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
                != (old_det, old_warn):  # only when changed: the call imports torch._inductor (0.9 s, cProfile)
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
