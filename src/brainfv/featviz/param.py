"""Image parametrisations: the optimised variables and how they become a batch of volumes.

Every parametrisation is an ``nn.Module`` whose ``forward()`` returns ``(B, 1, X, Y, Z)``.

- :class:`VoxelParam`   one variable per voxel.
- :class:`FourierParam` the 3D real FFT spectrum, scaled by ``1 / max(f, 1/max(size))^decay``
  (Lucid's ``fft_image`` in 3D): the optimiser's steps are decorrelated across frequencies, so
  low frequencies move as easily as high ones and results look less like noise.
- :class:`MacoParam`    phase-only: the amplitude spectrum is fixed to that of real training
  volumes and only the phase is optimised (MACO, Fel et al. 2023), in 3D.

An optional range constraint (``tanh``/``sigmoid``) bounds voxel values. ``init_std`` is the standard
deviation of the initial noise *image* (input units) for every parametrisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..config import default
from ..errors import ConfigError

__all__ = ["VoxelParam", "FourierParam", "MacoParam", "frequencies", "spectrum_scale", "mean_amplitude_spectrum",
           "build_param"]


def _noise(gens, shape, std):
    return torch.stack([torch.randn(shape, generator=g) * std for g in gens])


class _Ranged(nn.Module):
    def __init__(self, value_range=default("preset.range"), bound=default("preset.bound")):
        super().__init__()
        if value_range not in (None, "none", "tanh", "sigmoid"):
            raise ConfigError(f"range must be none, tanh or sigmoid; got {value_range!r}")
        self.value_range = None if value_range == "none" else value_range
        self.bound = bound

    def constrain(self, x):
        if self.value_range == "tanh":
            return self.bound * torch.tanh(x / self.bound)
        if self.value_range == "sigmoid":
            return self.bound * (2 * torch.sigmoid(2 * x / self.bound) - 1)
        return x


class VoxelParam(_Ranged):
    """One variable per voxel, initialised from seeded noise (per batch element) or a volume."""

    def __init__(self, shape, gens, init=default("preset.init"), init_std=default("preset.init_std"), init_volume=None,
                 value_range=default("preset.range"), bound=default("preset.bound")):
        super().__init__(value_range, bound)
        shape = tuple(shape)
        if init == "volume":
            v = torch.as_tensor(np.asarray(init_volume), dtype=torch.float32)
            x = v.expand((len(gens),) + shape).clone() + _noise(gens, shape, init_std)
        elif init == "zeros":
            x = torch.zeros((len(gens),) + shape)
        else:
            x = _noise(gens, shape, init_std)
        self.x = nn.Parameter(x[:, None].contiguous())

    def forward(self):
        return self.constrain(self.x)

    @torch.no_grad()
    def blur_(self, sigma):
        from .transforms import gaussian_blur

        self.x.copy_(gaussian_blur(self.x, sigma))


def frequencies(shape, device=None):
    """Frequency magnitude (cycles per voxel) of every bin of a 3D ``rfftn`` of ``shape``."""
    fx = torch.fft.fftfreq(shape[0], device=device)[:, None, None]
    fy = torch.fft.fftfreq(shape[1], device=device)[None, :, None]
    fz = torch.fft.rfftfreq(shape[2], device=device)[None, None, :]
    return torch.sqrt(fx ** 2 + fy ** 2 + fz ** 2)


def spectrum_scale(shape, decay=1.0):
    """Lucid's spectrum scaling in 3D: ``1 / max(f, 1/max(shape))^decay * sqrt(prod(shape))``.

    ``f`` is the frequency magnitude in cycles per voxel.
    """
    f = frequencies(shape)
    scale = 1.0 / torch.clamp(f, min=1.0 / max(shape)) ** decay
    return scale * math.sqrt(float(np.prod(shape)))


class FourierParam(_Ranged):
    """Volumes as ``irfftn(spectrum * spectrum_scale(decay))``; the spectrum is optimised.

    Initial noise is white in the spectrum variables, scaled so the initial image has standard
    deviation ``init_std`` (like :class:`VoxelParam`'s).
    """

    def __init__(self, shape, gens, decay=default("preset.decay"), init=default("preset.init"),
                 init_std=default("preset.init_std"), init_volume=None, value_range=default("preset.range"),
                 bound=default("preset.bound")):
        super().__init__(value_range, bound)
        self.shape = tuple(shape)
        self.register_buffer("scale", spectrum_scale(self.shape, decay))
        fshape = self.scale.shape + (2,)
        spec_std = init_std / self.unit_noise_std()
        if init == "volume":
            spec = self.to_spectrum(torch.as_tensor(np.asarray(init_volume), dtype=torch.float32))
            spec = spec.expand((len(gens),) + fshape).clone() + _noise(gens, fshape, spec_std)
        elif init == "zeros":
            spec = torch.zeros((len(gens),) + fshape)
        else:
            spec = _noise(gens, fshape, spec_std)
        self.spectrum = nn.Parameter(spec[:, None].contiguous())

    def unit_noise_std(self):
        """Standard deviation of the image made from unit white noise in the spectrum variables (fixed
        draw: deterministic)."""
        g = torch.Generator().manual_seed(0)
        spec = torch.view_as_complex(torch.randn(self.scale.shape + (2,), generator=g)) * self.scale
        return float(torch.fft.irfftn(spec, s=self.shape, dim=(-3, -2, -1)).std())

    def to_spectrum(self, volume):
        """The spectrum variables that reproduce ``volume`` exactly (round trip)."""
        spec = torch.fft.rfftn(volume, s=self.shape, dim=(-3, -2, -1)) / self.scale
        return torch.view_as_real(spec)

    def forward(self):
        spec = torch.view_as_complex(self.spectrum) * self.scale
        return self.constrain(torch.fft.irfftn(spec, s=self.shape, dim=(-3, -2, -1)))


def mean_amplitude_spectrum(volumes, shape=None, box=None, max_volumes=64):
    """Mean |rfftn| of real volumes (optionally cropped to ``box``, a tuple of slices): MACO's magnitude."""
    acc, n = None, 0
    for v in volumes[:max_volumes]:
        v = torch.as_tensor(np.asarray(v[box] if box is not None else v), dtype=torch.float32)
        a = torch.fft.rfftn(v, s=shape or v.shape).abs()
        acc = a if acc is None else acc + a
        n += 1
    if n == 0:
        raise ConfigError("MACO parametrisation needs real volumes for its magnitude spectrum")
    return acc / n


class MacoParam(_Ranged):
    """Phase-only parametrisation: ``irfftn(magnitude * exp(i * phase))`` with a fixed magnitude.

    The phase starts uniform in (-pi, pi] (``init="noise"``) or at the phase of ``init_volume``; the
    image's amplitude is set by the magnitude, so ``init_std`` does not apply.
    """

    def __init__(self, shape, gens, magnitude, init=default("preset.init"), init_volume=None,
                 value_range=default("preset.range"), bound=default("preset.bound")):
        super().__init__(value_range, bound)
        self.shape = tuple(shape)
        mag = torch.as_tensor(magnitude, dtype=torch.float32)
        self.register_buffer("magnitude", mag)
        if init == "volume":
            ph = torch.angle(torch.fft.rfftn(torch.as_tensor(np.asarray(init_volume), dtype=torch.float32)))
            phase = ph.expand((len(gens),) + mag.shape).clone()
        else:
            phase = torch.stack([(torch.rand(mag.shape, generator=g) * 2 - 1) * math.pi for g in gens])
        self.phase = nn.Parameter(phase[:, None].contiguous())

    def forward(self):
        # the same as torch.polar(magnitude, phase), whose backward is twice as slow on the CPU
        spec = torch.complex(self.magnitude * torch.cos(self.phase), self.magnitude * torch.sin(self.phase))
        return self.constrain(torch.fft.irfftn(spec, s=self.shape, dim=(-3, -2, -1)))


def build_param(preset, shape, gens, magnitude=None, init_volume=None):
    """The parametrisation a :class:`~brainfv.featviz.render.Preset` asks for."""
    kw = dict(value_range=preset.range, bound=preset.bound)
    init = "volume" if preset.init in ("volume", "template", "subject") else preset.init
    if init == "volume" and init_volume is None:
        raise ConfigError(f"init {preset.init!r} needs its starting volume (init_volume)")
    if preset.param == "voxel":
        return VoxelParam(shape, gens, init, preset.init_std, init_volume, **kw)
    if preset.param == "fourier":
        return FourierParam(shape, gens, preset.decay, init, preset.init_std, init_volume, **kw)
    if preset.param == "maco":
        if magnitude is None:
            raise ConfigError("param 'maco' needs the amplitude spectrum of real volumes")
        return MacoParam(shape, gens, magnitude, init, init_volume, **kw)
    raise ConfigError(f"param must be voxel, fourier or maco; got {preset.param!r}")
