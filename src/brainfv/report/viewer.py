"""One self-contained HTML page to scroll through each unit's volumes over the MNI152 template.

Per task × layer, :func:`write_viewer` writes a single HTML file that works offline (no request
leaves the file: scripts and images are embedded as text and ``data:`` URIs). A sidebar lists the
units with their MNI cut; the selected unit's panels (each preset's visualization, exemplar,
attribution) are shown one under the other as nilearn ``view_img`` (brainsprite) viewers, all
opened at the unit's common cut and linked: clicking in one moves the crosshair of all. Arrow keys
(or j / k) step through units.

Size. A page made of nilearn's standalone ``view_img`` documents repeats jQuery, brainsprite
and the template sprite in every viewer. Here each viewer's ``view_img`` output is taken apart
(:func:`parse_view`): the libraries and every identical image (the template sprite, colour bars)
are stored once, each viewer keeps only its overlay sprite and parameters, and viewers are built
in JavaScript when their unit is first shown. ``mode="iframe"`` instead embeds each viewer's own
nilearn page (in an iframe made on demand): the fallback if nilearn's page layout ever changes,
and the baseline of the size comparison in ``ViewerPage.n_bytes``.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from nilearn import plotting
from PIL import Image

from ..data.grid import Grid
from ..data.template import template_on_grid
from ..errors import InputDataError
from ..utils import Progress, atomic_path
from .anatomy import (
    DIVERGING_CMAP,
    THRESHOLD_FRACTION,
    _cheap_gc,
    _mask_for,
    choose_cut_coords,
    panel_style,
    robust_max,
)

__all__ = ["ViewerPage", "write_viewer", "parse_view", "repack_png"]

VIEW_WIDTH = 560  # px of one brainsprite viewer before the page's CSS resizes it


@dataclass
class ViewerPage:
    """What :func:`write_viewer` wrote: file, size, number of viewers, mode and time taken."""

    path: object
    n_bytes: int
    n_views: int
    mode: str
    seconds: float


# --------------------------------------------------------------------------- nilearn's page, parsed

_IMG_RE = re.compile(r'<img\s+id="(\w+)"[^>]*?src="data:image/png;base64,([A-Za-z0-9+/=]*)"', re.S)
_PARAMS_RE = re.compile(r"brainsprite\((\{.*?\})\)\s*;", re.S)
_SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.S)


def parse_view(page: str) -> dict | None:
    """Take a nilearn ``view_img`` standalone page apart.

    Returns
    -------
    dict with ``params`` (brainsprite's parameters), ``images`` (element id -> base64 PNG) and
    ``library`` (the brainsprite JavaScript), or None when the page does not have the layout
    nilearn's ``stat_map_template.html`` has had since nilearn 0.6.
    """
    m = _PARAMS_RE.search(page)
    if m is None:
        return None
    try:
        params = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    images = dict(_IMG_RE.findall(page))
    library = next((s.strip().rstrip(";") for s in _SCRIPT_RE.findall(page) if "function brainsprite" in s),
                   None)
    try:
        needed = [params["sprite"], params["overlay"]["sprite"]]
        if "colorMap" in params:
            needed.append(params["colorMap"]["img"])
    except (KeyError, TypeError):
        return None
    if library is None or any(k not in images for k in needed):
        return None
    return {"params": params, "images": images, "library": library}


# --------------------------------------------------------------------------- the page


def _template_img(template, display):
    """The background anatomy on the display grid (outside-brain voxels 0, shown black)."""
    if template is None:  # the study's own template on the grid (cached), brain only
        return display.to_nifti(template_on_grid(display)["t1"])
    if isinstance(template, np.ndarray):
        if template.shape != tuple(display.shape):
            raise InputDataError(f"template array of shape {template.shape} is not on the display grid "
                                 f"{tuple(display.shape)}; pass a NIfTI image instead")
        return display.to_nifti(template)
    img = nib.load(str(template)) if not hasattr(template, "affine") else template
    return display.to_nifti(display.resample_image(img))


def _display_grid(grid, voxel_size):
    if voxel_size is None or float(voxel_size) == grid.voxel_size:
        return grid
    lo = np.asarray(grid.origin) - grid.voxel_size / 2
    hi = lo + np.asarray(grid.shape) * grid.voxel_size
    return Grid.from_bbox(float(voxel_size), np.stack([lo, hi], axis=1))


def _validate_units(units, grid):
    if not units:
        raise InputDataError("write_viewer: no units to show")
    out = []
    for i, u in enumerate(units):
        if not isinstance(u, dict) or "label" not in u or "panels" not in u:
            raise InputDataError(f"write_viewer: units[{i}] must be a dict with 'label' and 'panels' "
                                 f"(and optionally 'cut_coords'), got {type(u).__name__}"
                                 f"{' with keys ' + str(sorted(u)) if isinstance(u, dict) else ''}")
        panels = {}
        for name, v in dict(u["panels"]).items():
            if v is not None:
                v = np.asarray(v, np.float32)
                if v.shape != tuple(grid.shape):
                    raise InputDataError(f"write_viewer: panel {name!r} of unit {u['label']!r} has shape "
                                         f"{v.shape}; expected the grid's {tuple(grid.shape)}")
            panels[str(name)] = v
        cut = u.get("cut_coords")
        if cut is not None:
            cut = tuple(float(c) for c in cut)
            if len(cut) != 3:
                raise InputDataError(f"write_viewer: cut_coords of unit {u['label']!r} must be (x, y, z) mm, "
                                     f"got {u['cut_coords']!r}")
        out.append({"label": str(u["label"]), "panels": panels, "cut_coords": cut})
    return out


def _column_vmax(units, styles, mask):
    """Colour-scale maximum per panel name over all units (column scale), as in the static figure."""
    vmax = {}
    for u in units:
        for name, v in u["panels"].items():
            if v is not None and panel_style(name, styles).scale == "column":
                vmax[name] = max(vmax.get(name, 0.0), robust_max(v, mask))
    return vmax


def _make_view(vol, style, grid, bg, cut, vmax_col, mask, threshold_fraction, cmap, display):
    """nilearn ``view_img`` page of one panel, and what its colour bar and caption say.

    Returns ``(page, legend)`` with legend keys ``range`` (colour bar end labels), ``units`` and
    ``caption`` (scale and threshold in words).
    """
    rmax = robust_max(vol, mask)
    # voxels shown as voxels (nearest) unless the display grid is coarser (then interpolate, not alias)
    interpolation = "nearest" if display.voxel_size <= grid.voxel_size else "continuous"
    common = dict(bg_img=bg, cut_coords=cut, black_bg=True, draw_cross=True, annotate=True, title=None,
                  colorbar=True, width_view=VIEW_WIDTH, resampling_interpolation=interpolation)
    if style.kind == "image":
        lo, hi = style.vlim or (-3.0, 3.0)
        data = np.clip(vol, lo, hi)
        data[(vol != 0) & (np.abs(data) <= 1e-6)] = 2e-6  # exact zeros = outside the image: template shows
        with warnings.catch_warnings():  # the threshold only makes the image's outside transparent
            warnings.filterwarnings("ignore", message="Threshold given was")
            view = plotting.view_img(grid.to_nifti(data), cmap="gray", symmetric_cmap=False, vmin=lo,
                                     vmax=hi, threshold=1e-6, **common)
        legend = {"range": [f"{lo:g}", f"{hi:g}"], "units": style.units,
                  "caption": "the image itself (values beyond the scale are clipped)"}
    elif style.scale == "panel":
        data, vm, thr = vol / (rmax or 1.0), 1.0, threshold_fraction
        view = plotting.view_img(grid.to_nifti(data), cmap=cmap, symmetric_cmap=True, vmax=vm,
                                 threshold=max(thr, 1e-6), **common)
        legend = {"range": ["−1", "1"], "units": f"{style.units} ÷ robust max {rmax:.3g}",
                  "caption": f"scaled by this panel's robust max (99.5th percentile of |value| in the brain "
                             f"mask); |value| < {threshold_fraction:.0%} of it hidden"}
    else:
        vm = float(vmax_col) or 1.0
        thr = threshold_fraction * rmax
        view = plotting.view_img(grid.to_nifti(vol), cmap=cmap, symmetric_cmap=True, vmax=vm,
                                 threshold=max(thr, 1e-6), **common)
        legend = {"range": [f"−{vm:.3g}", f"{vm:.3g}"], "units": style.units,
                  "caption": f"one scale for this column (all units); |value| < {thr:.3g} hidden "
                             f"({threshold_fraction:.0%} of this panel's robust max, {rmax:.3g})"}
    return view.get_standalone(), legend


def _key(b64):
    return hashlib.sha1(b64.encode()).hexdigest()[:16]


def repack_png(b64: str) -> str:
    """A base64 PNG re-encoded as an indexed (palette) PNG when that is exact and smaller.

    nilearn writes sprites as RGBA PNGs, but a sprite drawn through a colour map has at most a
    few hundred distinct RGBA values; stored as palette indices (with an RGBA palette) the same
    pixels take ~2.5× less space. Returns ``b64`` unchanged when there are more than 256 colours.
    """
    raw = base64.b64decode(b64)
    with Image.open(io.BytesIO(raw)) as im:
        rgba = np.asarray(im.convert("RGBA"))
    colours, index = np.unique(np.ascontiguousarray(rgba).reshape(-1, 4).view(np.uint32).ravel(),
                               return_inverse=True)
    if len(colours) > 256:
        return b64
    pal = Image.fromarray(index.reshape(rgba.shape[:2]).astype(np.uint8), mode="P")
    pal.putpalette(colours.view(np.uint8).tobytes(), rawmode="RGBA")
    buf = io.BytesIO()
    pal.save(buf, format="PNG", optimize=True)
    out = buf.getvalue()
    return base64.b64encode(out).decode("ascii") if len(out) < len(raw) else b64


def write_viewer(path: str | Path, title: str, units: list[dict], grid: Grid, template: object = None,
                 description: str = "", *, mask: np.ndarray | None = None, styles: dict | None = None,
                 threshold_fraction: float = THRESHOLD_FRACTION, display_voxel_size: float | None = None,
                 cmap: str = DIVERGING_CMAP, mode: str = "shared", log: Callable | None = None) -> ViewerPage:
    """Write one self-contained, offline HTML page to scroll through units' volumes on anatomy.

    - ``path``: the HTML file, written atomically; ``title``: the page title (e.g. ``"lesion — block4.norm"``);
      ``description``: plain text shown under the title.
    - ``units``: one dict per unit: ``label`` (str), ``panels`` (dict name -> 3D array on ``grid`` or None;
      dict order = display order) and optionally ``cut_coords`` ((x, y, z) MNI mm; default
      :func:`brainfv.report.anatomy.choose_cut_coords` over the unit's visualizations).
    - ``grid``: the study grid (:class:`brainfv.data.grid.Grid`) the volumes are on.
    - ``template``: background anatomy (Niimg, path, array on the display grid; default nilearn's MNI152 1 mm
      template, brain only, resampled). ``mask``: bool array on ``grid`` for robust maxima and the cut search
      (default the template's).
    - ``styles``: dict name -> PanelStyle, as in :func:`brainfv.report.anatomy.units_on_anatomy_figure`.
    - ``threshold_fraction``: overlay voxels with ``|v|`` below this fraction of the panel's robust maximum
      (99.5th percentile of ``|v|`` in the mask) are hidden so the anatomy shows (15 % by default).
    - ``display_voxel_size``: voxel size (mm) of the viewers' sprites; None: the study grid's (volumes shown at
      their own resolution, nearest-neighbour). The page grows with the voxel count: 4 units x 8 panels of
      noisy visualizations are ~2.4 MB at 3 mm, ~3.6 MB at 2 mm; a coarser display grid (e.g. 3 for a 1.5 mm
      study) interpolates instead of aliasing.
    - ``cmap``: diverging colour map (blue: darker T1 than average, red: brighter).
    - ``mode``: ``"shared"``: libraries and identical images stored once, viewers built on demand (see the
      module docstring); ``"iframe"``: each viewer's own nilearn page in an on-demand iframe.
    - ``log``: a callable for progress messages, or None.

    Returns a :class:`ViewerPage`.
    """
    t0 = time.perf_counter()
    if mode not in ("shared", "iframe"):
        raise ValueError(f"write_viewer: mode must be 'shared' or 'iframe', got {mode!r}")
    units = _validate_units(units, grid)
    mask = _mask_for(grid, mask)
    display = _display_grid(grid, display_voxel_size)
    bg = _template_img(template, display)
    vmax_col = _column_vmax(units, styles, mask)
    n_views = sum(v is not None for u in units for v in u["panels"].values())
    progress = Progress(n_views, "viewer panels", log=log or (lambda m: None), every=10.0)
    with _cheap_gc() as gc_state:
        text = _build(title, units, grid, description, mask, styles, threshold_fraction, display, bg,
                      vmax_col, cmap, mode, progress, gc_state)
    if text is None:  # nilearn's page layout unknown: embed its pages whole
        (log or (lambda m: None))(f"viewer: nilearn {nilearn.__version__}'s view_img page has an unknown "
                                  f"layout; falling back to mode='iframe'")
        return write_viewer(path, title, units, grid, template, description, mask=mask, styles=styles,
                            threshold_fraction=threshold_fraction, display_voxel_size=display_voxel_size,
                            cmap=cmap, mode="iframe", log=log)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return ViewerPage(path=path, n_bytes=len(text.encode("utf-8")), n_views=n_views, mode=mode,
                      seconds=time.perf_counter() - t0)


def _build(title, units, grid, description, mask, styles, threshold_fraction, display, bg, vmax_col, cmap,
           mode, progress, gc_state):
    """The page's HTML text, or None when a nilearn page cannot be parsed in mode 'shared'."""
    assets, library, out_units = {}, None, []
    for u in units:
        cut = u["cut_coords"]
        if cut is None:
            vols = [v for n, v in u["panels"].items() if panel_style(n, styles).use_for_cuts]
            if not any(v is not None for v in vols):
                vols = list(u["panels"].values())
            cut = choose_cut_coords(vols, grid, mask)
        panels = []
        for name, vol in u["panels"].items():
            entry = {"name": name, "caption": "", "view": None, "page": None}
            if vol is not None:
                style = panel_style(name, styles)
                page, legend = _make_view(vol, style, grid, bg, cut, vmax_col.get(name), mask,
                                          threshold_fraction, cmap, display)
                entry.update(legend)
                parsed = parse_view(page) if mode == "shared" else None
                if mode == "shared" and parsed is None:
                    return None
                if parsed is not None:
                    library = library or parsed["library"]
                    p = parsed["params"]
                    refs = {}
                    for role, elem in (("sprite", p["sprite"]), ("overlay", p["overlay"]["sprite"]),
                                       ("colormap", p.get("colorMap", {}).get("img"))):
                        if elem is None:
                            continue
                        b64 = parsed["images"][elem]
                        refs[role] = _key(b64)
                        if refs[role] not in assets:
                            assets[refs[role]] = repack_png(b64)
                    entry["view"] = {"params": p, **refs}
                else:
                    entry["page"] = page
                gc_state.refreeze()
                progress.update(extra=f"{u['label']} / {name}")
            panels.append(entry)
        out_units.append({"label": u["label"], "cut": [round(c, 2) for c in cut], "panels": panels})
    data = {"units": out_units, "assets": assets}
    return _page(title, description, data, library, threshold_fraction, display.voxel_size, grid.voxel_size)


def _json_for_script(obj):
    """JSON that can sit inside a <script> element (no '</' sequence ends it early)."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def _page(title, description, data, library, threshold_fraction, display_mm, grid_mm):
    esc = html.escape
    res = (f"{grid_mm:g} mm study grid" if display_mm == grid_mm
           else f"{grid_mm:g} mm study grid shown on a {display_mm:g} mm display grid")
    notes = (f"Each unit's panels are cut through one MNI point (shown per unit) and linked: click or drag "
             f"in any viewer to move all crosshairs. Overlays: blue = darker T1 than average, red = brighter; "
             f"voxels with |value| below {threshold_fraction:.0%} of the panel's robust maximum (99.5th "
             f"percentile of |value| in the brain mask) are hidden. Background: MNI152 template; {res}. "
             f"Keys: ↑/↓ or k/j previous/next unit.")
    lib = (library or "").replace("</script", "<\\/script")
    return _TEMPLATE.substitute(
        TITLE=esc(title), DESCRIPTION=esc(description), NOTES=esc(notes), DATA=_json_for_script(data),
        LIBRARY=lib,
        CSP=_CSP,
    )


from string import Template  # noqa: E402  (the page template reads better at the end of the module)

#: the page's Content-Security-Policy: nothing from the network, its own inline script, style and images only
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
        "frame-src 'self' data: about:; child-src 'self' data: about:")

_TEMPLATE = Template(r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="$CSP">
<title>$TITLE</title>
<style>
  :root { color-scheme: dark; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: #111; color: #ddd; }
  header { padding: 10px 18px; border-bottom: 1px solid #333; }
  header h1 { font-size: 18px; margin: 0 0 4px; color: #fff; }
  header p { margin: 2px 0; color: #aaa; font-size: 12.5px; max-width: 1100px; }
  header .controls { color: #ccc; }
  header .controls input { vertical-align: middle; width: 160px; }
  #layout { display: flex; align-items: flex-start; }
  nav { position: sticky; top: 0; width: 210px; flex: none; max-height: 100vh; overflow-y: auto;
        border-right: 1px solid #333; padding: 8px 0; }
  nav a { display: block; padding: 5px 14px; color: #ccc; text-decoration: none; font-size: 13px; }
  nav a small { display: block; color: #888; font-size: 11px; }
  nav a.active { background: #2a3a55; color: #fff; }
  nav a:hover { background: #222; }
  main { flex: 1; padding: 10px 18px; min-width: 0; }
  section.unit { display: none; }
  section.unit.active { display: block; }
  section.unit h2 { font-size: 16px; margin: 4px 0 8px; color: #fff; }
  section.unit h2 span { color: #9ab; font-weight: normal; font-size: 13px; margin-left: 10px; }
  .panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 14px; }
  .panel { background: #000; border: 1px solid #333; border-radius: 4px; padding: 6px; }
  .panel h3 { font-size: 14px; margin: 0 0 4px; color: #fff; }
  .panel .viewer { width: 100%; min-height: 40px; }
  .panel .viewer canvas { display: block; }
  .panel iframe { width: 100%; border: 0; aspect-ratio: 2.3; }
  .panel .caption { font-size: 11.5px; color: #999; margin-top: 2px; }
  .cbar { display: flex; align-items: center; gap: 6px; font-size: 12px; color: #ddd; margin-top: 4px; }
  .cbar img { width: 180px; height: 10px; image-rendering: pixelated; border: 1px solid #555; }
  .cbar .units { color: #bbb; margin-left: 8px; }
  .panel.missing .viewer { color: #777; font-style: italic; padding: 30px 0; text-align: center; }
</style>
</head>
<body>
<header>
  <h1>$TITLE</h1>
  <p>$DESCRIPTION</p>
  <p>$NOTES</p>
  <p class="controls"><label>overlay opacity
    <input type="range" id="opacity" min="0" max="100" value="100"></label> <span id="opacity-value">100 %</span></p>
</header>
<div id="layout">
  <nav id="toc"></nav>
  <main id="units"></main>
</div>
<script id="brainfv-data" type="application/json">$DATA</script>
<script>$LIBRARY</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("brainfv-data").textContent);
const built = {};      // unit index -> list of brainsprite objects (or iframes)
let current = -1;
let opacity = 1;
window.brainfv = { ready: false, built: built, errors: [] };

function fmtCut(c) { return "x=" + Math.round(c[0]) + " y=" + Math.round(c[1]) + " z=" + Math.round(c[2]) + " mm"; }

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

function skeleton() {
  const toc = document.getElementById("toc"), main = document.getElementById("units");
  DATA.units.forEach(function (u, i) {
    const a = el("a", { href: "#unit=" + i, id: "toc-" + i }, u.label);
    a.appendChild(el("small", {}, fmtCut(u.cut)));
    a.addEventListener("click", function (ev) { ev.preventDefault(); show(i); });
    toc.appendChild(a);
    const sec = el("section", { class: "unit", id: "unit-" + i });
    const h = el("h2", {}, u.label);
    h.appendChild(el("span", {}, "MNI cut " + fmtCut(u.cut)));
    sec.appendChild(h);
    const grid = el("div", { class: "panels" });
    u.panels.forEach(function (p, j) {
      const box = el("div", { class: "panel" + (p.view || p.page ? "" : " missing"), "data-panel": j });
      box.appendChild(el("h3", {}, p.name));
      box.appendChild(el("div", { class: "viewer" }, p.view || p.page ? undefined : "not available for this unit"));
      if (p.view && p.view.colormap && p.range) box.appendChild(colourBar(p));
      else if (p.page && p.units) box.appendChild(el("div", { class: "cbar" }, p.units));
      if (p.caption) box.appendChild(el("div", { class: "caption" }, p.caption));
      grid.appendChild(box);
    });
    sec.appendChild(grid);
    main.appendChild(sec);
  });
}

function colourBar(p) {
  const bar = el("div", { class: "cbar" });
  bar.appendChild(el("span", {}, p.range[0]));
  const im = el("img", { alt: "colour scale" });
  im.src = "data:image/png;base64," + DATA.assets[p.view.colormap];
  bar.appendChild(im);
  bar.appendChild(el("span", {}, p.range[1]));
  bar.appendChild(el("span", { class: "units" }, p.units));
  return bar;
}

function image(id, key) {
  const im = new Image();
  im.id = id;
  im.src = "data:image/png;base64," + DATA.assets[key];
  return im;
}

async function buildViewer(u, j, p, box, brains) {
  const id = "u" + u + "p" + j;
  const canvas = el("canvas", { id: id + "-canvas" });
  const imgs = [image(id + "-bg", p.view.sprite), image(id + "-ov", p.view.overlay)];
  if (p.view.colormap) imgs.push(image(id + "-cm", p.view.colormap));
  imgs.forEach(function (im) { canvas.appendChild(im); });   // fallback content: never rendered
  box.appendChild(canvas);
  await Promise.all(imgs.map(function (im) { return im.decode(); }));
  const params = JSON.parse(JSON.stringify(p.view.params));
  params.canvas = id + "-canvas";
  params.sprite = id + "-bg";
  params.overlay.sprite = id + "-ov";
  if (params.colorMap) params.colorMap.img = id + "-cm";
  params.smooth = false;   // voxels shown as voxels
  params.colorCrosshair = "rgba(90, 255, 90, 0.5)";   // see-through: the voxels under it stay visible
  if (params.colorMap) params.colorMap.hide = true;   // drawn below in HTML, readable at any size
  params.overlay.opacity = opacity;
  let brain = null;
  params.onclick = function () { link(u, brain); };
  brain = brainsprite(params);
  brains.push(brain);
}

function buildFrame(p, box, brains) {
  const f = el("iframe", { title: p.name });
  f.srcdoc = p.page.replace("<head>", "<head><style>body { margin: 0; background: #000; }</style>");
  box.appendChild(f);
  brains.push(f);
  return new Promise(function (resolve) { f.addEventListener("load", resolve); });
}

function link(u, src) {   // move every viewer of unit u to the slice clicked in one of them
  (built[u] || []).forEach(function (b) {
    if (b === src || !b.numSlice) return;
    b.numSlice.X = src.numSlice.X; b.numSlice.Y = src.numSlice.Y; b.numSlice.Z = src.numSlice.Z;
    b.drawAll();
  });
}

async function build(u) {
  const brains = [];
  built[u] = brains;
  const sec = document.getElementById("unit-" + u);
  const jobs = DATA.units[u].panels.map(function (p, j) {
    const box = sec.querySelector('[data-panel="' + j + '"] .viewer');
    if (p.view) return buildViewer(u, j, p, box, brains);
    if (p.page) return buildFrame(p, box, brains);
    return null;
  });
  await Promise.all(jobs.filter(Boolean));
}

async function show(u) {
  if (u < 0 || u >= DATA.units.length) return;
  window.brainfv.ready = false;
  if (current >= 0) {
    document.getElementById("unit-" + current).classList.remove("active");
    document.getElementById("toc-" + current).classList.remove("active");
  }
  current = u;
  document.getElementById("unit-" + u).classList.add("active");
  const a = document.getElementById("toc-" + u), nav = document.getElementById("toc");
  a.classList.add("active");
  if (a.offsetTop < nav.scrollTop || a.offsetTop + a.offsetHeight > nav.scrollTop + nav.clientHeight)
    nav.scrollTop = a.offsetTop - nav.clientHeight / 2;   // keep the entry in view, scroll only the list
  const sec = document.getElementById("unit-" + u);
  if (sec.getBoundingClientRect().top < 0) sec.scrollIntoView();   // the new unit's first panels
  history.replaceState(null, "", "#unit=" + u);   // not an element id: the browser must not jump to it
  try {
    if (!built[u]) await build(u);
    else built[u].forEach(function (b) { if (b.resize) { b.resize(); b.drawAll(); } });
  } catch (e) {
    window.brainfv.errors.push(String(e));
    console.error("brainfv viewer: " + e);
  }
  window.brainfv.ready = true;
  window.brainfv.current = u;
}

document.addEventListener("keydown", function (ev) {
  if (ev.key === "ArrowDown" || ev.key === "j") { ev.preventDefault(); show(current + 1); }
  if (ev.key === "ArrowUp" || ev.key === "k") { ev.preventDefault(); show(current - 1); }
});
window.brainfv.show = show;

document.getElementById("opacity").addEventListener("input", function (ev) {
  opacity = ev.target.value / 100;
  document.getElementById("opacity-value").textContent = ev.target.value + " %";
  Object.values(built).forEach(function (brains) {
    brains.forEach(function (b) { if (b.overlay) { b.overlay.opacity = opacity; b.init(); b.drawAll(); } });
  });
});

skeleton();
const m = /^#unit=(\d+)$$/.exec(location.hash);
show(m ? Math.min(+m[1], DATA.units.length - 1) : 0);
</script>
</body>
</html>
""")
