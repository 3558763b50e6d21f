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
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputDataError
from ..utils import atomic_path, get_logger, Progress, stable_seed
from .grid import Grid, load_volume
from .store import VolumeWriter
from .template import template_on_grid

__all__ = ["normalise", "assign_splits", "map_sex", "bids_records", "csv_records", "prepare_cohort",
           "DEFAULT_SEX_CODING"]

#: BIDS codes sex as male/m/M, female/f/F, other/o/O; IXI/ABIDE/UK Biobank-style numeric codings
#: differ between datasets, so numbers are *not* mapped unless the config says how.
DEFAULT_SEX_CODING = {
    "M": ["M", "m", "male", "Male", "MALE"],
    "F": ["F", "f", "female", "Female", "FEMALE"],
    "O": ["O", "o", "other", "Other", "OTHER"],
}

MIN_BRAIN_COVERAGE = 0.5


def normalise(vol, mask):
    """Z-score ``vol`` within ``mask``; zero outside. Returns ``(z, mean, std)``."""
    vals = vol[mask]
    if vals.size < 10:
        raise InputDataError(f"brain mask has only {vals.size} voxels")
    mean, std = float(vals.mean()), float(vals.std())
    if std <= 0:
        raise InputDataError("image is constant inside the brain mask")
    z = np.where(mask, (vol - mean) / std, 0.0).astype(np.float32)
    return z, mean, std


def assign_splits(strata, fractions, seed):
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


def map_sex(value, coding, subject):
    """Map a raw sex code to ``M``/``F``/``O`` using ``coding`` (dict code -> list of raw values)."""
    raw = str(value).strip()
    if raw.endswith(".0") and raw[:-2].isdigit():  # pandas reads 1 as 1.0 when a column has NaN
        raw = raw[:-2]
    for code, values in coding.items():
        if raw in [str(v) for v in values]:
            return code
    known = {code: list(values) for code, values in coding.items()}
    raise InputDataError(f"subject {subject!r}: unknown sex code {value!r}; known codes: {known} "
                         f"(set cohort.sex_coding to map your dataset's coding, e.g. 1/2 or 0/1)")


_ENTITY = re.compile(r"(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")


def _entities(name):
    return dict(_ENTITY.findall(name.split(".")[0]))


def _read_table(path, key):
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise InputDataError(f"{key}: table not found: {path}")
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    except Exception as e:
        raise InputDataError(f"{key}: cannot read table {path}: {e}") from e


def _check_duplicates(ids, where):
    import pandas as pd

    dup = pd.Series(ids)[pd.Series(ids).duplicated()].unique().tolist()
    if dup:
        raise InputDataError(f"duplicate subject ids in {where}: {dup}")


def bids_records(cfg, coding):
    """Find T1w images and labels in a BIDS dataset/derivatives folder.

    Returns ``(records, problems)``: a DataFrame (subject, sex, path, mask_path,
    plus the participants.tsv columns) and a list of ``(subject, reason)`` for
    subjects that cannot be used.
    """
    import pandas as pd

    root = cfg.get("root")
    if not root:
        raise ConfigError("cohort.bids.root must name the BIDS dataset folder when cohort.source is 'bids'")
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(f"cohort.bids.root: folder not found: {root}")
    table_path = root / cfg.get("participants", "participants.tsv")
    parts = _read_table(table_path, "cohort.bids.participants")
    if "participant_id" not in parts.columns:
        raise InputDataError(f"{table_path} has no 'participant_id' column (columns: {list(parts.columns)})")
    parts["subject"] = parts["participant_id"].str.strip().str.replace(r"^sub-", "", regex=True)
    _check_duplicates(parts["subject"], table_path)
    sex_col = cfg.get("sex_column", "sex")
    if sex_col not in parts.columns:
        raise InputDataError(f"{table_path} has no column {sex_col!r} (cohort.bids.sex_column); "
                             f"columns: {list(parts.columns)}")
    space, session = cfg.get("space"), cfg.get("session")
    images, masks = {}, {}
    for f in sorted(root.glob("sub-*/**/anat/*.nii*")):
        ent = _entities(f.name)
        sub = ent.get("sub")
        if sub is None or (space and ent.get("space") != space) or (session and ent.get("ses") != str(session)):
            continue
        stem = f.name.split(".")[0]
        if stem.endswith("_T1w"):
            images.setdefault(sub, f)  # sorted: first session/run wins
        elif stem.endswith("_mask") and ent.get("desc") == "brain":
            masks.setdefault(sub, f)
    problems = []
    rows = []
    label_subjects = set(parts["subject"])
    for sub in sorted(set(images) - label_subjects):
        problems.append((sub, f"image without a row in {table_path.name}: {images[sub]}"))
    for _, row in parts.iterrows():
        sub = row["subject"]
        if sub not in images:
            where = f"space-{space} " if space else ""
            problems.append((sub, f"no {where}T1w image found under {root / ('sub-' + sub)}"))
            continue
        try:
            sex = map_sex(row[sex_col], coding, sub) if pd.notna(row[sex_col]) else None
            if sex is None:
                raise InputDataError(f"subject {sub!r}: missing sex in {table_path.name}")
        except InputDataError as e:
            problems.append((sub, str(e)))
            continue
        rec = {k: v for k, v in row.items() if k not in ("participant_id", sex_col)}
        rec.update(subject=sub, sex=sex, path=str(images[sub]), mask_path=str(masks[sub]) if sub in masks else "")
        rows.append(rec)
    return pd.DataFrame(rows), problems


def csv_records(cfg, coding):
    """Read a table of subject id, NIfTI path (relative to the table) and labels."""
    import pandas as pd

    table = cfg.get("table")
    if not table:
        raise ConfigError("cohort.csv.table must name the CSV/TSV table when cohort.source is 'csv'")
    table = Path(table)
    df = _read_table(table, "cohort.csv.table")
    sc, pc, mc = cfg.get("subject_column", "subject"), cfg.get("path_column", "path"), cfg.get("mask_column")
    sex_col = cfg.get("sex_column", "sex")
    for key, col in (("subject_column", sc), ("path_column", pc), ("sex_column", sex_col)):
        if col not in df.columns:
            raise InputDataError(f"{table} has no column {col!r} (cohort.csv.{key}); columns: {list(df.columns)}")
    df[sc] = df[sc].str.strip()
    _check_duplicates(df[sc], table)
    rows, problems = [], []
    for _, row in df.iterrows():
        sub = row[sc]
        if pd.isna(row[pc]) or not str(row[pc]).strip():
            problems.append((sub, f"no image path in {table.name}"))
            continue
        path = Path(str(row[pc]).strip())
        path = path if path.is_absolute() else table.parent / path
        try:
            if pd.isna(row[sex_col]):
                raise InputDataError(f"subject {sub!r}: no label in column {sex_col!r} of {table.name}")
            sex = map_sex(row[sex_col], coding, sub)
        except InputDataError as e:
            problems.append((sub, str(e)))
            continue
        mask = ""
        if mc and mc in df.columns and pd.notna(row[mc]) and str(row[mc]).strip():
            m = Path(str(row[mc]).strip())
            mask = str(m if m.is_absolute() else table.parent / m)
        rec = {k: v for k, v in row.items() if k not in (sc, pc, sex_col) and k != mc}
        rec.update(subject=sub, sex=sex, path=str(path), mask_path=mask)
        rows.append(rec)
    return pd.DataFrame(rows), problems


def _real_subject(rec, grid, tpl):
    """Load one real subject onto the grid: (z-scored volume, wm prob, info)."""
    sub = rec["subject"]
    data, affine = load_volume(rec["path"], sub)
    vol = grid.resample(data, affine)
    if rec.get("mask_path"):
        mdata, maff = load_volume(rec["mask_path"], sub)
        mask = grid.resample(mdata > 0, maff, order=1, antialias=False) > 0.5
    else:
        mask = tpl["mask"]
    coverage = float(((np.abs(vol) > 0) & tpl["mask"]).sum() / tpl["mask"].sum())
    if coverage < MIN_BRAIN_COVERAGE:
        raise InputDataError(
            f"subject {sub!r}: {rec['path']} covers only {coverage:.0%} of the template brain after "
            f"resampling; is it in template (MNI152) space?")
    z, mean, std = normalise(vol, mask)
    return z, tpl["wm"], {"norm_mean": mean, "norm_std": std, "brain_voxels": int(mask.sum()),
                          "coverage": coverage}


def prepare_cohort(cfg, out_dir, log=None):
    """Prepare the cohort described by the full config ``cfg`` into ``out_dir``.

    Writes ``volumes.npy``, ``wm.npy`` (WM probability, uint8), ``participants.tsv``,
    ``qc.tsv``, ``reference.nii.gz``, ``mask.nii.gz`` and ``sex_effect.nii.gz``
    (the planted effect for the synthetic source; the empirical male−female mean
    difference of the training split for real data). Returns the participants table.
    """
    import pandas as pd

    log = log or get_logger().info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ccfg = cfg["cohort"]
    grid = Grid.from_config(cfg["grid"])
    seed = int(cfg["seed"])
    source = ccfg["source"]
    log(f"cohort source={source}; grid {grid.shape} at {grid.voxel_size} mm ({grid.n_voxels} voxels)")
    tpl = template_on_grid(grid)
    coding = ccfg.get("sex_coding") or DEFAULT_SEX_CODING
    on_missing = ccfg.get("on_missing", "error")
    qc_rows = []

    if source == "synthetic":
        from .synthetic import SyntheticCohort, SYNTHETIC_LABEL

        scfg = ccfg["synthetic"]
        gen = SyntheticCohort(grid, scfg["n_subjects"], seed, scfg.get("male_fraction", 0.5),
                              scfg.get("sex_effect"), scfg.get("variability"))
        n = gen.n
        label = SYNTHETIC_LABEL
        records = None
    elif source in ("bids", "csv"):
        records, problems = (bids_records if source == "bids" else csv_records)(ccfg[source], coding)
        for sub, reason in problems:
            if on_missing != "skip":
                who = "" if reason.startswith("subject ") else f"subject {sub!r}: "
                raise InputDataError(f"{who}{reason} (set cohort.on_missing: skip to leave such subjects out)")
            log(f"SKIP subject {sub}: {reason}")
            qc_rows.append({"subject": sub, "status": "skipped", "reason": reason})
        n = len(records)
        label = f"{source}: {ccfg[source].get('root') or ccfg[source].get('table')}"
        if n == 0:
            raise InputDataError(f"cohort source {source!r} yielded no usable subjects")
    else:
        raise ConfigError(f"cohort.source must be one of synthetic, bids, csv; got {source!r}")

    rows = []
    prog = Progress(n, "prepare_cohort subjects", log=log, unit="subj")
    with VolumeWriter(out_dir / "volumes.npy", n, grid.shape) as vw, \
            VolumeWriter(out_dir / "wm.npy", n, grid.shape, dtype=np.uint8) as ww:
        for i in range(n):
            if records is None:
                s = gen.generate(i)
                z, mean, std = normalise(s["t1"], s["mask"])
                wm = s["wm"]
                row = {"subject": s["subject"], "sex": s["sex"], "source_path": "synthetic",
                       "norm_mean": mean, "norm_std": std, "brain_voxels": int(s["mask"].sum()),
                       **{k: (v if np.isscalar(v) else str(tuple(round(x, 3) for x in v)))
                          for k, v in s["params"].items()}}
            else:
                rec = records.iloc[i].to_dict()
                try:
                    z, wm, info = _real_subject(rec, grid, tpl)
                except InputDataError as e:
                    if on_missing != "skip":
                        raise
                    log(f"SKIP subject {rec['subject']}: {e}")
                    qc_rows.append({"subject": rec["subject"], "status": "skipped", "reason": str(e)})
                    prog.update()
                    continue
                extra = {k: v for k, v in rec.items() if k not in ("subject", "sex", "path", "mask_path")}
                row = {"subject": rec["subject"], "sex": rec["sex"], "source_path": rec["path"], **info, **extra}
            row["index"] = vw.append(z)
            ww.append(np.round(np.clip(wm, 0, 1) * 255).astype(np.uint8))
            rows.append(row)
            qc_rows.append({"subject": row["subject"], "status": "ok", "reason": ""})
            prog.update()
        if not rows:
            raise InputDataError("no subject could be prepared (all skipped); see the log")
        parts = pd.DataFrame(rows)
        strat = ccfg.get("stratify", "sex")
        if strat not in parts.columns:
            raise ConfigError(f"cohort.stratify: column {strat!r} not in participants ({list(parts.columns)})")
        parts["split"] = assign_splits(parts[strat].values, ccfg["splits"], seed)
        parts["cohort"] = label

    # grid reference (template on the grid, normalised), mask, effect map
    ref, _, _ = normalise(tpl["t1"], tpl["mask"])
    if records is None:
        effect = gen.effect_map(normalise)
        regional = gen.effect_map(normalise, regional_only=True)
        effect_kind = "planted (synthetic ground truth)"
    else:  # real data: the effect's regional part cannot be separated from size differences
        effect = regional = _empirical_effect(out_dir / "volumes.npy", parts)
        effect_kind = "empirical mean difference M-F (training split)"
    with atomic_path(out_dir / "reference.nii.gz") as tmp:
        grid.to_nifti(ref).to_filename(tmp)
    with atomic_path(out_dir / "mask.nii.gz") as tmp:
        grid.to_nifti(tpl["mask"].astype(np.uint8), dtype=np.uint8).to_filename(tmp)
    for name, data, what in (("sex_effect", effect, effect_kind), ("sex_effect_regional", regional,
                                                                    "regional part of: " + effect_kind)):
        with atomic_path(out_dir / f"{name}.nii.gz") as tmp:
            img = grid.to_nifti(data)
            img.header["descrip"] = what[:79].encode()
            img.to_filename(tmp)
    with atomic_path(out_dir / "participants.tsv") as tmp:
        parts.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_dir / "qc.tsv") as tmp:
        pd.DataFrame(qc_rows).to_csv(tmp, sep="\t", index=False)
    counts = parts.groupby(["split", "sex"]).size().unstack(fill_value=0)
    log(f"cohort ready: {len(parts)} subjects ({label}); split x sex:\n{counts}")
    return parts


def _empirical_effect(volumes_path, parts):
    from .store import open_volumes

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



def cohort_job(job):
    """The ``prepare_cohort`` rule: the configured source → the cohort folder (outputs' folder), and its
    QC figure. Param ``cfg``: the config's ``seed``, ``grid`` and ``cohort`` sections."""
    import torch  # torchio (synthetic source) runs on torch

    from ..config import complete
    from ..report.figures import cohort_qc_figure

    torch.set_num_threads(job.threads)
    out = Path(job.output["volumes"]).parent
    prepare_cohort(complete(job.params["cfg"]), out, log=job.log)
    cohort_qc_figure(out, job.output["figure"])
