"""The paper-style 3D CNN with stable, readable layer names (see :mod:`brainfv.models.arch`).

Eitel et al.'s lab used four conv layers (8/32/64/64 channels) with ELU and 3D
dropout on 182×218×182 volumes, then flattened the last feature maps into FC→100→output
(``head: flatten``: position-specific weights, so a class logit can prefer a pattern at one place).
The default here is a lighter conv–BN–ReLU–maxpool stack (8-16-32-64) with global average pooling
(``head: pool``: nearly blind to where a pattern sits) for the 4 mm laptop grid; every piece is a config value.
"""
from __future__ import annotations

import copy as _copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, InputDataError
from ..utils import atomic_path

__all__ = ["ConvBlock", "BrainCNN", "build_model", "flatten_shape", "frozen", "save_checkpoint", "load_checkpoint"]

_DEFAULT = ModelConfig()  # the schema's defaults
_ACT = {"relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU}


class ConvBlock(nn.Module):
    """Conv3d → norm → activation → MaxPool3d(2), with modules named conv/norm/act/pool."""

    def __init__(self, cin, cout, kernel_size=3, norm="batch", activation="relu", spatial_dropout=0.0):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size, padding=kernel_size // 2, bias=norm != "batch")
        if norm == "batch":
            self.norm = nn.BatchNorm3d(cout)
        elif norm == "instance":
            self.norm = nn.InstanceNorm3d(cout, affine=True)
        elif norm in (None, "none"):
            self.norm = nn.Identity()
        else:
            raise ConfigError(f"model.norm must be batch, instance or none; got {norm!r}")
        if activation not in _ACT:
            raise ConfigError(f"model.activation must be one of {list(_ACT)}; got {activation!r}")
        self.act = _ACT[activation]()
        self.drop = nn.Dropout3d(spatial_dropout) if spatial_dropout else nn.Identity()
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.drop(self.act(self.norm(self.conv(x)))))


class BrainCNN(nn.Module):
    """Stack of :class:`ConvBlock` s, global pooling, dropout, optional hidden FC, classifier.

    Defaults are the config schema's (:class:`brainfv.config.ModelConfig`); ``n_classes`` comes from the data.
    """

    def __init__(self, channels=tuple(_DEFAULT.channels), kernel_size=_DEFAULT.kernel_size, norm=_DEFAULT.norm,
                 activation=_DEFAULT.activation, dropout=_DEFAULT.dropout, hidden=_DEFAULT.hidden, n_classes=2,
                 in_channels=1, spatial_dropout=_DEFAULT.spatial_dropout, global_pool=_DEFAULT.global_pool,
                 head=_DEFAULT.head, input_shape=None):
        super().__init__()
        self.arch = dict(channels=list(channels), kernel_size=kernel_size, norm=norm, activation=activation,
                         dropout=dropout, hidden=hidden, n_classes=n_classes, in_channels=in_channels,
                         spatial_dropout=spatial_dropout, global_pool=global_pool, head=head)
        kernels = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size] * len(channels)
        if len(kernels) != len(channels):
            raise ConfigError(f"model.kernel_size: {len(kernels)} sizes for {len(channels)} blocks")
        cin = in_channels
        self.n_blocks = len(channels)
        for i, (c, k) in enumerate(zip(channels, kernels), start=1):
            self.add_module(f"block{i}", ConvBlock(cin, c, k, norm, activation, spatial_dropout))
            cin = c
        if head == "pool":
            if global_pool == "avg":
                self.gap = nn.AdaptiveAvgPool3d(1)
            elif global_pool == "max":
                self.gap = nn.AdaptiveMaxPool3d(1)
            else:
                raise ConfigError(f"model.global_pool must be avg or max; got {global_pool!r}")
        elif head == "flatten":
            if input_shape is None:
                raise ConfigError("model.head: flatten needs the input grid's shape (input_shape) to size its "
                                  "first fully connected layer")
            self.feature_shape = flatten_shape(input_shape, len(channels))
            self.arch["input_shape"] = [int(n) for n in input_shape]
            cin = cin * int(torch.tensor(self.feature_shape).prod())
        else:
            raise ConfigError(f"model.head must be pool or flatten; got {head!r}")
        self.head = head
        self.dropout = nn.Dropout(dropout)
        if hidden:
            self.fc = nn.Linear(cin, hidden)
            self.fc_act = _ACT[activation]()
            cin = hidden
        self.classifier = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        x = self.dropout(torch.flatten(self.gap(x) if self.head == "pool" else x, 1))
        if hasattr(self, "fc"):
            x = self.fc_act(self.fc(x))
        return self.classifier(x)


def flatten_shape(input_shape: Sequence[int], n_blocks: int) -> tuple:
    """Spatial shape of the last feature maps (each block halves every axis, flooring, as MaxPool3d(2) does)."""
    shape = [int(n) for n in input_shape]
    for _ in range(n_blocks):
        shape = [n // 2 for n in shape]
    if min(shape) < 1:
        raise ConfigError(f"model: {n_blocks} blocks halve the grid {list(input_shape)} to nothing")
    return tuple(shape)


def build_model(arch: dict | ModelConfig | None = None, n_classes: int = 2,
                input_shape: Sequence[int] | None = None) -> BrainCNN:
    """A :class:`BrainCNN` from an architecture dict (config ``model`` section, validated against the schema);
    ``input_shape`` (the grid's shape) sizes the flatten head."""
    a = ModelConfig.from_config(arch, "model").as_dict()
    return BrainCNN(**a, n_classes=n_classes, input_shape=input_shape)


def frozen(model: nn.Module, device: str | torch.device | None = None, copy: bool = True) -> nn.Module:
    """An eval-mode model (a copy unless ``copy=False``) on ``device`` whose parameters need no gradient, with
    5D weights in channels-last 3D layout (how every 3D convolution here runs fastest on the CPU: e.g.
    integrated gradients 6.3 instead of 8.5 s a volume, a forward pass to block4.norm 0.09-0.15 instead of
    0.15-0.29 s; benchmarks/training.py). For optimising or attributing inputs; the caller's model is
    untouched."""
    m = _copy.deepcopy(model) if copy else model
    if device is not None:
        m = m.to(device)
    m = m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
        if p.dim() == 5:  # only 5D tensors have a 3D channels-last layout (Module.to would also try 4D buffers)
            # .to restrides even where .contiguous sees nothing to do (one input channel: both layouts count as
            # contiguous, but oneDNN reads the strides; (27, 27, 9, 3, 1) made every step 2.5x slower)
            p.data = p.data.to(memory_format=torch.channels_last_3d)
    return m


def save_checkpoint(path: str | Path, model: BrainCNN, **meta: object) -> None:
    """Save weights + architecture + metadata (classes, grid, task...) atomically."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "arch": model.arch, "meta": meta}, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[BrainCNN, dict]:
    """Load a model saved by :func:`save_checkpoint`: returns ``(model in eval mode, meta)``.

    One call, no Snakemake needed::

        model, meta = brainfv.models.load_checkpoint("results/models/lesion/model.pt")
        meta["classes"], meta["grid"]  # class names, and the grid/normalisation it expects
    """
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise InputDataError(f"model checkpoint not found: {path}") from None
    model = BrainCNN(**ck["arch"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck["meta"]
