"""On-disk dataset store: volumes as one ``.npy`` memmap, written subject by subject.

A dataset folder holds::

    volumes.npy        float32 (n_subjects, X, Y, Z), a standard .npy read one volume at a time
    participants.tsv   one row per subject; ``index`` is the row in volumes.npy
    reference.nii.gz   the grid (its affine is the study grid), the mean image
    mask.nii.gz        the brain mask on the grid

Memory use does not depend on the number of subjects: writers and readers hold one volume (plain
positioned file I/O, not memory maps, whose touched pages would count as process memory).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputDataError

__all__ = ["VolumeWriter", "VolumeReader", "open_volumes", "Dataset"]


class VolumeWriter:
    """Write ``n`` volumes of ``shape`` into ``path`` (``.npy``) one at a time, atomically.

    Volumes are appended with plain file writes (no memory map), so the writer's memory does not
    grow with the number of subjects. The file appears at ``path`` only after :meth:`close`
    succeeded; if fewer than ``n`` volumes were written (skipped subjects) it is rewritten with the
    right header, copying volume by volume.
    """

    def __init__(self, path, n, shape, dtype=np.float32):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.npy")
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.n = int(n)
        self.fh = open(self.tmp, "wb")
        _write_header(self.fh, (self.n,) + self.shape, self.dtype)
        self.n_written = 0

    def append(self, vol):
        vol = np.asarray(vol)
        if vol.shape != self.shape:
            raise ValueError(f"volume shape {vol.shape} != store shape {self.shape}")
        if self.n_written >= self.n:
            raise ValueError(f"store {self.path} holds {self.n} volumes; cannot append more")
        self.fh.write(np.ascontiguousarray(vol, dtype=self.dtype).tobytes())
        self.n_written += 1
        return self.n_written - 1

    def close(self):
        self.fh.close()
        if self.n_written < self.n:
            src = VolumeReader(self.tmp, n=self.n_written)
            compact = self.tmp.with_name(self.tmp.stem + "-c.npy")
            with open(compact, "wb") as out:
                _write_header(out, (self.n_written,) + self.shape, self.dtype)
                for i in range(self.n_written):
                    out.write(src[i].tobytes())
            os.replace(compact, self.tmp)
        os.replace(self.tmp, self.path)

    def abort(self):
        if not self.fh.closed:
            self.fh.close()
        if self.tmp.exists():
            self.tmp.unlink()

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


def open_volumes(path):
    """Open a store's volumes for reading (:class:`VolumeReader`; nothing is loaded up front)."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"volume store not found: {path}")
    return VolumeReader(path)


class Dataset:
    """A dataset folder (see module docstring): participants, lazy volumes, grid and mask."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / "participants.tsv").exists():
            raise InputDataError(f"{self.root} is not a brainfv dataset (no participants.tsv)")

    @property
    def participants(self):
        import pandas as pd

        return pd.read_csv(self.root / "participants.tsv", sep="\t", dtype={"subject": str})

    @property
    def volumes(self):
        return open_volumes(self.root / "volumes.npy")

    @property
    def reference(self):
        import nibabel as nib

        return nib.load(str(self.root / "reference.nii.gz"))

    @property
    def grid(self):
        from .grid import Grid

        return Grid.from_image(self.reference)

    @property
    def mask(self):
        import nibabel as nib

        return np.asarray(nib.load(str(self.root / "mask.nii.gz")).dataobj) > 0
