"""Jobs of the data rules: the cohort from its source, and the lesion dataset, each with its figure."""
from __future__ import annotations

from pathlib import Path

import torch  # torchio (synthetic source) runs on torch

from ..config import complete
from ..data.cohort import prepare_cohort
from ..data.lesions import synthesize_lesions
from ..report.figures import cohort_qc_figure, lesion_examples_figure
from .base import Job

__all__ = ["cohort_job", "lesions_job"]


def cohort_job(job: Job) -> None:
    """The ``prepare_cohort`` rule: the configured source → the cohort folder (outputs' folder), and its
    QC figure. Param ``cfg``: the config's ``seed``, ``grid`` and ``cohort`` sections."""
    torch.set_num_threads(job.threads)
    out = Path(job.output["volumes"]).parent
    prepare_cohort(complete(job.params["cfg"]), out, log=job.log)
    cohort_qc_figure(out, job.output["figure"])


def lesions_job(job: Job) -> None:
    """The ``synthesize_lesions`` rule: the cohort (inputs' folder) with artificial lesions → the lesion
    dataset (outputs' folder), and its example figure. Param ``cfg``: the config's ``seed`` and
    ``lesions`` sections."""
    out = Path(job.output["volumes"]).parent
    synthesize_lesions(job.folder("volumes", "wm", "participants", "reference", "mask", "sex_effect"),
                       complete(job.params["cfg"]), out, log=job.log)
    lesion_examples_figure(out, job.output["figure"])
