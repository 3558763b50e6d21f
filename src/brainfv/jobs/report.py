"""Jobs of the report rules: ``compare_regularizers``, ``unit_figures`` and ``report_figures``."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ..data.grid import Grid
from ..models.cnn import load_checkpoint
from ..report.anatomy import IG_UNITS, PanelStyle, units_on_anatomy_figure
from ..report.calibrate import paired_table, sanity_table, summarise
from ..report.compare import GT_METRICS, SUMMARY_EXTRA, _transfer_agreement, _truth, attribution_rows, compare_entries
from ..report.figures import metrics_figure, models_figure, signal_null_figure, trajectories_figure, unit_labels
from ..report.viewer import write_viewer
from ..utils import atomic_path
from .base import Job

__all__ = ["compare_job", "units_job", "report_job"]


def compare_job(job: Job) -> None:
    """The ``compare_regularizers`` rule.

    Params: ``entries`` (task, layer id, module, regularizer per visualization job, in the order of the
    ``niftis``, ``randomized`` and ``tables`` inputs), ``tasks`` (in the order of the per-task inputs
    ``infos``, ``participants``, ``masks``, ``effects``, ``effects_regional``), ``transfer_tasks`` (the tasks
    with a transfer model: ``models``, ``predictions``, ``transfer_models``, ``transfer_predictions``, in
    order), ``lesion_tasks`` (the tasks with ``lesion_masks`` inputs), ``attributions`` ((task, method) per
    ``attributions`` input), ``lesions`` and ``compare`` (config sections), ``seed``. Each task's ``infos``
    file (a trained model's metrics.json, a given model's description) names its target, classes and output
    layer. Outputs: ``table`` (comparison.tsv), ``controls``, ``summary``, ``sanity``, ``transfer``.
    """
    torch.set_num_threads(job.threads)
    p, inp, log = job.params, job.input, job.log
    cmp = p["compare"]
    truths, outputs = _task_truths(p, inp, log)
    transfer, transfer_rows = _transfer_models(p, inp, log)
    entries = [_load_entry(e, inp, k) for k, e in enumerate(p["entries"])]
    trained, controls = compare_entries(entries, truths, transfer, outputs, cmp["surrogates"], p["seed"], log)
    attr = _attribution_scores(p, inp, truths, outputs)
    metrics = sorted({m for t in truths.values() for m in GT_METRICS.get(t.kind, [])}) + ["transfer_prob"]
    paired = paired_table(trained, controls, metrics)
    summary = summarise(paired, metrics + [m for m in SUMMARY_EXTRA if m != "transfer_prob"], cmp["bootstrap"],
                        p["seed"])
    if attr:
        a = pd.DataFrame(attr)
        summary = pd.concat([summary, summarise(a, [m for m in metrics if m in a], cmp["bootstrap"], p["seed"])],
                            ignore_index=True)
        paired = pd.concat([paired, a], ignore_index=True)
    sanity = sanity_table(summary, [m for m in metrics if m != "transfer_prob"])
    for key, df in (("table", paired), ("controls", controls), ("summary", summary), ("sanity", sanity),
                    ("transfer", pd.DataFrame(transfer_rows))):
        with atomic_path(job.output[key]) as tmp:
            df.to_csv(tmp, sep="\t", index=False)
    show = summary[summary["metric"].isin(metrics)]
    log("summary (mean [95% CI], paired gain over the strongest control):\n" + show[
        ["task", "layer", "regularizer", "class", "metric", "mean", "ci_low", "ci_high", "strongest_control",
         "calibrated", "calibrated_low", "calibrated_high", "randomization_check"]
    ].to_string(index=False, float_format="%.3f"))


def _task_truths(p: dict, inp: dict, log: Callable) -> tuple[dict, dict]:
    """Each task's ground truth (from its dataset files) and the name of its model's output layer."""
    truths, outputs = {}, {}
    for i, task in enumerate(p["tasks"]):
        meta = json.loads(Path(inp["infos"][i]).read_text())
        outputs[task] = meta.get("output_layer")
        files = {"participants": inp["participants"][i], "mask": inp["masks"][i], "effect": inp["effects"][i],
                 "effect_regional": inp["effects_regional"][i]}
        if task in p["lesion_tasks"]:
            files["lesion_masks"] = inp["lesion_masks"][p["lesion_tasks"].index(task)]
        truths[task] = _truth(task, meta["target"], meta["classes"], files, p["lesions"], p["compare"]["n_real"], log)
    return truths, outputs


def _transfer_models(p: dict, inp: dict, log: Callable) -> tuple[dict, list]:
    """The transfer model of each task that has one, and how it agrees with the main model."""
    transfer, rows = {}, []
    for i, task in enumerate(p["transfer_tasks"]):
        main, meta = load_checkpoint(inp["models"][i])
        transfer[task], tmeta = load_checkpoint(inp["transfer_models"][i])
        rows.append(_transfer_agreement(task, inp["predictions"][i], inp["transfer_predictions"][i],
                                        {**meta, "arch": main.arch}, {**tmeta, "arch": transfer[task].arch}))
    missing = [t for t in p["tasks"] if t not in transfer]
    if missing:
        log(f"no transfer model for {missing} (a given model, or transfer.enabled: false): transfer_prob left out")
    return transfer, rows


def _volumes(path: str) -> np.ndarray:
    """A 4D NIfTI's volumes, first axis first."""
    return np.moveaxis(np.asarray(nib.load(path).dataobj, dtype=np.float32), -1, 0)


def _load_entry(e: dict, inp: dict, k: int) -> dict:
    """Visualization job ``k``: its table and its volumes as (seeds, units, X, Y, Z), trained and randomized."""
    tab = pd.read_csv(inp["tables"][k], sep="\t")
    n_units = tab.loc[tab["network"] == "trained", "unit"].nunique()
    tr = _volumes(inp["niftis"][k])
    rnd = _volumes(inp["randomized"][k]) if inp.get("randomized") else None
    shape = (-1, n_units) + tr.shape[1:]
    return {**e, "table": tab, "trained": tr.reshape(shape),
            "randomized": rnd.reshape(shape) if rnd is not None else None}


def _attribution_scores(p: dict, inp: dict, truths: dict, outputs: dict) -> list:
    """Attribution maps scored like the visualizations of their task's output layer."""
    attr = []
    for (task, method), path in zip(p["attributions"], inp.get("attributions", [])):
        maps = np.moveaxis(np.asarray(nib.load(path).dataobj, np.float32), -1, 0)
        # first-seen order, not a set's: row order must not depend on the interpreter's string hash seed
        layers = dict.fromkeys(e["layer"] for e in p["entries"] if e["task"] == task and e["module"] == outputs[task])
        for layer in layers:
            attr += attribution_rows(truths[task], dict(enumerate(maps)), method, layer, outputs[task])
    return attr


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
    title = f"task {p['task']} · {p['layer']} — {meta.get('cohort', '')}"
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
