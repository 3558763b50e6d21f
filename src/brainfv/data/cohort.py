"""Cohort preparation: any source → one RAS+ grid, brain-masked, normalised, split, streamed to disk.

Sources
-------
``synthetic``  subjects generated from the MNI152 template (:mod:`brainfv.data.synthetic`)
``bids``       a BIDS dataset or fMRIPrep-style derivatives already in template space
``csv``        a table of subject id, NIfTI path and label columns

All sources end the same way (:func:`prepare_cohort`): resample onto the grid
(world space, so any orientation is handled), brain mask, z-score within the
mask, a stratified subject-level split from the seed, one volume at a time
into the store.

For the real sources the data are checked in two passes, each reporting every problem at once:
first the tables alone (missing or duplicate ids, images without a row, unknown or missing
codes, missing files, stratification classes too small for the split), before any image is
loaded; then the images (unreadable, 4D, NaN, constant, not in template space: brain coverage
and correlation with the template, :func:`template_similarity`). With ``cohort.on_missing:
error`` one :class:`~brainfv.errors.InputDataError` lists every problem and nothing is written;
with ``skip`` the subjects are left out and ``qc.tsv`` says why.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import ndimage

from ..config import complete, default
from ..errors import ConfigError, InputDataError
from ..utils import Progress, atomic_path, get_logger, remove_stale_temporaries, stable_seed, terminate_cleanly
from .files import DATASET_FILES
from .grid import Grid, load_volume
from .sources import bids_files, check_accept, csv_files, read_table
from .store import VolumeWriter, open_volumes, write_manifest
from .synthetic import SYNTHETIC_LABEL, SyntheticCohort
from .template import template_on_grid

__all__ = ["normalise", "assign_splits", "map_sex", "sex_coding", "bids_records", "csv_records",
           "template_similarity", "qc_outliers", "prepare_cohort", "Problem", "DEFAULT_SEX_CODING",
           "DEFAULT_QC"]

#: BIDS codes sex as male/m/M, female/f/F, other/o/O; IXI/ABIDE/UK Biobank-style numeric codings
#: differ between datasets, so numbers are *not* mapped unless the config says how
#: (``cohort.sex_coding`` adds codes to these, :func:`sex_coding`).
DEFAULT_SEX_CODING = {
    "M": ["M", "m", "male", "Male", "MALE"],
    "F": ["F", "f", "female", "Female", "FEMALE"],
    "O": ["O", "o", "other", "Other", "OTHER"],
}

#: defaults of ``cohort.qc`` (the config schema states the same values; see the schema for why)
DEFAULT_QC = default("cohort.qc")  # the schema's (cohort.qc), for callers that give no qc section
#: resolution (FWHM, mm) at which an image is compared with the template (:func:`template_similarity`)
QC_FWHM_MM = 8.0
#: the cohort-relative template check (:func:`qc_outliers`): least robust spread of the template correlations
#: (a cohort of near-identical images has almost none) and least number of measured images
QC_MIN_SPREAD = 0.02
QC_MIN_SUBJECTS = 6

ON_MISSING_HINT = ("fix them, or set cohort.on_missing: skip to leave these subjects out "
                   "(they are then listed in qc.tsv with the reason)")


class Problem(NamedTuple):
    """A reason why ``subject`` cannot be used; ``hint`` (shared by problems of one kind) says what to do."""

    subject: str
    reason: str
    hint: str = ""


def _problem_report(problems, what, hint=ON_MISSING_HINT, written=False):
    """One message listing every problem (count, then one line per problem, then the hints)."""
    n_sub = len({p.subject for p in problems})
    lines = [f"{what}: {len(problems)} problem(s) with {n_sub} subject(s)"
             + ("" if written else "; nothing was written") + ":"]
    lines += [f"  subject {p.subject!r}: {p.reason}" for p in problems]
    hints = list(dict.fromkeys(p.hint for p in problems if p.hint))
    lines += hints + [hint[0].upper() + hint[1:]] if hint else hints
    return "\n".join(lines)


def normalise(vol: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Z-score ``vol`` within ``mask``; zero outside. Returns ``(z, mean, std)``."""
    vals = vol[mask]
    if vals.size < 10:
        raise InputDataError(f"brain mask has only {vals.size} voxels")
    mean, std = float(vals.mean()), float(vals.std())
    if std <= 0:
        raise InputDataError("image is constant inside the brain mask")
    z = np.where(mask, (vol - mean) / std, 0.0).astype(np.float32)
    return z, mean, std


def assign_splits(strata: Sequence, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Stratified, seeded subject-level split.

    Parameters
    ----------
    strata : sequence of hashable (e.g. sex per subject)
    fractions : dict split name -> fraction (summing to 1)
    seed : int

    Returns an array of split names, one per subject. Within each stratum the
    subjects are permuted with a seed derived from ``(seed, stratum)`` and cut by
    largest-remainder rounding, so every split gets at least one subject of every
    stratum; too few subjects raise :class:`InputDataError`.
    """
    names = [k for k, v in fractions.items() if v > 0]
    fr = np.array([fractions[k] for k in names], dtype=float)
    if not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise ConfigError(f"cohort.splits fractions must sum to 1, got {dict(fractions)} (sum {fr.sum():.3f})")
    strata = np.asarray([str(s) for s in strata], dtype=object)
    out = np.empty(len(strata), dtype=object)
    for value in sorted(set(strata)):
        idx = np.flatnonzero(strata == value)
        if len(idx) < len(names):
            raise InputDataError(
                f"too few subjects for the split: class {value!r} has {len(idx)} subject(s) but the "
                f"splits {names} need at least one each (cohort.splits)")
        rng = np.random.default_rng(stable_seed(seed, "split", value))
        idx = rng.permutation(idx)
        raw = fr * len(idx)
        counts = np.maximum(1, np.floor(raw).astype(int))
        while counts.sum() > len(idx):
            counts[np.argmax(counts)] -= 1
        while counts.sum() < len(idx):
            counts[np.argmax(raw - counts)] += 1
        start = 0
        for name, c in zip(names, counts):
            out[idx[start:start + c]] = name
            start += c
    return out


def sex_coding(user: dict | None = None) -> dict:
    """The sex codes in force: :data:`DEFAULT_SEX_CODING` extended by ``cohort.sex_coding`` (``user``).

    ``user`` maps a class (``M``/``F``/``O`` or a class of your own) to the raw codes of your
    dataset; they are *added* to the BIDS codes, so a table that mixes ``1/2`` and ``M/F/male/female``
    keeps every subject. A raw code the user assigns wins over the default meaning of the same code
    (``{M: [f]}`` makes ``f`` male). A code given for two classes is a :class:`ConfigError`.
    """
    user = dict(user or {})
    owner = {}
    for code, values in user.items():
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"cohort.sex_coding.{code}: expected a list of raw codes, got {values!r}")
        for v in values:
            key = str(v).strip()
            if key in owner and owner[key] != code:
                raise ConfigError(f"cohort.sex_coding: raw code {v!r} is given for both {owner[key]!r} and {code!r}")
            owner[key] = code
    merged = {code: [v for v in values if str(v) not in owner] for code, values in DEFAULT_SEX_CODING.items()}
    for code, values in user.items():
        merged.setdefault(code, [])
        merged[code] += [v for v in values if str(v).strip() not in {str(x) for x in merged[code]}]
    return merged


def _lookup_sex(value, coding):
    """The class of raw code ``value`` in ``coding``, or ``None``."""
    raw = str(value).strip()
    if raw.endswith(".0") and raw[:-2].isdigit():  # pandas reads 1 as 1.0 when a column has NaN
        raw = raw[:-2]
    for code, values in coding.items():
        if raw in [str(v).strip() for v in values]:
            return code
    return None


def _known_codes(coding):
    return "; ".join(f"{code}: {', '.join(str(v) for v in values)}" for code, values in coding.items())


def map_sex(value: object, coding: dict, subject: str) -> str:
    """Map a raw sex code to ``M``/``F``/``O`` using ``coding`` (dict code -> list of raw values)."""
    code = _lookup_sex(value, coding)
    if code is None:
        raise InputDataError(f"subject {subject!r}: unknown sex code {value!r}; known codes: {_known_codes(coding)} "
                             f"(cohort.sex_coding adds your dataset's codes, e.g. {{M: [1], F: [2]}})")
    return code


def _sex_problem(sub, raw, column, table_name, coding):
    """The problem for a missing or unknown sex code, or ``(None, code)`` when it maps."""
    if raw is None:
        return Problem(sub, f"no value in column {column!r} of {table_name} (missing sex)"), None
    code = _lookup_sex(raw, coding)
    if code is None:
        return Problem(sub, f"unknown sex code {raw!r} in column {column!r} of {table_name}",
                       f"Known sex codes: {_known_codes(coding)}; cohort.sex_coding adds your dataset's codes "
                       f"(e.g. {{M: [1], F: [2]}})."), None
    return None, code


def _duplicates(ids, table_name):
    """Problems for ids that occur on more than one row, and the set of those ids."""
    counts = Counter(ids)
    dups = {s for s, c in counts.items() if c > 1}
    problems = [Problem(s, f"duplicate subject id: {counts[s]} rows of {table_name}",
                        "A subject id must occur once per table (one image per subject).")
                for s in sorted(dups)]
    return problems, dups


def bids_records(cfg: dict, coding: dict, log: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, list]:
    """Find T1w images and labels in a BIDS dataset/derivatives folder (``cohort.bids`` section ``cfg``).

    Files are found by :func:`brainfv.data.sources.bids_files` (what the workflow declares as
    inputs). Returns ``(records, problems)``: a DataFrame (subject, sex, path, mask_path, plus the
    participants.tsv columns) and a list of :class:`Problem` for subjects that cannot be used
    (image without a row, no image, missing/unknown sex code, duplicate id). No image is opened.
    """
    found = bids_files(cfg)
    if found.candidates and log:
        sub, files = next(iter(sorted(found.candidates.items())))
        log(f"WARNING: {len(found.candidates)} subject(s) have several T1w images matching cohort.bids.space/"
            f"session (e.g. {sub}: {', '.join(f.name for f in files)}); the first in sorted order is used. Set "
            f"cohort.bids.space and cohort.bids.session to choose")
    table = read_table(found.table, "cohort.bids.participants")
    name = found.table.name
    if "participant_id" not in table.columns:
        raise InputDataError(f"{found.table} has no 'participant_id' column (columns: {table.columns})")
    sex_col = cfg.get("sex_column", "sex")
    if sex_col not in table.columns:
        raise InputDataError(f"{found.table} has no column {sex_col!r} (cohort.bids.sex_column); "
                             f"columns: {table.columns}")
    problems, rows = [], []
    ids = []
    for n, row in enumerate(table.rows, start=2):
        pid = (row["participant_id"] or "").strip()
        ids.append(pid[4:] if pid.startswith("sub-") else pid)
    dup_problems, dups = _duplicates([i for i in ids if i], name)
    problems += dup_problems
    for sub in sorted(set(found.images) - set(ids)):
        problems.append(Problem(sub, f"image without a row in {name}: {found.images[sub]}"))
    space = cfg.get("space")
    for n, (sub, row) in enumerate(zip(ids, table.rows), start=2):
        if not sub:
            problems.append(Problem(f"line {n}", f"no participant_id on line {n} of {name}"))
            continue
        if sub in dups:
            continue
        if sub not in found.images:
            where = f"space-{space} " if space else ""
            problems.append(Problem(sub, f"no {where}T1w image found under {found.root / ('sub-' + sub)}"))
            continue
        problem, sex = _sex_problem(sub, row[sex_col], sex_col, name, coding)
        if problem:
            problems.append(problem)
            continue
        rec = {k: v for k, v in row.items() if k not in ("participant_id", sex_col)}
        rec.update(subject=sub, sex=sex, path=str(found.images[sub]),
                   mask_path=str(found.masks[sub]) if sub in found.masks else "")
        rows.append(rec)
    return pd.DataFrame(rows), problems


def csv_records(cfg: dict, coding: dict) -> tuple[pd.DataFrame, list]:
    """Read a table of subject id, NIfTI path (relative to the table) and labels (``cohort.csv`` section ``cfg``).

    Paths are resolved by :func:`brainfv.data.sources.csv_files` (what the workflow declares as
    inputs). Returns ``(records, problems)`` like :func:`bids_records`; an image or mask file that
    does not exist is a problem (found here, before any image is opened).
    """
    found = csv_files(cfg)
    table = found.table
    name = table.path.name
    sc, pc, mc = found.subject_column, found.path_column, found.mask_column
    sex_col = cfg.get("sex_column", "sex")
    if sex_col not in table.columns:
        raise InputDataError(f"{table.path} has no column {sex_col!r} (cohort.csv.sex_column); "
                             f"columns: {table.columns}")
    ids = [(row[sc] or "").strip() for row in table.rows]
    problems, rows = [], []
    dup_problems, dups = _duplicates([i for i in ids if i], name)
    problems += dup_problems
    for n, (sub, row, image, mask) in enumerate(zip(ids, table.rows, found.images, found.masks), start=2):
        if not sub:
            problems.append(Problem(f"line {n}", f"no subject id (column {sc!r}) on line {n} of {name}"))
            continue
        if sub in dups:
            continue
        if image is None:
            problems.append(Problem(sub, f"no image path in column {pc!r} of {name}"))
            continue
        if not image.is_file():
            problems.append(Problem(sub, f"image file not found: {image} (column {pc!r} of {name}; "
                                         f"relative paths are taken from the table's folder)"))
            continue
        if mask is not None and not mask.is_file():
            problems.append(Problem(sub, f"mask file not found: {mask} (column {mc!r} of {name})"))
            continue
        problem, sex = _sex_problem(sub, row[sex_col], sex_col, name, coding)
        if problem:
            problems.append(problem)
            continue
        rec = {k: v for k, v in row.items() if k not in (sc, pc, sex_col) and k != mc}
        rec.update(subject=sub, sex=sex, path=str(image), mask_path=str(mask) if mask is not None else "")
        rows.append(rec)
    return pd.DataFrame(rows), problems


def _qc_settings(ccfg):
    qc = {**DEFAULT_QC, **(ccfg.get("qc") or {})}
    qc["accept"] = {str(s) for s in (qc.get("accept") or [])}
    return qc


@functools.lru_cache(maxsize=4)
def _qc_reference(grid):
    """The template side of :func:`template_similarity` on ``grid`` (cached: read-only)."""
    tpl = template_on_grid(grid)
    ref = _qc_smooth(tpl["t1"], grid)[tpl["mask"]].astype(np.float64)
    ref -= ref.mean()
    return ref / np.linalg.norm(ref)


def _qc_smooth(vol, grid):
    """``vol`` brought to :data:`QC_FWHM_MM` resolution (Gaussian; nothing if the grid is that coarse)."""
    fwhm = np.sqrt(max(QC_FWHM_MM ** 2 - grid.voxel_size ** 2, 0.0))
    if fwhm < 0.5 * grid.voxel_size:
        return np.asarray(vol, dtype=np.float32)
    return ndimage.gaussian_filter(np.asarray(vol, dtype=np.float32), fwhm / 2.3548 / grid.voxel_size,
                                   mode="constant")


def template_similarity(vol: np.ndarray, grid: Grid) -> tuple[float, float]:
    """How well an image resampled onto ``grid`` matches the template: ``(template_corr, coverage)``.

    ``template_corr`` is the Pearson correlation with the template T1 inside the template brain
    mask, both at :data:`QC_FWHM_MM` mm resolution (so the value does not depend on the grid's
    voxel size, and noise or small local differences weigh little): about 1 for the template
    itself, 0.65-0.85 for a brain in template space with inter-subject variability, rotations up
    to 15 degrees or shifts up to 10 mm; an image shifted by 20 mm or never registered falls
    below 0.5. ``coverage`` is the fraction of the template brain where the image is non-zero.
    """
    tpl = template_on_grid(grid)
    mask = tpl["mask"]
    coverage = float(((np.abs(vol) > 0) & mask).sum() / mask.sum())
    v = _qc_smooth(vol, grid)[mask].astype(np.float64)
    v -= v.mean()
    norm = np.linalg.norm(v)
    corr = float(v @ _qc_reference(grid) / norm) if norm > 0 else 0.0
    return corr, coverage


def _real_subject(rec, grid, tpl, qc=None):
    """Load one real subject onto the grid: (z-scored volume, wm prob, info).

    Raises :class:`InputDataError` naming subject, file, value and the ``cohort.qc`` key when the
    image is not in template space (coverage or template correlation below the thresholds),
    unless the subject is listed in ``cohort.qc.accept``.
    """
    qc = qc or _qc_settings({})
    sub = rec["subject"]
    data, affine = load_volume(rec["path"], sub)
    vol = grid.resample(data, affine)
    if rec.get("mask_path"):
        mdata, maff = load_volume(rec["mask_path"], sub)
        mask = grid.resample(mdata > 0, maff, order=1, antialias=False) > 0.5
    else:
        mask = tpl["mask"]
    corr, coverage = template_similarity(vol, grid)
    info = {"coverage": round(coverage, 4), "template_corr": round(corr, 4)}
    accepted = str(sub) in qc["accept"]
    failed = []
    if coverage < qc["min_coverage"]:
        failed.append(f"covers only {coverage:.0%} of the template brain after resampling "
                      f"(cohort.qc.min_coverage: {qc['min_coverage']:.0%})")
    if corr < qc["min_template_corr"]:
        failed.append(f"correlates with the template at r = {corr:.2f} inside the brain mask "
                      f"(cohort.qc.min_template_corr: {qc['min_template_corr']})")
    if failed and not accepted:
        err = InputDataError(
            f"subject {sub!r}: {rec['path']} {' and '.join(failed)}; is it in template (MNI152) space and "
            f"registered? If the image is right, list the subject in cohort.qc.accept to keep it")
        err.qc = info  # the measured values, for qc.tsv
        raise err
    info["qc_note"] = ("accepted by cohort.qc.accept: " + "; ".join(failed)) if failed else ""
    z, mean, std = normalise(vol, mask)
    return z, tpl["wm"], {"norm_mean": mean, "norm_std": std, "brain_voxels": int(mask.sum()), **info}


def qc_outliers(measured: dict, qc: dict, failed: set | tuple = ()) -> list:
    """The subjects whose template correlation is far below their own cohort's: ``r < median - k * spread``,
    with ``k`` = ``cohort.qc.outlier_k`` (0: off) and ``spread`` the cohort's robust standard deviation
    (1.4826 x the median absolute deviation, at least :data:`QC_MIN_SPREAD`). This catches misregistration
    that the absolute ``min_template_corr`` passes (a 15 mm shift or a 15 degree rotation in a cohort of
    well-registered images) while a cohort whose images all differ from the template (e.g. synthetic
    subjects: 0.51-0.88) keeps every subject. Needs :data:`QC_MIN_SUBJECTS` measured images.

    ``measured``: subject -> (template_corr, path). Subjects in ``failed`` (already reported) and in
    ``cohort.qc.accept`` are not reported. Returns a list of :class:`Problem`.
    """
    k = float(qc.get("outlier_k") or 0)
    if k <= 0 or len(measured) < QC_MIN_SUBJECTS:
        return []
    r = np.array([v[0] for v in measured.values()], dtype=float)
    med = float(np.median(r))
    spread = max(1.4826 * float(np.median(np.abs(r - med))), QC_MIN_SPREAD)
    bar = med - k * spread
    return [Problem(sub, f"{path} correlates with the template at r = {corr:.2f}, far below the cohort's median "
                         f"{med:.2f} (bar {bar:.2f}: median - {k:g} x {spread:.3f}, the robust spread of {len(r)} "
                         f"subjects; cohort.qc.outlier_k: {k:g}); is it registered to the template like the others? "
                         f"If the image is right, list the subject in cohort.qc.accept to keep it")
            for sub, (corr, path) in measured.items()
            if corr < bar and sub not in set(failed) and str(sub) not in qc["accept"]]


def _class_problems(records, strat, fractions):
    """Problems for subjects whose stratification class is too small to give every split one subject."""
    names = [k for k, v in fractions.items() if v > 0]
    counts = Counter(str(v) for v in records[strat])
    problems = []
    for value, n in sorted(counts.items()):
        if n < len(names):
            msg = (f"stratification class {value!r} (column {strat!r}, cohort.stratify) has {n} usable subject(s) but "
                   f"cohort.splits {dict(fractions)} needs at least one per split ({len(names)})")
            problems += [Problem(str(s), msg) for s in records.loc[records[strat].astype(str) == value, "subject"]]
    return problems


def prepare_cohort(cfg: dict, out_dir: str | Path, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Prepare the cohort described by the full config ``cfg`` into ``out_dir``.

    Writes ``volumes.npy``, ``wm.npy`` (WM probability, uint8), ``participants.tsv``,
    ``qc.tsv``, ``reference.nii.gz``, ``mask.nii.gz``, ``sex_effect.nii.gz``
    (the planted effect for the synthetic source; the empirical male−female mean
    difference of the training split for real data) and ``manifest.json`` (content hashes,
    :func:`brainfv.data.store.write_manifest`). Returns the participants table.

    Real sources are checked from the tables first, then image by image; every problem is reported
    at once (see the module docstring). SIGTERM/SIGINT end the run cleanly (no temporaries left),
    and temporaries left in ``out_dir`` by a killed earlier run are removed first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or get_logger().info
    remove_stale_temporaries(out_dir, log=log)
    with terminate_cleanly():
        return _prepare_cohort(cfg, out_dir, log)


def _prepare_cohort(cfg, out_dir, log):
    cfg = complete(cfg)  # a partial config gets the schema's defaults (no second copy of them here)
    ccfg = cfg["cohort"]
    grid = Grid.from_config(cfg["grid"])
    seed = int(cfg["seed"])
    log(f"cohort source={ccfg['source']}; grid {grid.shape} at {grid.voxel_size} mm ({grid.n_voxels} voxels)")
    on_missing = ccfg["on_missing"]
    fractions = np.array(list(ccfg["splits"].values()), dtype=float)
    if not np.isclose(fractions.sum(), 1.0, atol=1e-6):  # assign_splits says the same, but only at the end
        raise ConfigError(f"cohort.splits fractions must sum to 1, got {dict(ccfg['splits'])} "
                          f"(sum {fractions.sum():.3f})")
    src = _open_source(ccfg, grid, seed, log)
    qc_rows = list(src.qc_rows)
    rows, image_problems = [], []
    measured = {}  # subject -> (template_corr, path) of every image read, for the cohort-relative check
    prog = Progress(src.n, "prepare_cohort subjects", log=log, unit="subj")
    with VolumeWriter(out_dir / DATASET_FILES["volumes"], src.n, grid.shape) as vw, \
            VolumeWriter(out_dir / DATASET_FILES["wm"], src.n, grid.shape, dtype=np.uint8) as ww:
        for i in range(src.n):
            if src.records is None:
                z, wm, row, qc_row = _synthetic_subject(src.gen.generate(i))
            else:
                rec = src.records.iloc[i].to_dict()
                try:
                    z, wm, row, qc_row = _real_subject_row(rec, grid, src.tpl, src.qc)
                except InputDataError as e:
                    reason = str(e).removeprefix(f"subject {rec['subject']!r}: ")
                    image_problems.append(Problem(rec["subject"], reason))
                    if "template_corr" in getattr(e, "qc", {}):
                        measured[rec["subject"]] = (e.qc["template_corr"], rec["path"])
                    if on_missing == "skip":
                        log(f"SKIP subject {rec['subject']}: {reason}")
                        qc_rows.append({"subject": rec["subject"], "status": "skipped", "reason": reason,
                                        **getattr(e, "qc", {})})
                    prog.update()
                    continue
                measured[rec["subject"]] = (row["template_corr"], rec["path"])
            if image_problems and on_missing != "skip":
                prog.update()  # the cohort will fail: check the other images, write nothing more
                continue
            row["index"] = vw.append(z)
            ww.append(np.round(np.clip(wm, 0, 1) * 255).astype(np.uint8))
            rows.append(row)
            qc_rows.append(qc_row)
            prog.update()
        failed = {p.subject for p in image_problems}
        outliers = qc_outliers(measured, src.qc, failed) if src.records is not None else []
        if on_missing != "skip":
            image_problems += outliers
        if image_problems and on_missing != "skip":
            raise InputDataError(_problem_report(image_problems, f"cohort ({src.label}), images"))
        if not rows:
            raise InputDataError(_problem_report(image_problems, f"cohort ({src.label}): no subject left", hint=""))
        parts = _participants(rows, src, ccfg, seed, (vw, ww), qc_rows, log, outliers)
    _write_cohort_files(out_dir, grid, src, parts, qc_rows, vw.hash, ww.hash)
    counts = parts.groupby(["split", "sex"]).size().unstack(fill_value=0)
    log(f"cohort ready: {len(parts)} subjects ({src.label}); split x sex:\n{counts}")
    return parts


class _Source(NamedTuple):
    """An opened cohort source: a synthetic generator (``gen``) or the real subjects' ``records``."""

    gen: object
    records: pd.DataFrame | None
    n: int
    label: str
    tpl: dict
    qc: dict | None
    qc_rows: list


def _open_source(ccfg: dict, grid: Grid, seed: int, log: Callable) -> _Source:
    """The configured source: its subjects (checked; skipped ones as QC rows) and the template on the grid."""
    source = ccfg["source"]
    if source == "synthetic":
        tpl = template_on_grid(grid)
        scfg = ccfg["synthetic"]
        gen = SyntheticCohort(grid, scfg["n_subjects"], seed, scfg["male_fraction"],
                              scfg.get("sex_effect"), scfg.get("variability"))
        return _Source(gen, None, gen.n, SYNTHETIC_LABEL, tpl, None, [])
    if source in ("bids", "csv"):
        coding = sex_coding(ccfg.get("sex_coding"))
        qc = _qc_settings(ccfg)
        label = f"{source}: {ccfg[source].get('root') or ccfg[source].get('table')}"
        if source == "bids":
            records, problems = bids_records(ccfg["bids"], coding, log=log)
        else:
            records, problems = csv_records(ccfg["csv"], coding)
        check_accept(ccfg["qc"], set(records.get("subject", [])) | {p.subject for p in problems})
        records, problems = _check_records(records, problems, ccfg["stratify"], ccfg["splits"], ccfg["on_missing"],
                                           label, log)
        qc_rows = [{"subject": p.subject, "status": "skipped", "reason": p.reason} for p in problems]
        return _Source(None, records, len(records), label, template_on_grid(grid), qc, qc_rows)
    raise ConfigError(f"cohort.source must be one of synthetic, bids, csv; got {source!r}")


def _synthetic_subject(s: dict) -> tuple:
    """A generated subject as (z-scored volume, WM probability, participants row, QC row)."""
    z, mean, std = normalise(s["t1"], s["mask"])
    row = {"subject": s["subject"], "sex": s["sex"], "source_path": "synthetic",
           "norm_mean": mean, "norm_std": std, "brain_voxels": int(s["mask"].sum()),
           **{k: (v if np.isscalar(v) else str(tuple(round(x, 3) for x in v))) for k, v in s["params"].items()}}
    return z, s["wm"], row, {"subject": row["subject"], "status": "ok", "reason": ""}


def _real_subject_row(rec: dict, grid: Grid, tpl: dict, qc: dict) -> tuple:
    """A real subject's image on the grid, as (z-scored volume, WM probability, participants row, QC row);
    raises :class:`InputDataError` for an image that cannot be used."""
    z, wm, info = _real_subject(rec, grid, tpl, qc)
    note = info.pop("qc_note")
    extra = {k: v for k, v in rec.items() if k not in ("subject", "sex", "path", "mask_path")}
    row = {"subject": rec["subject"], "sex": rec["sex"], "source_path": rec["path"], **info, **extra}
    return z, wm, row, {"subject": row["subject"], "status": "ok", "reason": note,
                        "coverage": info["coverage"], "template_corr": info["template_corr"]}


def _participants(rows: list, src: _Source, ccfg: dict, seed: int, writers: tuple, qc_rows: list,
                  log: Callable, outliers: list = ()) -> pd.DataFrame:
    """The participants table with splits; real subjects that are template-check ``outliers`` (with
    ``on_missing: skip``) or whose class became too small for the splits after skipped images are left out
    (their volumes dropped from the open ``writers``, their QC rows updated)."""
    strat = ccfg["stratify"]
    parts = pd.DataFrame(rows)
    if strat not in parts.columns:
        raise ConfigError(f"cohort.stratify: column {strat!r} not in participants ({list(parts.columns)})")
    if src.records is not None:  # skipped images can leave a class too small for the split
        outliers = list(outliers)
        for o in outliers:
            log(f"SKIP subject {o.subject}: {o.reason}")
        out_ids = {o.subject for o in outliers}
        late = outliers + _class_problems(parts[~parts["subject"].astype(str).isin(out_ids)], strat, ccfg["splits"])
        if len(late) > len(outliers):
            report = _problem_report(late[len(outliers):], 'split after skipping images', hint='', written=True)
            log(f"WARNING: {report}"
                f"\n(cohort.on_missing: skip) leaving these subjects out")
        if late:
            gone = {p.subject for p in late}
            drop = parts["subject"].astype(str).isin(gone)
            for w in writers:
                w.drop(parts.loc[drop, "index"])
            parts = parts[~drop].copy()
            parts["index"] = [writers[0].final_index(int(p)) for p in parts["index"]]
            reasons = {p.subject: p.reason for p in late}
            for r in qc_rows:
                if r["subject"] in reasons and r["status"] == "ok":
                    r.update(status="skipped", reason=reasons[r["subject"]])
            if parts.empty:
                raise InputDataError("no subject could be prepared (all skipped); see the log")
    parts["split"] = assign_splits(parts[strat].values, ccfg["splits"], seed)
    parts["cohort"] = src.label
    return parts


def _write_cohort_files(out_dir: Path, grid: Grid, src: _Source, parts: pd.DataFrame, qc_rows: list,
                        volumes_hash: str, wm_hash: str) -> None:
    """The grid reference (template on the grid, normalised), mask, sex-effect maps, tables and manifest."""
    tpl = src.tpl
    ref, _, _ = normalise(tpl["t1"], tpl["mask"])
    if src.records is None:
        effect = src.gen.effect_map(normalise)
        regional = src.gen.effect_map(normalise, regional_only=True)
        effect_kind = "planted (synthetic ground truth)"
    else:  # real data: the effect's regional part cannot be separated from size differences
        effect = regional = _empirical_effect(out_dir / DATASET_FILES["volumes"], parts)
        effect_kind = "empirical mean difference M-F (training split)"
    with atomic_path(out_dir / DATASET_FILES["reference"]) as tmp:
        grid.to_nifti(ref).to_filename(tmp)
    with atomic_path(out_dir / DATASET_FILES["mask"]) as tmp:
        grid.to_nifti(tpl["mask"].astype(np.uint8), dtype=np.uint8).to_filename(tmp)
    for name, data, what in (("sex_effect", effect, effect_kind), ("sex_effect_regional", regional,
                                                                    "regional part of: " + effect_kind)):
        with atomic_path(out_dir / DATASET_FILES[name]) as tmp:
            img = grid.to_nifti(data)
            img.header["descrip"] = what[:79].encode()
            img.to_filename(tmp)
    with atomic_path(out_dir / DATASET_FILES["participants"]) as tmp:
        parts.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_dir / DATASET_FILES["qc"]) as tmp:
        pd.DataFrame(qc_rows).to_csv(tmp, sep="\t", index=False)
    write_manifest(out_dir, volumes_hash, [(DATASET_FILES["wm"], wm_hash)] + [DATASET_FILES[k] for k in (
        "reference", "mask", "sex_effect", "sex_effect_regional", "qc")])


def _check_records(records, problems, strat, fractions, on_missing, label, log):
    """The checks that need only the tables; returns the usable records and the skipped problems.

    Adds the stratification checks (column present, value present, every class large enough for
    the split) to the records' own problems. With ``on_missing: error`` any problem raises one
    :class:`InputDataError` listing all of them; with ``skip`` they are logged and their subjects
    dropped. Nothing has been loaded or written yet.
    """
    problems = list(problems)
    if records.empty and not problems:
        raise InputDataError(f"cohort {label!r}: the table lists no subject")
    if not records.empty:
        if strat not in records.columns:
            raise ConfigError(f"cohort.stratify: column {strat!r} is not in the participants table "
                              f"(columns: {sorted(c for c in records.columns if c not in ('path', 'mask_path'))})")
        missing = records[strat].isna()
        problems += [Problem(s, f"no value in the stratification column {strat!r} (cohort.stratify)")
                     for s in records.loc[missing, "subject"]]
        records = records[~missing]
        small = _class_problems(records, strat, fractions)
        if small and on_missing == "skip":
            log(f"WARNING: {_problem_report(small, 'split', hint='', written=True)}\n"
                f"(cohort.on_missing: skip) leaving these subjects out")
        problems += small
    if problems and on_missing != "skip":
        raise InputDataError(_problem_report(problems, f"cohort ({label})"))
    for p in problems:
        log(f"SKIP subject {p.subject}: {p.reason}")
    bad = {p.subject for p in problems}
    records = records[~records["subject"].isin(bad)].reset_index(drop=True) if not records.empty else records
    if records.empty:
        raise InputDataError(f"cohort source {label!r} yielded no usable subjects ({len(problems)} skipped: "
                             f"see the log)")
    return records, problems


def _empirical_effect(volumes_path, parts):
    vols = open_volumes(volumes_path)
    train = parts[parts["split"] == "train"]
    means = {}
    for sex in ("M", "F"):
        idx = train.loc[train["sex"] == sex, "index"].to_numpy()
        acc = np.zeros(vols.shape[1:], np.float64)
        for i in idx:
            acc += vols[i]
        means[sex] = acc / max(len(idx), 1)
    return (means["M"] - means["F"]).astype(np.float32)
