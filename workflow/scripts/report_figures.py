"""Rule report_figures: the study's figures from cached results (no training, no optimisation)."""
import _setup


def main(snakemake, log):
    import json
    from pathlib import Path

    import nibabel as nib
    import numpy as np
    import pandas as pd

    from brainfv.data.store import Dataset
    from brainfv.report import figures as F

    p = snakemake.params
    table = pd.read_csv(snakemake.input.table, sep="\t")
    out = Path(snakemake.output.metrics).parent
    F.metrics_figure(table, snakemake.output.metrics)
    traj = pd.concat([pd.read_csv(t, sep="\t") for t in snakemake.input.trajectories], ignore_index=True)
    F.trajectories_figure(traj, table, snakemake.output.trajectories)
    metrics, hist = {}, {}
    for mpath, hpath in zip(snakemake.input.model_metrics, snakemake.input.histories):
        m = json.loads(Path(mpath).read_text())
        metrics[m["task"], m["replicate"]] = m
        hist[m["task"], m["replicate"]] = pd.read_csv(hpath, sep="\t")
    F.models_figure(metrics, hist, snakemake.output.models)
    for (task, layer), path in zip(p.grids, snakemake.output.grids):
        ds = Dataset(p.datasets[task])
        vols = {}
        for e, nifti in zip(p.entries, snakemake.input.niftis):
            if e["task"] == task and e["layer"] == layer:
                vols[e["regularizer"]] = np.moveaxis(np.asarray(nib.load(nifti).dataobj, np.float32), -1, 0)
        sub = table[(table["task"] == task) & (table["layer"] == layer)]
        units = sorted(sub["unit"].unique())
        classes = metrics[task, 0]["classes"]
        labels = [f"{layer}:{u}" + (f"\n(logit '{classes[u]}')" if layer == "classifier" else "") for u in units]
        label = metrics[task, 0].get("cohort", "")
        F.featviz_grid_figure(vols, units, labels, ds.mask, path,
                              f"task {task} · layer {layer} · units × regularizers — {label}")
        log(f"figure {path}")


if __name__ == "__main__":
    _setup.run(main, snakemake)  # noqa: F821 (injected by Snakemake)
