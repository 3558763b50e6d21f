"""Volumes on anatomy: each unit's panels drawn over the MNI152 template at one shared MNI cut.

A neuroimager reads a map on anatomy, at stated MNI coordinates, and compares maps at the *same*
coordinates. So every panel of a unit (each regularization preset's visualization, a dataset
exemplar, an attribution map) is cut through the same point, chosen once per unit by
:func:`choose_cut_coords`, and the point is printed on the figure. Drawing is nilearn's
(:func:`nilearn.plotting.plot_stat_map`), on axes of one bare Agg figure (no pyplot); nothing here
changes matplotlib's global state.

Values keep their units: visualizations and exemplars are in the units of the network input,
z-scored T1 intensity (SD within the brain mask); attribution maps in integrated-gradient units.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nilearn import datasets, plotting
from PIL import Image
from scipy import ndimage

from ..data.grid import Grid
from ..data.template import template_on_grid
from ..errors import InputDataError
from ..utils import atomic_path

__all__ = [
    "Z_UNITS",
    "IG_UNITS",
    "PanelStyle",
    "AnatomyFigure",
    "robust_max",
    "choose_cut_coords",
    "panel_style",
    "units_on_anatomy_figure",
]

DPI = 110
Z_UNITS = "z-scored T1 (SD within the brain mask)"
IG_UNITS = "integrated gradients (a.u.)"
# Diverging, symmetric: blue = the unit prefers a darker T1 than average, red = brighter.
DIVERGING_CMAP = "RdBu_r"
# Overlays: hidden below THRESHOLD_FRACTION of the panel's robust maximum (the ROBUST_PERCENTILE-th
# percentile of |value| in the brain mask), fading in to opaque at OPAQUE_FRACTION of it.
ROBUST_PERCENTILE = 99.5
THRESHOLD_FRACTION = 0.15
OPAQUE_FRACTION = 0.5
BG_DIM = 0.6  # nilearn's dimming of the template: > 0 darkens it so the overlay stands out


@functools.lru_cache(maxsize=1)
def _has_transparency():
    """Whether nilearn's plot_stat_map takes ``transparency`` (nilearn >= 0.12)."""
    return "transparency" in inspect.signature(plotting.plot_stat_map).parameters


@contextlib.contextmanager
def _cheap_gc():
    """Freeze the objects alive now out of the garbage collector's reach, unfreeze on exit.

    nilearn's ``safe_get_data`` calls ``gc.collect()`` on every image it reads (several per
    panel); with matplotlib's and nilearn's objects alive a full collection costs ~0.2 s, i.e. 85 %
    of a panel's drawing time. Freezing (``gc.freeze``, what it exists for) makes those collections
    cheap; :meth:`refreeze` also freezes the artists drawn since. Nothing is changed when someone
    else has frozen objects already (we could not unfreeze only ours).
    """
    class _Freezer:
        active = gc.get_freeze_count() == 0

        def refreeze(self):
            if self.active:
                gc.freeze()

    f = _Freezer()
    f.refreeze()
    try:
        yield f
    finally:
        if f.active:
            gc.unfreeze()


@dataclass(frozen=True)
class PanelStyle:
    """How one column of panels is drawn.

    Attributes
    ----------
    kind : {"overlay", "image"}
        ``"overlay"``: a diverging map over the template, thresholded so the anatomy shows through
        (visualizations, attributions). ``"image"``: the volume itself in greyscale (a dataset
        exemplar: a T1 image, whose anatomy *is* the content).
    units : str
        What the colour bar's numbers are (e.g. :data:`Z_UNITS`).
    scale : {"column", "panel"}
        ``"column"``: one colour scale for the whole column, in ``units`` (units comparable down
        the column). ``"panel"``: each panel divided by its own robust maximum (the colour bar then
        reads "fraction of the panel's robust max" and each panel prints its maximum).
    use_for_cuts : bool
        Whether :func:`choose_cut_coords` considers this column when placing a unit's cut.
    vlim : tuple or None
        Fixed (vmin, vmax) for ``kind="image"`` (default -3..3 SD).
    """

    kind: str = "overlay"
    units: str = Z_UNITS
    scale: str = "column"
    use_for_cuts: bool = True
    vlim: tuple | None = None

    def __post_init__(self):
        if self.kind not in ("overlay", "image"):
            raise ValueError(f"PanelStyle.kind must be 'overlay' or 'image', got {self.kind!r}")
        if self.scale not in ("column", "panel"):
            raise ValueError(f"PanelStyle.scale must be 'column' or 'panel', got {self.scale!r}")


#: Styles of panel names the study uses; any other name is a visualization (overlay, z units).
DEFAULT_STYLES = {
    "exemplar": PanelStyle(kind="image", units=Z_UNITS, use_for_cuts=False, vlim=(-3.0, 3.0)),
    "attribution": PanelStyle(kind="overlay", units=IG_UNITS, scale="panel", use_for_cuts=False),
}


def panel_style(name: str, styles: dict | None = None) -> PanelStyle:
    """The :class:`PanelStyle` of panel ``name``: ``styles[name]``, else a study default.

    Names starting with ``exemplar`` / ``attribution`` get those defaults (``"attribution: AD"``),
    everything else is drawn as a visualization (overlay in z-scored T1 units, one scale per column).
    """
    if styles and name in styles:
        return styles[name]
    for key, style in DEFAULT_STYLES.items():
        if str(name).lower().startswith(key):
            return style
    return PanelStyle()


@dataclass
class AnatomyFigure:
    """What :func:`units_on_anatomy_figure` drew.

    ``cut_coords[i]`` is unit ``i``'s MNI cut (mm); ``panel_cut_coords[i][j]`` the cut nilearn's
    display of panel ``j`` actually used (None for a missing panel), so callers and tests can check
    that a row is cut at one place. ``vmax`` maps column name to its colour-scale maximum (column
    scale) or the list of per-panel maxima (panel scale).
    """

    path: object
    size_px: tuple
    n_bytes: int
    cut_coords: list
    panel_cut_coords: list
    vmax: dict = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- choosing cuts


def robust_max(vol: np.ndarray, mask: np.ndarray | None = None, percentile: float = ROBUST_PERCENTILE) -> float:
    """The ``percentile``-th percentile of ``|vol|`` inside ``mask`` (0 for an all-zero volume)."""
    a = np.abs(np.asarray(vol, np.float32))
    if mask is not None:
        a = a[np.asarray(mask, bool)]
    return float(np.percentile(a, percentile)) if a.size else 0.0


def _strength(vol, mask):
    """Robust maximum of ``|vol|`` relative to its spread (MAD-based SD) inside ``mask``.

    High for a volume with focal structure that stands out of its own background, ~3 for noise.
    """
    v = np.asarray(vol, np.float32)[mask]
    if v.size == 0:
        return 0.0
    rmax = float(np.percentile(np.abs(v), ROBUST_PERCENTILE))
    spread = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    if spread <= 0:
        spread = float(v.std())
    return rmax / spread if spread > 0 else (np.inf if rmax > 0 else 0.0)


def choose_cut_coords(volumes: list, grid: Grid, mask: np.ndarray | None = None, sigma_vox: float = 1.0) -> tuple:
    """One MNI cut (x, y, z in mm) for a unit, shared by all of its panels.

    The cut goes through the peak of smoothed ``|value|`` (Gaussian, ``sigma_vox`` voxels) of the
    unit's *strongest* volume: the one whose robust maximum (99.5th percentile of ``|value|``
    inside ``mask``) is largest relative to its own spread (1.4826 × MAD), i.e. the one with the
    most focal structure. The peak is searched inside ``mask`` and returned as the world
    coordinates of a voxel centre of ``grid``, so all slices fall exactly on grid voxels.

    Parameters
    ----------
    volumes : sequence or dict of 3D arrays (None entries are skipped)
        The unit's visualizations (e.g. one per regularization preset), on ``grid``.
    grid : brainfv.data.grid.Grid
    mask : bool array on ``grid`` or None
        Brain mask (default: the template's brain mask on ``grid``).

    Returns
    -------
    tuple of 3 floats
        MNI coordinates in mm. With no usable volume (all None or all zero) the mask's centre of
        mass, rounded to a voxel.
    """
    if isinstance(volumes, dict):
        volumes = list(volumes.values())
    vols = [np.asarray(v, np.float32) for v in volumes if v is not None]
    mask = _mask_for(grid, mask)
    for v in vols:
        if v.shape != tuple(grid.shape):
            raise InputDataError(f"choose_cut_coords: volume of shape {v.shape} is not on the grid "
                                 f"{tuple(grid.shape)}")
    scores = [_strength(v, mask) for v in vols]
    if not vols or max(scores) == 0:
        centre = np.round(ndimage.center_of_mass(mask)) if mask.any() else np.array(grid.shape) // 2
        return tuple(float(c) for c in grid.world_coords(centre))
    best = vols[int(np.argmax(scores))]
    smooth = ndimage.gaussian_filter(np.abs(best), sigma_vox, mode="constant")
    smooth = np.where(mask, smooth, -np.inf)
    ijk = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return tuple(float(c) for c in grid.world_coords(ijk))


def _mask_for(grid, mask):
    if mask is None:
        return template_on_grid(grid)["mask"]
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(grid.shape):
        raise InputDataError(f"brain mask of shape {mask.shape} is not on the grid {tuple(grid.shape)}")
    return mask


# --------------------------------------------------------------------------- the figure


def _as_unit_lists(panels, n_units):
    """``panels`` (name -> per-unit sequence or 4D array) as name -> list of (3D array or None)."""
    out = {}
    for name, seq in panels.items():
        if seq is None:
            seq = [None] * n_units
        lst = [None if v is None else np.asarray(v, np.float32) for v in seq]
        if len(lst) != n_units:
            raise InputDataError(f"panel {name!r} has {len(lst)} volumes; expected one per unit "
                                 f"({n_units}, None where a unit has none)")
        out[name] = lst
    return out


def _default_bg():
    return datasets.load_mni152_template(resolution=2)


def _cut_for_mode(xyz, display_mode):
    if display_mode == "ortho":
        return tuple(xyz)
    idx = {"x": 0, "y": 1, "z": 2}
    if not display_mode or any(c not in idx for c in display_mode):
        raise ValueError(f"display_mode must be 'ortho' or made of 'x', 'y', 'z' (e.g. 'z', 'yz'), "
                         f"got {display_mode!r}")
    return [xyz[idx[c]] for c in display_mode]


def units_on_anatomy_figure(panels: dict, unit_labels: list, grid: Grid, path: str | Path, title: str, *,
                            cut_coords: list | None = None, mask: np.ndarray | None = None, styles: dict | None = None,
                            bg_img: object = None, display_mode: str = "ortho",
                            threshold_fraction: float = THRESHOLD_FRACTION, panel_width: float = 3.0, dpi: int = DPI,
                            black_bg: bool = True, cmap: str = DIVERGING_CMAP, palette: bool = True,
                            log: Callable | None = None) -> AnatomyFigure:
    """Units (rows) × panels (columns), each panel over the template at the unit's common MNI cut: every panel of a
    row is cut through the same MNI point (``cut_coords[i]``, default :func:`choose_cut_coords` over the row's
    visualizations), printed left of the row, so presets can be compared voxel for voxel. Overlays use a symmetric
    diverging colour map (``cmap``; blue: darker T1 than average) and hide ``|value| < threshold_fraction`` × the
    panel's robust maximum (99.5th percentile of ``|value|`` in the brain ``mask``, default the template's), fading
    in up to 50 % of it (nilearn >= 0.12). Each column has one colour bar stating its units; a column scaled per
    panel (``PanelStyle.scale = "panel"``, the default for attributions) prints each panel's robust maximum.
    Exemplars (``kind="image"``) are greyscale on a fixed -3..3 SD scale. 8 units × 8 columns on the 52 × 64 × 52
    grid: 2800 × 1144 px, ~0.7 MB, ~25 s on two CPU cores.

    ``panels``: column name -> one 3D array on ``grid`` or None per unit (or 4D, units first), in column
    order; ``path``: the PNG, written atomically; ``styles``: name -> PanelStyle over :func:`panel_style`;
    ``bg_img``: default nilearn's 2 mm MNI152; ``display_mode``: ``"ortho"`` or a subset of ``"xyz"``;
    ``palette``: a 256-colour indexed PNG (3× smaller). Returns an :class:`AnatomyFigure`.
    """
    t0 = time.perf_counter()
    unit_labels, cols = _checked_panels(panels, unit_labels, grid)
    n, names = len(unit_labels), list(cols)
    mask = _mask_for(grid, mask)
    style = {name: panel_style(name, styles) for name in names}
    cuts = _row_cuts(cols, style, n, grid, mask, cut_coords)
    rmax = {name: [None if v is None else robust_max(v, mask) for v in cols[name]] for name in names}
    vmax = {name: _panel_vmax(style[name], rmax[name]) for name in names}
    bg = bg_img if bg_img is not None else _default_bg()
    fg, bgc = ("white", "black") if black_bg else ("black", "white")
    row_h, label_w, top_h, bottom_h, fig_w, fig_h = _figure_layout(display_mode, panel_width, n, len(names))
    panel_cuts = [[None] * len(names) for _ in range(n)]
    with mpl.rc_context(_figure_rc(fg, bgc)), _cheap_gc() as gc_state:
        # A bare Agg figure: no pyplot, so no backend switch and no figure registry to clean up.
        fig = Figure(figsize=(fig_w, fig_h), facecolor=bgc)
        FigureCanvasAgg(fig)
        try:
            gs = fig.add_gridspec(n, len(names), left=label_w / fig_w, right=1 - 0.2 / fig_w,
                                  top=1 - top_h / fig_h, bottom=bottom_h / fig_h, wspace=0.04, hspace=0.08)
            for i in range(n):
                for j, name in enumerate(names):
                    ax = fig.add_subplot(gs[i, j])
                    panel_cuts[i][j] = _draw_panel(
                        fig, ax, cols[name][i], grid, bg, cuts[i], style[name], vmax[name],
                        rmax[name][i], threshold_fraction, display_mode, black_bg, fg, cmap)
                    if i == 0:
                        ax.set_title(name, fontsize=10, color=fg, pad=4)
                _row_label(fig, unit_labels[i], cuts[i], (0.15 / fig_w, 1 - (top_h + row_h * (i + 0.5)) / fig_h), fg)
                gc_state.refreeze()
                if log:
                    log(f"anatomy figure: row {i + 1}/{n} drawn ({unit_labels[i]})")
            _colour_bars(fig, gs, names, style, vmax, threshold_fraction, fig_h, bottom_h, fg, cmap)
            fig.suptitle(title, fontsize=11, color=fg, y=1 - 0.12 / fig_h, va="top")
            size = _save_png(fig, path, dpi, bgc, palette)
        finally:
            fig.clear()
    return AnatomyFigure(path=path, size_px=size, n_bytes=os.path.getsize(path), cut_coords=cuts,
                         panel_cut_coords=panel_cuts, vmax=vmax, seconds=time.perf_counter() - t0)


def _row_label(fig: Figure, label: str, cut: tuple, xy: tuple, fg: str) -> None:
    """A row's label and its MNI cut, left of its panels."""
    x, y, z = cut
    fig.text(xy[0], xy[1], f"{label}\nx={x:.0f} y={y:.0f} z={z:.0f}\n(MNI mm)", ha="left", va="center",
             fontsize=8, color=fg, linespacing=1.3)


def _figure_layout(display_mode: str, panel_width: float, n_rows: int, n_cols: int) -> tuple:
    """(row height, label width, top and bottom margins, figure width and height), in inches."""
    n_views = 3 if display_mode == "ortho" else len(display_mode)
    row_h = panel_width / n_views * 1.1 if display_mode == "ortho" else panel_width / n_views * 1.25
    label_w, top_h, bottom_h = 1.25, 0.75, 0.85
    return (row_h, label_w, top_h, bottom_h, label_w + panel_width * n_cols + 0.2,
            top_h + row_h * n_rows + bottom_h)


def _figure_rc(fg: str, bgc: str) -> dict:
    """Matplotlib settings of the figure: text and axes in ``fg`` on a ``bgc`` background."""
    return {"font.size": 8, "axes.titlesize": 9, "text.color": fg, "axes.labelcolor": fg,
            "xtick.color": fg, "ytick.color": fg, "axes.edgecolor": fg, "figure.facecolor": bgc,
            "savefig.facecolor": bgc}


def _checked_panels(panels: dict, unit_labels: list, grid: object) -> tuple[list[str], dict]:
    """The row labels as strings and the columns as one entry per unit, each on the grid."""
    unit_labels = [str(u) for u in unit_labels]
    n = len(unit_labels)
    if n == 0:
        raise InputDataError("units_on_anatomy_figure: no units to draw")
    cols = _as_unit_lists(panels, n)
    if not cols:
        raise InputDataError("units_on_anatomy_figure: no panels to draw")
    for name, lst in cols.items():
        for i, v in enumerate(lst):
            if v is not None and v.shape != tuple(grid.shape):
                raise InputDataError(f"panel {name!r} of unit {unit_labels[i]!r} has shape {v.shape}; "
                                     f"expected the grid's {tuple(grid.shape)}")
    return unit_labels, cols


def _panel_vmax(st: PanelStyle, rmax: list) -> float | list:
    """A column's colour limit: an image's fixed scale, the column's largest robust maximum, or per panel."""
    vals = [r for r in rmax if r]
    if st.kind == "image":
        return (st.vlim or (-3.0, 3.0))[1]
    if st.scale == "column":
        return max(vals) if vals else 1.0
    return rmax


def _row_cuts(cols, style, n, grid, mask, cut_coords):
    if cut_coords is not None and len(cut_coords) != n:
        raise InputDataError(f"cut_coords has {len(cut_coords)} entries; expected one per unit ({n})")
    cuts = []
    for i in range(n):
        given = None if cut_coords is None else cut_coords[i]
        if given is not None:
            given = tuple(float(c) for c in given)
            if len(given) != 3:
                raise InputDataError(f"cut_coords[{i}] must be (x, y, z) in mm, got {cut_coords[i]!r}")
            cuts.append(given)
            continue
        vols = [cols[name][i] for name in cols if style[name].use_for_cuts]
        if not any(v is not None for v in vols):  # no visualization: fall back to any panel
            vols = [cols[name][i] for name in cols]
        cuts.append(choose_cut_coords(vols, grid, mask))
    return cuts


def _draw_panel(fig, ax, vol, grid, bg, xyz, st, vmax, rmax, threshold_fraction, display_mode,
                black_bg, fg, cmap):
    """Draw one panel on ``ax``; return the cut nilearn used (None for a missing panel)."""
    if vol is None:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_color("0.4")
            s.set_linestyle(":")
        ax.set_facecolor("none")
        ax.text(0.5, 0.5, "not available", ha="center", va="center", color="0.6", fontsize=8,
                transform=ax.transAxes)
        return None
    cut = _cut_for_mode(xyz, display_mode)
    img = grid.to_nifti(vol)
    common = dict(cut_coords=cut, display_mode=display_mode, figure=fig, axes=ax, colorbar=False,
                  annotate=False, draw_cross=False, black_bg=black_bg)
    if st.kind == "image":
        # Drawn as an opaque greyscale "overlay" over the template so every column shares the
        # template's field of view; exact zeros (outside the image's brain) show the template.
        lo, hi = st.vlim or (-3.0, 3.0)
        data = np.where(vol == 0, 0, np.clip(vol, lo, hi)).astype(np.float32)
        data[(vol != 0) & (data == 0)] = 1e-3
        display = plotting.plot_stat_map(grid.to_nifti(data), bg_img=bg, cmap="gray", vmin=lo, vmax=hi,
                                         symmetric_cbar=False, threshold=1e-6, dim=BG_DIM, **common)
    else:
        if st.scale == "panel":
            peak = rmax or 1.0
            img = grid.to_nifti(vol / peak)
            vm, thr = 1.0, threshold_fraction
        else:
            vm, thr = float(vmax) or 1.0, threshold_fraction * (rmax or 0.0)
        thr = max(thr, 1e-6)
        extra = {}
        if _has_transparency() and rmax:
            extra = _fade_in(vol, rmax, threshold_fraction, grid)
        display = plotting.plot_stat_map(img, bg_img=bg, cmap=cmap, vmax=vm, vmin=-vm,
                                         symmetric_cbar=True, threshold=thr, dim=BG_DIM, **common, **extra)
        if st.scale == "panel":
            box = ax.get_position()  # nilearn hides ``ax`` and draws in axes of its own
            fig.text(box.x0 + 0.004, box.y0, f"robust max {rmax:.2g}", ha="left", va="bottom",
                     fontsize=6.5, color=fg, zorder=10)  # under the sagittal view, the shortest
    display.annotate(left_right=True, positions=False, size=6)
    return tuple(float(c) for c in np.atleast_1d(display.cut_coords))


def _save_png(fig, path, dpi, facecolor, palette):
    """Write ``fig`` as PNG atomically (with ``palette``, 256-colour indexed); return its pixel size.

    An 8 × 8 panel figure of noisy visualizations is ~2.5 MB as RGBA and ~0.8 MB indexed; the
    quantisation (no dithering) is not visible: colour maps have 256 levels anyway.
    """
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, facecolor=facecolor, format="png")
    buf.seek(0)
    with atomic_path(path) as tmp, Image.open(buf) as im:
        if palette:
            q = im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            q.save(tmp, format="PNG", optimize=True)
        else:
            tmp.write_bytes(buf.getvalue())
        return im.size


def _fade_in(vol, rmax, threshold_fraction, grid):
    """nilearn ``transparency`` arguments: transparent at the threshold, opaque from OPAQUE_FRACTION.

    Alpha rises linearly with ``|v| / rmax`` from ``threshold_fraction`` to :data:`OPAQUE_FRACTION`
    (nilearn >= 0.12). nilearn rescales the float32 image by the range; with range ends that are
    exact in float16 (and so their difference exact in float32), the largest alpha is exactly 1,
    not the 1.0000001 that matplotlib refuses.
    """
    lo = float(np.float16(threshold_fraction))
    hi = float(np.float16(max(OPAQUE_FRACTION, 2 * threshold_fraction)))
    rel = np.clip(np.abs(vol) / rmax, 0, hi).astype(np.float32)
    if rel.max() < hi:  # every value below the opaque level: nothing to fade
        return {}
    return dict(transparency=grid.to_nifti(rel), transparency_range=[lo, hi])


def _colour_bars(fig, gs, names, style, vmax, threshold_fraction, fig_h, bottom_h, fg, diverging):
    """One horizontal colour bar under each column, labelled with the column's units."""
    for j, name in enumerate(names):
        st = style[name]
        box = gs[-1, j].get_position(fig)
        w = box.width * 0.7
        cax = fig.add_axes([box.x0 + (box.width - w) / 2, (bottom_h - 0.3) / fig_h, w, 0.1 / fig_h])
        if st.kind == "image":
            lo, hi = st.vlim or (-3.0, 3.0)
            norm, cmap, label = mpl.colors.Normalize(lo, hi), "gray", f"{name}: {st.units}"
        elif st.scale == "panel":
            norm, cmap = mpl.colors.Normalize(-1, 1), diverging
            label = (f"{st.units} ÷ each panel's robust max (printed)\n"
                     f"hidden below {threshold_fraction:.0%}, opaque from {OPAQUE_FRACTION:.0%} of it")
        else:
            vm = float(vmax[name]) or 1.0
            norm, cmap = mpl.colors.Normalize(-vm, vm), diverging
            label = (f"{st.units}\nhidden below {threshold_fraction:.0%}, opaque from "
                     f"{OPAQUE_FRACTION:.0%} of each panel's robust max")
        cb = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal",
                          extend="neither" if st.kind == "image" else "both")
        cb.ax.tick_params(labelsize=6.5, colors=fg, length=2)
        cb.outline.set_edgecolor(fg)
        cb.set_label(label, fontsize=6.5, color=fg, labelpad=2)
