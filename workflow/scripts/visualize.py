"""Rule visualize (and visualize_unit): activation maximization of one layer's units under one preset."""
import _setup


def main(snakemake, log):
    import numpy as np
    import pandas as pd
    import torch

    from brainfv.data.store import Dataset
    from brainfv.featviz.study import visualize_layer
    from brainfv.models import load_checkpoint
    from brainfv.training import pick_device
    from brainfv.utils import atomic_path

    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    device = pick_device(p.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, meta = load_checkpoint(snakemake.input.model, map_location=device)
    model.to(device)
    ds = Dataset(p.dataset_dir)
    parts = ds.participants
    vols = ds.volumes
    train_rows = parts.loc[parts["split"] == "train", "index"].to_numpy()[: p.n_real]
    test_rows = parts.loc[parts["split"] == "test", "index"].to_numpy()
    real = [vols[int(i)] for i in train_rows]
    test = [vols[int(i)] for i in test_rows]
    grid = ds.grid
    log(f"task {p.task} layer {p.layer} units {p.units} regularizer {p.regularizer} {p.preset} "
        f"({p.n_seeds} seeds each, batch {len(p.units) * p.n_seeds}, {p.steps} steps, device {device})")
    imgs, rows, traj, res = visualize_layer(
        model, p.layer, p.units, p.preset, shape=grid.shape, mask=ds.mask, real_volumes=real, test_volumes=test,
        seed=p.seed, task=p.task, regularizer=p.regularizer, steps=p.steps, lr=p.lr, n_seeds=p.n_seeds,
        objective=p.objective, device=device, log=log)
    if p.only_unit is not None:  # visualize_unit: keep the requested unit only
        j = list(p.units).index(p.only_unit)
        imgs = imgs[j:j + 1]
        rows = {k: v[j:j + 1] for k, v in rows.items()}
    img = grid.to_nifti(np.moveaxis(imgs, 0, -1))
    img.header["descrip"] = f"brainfv {p.task} {p.layer} {p.regularizer}"[:79].encode()
    with atomic_path(snakemake.output.nifti) as tmp:
        img.to_filename(tmp)
    with atomic_path(snakemake.output.table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    if "trajectory" in snakemake.output.keys():
        with atomic_path(snakemake.output.trajectory) as tmp:
            pd.DataFrame(traj).assign(task=p.task, layer=p.layer, regularizer=p.regularizer).to_csv(
                tmp, sep="\t", index=False)
    log(f"{len(p.units)} units in {res.seconds:.1f}s ({res.steps_per_s:.2f} steps/s); objective "
        f"{np.round(res.objective_start[:len(p.units)], 3).tolist()} -> "
        f"{np.round(res.objective_end[:len(p.units)], 3).tolist()}")


if __name__ == "__main__":
    _setup.run(main, snakemake)  # noqa: F821 (injected by Snakemake)
