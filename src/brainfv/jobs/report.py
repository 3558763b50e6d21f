"""Jobs of the report rules drawn from cached results: ``unit_figures`` and ``report_figures``."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..data.grid import Grid
from ..report.anatomy import IG_UNITS, PanelStyle, units_on_anatomy_figure
from ..report.figures import metrics_figure, models_figure, signal_null_figure, trajectories_figure, unit_labels
from ..report.viewer import write_viewer
from .base import Job

__all__ = ["units_job", "report_job"]


def units_job(job: Job) -> None:
    """The ``unit_figures`` rule: one request's units on anatomy (a PNG figure and an offline HTML viewer).

    Rows: the request's units; columns: each preset's visualization (seed 0), the unit's most activating test
    volume (exemplar, cropped to the receptive field around its maximum), and, for the model's output units,
    each attribution map of that class. Every panel of a unit is cut at the same MNI point, chosen from its
    visualizations and printed. Params: ``task``, ``layer`` (request id), ``module``, ``regularizers`` (in the
    order of the ``niftis``/``tables`` inputs), ``methods`` (of the ``attributions`` inputs, shown for the model's
    output layer, which ``info`` names).
    Inputs: ``niftis``, ``tables``, optional ``exemplars``/``exemplar_table`` and ``attributions``, ``mask``,
    ``reference``, ``info`` (the model's metrics.json or description: classes). Outputs: ``figure``, ``viewer``.
    """
    p, inp, log = job.params["spec"], job.input, job.log
    grid = Grid.from_image(nib.load(inp["reference"]))
    mask = np.asarray(nib.load(inp["mask"]).dataobj) > 0
    meta = json.loads(open(inp["info"]).read())
    first = pd.read_csv(inp["tables"][0], sep="\t")
    first = first[first["network"] == "trained"]
    units = sorted(first["unit"].unique())
    panels = {}
    for reg, nifti in zip(p["regularizers"], inp["niftis"]):
        data = np.asarray(nib.load(nifti).dataobj, np.float32)
        panels[reg] = [data[..., j] for j in range(len(units))]  # seed 0: the first volume of each unit
    if inp.get("exemplars"):
        ex = pd.read_csv(inp["exemplar_table"], sep="\t")
        data = nib.load(inp["exemplars"]).dataobj
        col = []
        for u in units:
            r = ex[(ex["unit"] == u) & (ex["rank"] == 0)]
            col.append(np.asarray(data[..., int(r["volume"].iloc[0])], np.float32) if len(r) else None)
        panels["exemplar (top test volume)"] = col
    styles = {}
    is_output = meta.get("output_layer") is not None and p["module"] == meta.get("output_layer")
    for method, nifti in zip(p["methods"] if is_output else [], inp.get("attributions", [])):
        data = np.asarray(nib.load(nifti).dataobj, np.float32)
        name = f"attribution: {method.replace('_', ' ')}"
        panels[name] = [data[..., u] if u < data.shape[-1] else None for u in units]
        styles[name] = PanelStyle(kind="overlay", units=IG_UNITS if method == "integrated_gradients"
                                  else f"{method.replace('_', ' ')} (a.u.)", scale="panel", use_for_cuts=False)
    labels = [lab.replace("\n", " ")
              for lab in unit_labels(p["module"], units, meta["classes"], meta.get("output_layer"))]
    what = meta.get("cohort") or ("positive control (built by hand)" if meta.get("role") == "positive control" else "")
    title = f"task {p['task']} · {p['layer']}" + (f" — {what}" if what else "")
    fig = units_on_anatomy_figure(panels, labels, grid, job.output["figure"], title, mask=mask, styles=styles, log=log)
    log(f"figure {job.output['figure']}: {fig.size_px[0]}x{fig.size_px[1]} px, cuts {fig.cut_coords}")
    entries = [{"label": lab, "cut_coords": cut, "panels": {k: v[i] for k, v in panels.items()}}
               for i, (lab, cut) in enumerate(zip(labels, fig.cut_coords))]
    page = write_viewer(job.output["viewer"], title, entries, grid, mask=mask, styles=styles, log=log,
                        description="Each unit's visualizations under every preset (seed 0), its most activating "
                                    "test volume and, for class logits, attribution maps, over the MNI152 template "
                                    "at the cut printed for the unit. Values: z-scored T1 (SD within the brain mask).")
    log(f"viewer {job.output['viewer']}: {page.n_bytes / 1e6:.1f} MB")


def report_job(job: Job) -> None:
    """The ``report_figures`` rule: every study figure from cached results (no training, no optimisation).

    Inputs: ``table`` (comparison), ``summary``, ``trajectories`` (one per visualization job),
    ``model_metrics`` and ``histories`` (one per trained model). Outputs: ``metrics``, ``calibration``,
    ``trajectories``, ``models``.
    """
    inp = job.input
    table = pd.read_csv(inp["table"], sep="\t")
    summary = pd.read_csv(inp["summary"], sep="\t")
    vis = table[~table["regularizer"].astype(str).str.startswith("attribution:")]
    metrics_figure(vis, job.output["metrics"])
    signal_null_figure(summary, job.output["calibration"])
    traj = pd.concat([pd.read_csv(t, sep="\t") for t in inp["trajectories"]], ignore_index=True)
    traj = traj[traj.get("network", "trained") == "trained"] if "network" in traj else traj
    trajectories_figure(traj, vis[vis["seed"] == 0], job.output["trajectories"])
    metrics, hist = {}, {}
    for mpath, hpath in zip(inp["model_metrics"], inp["histories"]):
        m = json.loads(Path(mpath).read_text())
        metrics[m["task"], m["role"]] = m
        hist[m["task"], m["role"]] = pd.read_csv(hpath, sep="\t")
    models_figure(metrics, hist, job.output["models"])
