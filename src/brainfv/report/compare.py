"""The comparison table: per task × layer × unit × regularizer, image metrics plus ground-truth fidelity.

Columns (besides those of the visualization tables, see :func:`brainfv.featviz.study.visualize_layer`):

``lesion_ncc``        best normalised cross-correlation with a hypo-intense lesion template of the
                      configured shapes and sizes (lesion task; 1 = a perfect lesion, ~0 = noise)
``lesion_shape``      the shape of the best-matching template; ``shape_correct`` for two-shape
                      labelling: whether a class-logit visualization shows its own class's shape
``effect_corr``       class-logit visualizations of the sex task: correlation with the sex-effect map
                      (male logit with M−F, female logit with F−M), inside the brain mask
``tv_ratio``/``hf_ratio`` total variation and high-frequency share relative to real volumes
``activation_ratio``  objective reached / the unit's maximum over real test volumes (> 1: beyond real data)
``stability``         mean correlation between the unit's visualizations from different seeds
``transfer_prob``     class-logit visualizations: probability an independently trained replicate model
                      gives the intended class (``transfer_correct``: it is its top class)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import LesionConfig

from .metrics import best_template_match, lesion_templates, quality_ratios, sex_effect_fidelity

__all__ = ["compare", "summarise", "compare_job"]


def compare(jobs, lesion_cfg, log=None, n_real=16):
    """Build the comparison table.

    ``jobs``: list of dicts with ``task, layer, regularizer, table (DataFrame), images (n_units, X, Y, Z),
    dataset (brainfv Dataset), target, classes, effect (array or None), transfer_model (or None)``.
    """
    import pandas as pd
    import torch

    from ..featviz.metrics import high_frequency_fraction, relative_tv

    log = log or (lambda m: None)
    lc = LesionConfig.from_config(lesion_cfg)
    real_stats = {}
    templates = {}
    out = []
    for job in jobs:
        ds = job["dataset"]
        key = str(ds.root)
        mask = ds.mask
        if key not in real_stats:
            vols = ds.volumes
            rows = ds.participants["index"].to_numpy()[:n_real]
            real_stats[key] = (float(np.mean([relative_tv(vols[int(i)], mask) for i in rows])),
                               float(np.mean([high_frequency_fraction(vols[int(i)]) for i in rows])))
        real_tv, real_hf = real_stats[key]
        tab = job["table"].copy()
        is_logit = job["layer"] == "classifier"
        extra = {k: [] for k in ("lesion_ncc", "lesion_shape", "lesion_diameter_mm", "shape_correct", "effect_corr",
                                 "tv_ratio", "hf_ratio", "transfer_prob", "transfer_correct", "intended_class")}
        for j, unit in enumerate(tab["unit"]):
            vol = np.asarray(job["images"][j], dtype=np.float64)
            q = quality_ratios(vol, real_tv, real_hf, mask)
            extra["tv_ratio"].append(q["tv_ratio"])
            extra["hf_ratio"].append(q["hf_ratio"])
            cls = job["classes"][unit] if is_logit and unit < len(job["classes"]) else ""
            extra["intended_class"].append(cls)
            if job["target"] == "lesion":
                vs = ds.grid.voxel_size
                shapes = lc.template_shapes
                dmin, dmax = lc.diameter_mm
                tk = (tuple(shapes), dmin, dmax, vs)
                if tk not in templates:
                    templates[tk] = lesion_templates(shapes, np.linspace(dmin, dmax, 3), vs, lc.edge_mm)
                m = best_template_match(vol, templates[tk], mask)
                extra["lesion_ncc"].append(m["ncc"])
                extra["lesion_shape"].append(m["shape"])
                extra["lesion_diameter_mm"].append(m["diameter_mm"])
                extra["shape_correct"].append(float(m["shape"] == cls) if lc.labelling == "shapes"
                                              and is_logit else float("nan"))
            else:
                for k in ("lesion_ncc", "lesion_diameter_mm", "shape_correct"):
                    extra[k].append(float("nan"))
                extra["lesion_shape"].append("")
            if job["target"] == "sex" and is_logit and job.get("effect") is not None and cls in ("M", "F"):
                extra["effect_corr"].append(sex_effect_fidelity(vol, job["effect"], mask, 1.0 if cls == "M" else -1.0))
            else:
                extra["effect_corr"].append(float("nan"))
            if is_logit and job.get("transfer_model") is not None:
                with torch.no_grad():
                    x = torch.as_tensor(vol, dtype=torch.float32)[None, None]
                    p = torch.softmax(job["transfer_model"](x), 1)[0].numpy()
                extra["transfer_prob"].append(float(p[unit]))
                extra["transfer_correct"].append(float(int(np.argmax(p)) == unit))
            else:
                extra["transfer_prob"].append(float("nan"))
                extra["transfer_correct"].append(float("nan"))
        for k, v in extra.items():
            tab[k] = v
        out.append(tab)
        log(f"compared {job['task']} {job['layer']} {job['regularizer']}: {len(tab)} units")
    return pd.concat(out, ignore_index=True)


SUMMARY_METRICS = ["activation_ratio", "stability", "lesion_ncc", "effect_corr", "transfer_correct",
                   "tv_ratio", "hf_ratio", "energy_inside_mask", "seconds"]


def summarise(table):
    """Mean of each metric per task × layer × regularizer (and the unit count)."""
    cols = [c for c in SUMMARY_METRICS if c in table.columns]
    g = table.groupby(["task", "layer", "regularizer"], sort=False)
    s = g[cols].mean()
    s["n_units"] = g.size()
    return s.reset_index()


def compare_job(job):
    """The ``compare_regularizers`` rule.

    Params: ``entries`` (task, layer, regularizer of each visualization, in the order of the ``niftis`` and
    ``tables`` inputs), ``tasks`` (task names, in the order of the per-task inputs below) and ``lesions``
    (the config section). Inputs per task: ``models``, ``transfer_models`` (may be empty), ``participants``,
    ``volumes``, ``masks``, ``references``, ``effects`` (the sex-effect map). Outputs: ``table``, ``summary``.
    """
    import nibabel as nib
    import pandas as pd
    import torch

    from ..data.store import Dataset
    from ..models import load_checkpoint
    from ..utils import atomic_path

    torch.set_num_threads(job.threads)
    p, inp = job.params, job.input
    tasks = list(p["tasks"])
    per_task = {}
    for i, task in enumerate(tasks):
        files = {k: inp[k][i] for k in ("participants", "volumes", "masks", "references", "effects")}
        folders = {str(Path(f).parent) for f in files.values()}
        if len(folders) != 1:
            raise ValueError(f"task {task}: dataset inputs are not in one folder: {sorted(folders)}")
        _, meta = load_checkpoint(inp["models"][i])
        transfer = load_checkpoint(inp["transfer_models"][i])[0] if inp.get("transfer_models") else None
        effect = nib.load(files["effects"]).get_fdata() if meta["target"] == "sex" else None
        per_task[task] = {"dataset": Dataset(folders.pop()), "target": meta["target"], "classes": meta["classes"],
                          "effect": effect, "transfer_model": transfer}
    jobs = []
    for entry, nifti, table in zip(p["entries"], inp["niftis"], inp["tables"]):
        jobs.append({**entry, **per_task[entry["task"]], "table": pd.read_csv(table, sep="\t"),
                     "images": np.moveaxis(np.asarray(nib.load(nifti).dataobj, dtype=np.float32), -1, 0)})
    table = compare(jobs, p["lesions"], log=job.log)
    with atomic_path(job.output["table"]) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    summary = summarise(table)
    with atomic_path(job.output["summary"]) as tmp:
        summary.to_csv(tmp, sep="\t", index=False)
    job.log("summary (means per task x layer x regularizer):\n" + summary.to_string(index=False, float_format="%.3f"))
