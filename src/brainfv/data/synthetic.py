"""A synthetic cohort made from the MNI152 template, with a planted, known sex effect.

Every subject starts from nilearn's MNI152 T1 template (and its GM/WM maps) on
the study grid and receives:

1. **the planted sex effect** (the ground truth later stages are scored against):

   * a *global volume* difference: male brains are scaled isotropically by
     ``(1 + g/2)^(1/3)``, female brains by ``(1 - g/2)^(1/3)``, so that the mean
     male/female volume ratio is about ``1 + g`` (``g = 0.10`` by default, of the
     order of the ~10 % difference reported in adults);
   * *regional* grey-matter differences: the T1 intensity of grey matter is
     modulated by ``± r/2`` (males ``+``, females ``-``) inside Gaussian regions
     (sigma 10 mm) listed in :data:`SEX_REGIONS`, with the sign given there.

   Both terms are multiplied by ``strength`` (``0`` removes the effect).
2. **nuisance variability** (torchio transforms, seeded per subject): random
   isotropic size (log-normal), rotation, translation, smooth elastic
   deformation, MRI bias field, gamma contrast change and Rician-like noise.

The ground-truth *effect map* is the difference of the noise-free male and
female images after intensity normalisation: what a perfect "male vs female"
detector could see. This cohort is **synthetic**; every table and figure says so.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchio as tio

from ..config import SexEffectConfig, VariabilityConfig, default
from ..utils import stable_seed
from .template import template_on_grid

__all__ = ["SyntheticCohort", "SEX_REGIONS", "SYNTHETIC_LABEL"]

SYNTHETIC_LABEL = "synthetic (MNI152-derived)"

#: (x, y, z) in MNI mm, sign: +1 = more GM signal in males, -1 = more in females
SEX_REGIONS = (
    ((-24.0, -6.0, -18.0), +1.0),   # left amygdala / hippocampal head
    ((24.0, -6.0, -18.0), +1.0),    # right amygdala / hippocampal head
    ((0.0, -62.0, 40.0), -1.0),     # precuneus
    ((-44.0, 20.0, 22.0), -1.0),    # left inferior frontal
    ((44.0, 20.0, 22.0), -1.0),     # right inferior frontal
)
REGION_SIGMA_MM = 10.0


def _region_map(grid):
    ijk = np.indices(grid.shape, dtype=np.float32).reshape(3, -1).T
    xyz = grid.world_coords(ijk)
    out = np.zeros(len(xyz), np.float32)
    for centre, sign in SEX_REGIONS:
        d2 = ((xyz - np.asarray(centre)) ** 2).sum(1)
        out += sign * np.exp(-d2 / (2 * REGION_SIGMA_MM ** 2)).astype(np.float32)
    return out.reshape(grid.shape)


class SyntheticCohort:
    """Generator of synthetic subjects on ``grid`` (see module docstring).

    Parameters
    ----------
    grid : Grid
    n_subjects : int
    seed : int
        Each subject's randomness derives from ``(seed, subject index)``, so any
        subject can be regenerated alone.
    male_fraction : float
    sex_effect : dict (or :class:`~brainfv.config.SexEffectConfig`) with ``global_volume``, ``regional``
        and ``strength``; missing keys take the config schema's defaults
    variability : dict (or :class:`~brainfv.config.VariabilityConfig`) with ``scale_sd``, ``rotation_deg``,
        ``translation_mm``, ``deformation_mm``, ``bias``, ``gamma_sd``, ``noise_sd``
    """

    def __init__(self, grid, n_subjects, seed, male_fraction=default("cohort.synthetic.male_fraction"),
                 sex_effect=None, variability=None):
        self.grid = grid
        self.n = int(n_subjects)
        self.seed = int(seed)
        self.effect = SexEffectConfig.from_config(sex_effect, "cohort.synthetic.sex_effect").as_dict()
        var = VariabilityConfig.from_config(variability, "cohort.synthetic.variability").as_dict()
        self.var = var
        self.tpl = template_on_grid(grid)
        self.regions = _region_map(grid) * self.tpl["gm"]
        rng = np.random.default_rng(stable_seed(self.seed, "synthetic-sex"))
        n_m = int(round(self.n * male_fraction))
        sexes = np.array(["M"] * n_m + ["F"] * (self.n - n_m))
        rng.shuffle(sexes)
        self.sexes = sexes

    def subject_id(self, i: int) -> str:
        return f"syn{i:04d}"

    def _sex_terms(self, sex):
        half = 0.5 if sex == "M" else -0.5
        s = self.effect["strength"]
        scale = (1.0 + 2 * half * s * self.effect["global_volume"] / 2) ** (1.0 / 3.0)
        modulation = 1.0 + 2 * half * s * self.effect["regional"] / 2 * self.regions
        return scale, modulation

    def _subject(self, t1, scale, degrees, translation, random_transforms=()):
        aff = self.grid.affine
        subj = tio.Subject(
            t1=tio.ScalarImage(tensor=torch.from_numpy(t1[None]), affine=aff),
            wm=tio.ScalarImage(tensor=torch.from_numpy(self.tpl["wm"][None].copy()), affine=aff),
            mask=tio.ScalarImage(tensor=torch.from_numpy(self.tpl["mask"][None].astype(np.float32)), affine=aff),
        )
        transforms = [tio.Affine(scales=(scale,) * 3, degrees=degrees, translation=translation,
                                 default_pad_value=0.0, image_interpolation="linear")]
        transforms += list(random_transforms)
        out = tio.Compose(transforms)(subj)
        return (out["t1"].data[0].numpy(), out["wm"].data[0].numpy(), out["mask"].data[0].numpy() > 0.5)

    def generate(self, i: int) -> dict:
        """Subject ``i``: dict with ``subject, sex, t1 (raw, 0 outside brain), wm, mask, params``."""
        sex = self.sexes[i]
        seed = stable_seed(self.seed, "synthetic-subject", i)
        rng = np.random.default_rng(seed)
        v = self.var
        sex_scale, modulation = self._sex_terms(sex)
        size = float(np.exp(rng.normal(0, v["scale_sd"])))
        degrees = tuple(float(d) for d in rng.uniform(-v["rotation_deg"], v["rotation_deg"], 3))
        translation = tuple(float(t) for t in rng.uniform(-v["translation_mm"], v["translation_mm"], 3))
        rand = []
        if v["deformation_mm"] > 0:
            rand.append(tio.RandomElasticDeformation(num_control_points=7, max_displacement=v["deformation_mm"],
                                                     locked_borders=2))
        if v["bias"] > 0:
            rand.append(tio.RandomBiasField(coefficients=v["bias"], include=["t1"]))
        if v["gamma_sd"] > 0:
            rand.append(tio.RandomGamma(log_gamma=v["gamma_sd"], include=["t1"]))
        if v["noise_sd"] > 0:
            rand.append(tio.RandomNoise(std=v["noise_sd"], include=["t1"]))
        t1 = (self.tpl["t1"] * modulation).astype(np.float32)
        with torch.random.fork_rng(devices=[]):  # torchio draws from torch's global RNG: seed it, then restore it
            torch.manual_seed(seed)
            t1, wm, mask = self._subject(t1, sex_scale * size, degrees, translation, rand)
        t1 = np.where(mask, np.clip(t1, 0, None), 0).astype(np.float32)
        params = {"size_factor": size, "sex_scale": sex_scale, "rotation_deg": degrees,
                  "translation_mm": translation}
        return {"subject": self.subject_id(i), "sex": sex, "t1": t1, "wm": np.clip(wm, 0, 1),
                "mask": mask, "params": params}

    def expected(self, sex: str, regional_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The noise-free image of ``sex`` (template + planted effect only) and its mask; with
        ``regional_only``, without the global size difference."""
        scale, modulation = self._sex_terms(sex)
        if regional_only:
            scale = 1.0
        t1, _, mask = self._subject((self.tpl["t1"] * modulation).astype(np.float32), scale, (0, 0, 0), (0, 0, 0))
        return np.where(mask, t1, 0).astype(np.float32), mask

    def effect_map(self, normalise: Callable, regional_only: bool = False) -> np.ndarray:
        """Ground truth: normalised expected male image minus normalised expected female image.

        The full map is dominated by the global size difference (the brain's edges move); with
        ``regional_only`` it holds just the regional grey-matter differences, the part of the effect a model
        that ignores brain size can use.
        """
        m, mm = self.expected("M", regional_only)
        f, fm = self.expected("F", regional_only)
        return normalise(m, mm)[0] - normalise(f, fm)[0]
