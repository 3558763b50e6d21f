"""Devices and the torch settings that depend on them, changed only inside a ``with`` block.

Training and visualization set cuDNN autotuning (CUDA) or deterministic algorithms (CPU) for their
duration and restore what was there before, so importing or calling brainfv never leaves global
torch state changed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["pick_device", "compute_settings", "native_bf16", "autocast_default"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else the CPU; otherwise the named device (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so oneDNN's bf16 convolutions are faster than
    fp32 ones rather than emulated; False where torch cannot tell."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(c()) for c in checks if c is not None)
    except (RuntimeError, AttributeError):
        return False


def autocast_default(device: str | torch.device) -> bool:
    """bf16 autocast in the visualization loop unless asked otherwise (``featviz.amp: null``): on CUDA, and on a
    CPU with native bf16. Adopted when it saved a quarter of the loop time (4 mm grid, one thread, AMD EPYC with
    AVX512-BF16; ``benchmarks/precision.py``, the default study's lesion, lesion-flatten and sex networks, class
    logits, 8 seeds x 3 presets: 142 vs 188 s to the plateau) with the endpoint metrics unchanged (the paired
    bf16 - fp32 differences of lesion_ncc, lesion_map_corr and effect_corr within 1.5 standard errors of 0 and within
    the spread between seeds). Since the fp32 loop computes the first convolution's input gradient as a depthwise
    convolution (:class:`~brainfv.featviz.simplify.OneChannelConv3d`) the two cost about the same on that CPU: 85.9 s
    bf16 vs 79.9 s fp32 in the same benchmark (one run), and the whole default study's visualize jobs 1,262 s in bf16 vs
    1,314 s in fp32 (one fresh-clone run each; its other jobs ran 3-18 % slower too). bf16 stays the default because
    switching would change the study's results (2 of 24 primary verdicts moved, each within its interval) for no
    measured gain; ``featviz.amp: false`` asks for fp32. On CPUs without native bf16 it is emulated and slower, so
    fp32 stays. Training does not use this default (:func:`brainfv.training.step_autocast`)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and native_bf16())


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
