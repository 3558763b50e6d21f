"""On-disk dataset store: volumes as one ``.npy`` memmap, written subject by subject.

A dataset folder holds::

    volumes.npy        float32 (n_subjects, X, Y, Z), read lazily (np.load(mmap_mode="r"))
    participants.tsv   one row per subject; ``index`` is the row in volumes.npy
    reference.nii.gz   the grid (its affine is the study grid), the mean image
    mask.nii.gz        the brain mask on the grid

Memory use does not depend on the number of subjects: writers hold one volume.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputDataError

__all__ = ["VolumeWriter", "open_volumes", "Dataset"]


class VolumeWriter:
    """Write ``n`` volumes of ``shape`` into ``path`` (``.npy``) one at a time, atomically.

    The file appears at ``path`` only after :meth:`close` succeeded; if fewer
    than ``n`` rows were kept (skipped subjects) the file is compacted.
    """

    def __init__(self, path, n, shape, dtype=np.float32):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.npy")
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype, shape=(n,) + self.shape)
        self.n_written = 0

    def append(self, vol):
        vol = np.asarray(vol)
        if vol.shape != self.shape:
            raise ValueError(f"volume shape {vol.shape} != store shape {self.shape}")
        self.mm[self.n_written] = vol.astype(self.dtype, copy=False)
        self.n_written += 1
        return self.n_written - 1

    def close(self):
        n_alloc = self.mm.shape[0]
        self.mm.flush()
        if self.n_written < n_alloc:
            compact = self.tmp.with_name(self.tmp.stem + "-c.npy")
            out = np.lib.format.open_memmap(compact, mode="w+", dtype=self.dtype,
                                            shape=(self.n_written,) + self.shape)
            for i in range(self.n_written):
                out[i] = self.mm[i]
            out.flush()
            del out
            del self.mm
            os.replace(compact, self.tmp)
        else:
            del self.mm
        os.replace(self.tmp, self.path)

    def abort(self):
        if hasattr(self, "mm"):
            del self.mm
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_volumes(path):
    """Open a store's volumes read-only as a memmap (nothing is loaded)."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"volume store not found: {path}")
    return np.load(path, mmap_mode="r")


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
