"""Image parametrisations: the optimised variables and how they become a batch of volumes.

Every parametrisation is an ``nn.Module`` whose ``forward()`` returns ``(B, 1, X, Y, Z)``. Those here also take
``forward(rows=idx)`` (and ``project_(rows=idx)``): only the batch elements ``idx`` (a 1-D index tensor of distinct
elements), each as in the whole batch — on the CPU (MKL's FFT) bit for bit, measured on 12 grids at 1-4 threads;
a lone element is transformed twice, because MKL transforms a batch of one differently in the last bits — so the
loop transforms only the elements still optimised (:func:`takes_rows`). A whole batch of one is a batch of one.

- :class:`VoxelParam`   one variable per voxel.
- :class:`FourierParam` the 3D real FFT spectrum, scaled by ``1 / max(f, 1/max(size))^decay``
  (Lucid's ``fft_image`` in 3D): the optimiser's steps are decorrelated across frequencies, so
  low frequencies move as easily as high ones and results look less like noise.
- :class:`MacoParam`    phase-only: the amplitude spectrum is fixed to that of real training
  volumes and only the phase is optimised (MACO, Fel et al. 2023), in 3D.

Every parametrisation yields volumes inside the intensity range of real brains (``range: data``, the
default): the ``[p, 100 - p]`` percentiles (``range_pct``, 0.5) of the brain voxels of real z-scored
volumes (:func:`data_range`), so an optimum exists and an image compares with real ones. How the range
holds (``bound_by``), chosen by measurement (``benchmarks/convergence.py``, class logits and block2 neurons
of the laptop lesion model, 52x64x52, up to 256 steps):

- ``project`` (the default): hard bounds, the variables projected back after every Adam step (voxel: clipped;
  Fourier: the spectrum of the clipped image, an exact projection since the spectrum is a linear, invertible
  function of the image). Voxels that reach a bound stop changing, so the objective plateaus: the voxel
  logits converged in 96-168 steps (rtol 2 %) at the activation the squash reached only after 256 steps
  (16.9), Fourier in 56-72 steps (squash: 72-88) at 93 % of the squash's activation.
- ``squash``: ``c + h * tanh((x - c) / h)`` (``c``, ``h``: the range's centre and half-width; slope 1 at the
  centre), Lucid's decorrelate-then-squash for Fourier. A voxel near a bound gets an exponentially small
  gradient and keeps creeping towards it: the voxel logits were still rising at step 256 (Adam's beta2 0.99
  or 0.9 changed nothing). MACO's phase-only variables cannot be projected, so MACO is always squashed.
- A norm constraint (rescaling the image to a real brain's norm) was not used: it bounds energy, not voxels,
  so single voxels still reach many SD.

``range: none`` leaves the image unbounded (experiments only); ``tanh``/``sigmoid`` bound it to
``+-bound``. ``init_std`` is the standard deviation of the initial noise *image* (input units) for every
parametrisation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..config import Preset, default
from ..errors import ConfigError

__all__ = ["Squash", "data_range", "VoxelParam", "FourierParam", "MacoParam", "frequencies", "spectrum_scale",
           "mean_amplitude_spectrum", "takes_rows",
           "build_param"]


def takes_rows(param: nn.Module) -> bool:
    """Whether ``param`` computes a subset of its batch: ``forward(rows=idx)`` (and ``project_(rows=idx)`` when it
    projects). A user's parametrisation without it is run on the whole batch."""
    import inspect

    def has(name):
        fn = getattr(param, name, None)
        try:
            return fn is not None and "rows" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a callable without a signature (a builtin, a C extension)
            return False

    return has("forward") and (not hasattr(param, "project_") or has("project_"))


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``t``'s elements ``rows`` (all when None); a lone element twice (see the module docstring): slice with
    :func:`_first`."""
    if rows is None:
        return t
    return t[rows.repeat(2) if rows.numel() == 1 else rows]


def _first(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None or rows.numel() != 1 else x[:1]


def _noise(gens, shape, std):
    return torch.stack([torch.randn(shape, generator=g) * std for g in gens])


RANGES = ("data", "none", "tanh", "sigmoid")


def data_range(volumes: Sequence[np.ndarray], mask: np.ndarray | None = None,
               pct: float = default("preset.range_pct")) -> tuple[float, float]:
    """``(lo, hi)``: the ``pct`` and ``100 - pct`` percentiles of the brain voxels (``mask``; all voxels
    when None) of real volumes, the range ``range: data`` squashes into."""
    vols = [np.asarray(v, np.float32) for v in volumes]
    if not vols:
        raise ConfigError("range 'data' needs real volumes (or data_range=(lo, hi)) for the intensity range")
    m = np.ones(vols[0].shape, bool) if mask is None else np.asarray(mask, bool)
    vals = np.concatenate([v[m] for v in vols])
    lo, hi = np.percentile(vals, [pct, 100 - pct])
    if not lo < hi:
        raise ConfigError(f"range 'data': the brain voxels of the real volumes span no range ({lo:g}, {hi:g})")
    return float(lo), float(hi)


class Squash(nn.Module):
    """Maps the unconstrained image into ``(lo, hi)``: ``c + h * tanh((x - c) / h)`` with ``c`` the
    centre and ``h`` the half-width (slope 1 at the centre). ``range=None``/``"none"``: the identity."""

    def __init__(self, lo=None, hi=None, project=False):
        super().__init__()
        self.bounded = lo is not None
        self.project = bool(project) and self.bounded  # hard bounds, kept by projecting after each step
        self.lo, self.hi = (float(lo), float(hi)) if self.bounded else (None, None)
        if self.bounded and not self.lo < self.hi:
            raise ConfigError(f"range: lower bound {lo} is not below the upper bound {hi}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bounded:
            return x
        if self.project:
            # the variables are projected into the range after each step: the clamp only removes FFT rounding, and
            # passes every gradient (straight through), so rounding never decides which voxels get one
            return x + (x.clamp(self.lo, self.hi) - x).detach()
        c, h = (self.lo + self.hi) / 2, (self.hi - self.lo) / 2
        # tanh rounds to +-1 in float32 for large arguments; the clamp only removes that last bit
        return (c + h * torch.tanh((x - c) / h)).clamp(self.lo, self.hi)

    def inverse(self, v: torch.Tensor) -> torch.Tensor:
        """The unconstrained values whose squash is ``v`` (values at or beyond a bound: just inside it), so an
        init volume starts as itself."""
        if not self.bounded:
            return v
        if self.project:
            return v.clamp(self.lo, self.hi)
        c, h = (self.lo + self.hi) / 2, (self.hi - self.lo) / 2
        return c + h * torch.atanh(((v - c) / h).clamp(-0.999, 0.999))


def make_squash(value_range: str | None = default("preset.range"), bound: float = default("preset.bound"),
                data: Sequence[float] | None = None, project: bool = False) -> Squash:
    """The :class:`Squash` a preset's ``range`` asks for (``data``: into ``data=(lo, hi)``; ``project``: hard
    bounds kept by the parametrisation's ``project_`` instead of the tanh)."""
    if value_range not in RANGES + (None,):
        raise ConfigError(f"range must be one of {', '.join(RANGES)}; got {value_range!r}")
    if value_range == "data":
        if data is None:
            raise ConfigError("range 'data' needs the data's intensity range (data_range=(lo, hi), or real volumes "
                              "to take it from); set the preset's range: none for an unbounded image")
        return Squash(*data, project=project)
    if value_range in ("tanh", "sigmoid"):  # 2 * sigmoid(2y) - 1 == tanh(y): the same bound either way
        return Squash(-bound, bound, project=project)
    return Squash()


class _Ranged(nn.Module):
    def __init__(self, value_range=default("preset.range"), bound=default("preset.bound"), data=None,
                 project=False):
        super().__init__()
        self.squash = make_squash(value_range, bound, data, project)

    def constrain(self, x):
        return self.squash(x)


class VoxelParam(_Ranged):
    """One variable per voxel, initialised from seeded noise (per batch element) or a volume."""

    def __init__(self, shape, gens, init=default("preset.init"), init_std=default("preset.init_std"), init_volume=None,
                 value_range=default("preset.range"), bound=default("preset.bound"), data=None, project=False):
        super().__init__(value_range, bound, data, project)
        shape = tuple(shape)
        if init == "volume":
            v = self.squash.inverse(torch.as_tensor(np.asarray(init_volume), dtype=torch.float32))
            x = v.expand((len(gens),) + shape).clone() + _noise(gens, shape, init_std)
        elif init == "zeros":
            x = torch.zeros((len(gens),) + shape)
        else:
            x = _noise(gens, shape, init_std)
        self.x = nn.Parameter(x[:, None].contiguous())
        self.project_()

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.constrain(self.x if rows is None else self.x[rows])

    @torch.no_grad()
    def project_(self, rows: torch.Tensor | None = None) -> None:
        """With hard bounds (``bound_by: project``): the variables (of the elements ``rows``) back into the range
        (projected Adam)."""
        if self.squash.project:
            if rows is None:
                self.x.clamp_(self.squash.lo, self.squash.hi)
            else:
                self.x.index_copy_(0, rows, self.x[rows].clamp(self.squash.lo, self.squash.hi))

    @torch.no_grad()
    def blur_(self, sigma: float) -> None:
        from .transforms import gaussian_blur

        self.x.copy_(gaussian_blur(self.x, sigma))


def frequencies(shape: Sequence[int], device: str | torch.device | None = None) -> torch.Tensor:
    """Frequency magnitude (cycles per voxel) of every bin of a 3D ``rfftn`` of ``shape``."""
    fx = torch.fft.fftfreq(shape[0], device=device)[:, None, None]
    fy = torch.fft.fftfreq(shape[1], device=device)[None, :, None]
    fz = torch.fft.rfftfreq(shape[2], device=device)[None, None, :]
    return torch.sqrt(fx ** 2 + fy ** 2 + fz ** 2)


def spectrum_scale(shape: Sequence[int], decay: float = 1.0) -> torch.Tensor:
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
                 bound=default("preset.bound"), data=None, project=False):
        super().__init__(value_range, bound, data, project)
        self.shape = tuple(shape)
        self.register_buffer("scale", spectrum_scale(self.shape, decay))
        fshape = self.scale.shape + (2,)
        spec_std = init_std / self.unit_noise_std()
        if init == "volume":
            v = self.squash.inverse(torch.as_tensor(np.asarray(init_volume), dtype=torch.float32))
            spec = self.to_spectrum(v)
            spec = spec.expand((len(gens),) + fshape).clone() + _noise(gens, fshape, spec_std)
        elif init == "zeros":
            spec = torch.zeros((len(gens),) + fshape)
        else:
            spec = _noise(gens, fshape, spec_std)
        self.spectrum = nn.Parameter(spec[:, None].contiguous())
        self.project_()

    @torch.no_grad()
    def project_(self, rows: torch.Tensor | None = None) -> None:
        """With hard bounds: the spectrum of the image clipped to the range (an exact projection in image
        space: the spectrum is a linear, invertible function of the image); of the elements ``rows`` only."""
        if self.squash.project:
            spec = _rows(self.spectrum, rows)
            img = torch.fft.irfftn(torch.view_as_complex(spec) * self.scale, s=self.shape, dim=(-3, -2, -1))
            # every step, whether or not a voxel left the range: a test per element would depend on the last
            # bits of the batched FFT, and an element would then not compute the same alone and in a batch
            new = _first(self.to_spectrum(img.clamp(self.squash.lo, self.squash.hi)), rows)
            if rows is None:
                self.spectrum.copy_(new)
            else:
                self.spectrum.index_copy_(0, rows, new)

    def unit_noise_std(self) -> float:
        """Standard deviation of the image made from unit white noise in the spectrum variables (fixed
        draw: deterministic)."""
        g = torch.Generator().manual_seed(0)
        spec = torch.view_as_complex(torch.randn(self.scale.shape + (2,), generator=g)) * self.scale
        return float(torch.fft.irfftn(spec, s=self.shape, dim=(-3, -2, -1)).std())

    def to_spectrum(self, volume: torch.Tensor) -> torch.Tensor:
        """The spectrum variables that reproduce ``volume`` exactly (round trip)."""
        spec = torch.fft.rfftn(volume, s=self.shape, dim=(-3, -2, -1)) / self.scale
        return torch.view_as_real(spec)

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        spec = torch.view_as_complex(_rows(self.spectrum, rows)) * self.scale
        return _first(self.constrain(torch.fft.irfftn(spec, s=self.shape, dim=(-3, -2, -1))), rows)


def mean_amplitude_spectrum(volumes: Sequence[np.ndarray], shape: Sequence[int] | None = None,
                            box: tuple[slice, ...] | None = None, max_volumes: int = 64) -> torch.Tensor:
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
                 value_range=default("preset.range"), bound=default("preset.bound"), data=None):
        super().__init__(value_range, bound, data)
        self.shape = tuple(shape)
        mag = torch.as_tensor(magnitude, dtype=torch.float32)
        self.register_buffer("magnitude", mag)
        if init == "volume":
            ph = torch.angle(torch.fft.rfftn(torch.as_tensor(np.asarray(init_volume), dtype=torch.float32)))
            phase = ph.expand((len(gens),) + mag.shape).clone()
        else:
            phase = torch.stack([(torch.rand(mag.shape, generator=g) * 2 - 1) * math.pi for g in gens])
        self.phase = nn.Parameter(phase[:, None].contiguous())

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        # the same as torch.polar(magnitude, phase), whose backward is twice as slow on the CPU
        phase = _rows(self.phase, rows)
        spec = torch.complex(self.magnitude * torch.cos(phase), self.magnitude * torch.sin(phase))
        return _first(self.constrain(torch.fft.irfftn(spec, s=self.shape, dim=(-3, -2, -1))), rows)


def build_param(preset: Preset, shape: Sequence[int], gens: Sequence[torch.Generator],
                magnitude: torch.Tensor | np.ndarray | None = None, init_volume: np.ndarray | None = None,
                data: Sequence[float] | None = None) -> VoxelParam | FourierParam | MacoParam:
    """The parametrisation a :class:`~brainfv.featviz.render.Preset` asks for (``data``: the ``(lo, hi)``
    intensity range of real brains, for ``range: data``). ``bound_by: project`` applies to the voxel and
    Fourier parametrisations; MACO's phase-only variables cannot be projected, so MACO is always squashed."""
    kw = dict(value_range=preset.range, bound=preset.bound, data=data)
    project = preset.bound_by == "project"
    init = "volume" if preset.init in ("volume", "template", "subject") else preset.init
    if init == "volume" and init_volume is None:
        raise ConfigError(f"init {preset.init!r} needs its starting volume (init_volume)")
    if preset.param == "voxel":
        return VoxelParam(shape, gens, init, preset.init_std, init_volume, project=project, **kw)
    if preset.param == "fourier":
        return FourierParam(shape, gens, preset.decay, init, preset.init_std, init_volume, project=project, **kw)
    if preset.param == "maco":
        if magnitude is None:
            raise ConfigError("param 'maco' needs the amplitude spectrum of real volumes")
        return MacoParam(shape, gens, magnitude, init, init_volume, **kw)
    raise ConfigError(f"param must be voxel, fourier or maco; got {preset.param!r}")
