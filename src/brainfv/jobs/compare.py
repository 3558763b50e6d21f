"""Job of the ``compare_regularizers`` rule: one table over task × layer × unit × regularizer with fidelity
metrics, paired against the controls, summarised and calibrated."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ..models.cnn import load_checkpoint
from ..report.calibrate import judge, paired_table, sanity_table, summarise
from ..report.compare import GT_METRICS, SUMMARY_EXTRA, _transfer_agreement, _truth, attribution_rows, compare_entries
from ..report.findings import render
from ..utils import atomic_path
from .base import Job

__all__ = ["compare_job"]


def compare_job(job: Job) -> None:
    """The ``compare_regularizers`` rule.

    Params: ``entries`` (task, layer id, module, regularizer per visualization job, in the order of the
    ``niftis``, ``randomized`` and ``tables`` inputs), ``tasks`` (in the order of the per-task inputs
    ``infos``, ``participants``, ``masks``, ``effects``, ``effects_regional``), ``transfer_tasks`` (the tasks
    with a transfer model: ``models``, ``predictions``, ``transfer_models``, ``transfer_predictions``, in
    order), ``lesion_tasks`` (the tasks with ``lesion_masks`` inputs), ``attributions`` ((task, method) per
    ``attributions`` input), ``lesions``, ``compare`` and ``report`` (config sections), ``seed``, ``heads`` and
    ``model_kinds`` (per task: its network head, and trained / positive control / given). Each task's ``infos``
    file (a trained model's metrics.json, a given model's description) names its target, classes and output
    layer. Outputs: ``table`` (comparison.tsv), ``controls``, ``summary``, ``sanity``, ``transfer``,
    ``findings`` (findings.md).
    """
    torch.set_num_threads(job.threads)
    p, inp, log = job.params, job.input, job.log
    cmp = p["compare"]
    truths, outputs = _task_truths(p, inp, log)
    transfer, transfer_rows = _transfer_models(p, inp, log)
    entries = [_load_entry(e, inp, k) for k, e in enumerate(p["entries"])]
    heads = p.get("heads") or {}
    trained, controls = compare_entries(entries, truths, transfer, outputs, cmp["surrogates"], p["seed"], log, heads)
    attr = _attribution_scores(p, inp, truths, outputs)
    metrics = sorted({m for t in truths.values() for m in GT_METRICS.get(t.kind, [])}) + ["transfer_prob"]
    paired = paired_table(trained, controls, metrics)
    method = cmp["interval"]
    summary = summarise(paired, metrics + [m for m in SUMMARY_EXTRA if m != "transfer_prob"], cmp["bootstrap"],
                        p["seed"], method)
    if attr:
        a = pd.DataFrame(attr)
        summary = pd.concat([summary, summarise(a, [m for m in metrics if m in a], cmp["bootstrap"], p["seed"],
                                                method)], ignore_index=True)
        paired = pd.concat([paired, a], ignore_index=True)
    summary.insert(1, "head", summary["task"].map(heads).fillna(""))  # findings are stated per network head
    summary.insert(2, "model", summary["task"].map(p.get("model_kinds") or {}).fillna(""))
    summary, missing = judge(summary, p["report"]["primary"], p["report"]["sesoi"])
    for e in missing:
        log(f"report.primary: no rows for {e} in this run: listed as not run in findings.md")
    sanity = sanity_table(summary, [m for m in metrics if m != "transfer_prob"])
    for key, df in (("table", paired), ("controls", controls), ("summary", summary), ("sanity", sanity),
                    ("transfer", pd.DataFrame(transfer_rows))):
        with atomic_path(job.output[key]) as tmp:
            df.to_csv(tmp, sep="\t", index=False)
    findings = render(summary, missing, method=method)
    with atomic_path(job.output["findings"]) as tmp:
        Path(tmp).write_text(findings)
    log("findings.md:\n" + findings)


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
