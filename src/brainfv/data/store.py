"""On-disk dataset store: volumes as one ``.npy`` memmap, written subject by subject.

A dataset folder holds::

    volumes.npy        float32 (n_subjects, X, Y, Z), a standard .npy read one volume at a time
    participants.tsv   one row per subject; ``index`` is the row in volumes.npy
    reference.nii.gz   the grid (its affine is the study grid), the mean image
    mask.nii.gz        the brain mask on the grid
    manifest.json      what the folder holds: number, shape and dtype of the volumes, a hash of the
                       volume bytes and of every other file written (:func:`write_manifest`)

Memory use does not depend on the number of subjects: writers and readers hold one volume (plain
positioned file I/O, not memory maps, whose touched pages would count as process memory).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..errors import InputDataError
from ..utils import remove_stale_temporaries, temporary_name, write_json
from .files import DATASET_FILES
from .grid import Grid

__all__ = ["VolumeWriter", "VolumeReader", "open_volumes", "Dataset", "write_manifest", "file_hash", "store_hash",
           "MANIFEST_FORMAT", "HASH"]

#: version of the manifest layout; bump when its meaning changes (the fingerprint includes it)
MANIFEST_FORMAT = 1
#: the hash every content hash of a dataset uses (``hashlib.blake2b`` with a 32-byte digest)
HASH = "blake2b-256"


def _hasher():
    return hashlib.blake2b(digest_size=32)


def file_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    """The :data:`HASH` hex digest of a file's bytes (read in 4 MiB chunks)."""
    h = _hasher()
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


class VolumeWriter:
    """Write ``n`` volumes of ``shape`` into ``path`` (``.npy``) one at a time, atomically.

    Volumes are appended with plain file writes (no memory map), so the writer's memory does not
    grow with the number of subjects. The file appears at ``path`` only after :meth:`close`
    succeeded; if fewer than ``n`` volumes were kept (skipped subjects, :meth:`drop`) it is
    rewritten with the right header, copying volume by volume.

    The writer keeps a running :data:`HASH` of the bytes of the volumes it keeps, in order
    (:attr:`hash`, set by :meth:`close`): the same volumes in the same order give the same hash,
    however many were reserved, skipped or dropped. Temporaries that a killed earlier writer of the
    same file left behind are removed when the writer starts (:func:`~brainfv.utils.remove_stale_temporaries`).
    """

    def __init__(self, path, n, shape, dtype=np.float32):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path.parent, self.path.stem)
        self.tmp = self.path.with_name(temporary_name(self.path.stem, ".npy"))
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.n = int(n)
        self.fh = open(self.tmp, "wb")
        _write_header(self.fh, (self.n,) + self.shape, self.dtype)
        self.n_written = 0
        self.dropped = set()
        self.hash = None
        self._hasher = _hasher()

    def append(self, vol: np.ndarray) -> int:
        """Append one volume; returns its position among the volumes written so far."""
        vol = np.asarray(vol)
        if vol.shape != self.shape:
            raise ValueError(f"volume shape {vol.shape} != store shape {self.shape}")
        if self.n_written >= self.n:
            raise ValueError(f"store {self.path} holds {self.n} volumes; cannot append more")
        buf = np.ascontiguousarray(vol, dtype=self.dtype).tobytes()
        self.fh.write(buf)
        self._hasher.update(buf)
        self.n_written += 1
        return self.n_written - 1

    def drop(self, positions: Iterable[int]) -> None:
        """Leave the volumes at ``positions`` (as returned by :meth:`append`) out of the final file.

        The kept volumes keep their order; their final index is their rank among the kept ones
        (:meth:`final_index`).
        """
        for p in positions:
            p = int(p)
            if not 0 <= p < self.n_written:
                raise IndexError(f"cannot drop volume {p}: {self.n_written} written to {self.path}")
            self.dropped.add(p)

    def final_index(self, position: int) -> int | None:
        """The index in the closed file of the volume appended at ``position`` (``None`` if dropped)."""
        if position in self.dropped:
            return None
        return int(position) - sum(1 for d in self.dropped if d < position)

    @property
    def n_kept(self) -> int:
        return self.n_written - len(self.dropped)

    def close(self) -> None:
        self.fh.close()
        if self.n_kept < self.n:
            src = VolumeReader(self.tmp, n=self.n_written)
            compact = self.tmp.with_name(self.tmp.stem + "-c.npy")
            rehash = _hasher() if self.dropped else None
            with open(compact, "wb") as out:
                _write_header(out, (self.n_kept,) + self.shape, self.dtype)
                for i in range(self.n_written):
                    if i in self.dropped:
                        continue
                    buf = src[i].tobytes()
                    out.write(buf)
                    if rehash is not None:
                        rehash.update(buf)
            if rehash is not None:
                self._hasher = rehash
            os.replace(compact, self.tmp)
        os.replace(self.tmp, self.path)
        self.hash = self._hasher.hexdigest()

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        for tmp in (self.tmp, self.tmp.with_name(self.tmp.stem + "-c.npy")):
            if tmp.exists():
                tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_header(fh, shape, dtype):
    np.lib.format.write_array_header_2_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


class VolumeReader:
    """Read-only, random access to the volumes of a ``.npy`` store, one volume per read.

    Unlike a memory map, the pages it reads do not stay mapped into the process, so reading every
    volume of a large cohort does not grow the process's memory. ``reader[i]`` returns a new array.
    """

    def __init__(self, path, n=None):
        self.path = str(path)
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(fh)
            self.offset = fh.tell()
        if fortran:
            raise InputDataError(f"{path}: Fortran-ordered store is not supported")
        self.dtype = np.dtype(dtype)
        self.shape = (int(n) if n is not None else shape[0],) + tuple(shape[1:])
        self.item_shape = tuple(shape[1:])
        self.nbytes_item = int(np.prod(self.item_shape)) * self.dtype.itemsize
        self._fd = None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"volume {i} out of range (store has {len(self)})")
        if self._fd is None:  # opened lazily: a reader can be pickled into DataLoader workers
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = os.pread(self._fd, self.nbytes_item, self.offset + i * self.nbytes_item)
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.item_shape).copy()

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = None
        return d

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def store_hash(path: str | Path) -> str:
    """The :data:`HASH` of the volume bytes of a ``.npy`` store, read one volume at a time (what
    :class:`VolumeWriter` computes while writing it)."""
    h = _hasher()
    for v in open_volumes(path):
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def write_manifest(root: str | Path, volumes_hash: str | None = None, files: Sequence = (),
                   extra: dict | None = None) -> dict:
    """Write ``root/manifest.json``: what a dataset folder holds, by content; returns the manifest.

    Keys: ``format`` (:data:`MANIFEST_FORMAT`), ``hash`` (:data:`HASH`), ``n_volumes``, ``shape``
    and ``dtype`` of ``volumes.npy``, ``volumes_hash`` (hash of the volume bytes in order, as
    :class:`VolumeWriter` computes it; computed here by reading the store one volume at a time
    when not given), ``participants_hash`` (of ``participants.tsv``) and ``files``: the hash of
    each other file named in ``files`` (names relative to ``root``; a ``(name, hash)`` pair is
    taken as given: for a ``.npy`` store, the hash of its volume bytes that its
    :class:`VolumeWriter` computed, like ``volumes_hash``). ``extra`` entries are added as they are (plain
    JSON values). No paths or times: the same content gives the same manifest wherever it lies.
    """
    root = Path(root)
    vols = open_volumes(root / DATASET_FILES["volumes"])
    hashes = {}
    for f in files:
        name, digest = (f if isinstance(f, tuple) else (f, None))
        hashes[str(name)] = digest or (store_hash(root / name) if str(name).endswith(".npy")
                                       else file_hash(root / name))
    manifest = {"format": MANIFEST_FORMAT, "hash": HASH, "n_volumes": int(vols.shape[0]),
                "shape": [int(s) for s in vols.item_shape], "dtype": np.dtype(vols.dtype).str,
                "volumes_hash": volumes_hash or store_hash(root / DATASET_FILES["volumes"]),
                "participants_hash": file_hash(root / DATASET_FILES["participants"]),
                "files": dict(sorted(hashes.items())), **(extra or {})}
    write_json(manifest, root / DATASET_FILES["manifest"])
    return manifest


def open_volumes(path: str | Path) -> VolumeReader:
    """Open a store's volumes for reading (:class:`VolumeReader`; nothing is loaded up front)."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"volume store not found: {path}")
    return VolumeReader(path)


class Dataset:
    """A dataset folder (see module docstring): participants, lazy volumes, grid and mask."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / DATASET_FILES["participants"]).exists():
            raise InputDataError(f"{self.root} is not a brainfv dataset (no participants.tsv)")

    @property
    def participants(self) -> pd.DataFrame:
        return pd.read_csv(self.root / DATASET_FILES["participants"], sep="\t", dtype={"subject": str})

    @property
    def volumes(self) -> VolumeReader:
        return open_volumes(self.root / DATASET_FILES["volumes"])

    @property
    def reference(self) -> nib.Nifti1Image:
        return nib.load(str(self.root / DATASET_FILES["reference"]))

    @property
    def grid(self) -> Grid:
        return Grid.from_image(self.reference)

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(nib.load(str(self.root / DATASET_FILES["mask"])).dataobj) > 0

    @property
    def manifest(self) -> dict:
        """The dataset's ``manifest.json`` as a dict (:func:`write_manifest`)."""
        path = self.root / DATASET_FILES["manifest"]
        if not path.exists():
            raise InputDataError(
                f"{path} not found: the dataset was made before brainfv wrote manifests, or not by "
                f"prepare_cohort/synthesize_lesions; rerun the rule that makes it (snakemake --forcerun "
                f"prepare_cohort) or call brainfv.data.store.write_manifest({str(self.root)!r})")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputDataError(f"{path}: cannot read the manifest: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise InputDataError(f"{path}: manifest format {found!r} is not {MANIFEST_FORMAT}; rerun the rule that "
                                 f"makes the dataset")
        return manifest

    def fingerprint(self) -> str:
        """One :data:`HASH` hex string for the dataset's content (volumes, participants, every file of
        the manifest), e.g. to key a training checkpoint on the data it was made from.

        Computed from ``manifest.json`` (cheap: no volume is read), so it changes exactly when the
        content the manifest describes changes, and not when the folder is moved or rewritten with
        the same content. Raises :class:`InputDataError` when the manifest is missing.
        """
        text = json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()
