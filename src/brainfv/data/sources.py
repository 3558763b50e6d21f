"""Where a cohort's files are: the one file discovery shared by ``prepare_cohort`` and the workflow.

Light on purpose (standard library only: no torch, nibabel, pandas or numpy), because the workflow
calls :func:`source_files` while it builds the DAG, to declare every file the cohort is made from
as an input of ``prepare_cohort`` (so an added, removed or replaced image reruns it).
:func:`brainfv.data.cohort.bids_records` and :func:`~brainfv.data.cohort.csv_records` start from the
same :func:`bids_files` / :func:`csv_files`, so the workflow and the cohort cannot disagree on which
images make the cohort.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check_source
from ..errors import ConfigError, InputDataError

__all__ = ["NA_VALUES", "Table", "read_table", "entities", "BidsFiles", "bids_files", "CsvFiles", "csv_files",
           "resolve_table_path", "source_files", "check_accept", "inputs_digest"]

#: cell values read as missing (pandas' defaults, which include BIDS's ``n/a``)
NA_VALUES = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                       "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


@dataclass
class Table:
    """A participants/subjects table: its path, column names and rows (dicts of str, None = missing)."""

    path: Path
    columns: list
    rows: list


def read_table(path: str | Path, key: str) -> Table:
    """Read a CSV (``,``) or TSV (``.tsv``/``.txt``: tab) table as strings; missing cells are ``None``.

    ``key`` is the config key that names the table, for the error messages: a missing file is a
    :class:`ConfigError` naming it, an unreadable one an :class:`InputDataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: table not found: {path}")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise InputDataError(f"{key}: table {path} is empty (no header line)")
            columns = [c.strip() for c in header]
            rows = []
            for n, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue  # blank line
                if len(cells) > len(columns):
                    raise InputDataError(f"{key}: {path} line {n} has {len(cells)} fields but the header has "
                                         f"{len(columns)} ({columns})")
                cells = cells + [""] * (len(columns) - len(cells))
                rows.append({c: (None if v.strip() in NA_VALUES else v) for c, v in zip(columns, cells)})
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise InputDataError(f"{key}: cannot read table {path}: {type(e).__name__}: {e}") from e
    return Table(path, columns, rows)


_ENTITY = re.compile(r"(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")


def entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name: ``sub-01_ses-2_T1w.nii.gz`` -> ``{'sub': '01', 'ses': '2'}``."""
    return dict(_ENTITY.findall(name.split(".")[0]))


@dataclass
class BidsFiles:
    """The files of a BIDS cohort: participants table, one T1w image (and brain mask) per subject.

    ``images``/``masks`` map subject (without ``sub-``) to the file used; ``candidates`` maps a
    subject with more than one matching T1w to all of them (the first in sorted order is used).
    """

    root: Path
    table: Path
    images: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)


def bids_files(bids_cfg: dict) -> BidsFiles:
    """Find the participants table and the T1w images/brain masks of ``cohort.bids``.

    Images are ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` (masks ``*_desc-brain_mask.nii[.gz]``) whose
    ``space-``/``ses-`` entities match ``cohort.bids.space``/``session`` when those are set; per
    subject the first in sorted order wins. Raises :class:`ConfigError` naming ``cohort.bids.root``
    (not given, not a folder) or ``cohort.bids.participants`` (file absent).
    """
    check_source({"source": "bids", "bids": bids_cfg})
    root = Path(bids_cfg["root"])
    table = root / bids_cfg.get("participants", "participants.tsv")
    space, session = bids_cfg.get("space"), bids_cfg.get("session")
    out = BidsFiles(root=root, table=table)
    found = sorted(list(root.glob("sub-*/anat/*.nii*")) + list(root.glob("sub-*/ses-*/anat/*.nii*")))
    seen = {"space": set(), "ses": set()}  # of every T1w image, to name them when the selection matches none
    for f in found:
        ent = entities(f.name)
        sub = ent.get("sub")
        stem = f.name.split(".")[0]
        if sub is not None and stem.endswith("_T1w"):
            for k, values in seen.items():
                values.add(ent.get(k))
        if sub is None or (space and ent.get("space") != space) or (session and ent.get("ses") != str(session)):
            continue
        if stem.endswith("_T1w"):
            out.candidates.setdefault(sub, []).append(f)
            out.images.setdefault(sub, f)  # sorted: first session/run wins
        elif stem.endswith("_mask") and ent.get("desc") == "brain":
            out.masks.setdefault(sub, f)
    out.candidates = {s: c for s, c in out.candidates.items() if len(c) > 1}
    if not out.images:
        for key, entity, value in (("space", "space", space), ("session", "ses", session)):
            if value and seen[entity] and str(value) not in seen[entity]:
                named = sorted(v for v in seen[entity] if v is not None)
                none = f" (and images without a {entity}- entity)" if None in seen[entity] else ""
                raise ConfigError(f"cohort.bids.{key}: no T1w image under {root} has {entity}-{value}; "
                                  f"{'spaces' if key == 'space' else 'sessions'} found: {named}{none}")
    return out


def check_accept(qc_cfg: dict, subjects: set) -> None:
    """Every ``cohort.qc.accept`` entry names a subject of the cohort (``subjects``: the ids the source
    lists); raise :class:`ConfigError` naming the entries that match none, and why they may not (an id
    YAML read as a number, a ``sub-`` prefix)."""
    subjects = {str(s) for s in subjects}
    bad = []
    for i, entry in enumerate((qc_cfg or {}).get("accept") or []):
        if str(entry) in subjects:
            continue
        why = ""
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            near = sorted(s for s in subjects if s.lstrip("0") == str(entry).lstrip("0") or
                          (s.isdigit() and s.startswith("0") and _octal(s) == entry))
            why = (f": YAML read it as the integer {entry}; write the id in quotes"
                   + (f", '{near[0]}'" if near else " (e.g. '005')"))
        elif str(entry).startswith("sub-") and str(entry)[4:] in subjects:
            why = f": ids are written without 'sub-', '{str(entry)[4:]}'"
        bad.append(f"cohort.qc.accept[{i}]: {entry!r} matches no subject{why}")
    if bad:
        shown = sorted(subjects)
        more = f", ... ({len(shown)} in all)" if len(shown) > 10 else ""
        raise ConfigError(f"{'; '.join(bad)} (the cohort's subjects: {', '.join(map(repr, shown[:10]))}{more})")


def _octal(text):
    try:
        return int(text, 8)
    except ValueError:
        return None


@dataclass
class CsvFiles:
    """The files of a CSV cohort: the table, and per row the image and mask paths (``None``: not given)."""

    table: Table
    subject_column: str
    path_column: str
    mask_column: str | None
    images: list = field(default_factory=list)
    masks: list = field(default_factory=list)


def resolve_table_path(value: str | None, table_path: str | Path) -> Path | None:
    """A path from a table cell: stripped, relative paths taken from the table's folder; ``None`` if empty."""
    if value is None or not str(value).strip():
        return None
    p = Path(str(value).strip())
    return p if p.is_absolute() else Path(table_path).parent / p


def csv_files(csv_cfg: dict) -> CsvFiles:
    """Read the ``cohort.csv`` table and resolve its image (and mask) paths, one per row.

    Raises :class:`ConfigError` naming ``cohort.csv.table`` (not given, not found) and
    :class:`InputDataError` naming ``cohort.csv.subject_column``/``path_column``/``mask_column``
    when the table lacks that column.
    """
    check_source({"source": "csv", "csv": csv_cfg})
    path = csv_cfg["table"]
    table = read_table(path, "cohort.csv.table")
    sc, pc = csv_cfg.get("subject_column", "subject"), csv_cfg.get("path_column", "path")
    mc = csv_cfg.get("mask_column")
    for key, col in (("subject_column", sc), ("path_column", pc), ("mask_column", mc)):
        if col is not None and col not in table.columns:
            raise InputDataError(f"{table.path} has no column {col!r} (cohort.csv.{key}); "
                                 f"columns: {table.columns}")
    out = CsvFiles(table=table, subject_column=sc, path_column=pc, mask_column=mc)
    for row in table.rows:
        out.images.append(resolve_table_path(row[pc], table.path))
        out.masks.append(resolve_table_path(row[mc], table.path) if mc else None)
    return out


def source_files(cohort_cfg: dict) -> list[str]:
    """Every file ``prepare_cohort`` reads for the configured ``cohort`` section, as sorted strings.

    ``synthetic``: none. ``bids``: the participants table, each subject's T1w image and brain mask
    (also the image of a subject without a row, which ``prepare_cohort`` reports). ``csv``: the
    table and every image and mask path it names. Files that do not exist are left out (the cohort
    reports them as problems; with ``cohort.on_missing: skip`` their subjects are left out), so
    that adding one later changes this list and reruns the cohort. Reads one table and lists the
    ``anat`` folders: no image is opened.

    Raises :class:`ConfigError` naming the config key when the source itself is missing
    (``cohort.bids.root``, ``cohort.bids.participants``, ``cohort.csv.table``).
    """
    source = cohort_cfg.get("source", "synthetic")
    if source == "synthetic":
        return []
    if source == "bids":
        found = bids_files(cohort_cfg.get("bids") or {})
        files = [found.table, *found.images.values(), *(m for s, m in found.masks.items() if s in found.images)]
        check_accept(cohort_cfg.get("qc"), found.images)
    elif source == "csv":
        found = csv_files(cohort_cfg.get("csv") or {})
        files = [found.table.path, *(p for p in found.images + found.masks if p is not None and p.is_file())]
        check_accept(cohort_cfg.get("qc"), [(r[found.subject_column] or "").strip() for r in found.table.rows])
    else:
        raise ConfigError(f"cohort.source must be one of synthetic, bids, csv; got {source!r}")
    return sorted({str(f) for f in files})


def inputs_digest(files: list, cache: str | Path) -> str:
    """One hash of the content of ``files`` (and of their paths): a rule parameter that changes when any file
    gets new content, even content that keeps its old modification time (``cp -p``, ``rsync -a``, a restore
    from backup), which Snakemake's time-based rerun trigger does not see; its ``params`` trigger reruns the
    rule. Putting back the old content gives back the old hash, so nothing reruns for it.

    Each file's hash is cached in the JSON file ``cache``, keyed on its size, mtime, ctime and inode: a file
    is read again only when one of them changed, and a replaced file always gets a new ctime or inode,
    whatever its mtime says. Standard library only (the workflow calls this while it builds the DAG).
    """
    cache = Path(cache)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    fresh = {}
    total = hashlib.blake2b(digest_size=20)
    for f in sorted({str(f) for f in files}):
        st = os.stat(f)
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(f)
        digest = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == key else _file_hash(f)
        fresh[f] = [key, digest]
        total.update(f"{digest}  {f}\n".encode())
    if fresh != known:
        _write_atomic(cache, json.dumps(fresh))
    return total.hexdigest()


def _file_hash(f):
    """SHA-256 of a file's bytes (about twice blake2b's speed where the CPU has SHA extensions)."""
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file in its folder (concurrent Snakemake processes that
    build the DAG may write the same file: each rename is whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
