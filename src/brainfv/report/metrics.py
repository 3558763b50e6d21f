"""Ground-truth metrics of a visualization, each defined once and tested on constructed volumes.

A metric is only read against its controls (:mod:`brainfv.report.calibrate`): the same metric on
visualizations that cannot know the answer, and on surrogates that keep a visualization's amplitude
spectrum but not its spatial structure (:func:`phase_surrogates`).

- :class:`TemplateBank` / :func:`lesion_templates`: best normalised cross-correlation with a dark lesion
  template of the configured shapes and sizes, searched only inside the region that was optimised and
  only with templates that fit in it, and where the best match lies;
- :func:`lesion_hit`: whether that position is where lesions were planted (against its base rate);
- :func:`sex_effect_fidelity`: correlation with a sex-effect map (e.g. its regional component);
- :func:`quality_ratios`: roughness and high-frequency share relative to real volumes, inside the region.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.lesions import lesion_profile
from ..featviz.metrics import correlation, high_frequency_fraction, relative_tv
from ..utils import fast_fft_size

__all__ = ["lesion_templates", "TemplateBank", "best_template_match", "lesion_hit", "base_rate",
           "phase_surrogates", "sex_effect_fidelity", "quality_ratios", "region_slices"]


def region_slices(region: tuple | None, shape: Sequence[int]) -> tuple:
    """``region`` as a tuple of slices: ``None`` (the whole volume), slices, or ``[[lo, hi], ...]``."""
    if region is None:
        return tuple(slice(0, n) for n in shape)
    return tuple(r if isinstance(r, slice) else slice(int(r[0]), int(r[1])) for r in region)


def lesion_templates(shapes: Sequence[str], diameters_mm: Sequence[float], voxel_size: float,
                     edge_mm: float = 1.0) -> list:
    """Dark (negative) lesion templates of each shape and diameter: ``[(shape, diameter_mm, array)]``.

    Each patch is cropped to the lesion plus one voxel of surround (its soft edge included), so a template
    is as small as the lesion it stands for and fits wherever such a lesion would.
    """
    out = []
    for shape in shapes:
        for d in diameters_mm:
            prof, _ = lesion_profile(shape, d / 2, voxel_size, edge_mm)
            idx = np.argwhere(prof > 0.05)
            lo = np.maximum(idx.min(0) - 1, 0)
            hi = np.minimum(idx.max(0) + 2, prof.shape)
            c = np.asarray(prof.shape) // 2
            half = np.maximum(c - lo, hi - 1 - c)  # keep the patch centred (odd size)
            sl = tuple(slice(int(ci - h), int(ci + h + 1)) for ci, h in zip(c, half))
            out.append((shape, float(d), -prof[sl]))
    return out


class TemplateBank:
    """Normalised cross-correlation of volumes with a fixed set of templates, by FFT, batched.

    The spectra of the templates (and of the box filters giving each position's local mean and variance)
    are computed once for a volume shape; each call costs one forward FFT per volume and one inverse FFT
    per template size and template.
    """

    def __init__(self, templates, shape, dtype=torch.float64, fft_shape: tuple | None = None):
        self.templates = list(templates)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        m = max(max(t.shape) for _, _, t in self.templates)
        exact = tuple(n + m - 1 for n in self.shape)  # the smallest size without wrap-around
        # 2,3,5-smooth by default (3x faster); ``fft_shape`` (at least ``exact``) for comparing sizes
        self.fft_shape = tuple(fast_fft_size(n) for n in exact) if fft_shape is None else tuple(fft_shape)
        if any(f < e for f, e in zip(self.fft_shape, exact)):
            raise ValueError(f"fft_shape {self.fft_shape} smaller than {exact}: the correlation would wrap around")
        self.spectra, self.norms, self.sizes = [], [], []
        box = {}
        for _, _, t in self.templates:
            t0 = t - t.mean()
            self.norms.append(float(np.sqrt((t0 ** 2).sum())))
            self.spectra.append(torch.fft.rfftn(torch.as_tensor(t0[::-1, ::-1, ::-1].copy(), dtype=dtype),
                                                s=self.fft_shape))
            self.sizes.append(tuple(t.shape))
            if t.shape not in box:
                box[t.shape] = torch.fft.rfftn(torch.ones(t.shape, dtype=dtype), s=self.fft_shape)
        self.box = box

    def _same(self, full, size):
        h = [(s - 1) // 2 for s in size]
        return full[(..., *[slice(hi, hi + n) for hi, n in zip(h, self.shape)])]

    def match(self, volumes: Sequence, region: tuple | None = None, mask: np.ndarray | None = None,
              chunk: int = 2) -> list:
        """Best match of each volume in ``volumes`` (B, X, Y, Z): a list of dicts ``ncc, shape, diameter_mm,
        position`` (``ncc`` NaN when no template fits in ``region``). Template centres are searched inside
        ``mask`` and only where the whole template lies inside ``region`` (the optimised box). ``chunk`` volumes
        at a time (the spectra and local statistics are float64 arrays of the padded shape per volume: 48
        volumes at once took 260 MB on the 4 mm grid; on the default run's comparison, 2 at a time peaked at
        807 MB against 961 MB for 8, in the same time and with byte-identical tables)."""
        v = np.asarray(volumes)
        if v.ndim == 3:
            v = v[None]
        return [m for i in range(0, len(v), chunk) for m in self._match(v[i:i + chunk], region, mask)]

    def _match(self, volumes: np.ndarray, region: tuple | None, mask: np.ndarray | None) -> list:
        v = torch.as_tensor(volumes, dtype=self.dtype)
        reg = region_slices(region, self.shape)
        vf = torch.fft.rfftn(v, s=self.fft_shape, dim=(-3, -2, -1))
        v2f = torch.fft.rfftn(v * v, s=self.fft_shape, dim=(-3, -2, -1))
        best = [{"ncc": float("nan"), "shape": None, "diameter_mm": float("nan"), "position": None}
                for _ in range(len(v))]
        local = {}
        for (shape, d, _), spec, norm, size in zip(self.templates, self.spectra, self.norms, self.sizes):
            valid = self._valid(size, reg, mask)
            if valid is None or norm == 0:
                continue
            if size not in local:
                n = float(np.prod(size))
                s1 = self._same(torch.fft.irfftn(vf * self.box[size], s=self.fft_shape, dim=(-3, -2, -1)), size)
                s2 = self._same(torch.fft.irfftn(v2f * self.box[size], s=self.fft_shape, dim=(-3, -2, -1)), size)
                local[size] = torch.sqrt(torch.clamp(s2 - s1 * s1 / n, min=0))
            num = self._same(torch.fft.irfftn(vf * spec, s=self.fft_shape, dim=(-3, -2, -1)), size)
            den = local[size] * norm
            eps = 1e-6 * torch.amax(den, dim=(-3, -2, -1), keepdim=True).clamp(min=1e-12)
            ncc = torch.where((den > eps) & valid, num / den.clamp(min=1e-12), torch.full_like(num, -2.0))
            flat = ncc.reshape(len(v), -1)
            val, idx = flat.max(1)
            for b in range(len(v)):
                score = float(val[b])
                if score > -2 and (np.isnan(best[b]["ncc"]) or score > best[b]["ncc"]):
                    best[b] = {"ncc": min(score, 1.0), "shape": shape, "diameter_mm": d,
                               "position": tuple(int(i) for i in np.unravel_index(int(idx[b]), self.shape))}
        return best

    def valid_positions(self, region: tuple | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        """Where :meth:`match` can place a best match (any template's valid centres), as a bool array: the
        positions a hit rate's chance level must be computed over."""
        reg = region_slices(region, self.shape)
        ok = np.zeros(self.shape, bool)
        for size in set(self.sizes):
            v = self._valid(size, reg, mask)
            if v is not None:
                ok |= v.numpy()
        return ok

    def _valid(self, size, reg, mask):
        ok = torch.zeros(self.shape, dtype=torch.bool)
        sl = []
        for s, r, n in zip(size, reg, self.shape):
            h = (s - 1) // 2
            lo, hi = max(r.start, 0) + h, min(r.stop, n) - (s - 1 - h)
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        ok[tuple(sl)] = True
        if mask is not None:
            ok &= torch.as_tensor(np.asarray(mask, bool))
        return ok if bool(ok.any()) else None


def best_template_match(vol: np.ndarray, templates: list, mask: np.ndarray | None = None,
                        region: tuple | None = None) -> dict:
    """Best normalised cross-correlation of ``vol`` with any template at any position (see :class:`TemplateBank`).

    Returns ``{"ncc", "shape", "diameter_mm", "position"}``: a volume containing exactly one of the templates
    scores 1 at its position; noise scores near 0 (for templates of many voxels).
    """
    return TemplateBank(templates, np.shape(vol)).match(np.asarray(vol)[None], region, mask)[0]


def lesion_hit(position: Sequence[int] | None, lesion_map: np.ndarray) -> float:
    """1.0 when ``position`` (a voxel) lies where a lesion was planted (``lesion_map > 0``), 0.0 if not,
    NaN without a position."""
    if position is None:
        return float("nan")
    return float(np.asarray(lesion_map)[tuple(position)] > 0)


def base_rate(lesion_map: np.ndarray, mask: np.ndarray, region: tuple | None = None) -> float:
    """The chance of a hit: the share of positions (inside ``mask`` and ``region``) where lesions were planted."""
    m = np.asarray(mask, bool).copy()
    if region is not None:
        r = np.zeros_like(m)
        r[region_slices(region, m.shape)] = True
        m &= r
    return float((np.asarray(lesion_map)[m] > 0).mean()) if m.any() else float("nan")


def phase_surrogates(vol: np.ndarray, n: int, rng: np.random.Generator, region: tuple | None = None,
                     mask: np.ndarray | None = None) -> list[np.ndarray]:
    """``n`` surrogates of ``vol``: inside ``region``, the same amplitude spectrum with random phases (the
    mean kept), then ``mask`` applied as the visualization's was; zero elsewhere. What a metric gives on
    them is what the visualization's smoothness and contrast alone would give."""
    vol = np.asarray(vol, np.float64)
    reg = region_slices(region, vol.shape)
    sub = vol[reg]
    spec = np.fft.rfftn(sub)
    amp = np.abs(spec)
    out = np.zeros((n,) + vol.shape, np.float32)
    for i in range(n):
        phase = np.angle(np.fft.rfftn(rng.standard_normal(sub.shape)))  # Hermitian-consistent random phases
        phase.flat[0] = np.angle(spec.flat[0])  # the mean keeps its sign (a dark image stays dark)
        s = np.fft.irfftn(amp * np.exp(1j * phase), s=sub.shape, axes=(0, 1, 2))
        if mask is not None:
            s = s * np.asarray(mask)[reg]
        out[(i,) + reg] = s
    return out


def sex_effect_fidelity(vis: np.ndarray, effect: np.ndarray, mask: np.ndarray, sign: float = 1.0) -> float:
    """Correlation (inside ``mask``) of a visualization with a sex-effect map × ``sign``.

    ``sign`` is +1 for what should look male (effect = male − female) and −1 for female.
    """
    return correlation(np.asarray(vis) * sign, effect, mask)


def quality_ratios(vis: np.ndarray, real_tv: float, real_hf: float, mask: np.ndarray | None = None,
                   region: tuple | None = None) -> dict:
    """Roughness and high-frequency share of ``vis`` inside ``region`` divided by those of real volumes in the
    same region (1 = real-like)."""
    reg = region_slices(region, np.shape(vis))
    v = np.asarray(vis)[reg]
    m = np.asarray(mask)[reg] if mask is not None else None
    return {"tv_ratio": relative_tv(v, m) / real_tv if real_tv else float("nan"),
            "hf_ratio": high_frequency_fraction(v) / real_hf if real_hf else float("nan")}
