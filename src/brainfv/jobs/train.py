"""Job of the ``train_model`` rule: one task's model trained and evaluated, and its learning curve drawn."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..report.figures import learning_curve_figure
from ..training import train_task
from .base import Job, retains_freed_memory

__all__ = ["train_job"]


@retains_freed_memory
def train_job(job: Job) -> None:
    """The ``train_model`` rule. Inputs: the task's dataset files (``volumes``, ``participants``,
    ``reference``). Params: ``spec`` (task, role, replicate, target, arch, training, seed, bootstrap; see
    ``model_spec`` in ``workflow/rules/common.smk``) and ``checkpoint_dir``. Outputs: ``model``, ``metrics``,
    ``predictions``, ``history``, ``curve``."""
    torch.set_num_threads(job.threads)
    s = job.params["spec"]
    out = Path(job.output["model"]).parent
    metrics = train_task(job.folder("volumes", "participants", "reference", "manifest"), s["task"], s["target"],
                         s["arch"], s["training"], s["seed"], out, job.params["checkpoint_dir"], log=job.log,
                         replicate=s["replicate"], role=s["role"], bootstrap=s["bootstrap"])
    history = pd.read_csv(job.output["history"], sep="\t")
    learning_curve_figure(history, metrics, job.output["curve"], f"task {s['task']} ({s['role']} model) — "
                          f"{metrics['cohort']}")
