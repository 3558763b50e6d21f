"""The files of a dataset folder, by kind: one table for the library, the workflow's rules and the command line.

Standard library only (``workflow/rules/common.smk`` imports it while Snakemake builds the DAG).
"""
from __future__ import annotations

__all__ = ["DATASET_FILES", "KNOWN_FILE"]

#: kind -> file name in a dataset folder (the cohort and the lesion dataset; the lesion files only in the latter)
DATASET_FILES = {
    "volumes": "volumes.npy",
    "participants": "participants.tsv",
    "reference": "reference.nii.gz",
    "mask": "mask.nii.gz",
    "sex_effect": "sex_effect.nii.gz",
    "sex_effect_regional": "sex_effect_regional.nii.gz",
    "manifest": "manifest.json",
    "wm": "wm.npy",
    "qc": "qc.tsv",
    "lesion_masks": "lesion_masks.npy",
    "lesions": "lesions.tsv",
    "lesion_frequency": "lesion_frequency.nii.gz",
    "qc_figure": "qc.png",
    "lesion_examples": "examples.png",
}

#: in a positive-control network's model folder (brainfv.models.positive): the known optimum of each class logit
#: (X × Y × Z × classes; NaN where no single image is the optimum), scored as ``known_corr`` (brainfv.report.compare)
KNOWN_FILE = "known.nii.gz"
