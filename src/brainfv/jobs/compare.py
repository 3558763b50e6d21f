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
from ..report.compare import (
    GT_METRICS,
    SUMMARY_EXTRA,
    attribution_rows,
    compare_entries,
    task_truth,
    transfer_agreement,
)
from ..report.findings import render
from ..utils import atomic_path
from .base import Job

__all__ = ["compare_job"]


def compare_job(job: Job) -> None:
    """The ``compare_regularizers`` rule.

    Param ``records`` (``workflow/rules/common.smk`` compare_records; every path in them is a declared
    input): ``entries`` (task, layer id, module, regularizer and the paths ``nifti``, ``randomized``, ``table``
    of each visualization job), ``tasks`` (task, ``info`` — a trained model's metrics.json or a given model's
    description, naming its target, classes and output layer —, ``head``, ``model_kind`` and its dataset's
    ``participants``, ``mask``, ``sex_effect``, ``sex_effect_regional``, ``lesion_masks``, ``known`` — a positive
    control's known optimum), ``transfer`` (task,
    optionally ``replicate``: the trained network whose visualizations it tests, its ``model`` and ``predictions``,
    ``transfer_model``, ``transfer_predictions``) and ``attributions`` (task,
    method, ``path``). Params ``lesions``, ``compare``, ``report`` (config sections) and ``seed``. Outputs:
    ``table`` (comparison.tsv), ``controls``, ``summary``, ``sanity``, ``transfer``, ``findings`` (findings.md).
    """
    torch.set_num_threads(job.threads)
    p, log = job.params, job.log
    cmp, rec = p["compare"], p["records"]
    truths, outputs = _task_truths(rec["tasks"], p, log)
    transfer, transfer_rows = _transfer_models(rec["transfer"], [t["task"] for t in rec["tasks"]], log)
    entries = [_load_entry(e) for e in rec["entries"]]
    heads = {t["task"]: t["head"] for t in rec["tasks"]}
    trained, controls = compare_entries(entries, truths, transfer, outputs, cmp["surrogates"], p["seed"], log, heads)
    attr = _attribution_scores(rec["attributions"], rec["entries"], truths, outputs)
    metrics = sorted({m for t in truths.values() for m in GT_METRICS.get(t.kind, [])})
    metrics += ["known_corr"] * any(t.known is not None for t in truths.values()) + ["transfer_prob"]
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
    summary.insert(2, "model", summary["task"].map({t["task"]: t["model_kind"] for t in rec["tasks"]}).fillna(""))
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


def _task_truths(tasks: list[dict], p: dict, log: Callable) -> tuple[dict, dict]:
    """Each task's ground truth (from its dataset files) and the name of its model's output layer."""
    truths, outputs = {}, {}
    for t in tasks:
        meta = json.loads(Path(t["info"]).read_text())
        outputs[t["task"]] = meta.get("output_layer")
        files = {"participants": t["participants"], "mask": t["mask"], "effect": t["sex_effect"],
                 "effect_regional": t["sex_effect_regional"]}
        for key in ("lesion_masks", "known"):
            if t.get(key):
                files[key] = t[key]
        truths[t["task"]] = task_truth(t["task"], meta["target"], meta["classes"], files, p["lesions"],
                                   p["compare"]["n_real"], log)
    return truths, outputs


def _transfer_models(records: list[dict], tasks: list[str], log: Callable) -> tuple[dict, list]:
    """The transfer model of each task that has one (keyed by task, or by (task, replicate) for a record that
    names the trained replicate whose visualizations it tests), and how it agrees with that replicate's model."""
    transfer, rows, loaded = {}, [], {}

    def load(path: str) -> tuple:
        if path not in loaded:
            loaded[path] = load_checkpoint(path)
        return loaded[path]

    for r in records:
        main, meta = load(r["model"])
        net, tmeta = load(r["transfer_model"])
        rep = r.get("replicate")
        transfer[r["task"] if rep is None else (r["task"], rep)] = net
        row = transfer_agreement(r["task"], r["predictions"], r["transfer_predictions"], {**meta, "arch": main.arch},
                                 {**tmeta, "arch": net.arch})
        rows.append(row if rep is None else {"task": r["task"], "replicate": rep, **row})
    have = {k[0] if isinstance(k, tuple) else k for k in transfer}
    missing = [t for t in tasks if t not in have]
    if missing:
        log(f"no transfer model for {missing} (a given model, or transfer.enabled: false): transfer_prob left out")
    return transfer, rows


def _volumes(path: str) -> np.ndarray:
    """A 4D NIfTI's volumes, first axis first."""
    return np.moveaxis(np.asarray(nib.load(path).dataobj, dtype=np.float32), -1, 0)


class LazyVolumes:
    """A visualization job's volumes (seeds, units, X, Y, Z), read from its NIfTI each time they are used and not
    kept: the comparison holds one job's volumes (and its other-model control's) at a time instead of every job's
    (the default study's 39 jobs: 321 MB)."""

    def __init__(self, path: str, n_units: int) -> None:
        self.path, self.n_units = path, n_units

    def load(self) -> np.ndarray:
        v = _volumes(self.path)
        return v.reshape((-1, self.n_units) + v.shape[1:])

    def reshape(self, *shape: int | tuple) -> np.ndarray:
        return self.load().reshape(*shape)


def _load_entry(e: dict) -> dict:
    """A visualization job's record with its table, and its trained and randomized volumes as
    :class:`LazyVolumes` (seeds, units, X, Y, Z), in place of their paths."""
    tab = pd.read_csv(e["table"], sep="\t")
    n_units = tab.loc[tab["network"] == "trained", "unit"].nunique()
    keep = {k: v for k, v in e.items() if k not in ("nifti", "table", "randomized")}
    return {**keep, "table": tab, "trained": LazyVolumes(e["nifti"], n_units),
            "randomized": LazyVolumes(e["randomized"], n_units) if e.get("randomized") else None}


def _attribution_scores(attributions: list[dict], entries: list[dict], truths: dict, outputs: dict) -> list:
    """Attribution maps scored like the visualizations of their task's output layer."""
    attr = []
    for a in attributions:
        maps = np.moveaxis(np.asarray(nib.load(a["path"]).dataobj, np.float32), -1, 0)
        task = a["task"]
        # first-seen order, not a set's: row order must not depend on the interpreter's string hash seed
        layers = dict.fromkeys(e["layer"] for e in entries if e["task"] == task and e["module"] == outputs[task])
        for layer in layers:
            attr += attribution_rows(truths[task], dict(enumerate(maps)), a["method"], layer, outputs[task])
    return attr
