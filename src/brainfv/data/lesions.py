"""Artificial lesions: shapes, placement in white matter, insertion into cohort volumes.

A lesion is a soft-edged shape (:data:`SHAPES`) of a given diameter (mm) and
contrast, inserted at a white-matter location deep enough that the whole shape
(plus ``depth_margin_mm``) lies in WM, and at least ``min_gap_mm`` from other
lesions of the same subject. Contrast is *relative to the local tissue*: the raw
T1 intensity is multiplied by ``1 + contrast * profile`` (``contrast = -0.2``
lowers the T1 signal by 20 % at the core, as in hypo-intense lesions). Volumes
in the store are z-scored, so the change is applied on the subject's raw scale
(``norm_mean``/``norm_std`` in the participants table) and renormalised with
the same parameters.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from ..config import complete
from ..errors import ConfigError, InputDataError
from ..utils import Progress, atomic_path, get_logger, stable_seed
from .files import DATASET_FILES
from .grid import Grid
from .store import Dataset, VolumeWriter, open_volumes, write_manifest

__all__ = ["SHAPES", "shape_distance", "lesion_profile", "region_mask", "place_lesions", "insert_lesion",
           "synthesize_lesions", "random_rotation"]

SHAPES = ("sphere", "cube", "ellipsoid", "cross")
#: semi-axes of the ellipsoid relative to its radius; bar half-width of the cross relative to its radius
ELLIPSOID_AXES = (1.0, 0.55, 0.55)
CROSS_WIDTH = 0.34


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def shape_distance(shape: str, xyz: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance (mm; < 0 inside) of points ``xyz`` (..., 3) to a shape of ``radius``.

    ``sphere``: ball; ``cube``: half side = radius; ``ellipsoid``: semi-axes
    radius × :data:`ELLIPSOID_AXES`; ``cross``: three orthogonal bars of half
    length = radius and half width = radius × :data:`CROSS_WIDTH` (non-convex).
    """
    a = np.abs(xyz)
    if shape == "sphere":
        return np.linalg.norm(xyz, axis=-1) - radius
    if shape == "cube":
        return a.max(axis=-1) - radius
    if shape == "ellipsoid":
        axes = radius * np.asarray(ELLIPSOID_AXES)
        return (np.linalg.norm(xyz / axes, axis=-1) - 1.0) * axes.min()
    if shape == "cross":
        w = radius * CROSS_WIDTH
        bars = []
        for k in range(3):
            others = [j for j in range(3) if j != k]
            bars.append(np.maximum(a[..., k] - radius, np.maximum(a[..., others[0]], a[..., others[1]]) - w))
        return np.minimum(np.minimum(bars[0], bars[1]), bars[2])
    raise ConfigError(f"unknown lesion shape {shape!r}; known shapes: {list(SHAPES)}")


def lesion_profile(shape: str, radius_mm: float, voxel_size: float, edge_mm: float = 1.0,
                   rotation: np.ndarray | None = None, offset_vox: tuple = (0, 0, 0)) -> tuple[np.ndarray, tuple]:
    """The soft lesion profile (0..1) on a local voxel patch centred on the lesion.

    Returns ``(profile, half)`` where ``profile`` has side ``2 * half + 1`` voxels.
    ``offset_vox`` is the sub-voxel position of the centre. The edge is a
    logistic ramp of width ``edge_mm`` (partial volume and a soft border).
    """
    half = int(np.ceil((radius_mm + 3 * max(edge_mm, 1e-3)) / voxel_size)) + 1
    ax = np.arange(-half, half + 1, dtype=np.float32)
    g = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)
    xyz = (g - np.asarray(offset_vox, dtype=np.float32)) * voxel_size
    if rotation is not None:
        xyz = xyz @ np.asarray(rotation, dtype=np.float32)  # world -> shape frame
    d = shape_distance(shape, xyz, radius_mm)
    edge = max(edge_mm, 0.25 * voxel_size)
    prof = 1.0 / (1.0 + np.exp(np.clip(d / (edge / 4.0), -50, 50)))
    return prof.astype(np.float32), half


def _extent(shape, radius):
    """Radius of the ball enclosing the shape (for depth and gap checks)."""
    return {"sphere": radius, "cube": radius * np.sqrt(3), "ellipsoid": radius,
            "cross": radius * np.sqrt(1 + 2 * CROSS_WIDTH ** 2)}[shape]


def region_mask(grid: Grid, region_mm: list | None) -> np.ndarray:
    """Voxels of ``grid`` whose centres lie in the MNI box ``region_mm`` ([[x0, x1], [y0, y1], [z0, z1]]); all
    voxels for ``None``."""
    if region_mm is None:
        return np.ones(grid.shape, bool)
    box = np.asarray(region_mm, float)
    if box.shape != (3, 2) or np.any(box[:, 0] >= box[:, 1]):
        raise ConfigError(f"lesions.region_mm must be [[x0, x1], [y0, y1], [z0, z1]] with x0 < x1 ..., got {region_mm}")
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = grid.world_coords(ijk).reshape(grid.shape + (3,))
    return np.all((xyz >= box[:, 0]) & (xyz <= box[:, 1]), axis=-1)


def place_lesions(wm_prob: np.ndarray, shapes: list[str], radii: list[float], voxel_size: float,
                  rng: np.random.Generator, wm_threshold: float = 0.5, depth_margin_mm: float = 0.0,
                  min_gap_mm: float = 3.0, subject: str | None = None, min_radius: float | None = None,
                  log: Callable[[str], None] | None = None,
                  allowed: np.ndarray | None = None) -> tuple[list, list[float]]:
    """Choose lesion centres (voxel indices) inside white matter.

    A centre is valid where the distance to the nearest non-WM voxel is at least the
    lesion's radius plus ``depth_margin_mm``, inside ``allowed`` (a boolean region, e.g. from
    :func:`region_mask`; the whole grid if None), and its distance to every lesion already
    placed is at least the sum of their enclosing radii plus ``min_gap_mm``. A lesion
    that does not fit is shrunk in 10 % steps down to ``min_radius``; if it still does
    not fit, :class:`InputDataError` names the subject. Returns ``(centres, radii)``.
    """
    wm = wm_prob >= wm_threshold
    depth = ndimage.distance_transform_edt(wm) * voxel_size
    if allowed is not None:
        depth = np.where(allowed, depth, 0.0)
    placed, out_r = [], []
    for shape, r in zip(shapes, radii):
        r0 = r
        floor = min(r, min_radius if min_radius is not None else r)
        while True:
            ext = _extent(shape, r)
            cand = np.argwhere(depth >= r + depth_margin_mm)
            for (c, e) in placed:
                cand = cand[np.linalg.norm((cand - c) * voxel_size, axis=1) >= ext + e + min_gap_mm]
            if len(cand) or r <= floor:
                break
            r = max(floor, r * 0.9)
        if len(cand) == 0:
            raise InputDataError(
                f"subject {subject!r}: no white-matter location fits a {shape} lesion of radius {r:.1f} mm "
                f"(depth margin {depth_margin_mm} mm, gap {min_gap_mm} mm, {len(placed)} already placed"
                + ("" if allowed is None else ", inside lesions.region_mm") + "); lower lesions.diameter_mm or "
                "lesions.count, or the WM threshold" + ("" if allowed is None else ", or widen lesions.region_mm"))
        if r < r0 and log:
            log(f"subject {subject}: {shape} lesion shrunk from radius {r0:.1f} to {r:.1f} mm to fit in WM")
        c = cand[rng.integers(len(cand))]
        placed.append((c, ext))
        out_r.append(r)
    return [c for c, _ in placed], out_r


def insert_lesion(z: np.ndarray, profile: np.ndarray, half: tuple, centre: tuple, contrast: float, norm_mean: float,
                  norm_std: float) -> tuple[tuple, np.ndarray]:
    """Insert one lesion into a z-scored volume in place; returns the profile pasted on the full grid's slices.

    The raw intensity ``raw = z * std + mean`` is multiplied by ``1 + contrast * profile``.
    """
    sl_dst, sl_src = [], []
    for c, n in zip(centre, z.shape):
        lo, hi = c - half, c + half + 1
        sl_dst.append(slice(max(lo, 0), min(hi, n)))
        sl_src.append(slice(max(lo, 0) - lo, (2 * half + 1) - (hi - min(hi, n))))
    sl_dst, sl_src = tuple(sl_dst), tuple(sl_src)
    p = profile[sl_src]
    raw = z[sl_dst] * norm_std + norm_mean
    z[sl_dst] = np.where(z[sl_dst] != 0, ((raw * (1 + contrast * p)) - norm_mean) / norm_std, 0)
    return sl_dst, p


def synthesize_lesions(cohort_dir: str | Path, cfg: dict, out_dir: str | Path,
                       log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Create the lesion dataset from a prepared cohort (see module docstring).

    ``cfg`` is the full config (``lesions`` and ``seed`` are used). With ``lesions.paired`` (the
    default for presence labelling) every subject appears twice, without and with lesions, in its
    own split (matched pairs: a small cohort cannot then be memorised by anatomy). Writes to
    ``out_dir``: ``volumes.npy``, ``lesion_masks.npy`` (uint8, 1 inside lesions),
    ``participants.tsv`` (cohort columns + ``lesion`` label + ``n_lesions``),
    ``lesions.tsv`` (one row per lesion), ``lesion_frequency.nii.gz``, copies
    of the grid ``reference.nii.gz``/``mask.nii.gz``, and ``manifest.json`` (content hashes,
    :func:`brainfv.data.store.write_manifest`).
    """
    log = log or get_logger().info
    cfg = complete(cfg)  # a partial config gets the schema's defaults (no second copy of them here)
    lc = cfg["lesions"]
    seed = int(cfg["seed"])
    cohort = Dataset(cohort_dir)
    parts = cohort.participants
    grid = cohort.grid
    vols = cohort.volumes
    wms = open_volumes(Path(cohort_dir) / DATASET_FILES["wm"])
    _check_lesion_config(lc)
    paired = bool(lc["paired"]) and lc["labelling"] == "presence"
    sources, labels = _lesion_labels(parts, lc, seed, paired)
    names = _label_names(lc)
    allowed = region_mask(grid, lc["region_mm"]) if lc["region_mm"] is not None else None
    rows, lesion_rows = [], []
    freq = np.zeros(grid.shape, np.float32)
    n_out = len(sources)
    prog = Progress(n_out, "synthesize_lesions volumes", log=log, unit="vol")
    with VolumeWriter(Path(out_dir) / DATASET_FILES["volumes"], n_out, grid.shape) as vw, \
            VolumeWriter(Path(out_dir) / DATASET_FILES["lesion_masks"], n_out, grid.shape, dtype=np.uint8) as mw:
        for pos, src in enumerate(sources):
            p = parts.iloc[int(src)]
            sub = p["subject"]
            rng = np.random.default_rng(stable_seed(seed, "lesions", sub))
            z = np.array(vols[int(p["index"])], dtype=np.float32)
            y = int(labels[pos])
            volume_id = f"{sub}_{names[y]}" if paired else sub
            wm = np.asarray(wms[int(p["index"])], dtype=np.float32) / 255.0
            lesion_mask, shapes, new_rows = _lesion_volume(z, wm, p, names[y], y == 0, volume_id, lc, grid, rng, log,
                                                           allowed)
            lesion_rows += new_rows
            binary = lesion_mask >= 0.5
            freq += binary
            vw.append(z)
            mw.append(binary.astype(np.uint8))
            row = p.to_dict()
            row.update(index=pos, volume_id=volume_id, cohort_index=int(p["index"]),
                       lesion=names[y], lesion_label=y, n_lesions=len(shapes), lesion_shapes=",".join(shapes))
            rows.append(row)
            prog.update()
    pd_parts = _write_lesion_dataset(Path(out_dir), cohort_dir, grid, rows, lesion_rows, freq / max(len(parts), 1),
                                     vw.hash, mw.hash)
    counts = pd_parts.groupby(["split", "lesion"]).size().unstack(fill_value=0)
    log(f"lesion dataset ready: {len(pd_parts)} subjects, {len(lesion_rows)} lesions; split x label:\n{counts}")
    return pd_parts


def _check_lesion_config(lc: dict) -> None:
    """The ``lesions`` section's shapes and ranges (the schema cannot say min <= max)."""
    for s in lc["shapes"] + [lc["shape_a"], lc["shape_b"]]:
        if s not in SHAPES:
            raise ConfigError(f"lesions.shapes: unknown shape {s!r}; known: {list(SHAPES)}")
    dmin, dmax = lc["diameter_mm"]
    nmin, nmax = lc["count"]
    if not (0 < dmin <= dmax):
        raise ConfigError(f"lesions.diameter_mm must be [min, max] with 0 < min <= max, got {lc['diameter_mm']}")
    if not (1 <= nmin <= nmax):
        raise ConfigError(f"lesions.count must be [min, max] with 1 <= min <= max, got {lc['count']}")


def _lesion_labels(parts: pd.DataFrame, lc: dict, seed: int, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which cohort row each output volume comes from, and its label (0/1)."""
    if paired:
        # matched pairs: every subject once without and once with lesions, in its own split, so the
        # two classes share the same anatomy and only the lesions tell them apart
        return np.repeat(np.arange(len(parts)), 2), np.tile([0, 1], len(parts))
    # labels balanced within every split (systematic sampling over the split's subjects ordered by sex)
    labels = np.zeros(len(parts), dtype=int)
    frac = float(lc["fraction_positive"])
    for split, grp in parts.groupby("split"):
        rng = np.random.default_rng(stable_seed(seed, "lesion-label", split))
        order = np.concatenate([rng.permutation(g.index.to_numpy()) for _, g in grp.groupby("sex")])
        u = rng.random()
        k = np.arange(len(order))
        labels[order] = (np.floor((k + 1) * frac + u) - np.floor(k * frac + u)).astype(int)
    return np.arange(len(parts)), labels


def _label_names(lc: dict) -> dict[int, str]:
    """The class names of labels 0 and 1 under ``lesions.labelling``."""
    scheme = lc["labelling"]
    if scheme == "presence":
        return {0: "absent", 1: "present"}
    if scheme == "shapes":
        return {0: lc["shape_a"], 1: lc["shape_b"]}
    raise ConfigError(f"lesions.labelling must be 'presence' or 'shapes', got {scheme!r}")


def _lesion_volume(z: np.ndarray, wm: np.ndarray, p: pd.Series, name: str, negative: bool, volume_id: str,
                   lc: dict, grid: Grid, rng: np.random.Generator, log: Callable,
                   allowed: np.ndarray | None = None) -> tuple:
    """Lesions inserted into ``z`` (in place) for one output volume of class ``name``: (soft lesion mask, the
    lesions' shapes, one table row per lesion). Draws from ``rng`` in a fixed order (count, shapes, radii,
    then per lesion its contrast and orientation)."""
    scheme, shapes_cfg, vs = lc["labelling"], lc["shapes"], grid.voxel_size
    (dmin, dmax), (cmin, cmax), (nmin, nmax) = lc["diameter_mm"], lc["contrast"], lc["count"]
    lesion_mask = np.zeros(grid.shape, np.float32)
    n_les = 0 if scheme == "presence" and negative else int(rng.integers(nmin, nmax + 1))
    if scheme == "shapes":
        shapes = [name] * n_les
    else:
        shapes = [shapes_cfg[int(rng.integers(len(shapes_cfg)))] for _ in range(n_les)]
    radii = [float(rng.uniform(dmin, dmax)) / 2 for _ in range(n_les)]
    sub = p["subject"]
    centres, radii = place_lesions(wm, shapes, radii, vs, rng, lc["wm_threshold"], lc["depth_margin_mm"],
                                   lc["min_gap_mm"], subject=sub, min_radius=dmin / 2, log=log, allowed=allowed)
    rows = []
    for k, (shape, r, c) in enumerate(zip(shapes, radii, centres)):
        contrast = float(rng.uniform(cmin, cmax))
        rot = random_rotation(rng) if (lc["random_orientation"] and shape != "sphere") else None
        prof, half = lesion_profile(shape, r, vs, lc["edge_mm"], rot)
        sl, pp = insert_lesion(z, prof, half, tuple(int(v) for v in c), contrast,
                               float(p["norm_mean"]), float(p["norm_std"]))
        lesion_mask[sl] = np.maximum(lesion_mask[sl], pp)
        xyz = grid.world_coords(c)
        rows.append({
            "subject": sub, "volume_id": volume_id, "lesion_id": k, "shape": shape, "radius_mm": round(r, 3),
            "diameter_mm": round(2 * r, 3), "contrast": round(contrast, 4),
            "x_mm": xyz[0], "y_mm": xyz[1], "z_mm": xyz[2], "i": int(c[0]), "j": int(c[1]),
            "k": int(c[2]), "volume_mm3": round(float((pp >= 0.5).sum()) * vs ** 3, 1)})
    return lesion_mask, shapes, rows


def _write_lesion_dataset(out_dir: Path, cohort_dir: str | Path, grid: Grid, rows: list, lesion_rows: list,
                          frequency: np.ndarray, volumes_hash: str, masks_hash: str) -> pd.DataFrame:
    """The lesion dataset's tables, lesion frequency map, the cohort's grid files and the manifest."""
    pd_parts = pd.DataFrame(rows)
    with atomic_path(out_dir / DATASET_FILES["participants"]) as tmp:
        pd_parts.to_csv(tmp, sep="\t", index=False)
    cols = ["subject", "volume_id", "lesion_id", "shape", "radius_mm", "diameter_mm", "contrast", "x_mm", "y_mm",
            "z_mm", "i", "j", "k", "volume_mm3"]
    with atomic_path(out_dir / DATASET_FILES["lesions"]) as tmp:
        pd.DataFrame(lesion_rows, columns=cols).to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_dir / DATASET_FILES["lesion_frequency"]) as tmp:
        grid.to_nifti(frequency).to_filename(tmp)
    for name in (DATASET_FILES[k] for k in ("reference", "mask", "sex_effect", "sex_effect_regional")):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(Path(cohort_dir) / name, tmp)
    write_manifest(out_dir, volumes_hash, [(DATASET_FILES["lesion_masks"], masks_hash)] + [
        DATASET_FILES[k] for k in ("lesions", "lesion_frequency", "reference", "mask", "sex_effect",
                                   "sex_effect_regional")])
    return pd_parts
