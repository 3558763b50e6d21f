"""The study grid: one RAS+ voxel grid in template (MNI152) space, and resampling onto it."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..errors import ConfigError, InputDataError

__all__ = ["Grid", "load_volume"]


@dataclass(frozen=True)
class Grid:
    """A RAS+ voxel grid: ``shape`` voxels of ``voxel_size`` mm starting at ``origin`` (mm).

    Voxel ``(i, j, k)`` has its centre at ``origin + voxel_size * (i, j, k)`` in
    template world coordinates, so the affine is diagonal and positive (RAS+).
    """

    shape: tuple
    voxel_size: float
    origin: tuple

    @classmethod
    def from_bbox(cls, voxel_size: float, bbox_mm: Sequence) -> Grid:
        """A grid of ``voxel_size`` mm covering ``bbox_mm = [[xmin, xmax], [ymin, ymax], [zmin, zmax]]``."""
        vs = float(voxel_size)
        if not vs > 0:
            raise ConfigError(f"grid.voxel_size must be > 0 mm, got {voxel_size!r}")
        bbox = np.asarray(bbox_mm, dtype=float)
        if bbox.shape != (3, 2) or np.any(bbox[:, 1] <= bbox[:, 0]):
            raise ConfigError(f"grid.bbox_mm must be [[xmin, xmax], [ymin, ymax], [zmin, zmax]] "
                              f"with min < max, got {bbox_mm!r}")
        shape = tuple(int(n) for n in np.maximum(1, np.round((bbox[:, 1] - bbox[:, 0]) / vs)).astype(int))
        return cls(shape=shape, voxel_size=vs, origin=tuple(float(o) for o in bbox[:, 0]))

    @classmethod
    def from_config(cls, grid_cfg: dict) -> Grid:
        return cls.from_bbox(grid_cfg["voxel_size"], grid_cfg["bbox_mm"])

    @classmethod
    def from_image(cls, img: nib.Nifti1Image) -> Grid:
        """The grid of an image written by :meth:`to_nifti` (diagonal, isotropic, RAS+)."""
        a = np.asarray(img.affine, dtype=float)
        vs = a[0, 0]
        if not (np.allclose(a[:3, :3], np.eye(3) * vs, atol=1e-4) and vs > 0):
            raise InputDataError(f"image affine is not an isotropic RAS+ study grid:\n{a}")
        return cls(shape=tuple(int(s) for s in img.shape[:3]), voxel_size=float(vs),
                   origin=tuple(float(o) for o in a[:3, 3]))

    @property
    def affine(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, :3] *= self.voxel_size
        a[:3, 3] = self.origin
        return a

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def world_coords(self, ijk: Sequence) -> np.ndarray:
        """World (mm) coordinates of voxel indices ``ijk`` (..., 3)."""
        return np.asarray(self.origin) + self.voxel_size * np.asarray(ijk, dtype=float)

    def voxel_coords(self, xyz: Sequence) -> np.ndarray:
        """Continuous voxel indices of world coordinates ``xyz`` (..., 3)."""
        return (np.asarray(xyz, dtype=float) - np.asarray(self.origin)) / self.voxel_size

    def to_nifti(self, data: np.ndarray, dtype: type = np.float32) -> nib.Nifti1Image:
        """Wrap ``data`` (grid shape, optionally with a 4th axis) as a NIfTI image on this grid."""
        data = np.asarray(data)
        if tuple(data.shape[:3]) != self.shape:
            raise ValueError(f"data shape {data.shape} does not match grid {self.shape}")
        img = nib.Nifti1Image(data.astype(dtype, copy=False), self.affine)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(self.affine, code=4)  # 4 = MNI152
        img.header.set_sform(self.affine, code=4)
        return img

    def resample(self, data: np.ndarray, affine: np.ndarray, order: int = 1, antialias: bool = True,
                 cval: float = 0.0) -> np.ndarray:
        """Resample a 3D array with voxel-to-world ``affine`` onto this grid.

        Works in world space, so any source orientation (LAS, PSR, oblique) lands
        correctly on the RAS+ grid. When the source voxels are finer than the
        grid, the source is first smoothed with a Gaussian matching the size
        change (``antialias``), as a scanner at the coarser resolution would see it.
        """
        data = np.asarray(data, dtype=np.float32)
        affine = np.asarray(affine, dtype=float)
        src_vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if antialias and order > 0:
            ratio = self.voxel_size / src_vox
            # FWHM of the target voxel in source voxels, minus what the source already has
            sigma = np.where(ratio > 1, np.sqrt(np.maximum(ratio ** 2 - 1, 0)) / 2.3548, 0.0)
            if np.any(sigma > 0.1):
                data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
        mapping = np.linalg.inv(affine) @ self.affine  # grid voxel -> source voxel
        return ndimage.affine_transform(
            data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=self.shape,
            order=order, mode="constant", cval=cval, prefilter=False,
        ).astype(np.float32)

    def resample_image(self, img: nib.Nifti1Image, order: int = 1, antialias: bool = True) -> np.ndarray:
        """Resample a nibabel image (3D) onto this grid."""
        return self.resample(np.asanyarray(img.dataobj), img.affine, order=order, antialias=antialias)


def load_volume(path: str | Path, subject: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as ``(data float32, affine)``, with errors naming subject and file.

    A 4D image with a single volume is accepted (squeezed); other 4D images,
    NaN/inf values and constant images are rejected.
    """
    who = f"subject {subject!r}: " if subject is not None else ""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"{who}image file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many kinds (ImageFileError, EOFError, zlib.error, ...)
        raise InputDataError(f"{who}cannot read NIfTI {path}: {type(e).__name__}: {e}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"{who}{path} has shape {data.shape}; expected a 3D T1 volume "
                             f"(one volume, not a time series or multi-echo image)")
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputDataError(f"{who}{path} contains {n} NaN/inf voxels")
    if float(data.max()) == float(data.min()):
        raise InputDataError(f"{who}{path} is constant (all voxels = {float(data.max())})")
    return data, np.asarray(img.affine, dtype=float)
