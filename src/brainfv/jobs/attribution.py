"""Job of the ``attribute`` rule: attribution maps of a task's class logits on its test subjects."""
from __future__ import annotations

import json

import pandas as pd
import torch

from ..attribution import RowView, attribution_table, class_attribution_maps, write_attribution_nifti
from ..data.store import Dataset
from ..device import pick_device
from ..utils import atomic_path
from .base import Job, retains_freed_memory
from .models import task_model

__all__ = ["attribution_job"]


@retains_freed_memory
def attribution_job(job: Job) -> None:
    """The ``attribute`` rule: attribution maps of a task's class logits on its test subjects.

    Inputs: ``model`` (loaded as param ``model``, a model spec, says), ``info`` (JSON with the model's
    ``classes`` and ``target``: a trained model's metrics.json or a given model's description) and the
    dataset's ``participants``, ``volumes``, ``reference``. Params: ``methods``, ``n_steps``,
    ``max_per_class`` (the first test subjects of each class), ``device``.
    Outputs: one 4D NIfTI per method (output name = method; volume ``c`` = class ``c``) and ``table``.
    """
    torch.set_num_threads(job.threads)
    p, log = job.params, job.log
    device = pick_device(p["device"])
    model, _ = task_model(job, device)
    meta = json.loads(open(job.input["info"]).read())
    classes, target = meta["classes"], meta["target"]
    ds = Dataset(job.folder("participants", "volumes", "reference"))
    parts = ds.participants
    test = parts[(parts["split"] == "test") & parts[target].astype(str).isin(classes)]
    picked = pd.concat([g.head(p["max_per_class"]) for _, g in test.groupby(test[target].astype(str), sort=True)])
    labels = [classes.index(str(v)) for v in picked[target]]
    volumes = RowView(ds.volumes, picked["index"])
    tables = []
    for method in p["methods"]:
        log(f"{method}: {len(picked)} test subjects ({p['max_per_class']} per class at most), classes {classes}")
        res = class_attribution_maps(model, volumes, labels, len(classes), method, n_steps=p["n_steps"],
                                     device=device, log=log)
        write_attribution_nifti(res["maps"], classes, ds.grid, job.output[method])
        tables.append(attribution_table(res, classes))
    with atomic_path(job.output["table"]) as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, sep="\t", index=False)
