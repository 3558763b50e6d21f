"""Figures: orthogonal-slice montages, visualization grids, metric plots, learning curves.

All functions take arrays and tables (no Snakemake), write one PNG atomically
and return the matplotlib figure's size in pixels.
"""
from __future__ import annotations

import numpy as np

from ..utils import atomic_path

__all__ = ["orthoslices", "subject_montage", "save"]

DPI = 110


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path):
    """Save ``fig`` to ``path`` atomically; return its (width, height) in pixels."""
    plt = _mpl()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, facecolor=fig.get_facecolor())
    size = tuple(int(round(v * DPI)) for v in fig.get_size_inches())
    plt.close(fig)
    return size


def slices_at(vol, centre):
    """Sagittal, coronal and axial slices of a RAS+ volume through voxel ``centre``, display-oriented."""
    i, j, k = (int(c) for c in centre)
    return [vol[i, :, :].T, vol[:, j, :].T, vol[:, :, k].T]


def orthoslices(axes, vol, centre, cmap="gray", vmin=None, vmax=None, overlay=None, overlay_cmap="autumn_r",
                outline=None):
    """Draw sagittal/coronal/axial slices of ``vol`` on three ``axes``.

    ``overlay`` (same shape, e.g. a lesion mask) is drawn semi-transparently where > 0;
    ``outline`` (a brain mask) is drawn as a contour for orientation.
    """
    ims = []
    for ax, sl, ol, om in zip(axes, slices_at(vol, centre),
                              slices_at(overlay, centre) if overlay is not None else [None] * 3,
                              slices_at(outline, centre) if outline is not None else [None] * 3):
        ims.append(ax.imshow(sl, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"))
        if ol is not None:
            ax.imshow(np.ma.masked_where(ol <= 0, ol), origin="lower", cmap=overlay_cmap, alpha=0.6,
                      vmin=0, vmax=1, interpolation="nearest")
        if om is not None:
            ax.contour(om.astype(float), levels=[0.5], colors="0.6", linewidths=0.6)
        ax.set_xticks([])
        ax.set_yticks([])
    return ims


def subject_montage(volumes, titles, path, suptitle, overlays=None, centres=None, vlim=(-3, 3)):
    """Rows of subjects × (sagittal, coronal, axial) slices; optional overlays (e.g. lesion masks).

    Slices go through ``centres`` (one voxel per row) or the volume centre.
    """
    plt = _mpl()
    n = len(volumes)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.3 * n + 0.8), squeeze=False,
                             gridspec_kw={"wspace": 0.02, "hspace": 0.15})
    for r, vol in enumerate(volumes):
        c = centres[r] if centres is not None else tuple(s // 2 for s in vol.shape)
        orthoslices(axes[r], vol, c, vmin=vlim[0], vmax=vlim[1],
                    overlay=None if overlays is None else overlays[r])
        axes[r, 0].set_ylabel(titles[r], fontsize=8)
    for ax, name in zip(axes[0], ("sagittal", "coronal", "axial")):
        ax.set_title(name, fontsize=9)
    fig.suptitle(suptitle, fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.98, top=1 - 0.75 / (2.3 * n + 0.6), bottom=0.02)
    return save(fig, path)


def cohort_qc_figure(dataset_dir, path, n_per_sex=3):
    """QC montage of the first ``n_per_sex`` subjects of each sex of a prepared dataset."""
    from ..data.store import Dataset

    ds = Dataset(dataset_dir)
    parts = ds.participants
    vols = ds.volumes
    picks = []
    for sex in sorted(parts["sex"].unique()):
        picks += parts[parts["sex"] == sex].head(n_per_sex).index.tolist()
    rows = parts.loc[picks]
    label = str(parts["cohort"].iloc[0])
    titles = [f"{r.subject} ({r.sex}, {r.split})" for r in rows.itertuples()]
    return subject_montage([np.asarray(vols[int(i)]) for i in rows["index"]], titles, path,
                           f"Cohort QC — {label} — {len(parts)} subjects, z-scored")


def lesion_examples_figure(dataset_dir, path, n=4):
    """Lesioned subjects (mask overlay, slices through a lesion) and lesion-free ones."""
    import pandas as pd

    from ..data.store import Dataset, open_volumes

    ds = Dataset(dataset_dir)
    parts = ds.participants
    les = pd.read_csv(ds.root / "lesions.tsv", sep="\t", dtype={"subject": str})
    vols = ds.volumes
    masks = open_volumes(ds.root / "lesion_masks.npy")
    with_les = parts[parts["n_lesions"] > 0].head(n)
    without = parts[parts["n_lesions"] == 0].head(max(1, n // 2))
    vlist, olist, titles, centres = [], [], [], []
    for r in pd.concat([with_les, without]).itertuples():
        vlist.append(np.asarray(vols[int(r.index)]))
        olist.append(np.asarray(masks[int(r.index)]).astype(np.float32))
        sub_les = les[les["subject"] == r.subject]
        if len(sub_les):
            first = sub_les.iloc[0]
            centres.append((int(first.i), int(first.j), int(first.k)))
            titles.append(f"{r.subject}: {r.n_lesions}× {r.lesion_shapes.split(',')[0]}…\n"
                          f"label {r.lesion}")
        else:
            centres.append(tuple(s // 2 for s in vlist[-1].shape))
            titles.append(f"{r.subject}: label {r.lesion}")
    label = str(parts["cohort"].iloc[0])
    return subject_montage(vlist, titles, path, f"Artificial lesions — {label} — red: lesion mask",
                           overlays=olist, centres=centres)


def learning_curve_figure(history, metrics, path, title):
    """Loss and validation balanced accuracy per epoch, with the test result in the legend."""
    plt = _mpl()
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(history["epoch"], history["train_loss"], "o-", ms=3, label="train")
    a1.plot(history["epoch"], history["val_loss"], "o-", ms=3, label="validation")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a1.legend()
    a2.plot(history["epoch"], history["train_accuracy"], "o-", ms=3, label="train accuracy")
    a2.plot(history["epoch"], history["val_balanced_accuracy"], "o-", ms=3, label="val balanced acc.")
    best = int(metrics["best_epoch"])
    t = metrics["test"]
    a2.axvline(best, color="0.5", ls="--", lw=1)
    a2.set(xlabel="epoch", ylabel="accuracy", ylim=(0.3, 1.02),
           title=f"test: bal. acc {t['balanced_accuracy']:.2f}, AUC {t['roc_auc']:.2f} (best epoch {best})")
    a2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    sns.reset_orig()
    return save(fig, path)
