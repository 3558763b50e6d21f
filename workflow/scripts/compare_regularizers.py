"""Rule compare_regularizers: one table over task × layer × unit × regularizer with fidelity metrics."""
import _setup


def main(snakemake, log):
    import nibabel as nib
    import numpy as np
    import pandas as pd
    import torch

    from brainfv.data.store import Dataset
    from brainfv.models import load_checkpoint
    from brainfv.report.compare import compare, summarise
    from brainfv.utils import atomic_path

    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    models = {}
    jobs = []
    for entry, nifti, table in zip(p.entries, snakemake.input.niftis, snakemake.input.tables):
        task = entry["task"]
        if task not in models:
            _, meta = load_checkpoint(p.models[task][0])
            transfer = load_checkpoint(p.models[task][1])[0] if len(p.models[task]) > 1 else None
            models[task] = (meta, transfer)
        meta, transfer = models[task]
        ds = Dataset(p.datasets[task])
        effect = nib.load(str(ds.root / "sex_effect.nii.gz")).get_fdata() if meta["target"] == "sex" else None
        jobs.append({"task": task, "layer": entry["layer"], "regularizer": entry["regularizer"],
                     "table": pd.read_csv(table, sep="\t"),
                     "images": np.moveaxis(np.asarray(nib.load(nifti).dataobj, dtype=np.float32), -1, 0),
                     "dataset": ds, "target": meta["target"], "classes": meta["classes"], "effect": effect,
                     "transfer_model": transfer})
    table = compare(jobs, p.lesions, log=log)
    with atomic_path(snakemake.output.table) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    summary = summarise(table)
    with atomic_path(snakemake.output.summary) as tmp:
        summary.to_csv(tmp, sep="\t", index=False)
    log("summary (means per task x layer x regularizer):\n" + summary.to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    _setup.run(main, snakemake)  # noqa: F821 (injected by Snakemake)
