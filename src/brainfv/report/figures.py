"""Figures: orthogonal-slice montages, visualization grids, metric plots, learning curves.

All functions take arrays and tables (no Snakemake), write one PNG atomically
and return the matplotlib figure's size in pixels.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage

from ..data.files import DATASET_FILES
from ..data.store import Dataset, open_volumes
from ..utils import atomic_path

__all__ = ["orthoslices", "subject_montage", "save", "cohort_qc_figure", "lesion_examples_figure",
           "learning_curve_figure", "featviz_grid_figure", "metrics_figure", "trajectories_figure", "models_figure",
           "unit_labels"]

DPI = 110


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _themed(context):
    """Run a figure function under seaborn's whitegrid theme in ``context``; matplotlib's settings are
    restored afterwards (``rc_context``), so callers' styles are untouched."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            import matplotlib
            import seaborn as sns

            _mpl()
            with matplotlib.rc_context():
                sns.set_theme(style="whitegrid", context=context)
                return fn(*args, **kwargs)
        return inner
    return wrap


def save(fig: Figure, path: str | Path) -> tuple[int, int]:
    """Save ``fig`` to ``path`` atomically; return its (width, height) in pixels."""
    plt = _mpl()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, facecolor=fig.get_facecolor())
    size = tuple(int(round(v * DPI)) for v in fig.get_size_inches())
    plt.close(fig)
    return size


def slices_at(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices of a RAS+ volume through voxel ``centre``, display-oriented."""
    i, j, k = (int(c) for c in centre)
    return [vol[i, :, :].T, vol[:, j, :].T, vol[:, :, k].T]


def orthoslices(axes: Sequence, vol: np.ndarray, centre: Sequence[int], cmap: str = "gray", vmin: float | None = None,
                vmax: float | None = None, overlay: np.ndarray | None = None, overlay_color: str = "red",
                outline: np.ndarray | None = None) -> list:
    """Draw sagittal/coronal/axial slices of ``vol`` on three ``axes``.

    ``overlay`` (same shape, e.g. a lesion mask) is outlined in ``overlay_color``;
    ``outline`` (a brain mask) is drawn as a contour for orientation.
    """
    ims = []
    for ax, sl, ol, om in zip(axes, slices_at(vol, centre),
                              slices_at(overlay, centre) if overlay is not None else [None] * 3,
                              slices_at(outline, centre) if outline is not None else [None] * 3):
        ims.append(ax.imshow(sl, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"))
        if ol is not None and (ol > 0.5).any():  # outline, so the lesion itself stays visible
            ax.contour(ol.astype(float), levels=[0.5], colors=[overlay_color], linewidths=1.0)
        if om is not None:
            ax.contour(om.astype(float), levels=[0.5], colors="0.6", linewidths=0.6)
        ax.set_xticks([])
        ax.set_yticks([])
    return ims


def subject_montage(volumes: list, titles: list[str], path: str | Path, suptitle: str, overlays: list | None = None,
                    centres: list | None = None, vlim: tuple = (-3, 3)) -> tuple[int, int]:
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


def cohort_qc_figure(dataset_dir: str | Path, path: str | Path, n_per_sex: int = 3) -> tuple[int, int]:
    """QC montage of the first ``n_per_sex`` subjects of each sex of a prepared dataset."""
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


def lesion_examples_figure(dataset_dir: str | Path, path: str | Path, n: int = 4) -> tuple[int, int]:
    """Lesioned volumes (mask overlay, slices through a lesion), and lesion-free ones at the same slices.

    With matched pairs, the lesion-free rows are the twins of the first lesioned subjects.
    """
    ds = Dataset(dataset_dir)
    parts = ds.participants
    if "volume_id" not in parts:
        parts["volume_id"] = parts["subject"]
    les = pd.read_csv(ds.root / DATASET_FILES["lesions"], sep="\t", dtype={"subject": str})
    if "volume_id" not in les:
        les["volume_id"] = les["subject"]
    vols = ds.volumes
    masks = open_volumes(ds.root / DATASET_FILES["lesion_masks"])
    with_les = parts[parts["n_lesions"] > 0].head(n)
    twins = parts[(parts["n_lesions"] == 0) & parts["subject"].isin(with_les["subject"])].head(max(1, n // 2))
    if len(twins) == 0:
        twins = parts[parts["n_lesions"] == 0].head(max(1, n // 2))
    centre_of = {}
    vlist, olist, titles, centres = [], [], [], []
    for r in pd.concat([with_les, twins]).itertuples():
        vlist.append(np.asarray(vols[int(r.index)]))
        olist.append(np.asarray(masks[int(r.index)]).astype(np.float32))
        sub_les = les[les["volume_id"] == r.volume_id]
        if len(sub_les):
            first = sub_les.iloc[0]
            c = (int(first.i), int(first.j), int(first.k))
            centre_of[r.subject] = c
            shapes = ", ".join(sub_les["shape"].tolist())
            titles.append(f"{r.subject}: {r.lesion}\n{len(sub_les)} lesion(s): {shapes}")
        else:
            c = centre_of.get(r.subject, tuple(s // 2 for s in vlist[-1].shape))
            titles.append(f"{r.subject}: {r.lesion}\n(same slices, no lesion)")
        centres.append(c)
    label = str(parts["cohort"].iloc[0])
    return subject_montage(vlist, titles, path, f"Artificial lesions — {label} — red outline: lesion mask",
                           overlays=olist, centres=centres)


@_themed("notebook")
def learning_curve_figure(history: pd.DataFrame, metrics: dict, path: str | Path, title: str) -> tuple[int, int]:
    """Loss and validation balanced accuracy per epoch, with the test result in the legend."""
    plt = _mpl()

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
    return save(fig, path)


def _cell(vol, mask, centre):
    """Sagittal | coronal | axial slices side by side as one 2D array (and the mask's, for its outline)."""
    sl = slices_at(vol, centre)
    ml = slices_at(mask.astype(np.float32), centre)
    h = max(s.shape[0] for s in sl)

    def pad(a):
        out = np.full((h, a.shape[1]), np.nan, np.float32)
        out[: a.shape[0]] = a
        return out

    gap = np.full((h, 2), np.nan, np.float32)
    img = np.concatenate([pad(sl[0]), gap, pad(sl[1]), gap, pad(sl[2])], axis=1)
    msk = np.concatenate([pad(ml[0]), gap, pad(ml[1]), gap, pad(ml[2])], axis=1)
    return img, np.nan_to_num(msk)


def peak_voxel(vol: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.0) -> tuple:
    """Voxel of the largest smoothed |value| (where a visualization's structure is), inside ``mask``."""
    a = ndimage.gaussian_filter(np.abs(np.asarray(vol, np.float32)), sigma)
    if mask is not None:
        a = np.where(mask, a, 0)
    return np.unravel_index(int(np.argmax(a)), a.shape)


def featviz_grid_figure(volumes: np.ndarray, units: list, unit_labels: list[str], mask: np.ndarray | None,
                        path: str | Path, title: str) -> tuple[int, int]:
    """Units (rows) × regularizers (columns) of orthogonal slices through each visualization.

    ``volumes``: dict regularizer -> array (n_units, X, Y, Z). Each volume is divided by its robust
    maximum (99.5th percentile of |value|) so every panel shares the symmetric scale −1..1 (blue:
    the unit prefers a lower T1 signal, red: higher); grey lines outline the template brain. Slices
    go through each visualization's peak.
    """
    plt = _mpl()
    regs = list(volumes)
    n = len(units)
    cells = {}
    for r in regs:
        for i in range(n):
            v = np.asarray(volumes[r][i], np.float32)
            scale = np.percentile(np.abs(v[mask]) if mask.any() else np.abs(v), 99.5) or 1.0
            cells[r, i] = _cell(v / scale, mask, peak_voxel(v, mask))
    h, w = cells[regs[0], 0][0].shape
    cw, ch = 2.6, 2.6 * h / w
    fig, axes = plt.subplots(n, len(regs), figsize=(cw * len(regs) + 1.2, ch * n + 1.0), squeeze=False)
    im = None
    for j, r in enumerate(regs):
        for i in range(n):
            ax = axes[i, j]
            img, msk = cells[r, i]
            im = ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.contour(msk, levels=[0.5], colors="0.55", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("white")
            if i == 0:
                ax.set_title(r, fontsize=10)
            if j == 0:
                ax.set_ylabel(unit_labels[i], fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.92, top=1 - 0.7 / (ch * n + 1.0), bottom=0.02, wspace=0.03, hspace=0.05)
    cax = fig.add_axes([0.935, 0.25, 0.012, 0.5])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("activation-maximising input / robust max", fontsize=8)
    return save(fig, path)


@_themed("paper")
def metrics_figure(table: pd.DataFrame, path: str | Path, metrics: list[str] | None = None) -> tuple[int, int]:
    """Per-regularizer distributions of each metric (box + points), one row per metric, one column per task."""
    plt = _mpl()
    import seaborn as sns

    metrics = metrics or [m for m in ("act_matched_z", "stability", "lesion_ncc", "lesion_map_corr", "effect_corr",
                                      "tv_ratio", "hf_ratio", "energy_inside_mask")
                          if m in table and table[m].notna().any() and np.nanstd(table[m].to_numpy(float)) > 1e-9]
    tasks = list(dict.fromkeys(table["task"]))
    regs = list(dict.fromkeys(table["regularizer"]))
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(4.2 * len(tasks) + 1.5, 2.3 * len(metrics) + 0.6),
                             squeeze=False)
    for j, task in enumerate(tasks):
        sub = table[table["task"] == task]
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            d = sub[sub[m].notna()]
            if len(d):
                sns.boxplot(data=d, x="regularizer", y=m, order=regs, ax=ax, color="0.9", fliersize=0, width=0.6)
                sns.stripplot(data=d, x="regularizer", y=m, order=regs, hue="layer", ax=ax, size=3, dodge=False,
                              alpha=0.8, legend=(i == 0 and j == len(tasks) - 1))
            else:
                ax.text(0.5, 0.5, "not defined for this task", ha="center", va="center", transform=ax.transAxes,
                        color="0.5")
            ax.set_xlabel("")
            ax.set_ylabel(m.replace("_", " "))
            if i == 0:
                ax.set_title(f"task: {task}")
            if i < len(metrics) - 1:
                ax.set_xticklabels([])
            else:
                ax.tick_params(axis="x", rotation=30)
    handles = [a.get_legend() for a in axes.ravel() if a.get_legend() is not None]
    for lg in handles:
        lg.set_title("layer")
        sns.move_legend(lg.axes, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.suptitle("Regularizer comparison: each point is one unit's visualization")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return save(fig, path)


@_themed("paper")
def trajectories_figure(traj: pd.DataFrame, table: pd.DataFrame, path: str | Path) -> tuple[int, int]:
    """Objective over optimisation steps, relative to each unit's maximum on real test volumes."""
    plt = _mpl()
    import seaborn as sns

    keys = ["task", "layer", "regularizer", "unit"] + (["replicate"] if "replicate" in traj and "replicate" in table
                                                       else [])  # each trained replicate's units on their own
    t = traj.merge(table[keys + ["real_max"]], on=keys, how="left")
    t["relative"] = t["objective"] / t["real_max"].where(t["real_max"].abs() > 1e-8)
    tasks = list(dict.fromkeys(t["task"]))
    layers = list(dict.fromkeys(t["layer"]))
    fig, axes = plt.subplots(len(tasks), len(layers), figsize=(3.6 * len(layers) + 1.6, 2.8 * len(tasks) + 0.5),
                             squeeze=False, sharex=True)
    order = sorted(t["regularizer"].unique())
    legend_ax = None
    for i, task in enumerate(tasks):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            d = t[(t["task"] == task) & (t["layer"] == layer)]
            ax.set_title(f"{task} · {layer}", fontsize=9)
            if not len(d):  # a request this task does not run: said, not drawn as an empty plot
                ax.text(0.5, 0.5, "not visualised", ha="center", va="center", color="0.5", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            sns.lineplot(data=d, x="step", y="relative", hue="regularizer", hue_order=order, ax=ax,
                         errorbar=("pi", 50), legend=legend_ax is None)
            legend_ax = legend_ax or ax
            ax.axhline(1.0, color="0.3", ls=":", lw=1)
            ax.set_ylabel("objective / max over real volumes" if j == 0 else "")
    if legend_ax is not None and legend_ax.get_legend() is not None:
        sns.move_legend(legend_ax, "upper left", fontsize=7, title="preset")
    fig.suptitle("Activation during optimisation (median and interquartile range over units; dotted: best real volume)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, path)


@_themed("paper")
def models_figure(metrics: dict, histories: dict, path: str | Path) -> tuple[int, int]:
    """Validation balanced accuracy per epoch and test metrics of every trained model."""
    plt = _mpl()
    import seaborn as sns

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    rows = []
    for (task, role), h in histories.items():
        a1.plot(h["epoch"], h["val_balanced_accuracy"], "-o", ms=2.5, label=f"{task} ({role})")
    for (task, role), m in metrics.items():
        for k in ("balanced_accuracy", "roc_auc"):
            rows.append({"model": f"{task}\n{role}", "metric": k.replace("_", " "), "value": m["test"][k]})
    a1.set(xlabel="epoch", ylabel="validation balanced accuracy", ylim=(0.3, 1.02), title="learning curves")
    a1.legend(fontsize=7)
    df = pd.DataFrame(rows)
    sns.barplot(data=df, x="model", y="value", hue="metric", ax=a2)
    for c in a2.containers:
        a2.bar_label(c, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    a2.set(ylim=(0, 1.15), ylabel="held-out test", xlabel="", title="test performance")
    a2.tick_params(axis="x", labelrotation=45, labelsize=7)
    a2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, path)


def unit_labels(layer: str, units: list[int], classes: list | None = None,
                output_layer: str | None = "classifier") -> list[str]:
    """Row labels ``layer:unit``, with the class name for units of the model's output layer."""
    named = layer == output_layer and classes is not None
    return [f"{layer}:{u}" + (f"\n(logit '{classes[u]}')" if named and u < len(classes) else "") for u in units]


CONTROL_STYLE = {"randomized": ("#d95f02", "s", "re-initialised network"),
                 "other": ("#1b9e77", "^", "other task's model"),
                 "surrogate": ("#7570b3", "v", "phase-randomised copies")}
METRIC_LABELS = {"lesion_ncc": "lesion shape (NCC)", "lesion_hit": "lesion location (hit rate)",
                 "lesion_map_corr": "lesion evidence × lesion map (r)", "effect_corr": "regional sex effect (r)",
                 "effect_corr_full": "full sex-effect map (r)", "transfer_prob": "transfer p(intended class)"}


@_themed("paper")
def signal_null_figure(summary: pd.DataFrame, path: str | Path, metrics: list[str] | None = None) -> tuple[int, int]:
    """Ground-truth metrics per preset against their controls: one row of panels per task × metric, one panel
    per request that has the metric. Black: the trained model's visualizations (mean and 95 % interval,
    brainfv.report.stats); coloured markers: the same metric on the controls; the mark above a preset is
    the model-randomization check (✓: the paired gain over the re-initialised network has a CI above 0);
    dashed lines: attribution maps of the same model (positive control), where available; dotted: the base
    rate of lesion location."""
    plt = _mpl()
    s = summary.copy()
    if "class" in s:  # class-logit units are read per intended class: one panel each
        cls = s["class"].fillna("").astype(str)
        s["layer"] = s["layer"] + np.where(cls != "", " · " + cls, "")
    metrics = metrics or [m for m in METRIC_LABELS if m in set(s["metric"]) and m != "effect_corr_full"]
    attr = s[s["regularizer"].str.startswith("attribution:")]
    base = s[s["metric"] == "lesion_hit_base_rate"]
    s = s[~s["regularizer"].str.startswith("attribution:")]
    regs = list(dict.fromkeys(s["regularizer"]))
    rows = _signal_null_rows(s, metrics)
    ncol = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, squeeze=False,
                             figsize=(0.42 * len(regs) * ncol + 1.6 * ncol + 1.2, 2.3 * len(rows) + 0.9))
    for i, (task, metric, layers) in enumerate(rows):
        for j in range(ncol):
            if j >= len(layers):
                axes[i, j].set_axis_off()
                continue
            layer = layers[j]
            d = s[(s["task"] == task) & (s["metric"] == metric) & (s["layer"] == layer)].set_index("regularizer")
            _signal_null_panel(axes[i, j], d.reindex(regs), regs, metric, f"{task} · {layer}",
                               attr[(attr["task"] == task) & (attr["metric"] == metric) & (attr["layer"] == layer)],
                               base[(base["task"] == task) & (base["layer"] == layer)], first=j == 0)
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.995))
    fig.suptitle("Ground truth in the visualizations, against controls that cannot know it "
                 "(✓/✗: model-randomization check)", y=1.035, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    return save(fig, path)


def _signal_null_rows(s: pd.DataFrame, metrics: list[str]) -> list[tuple]:
    """The figure's rows: (task, metric, the requests that have the metric), in first-seen order."""
    rows = []
    for task in dict.fromkeys(s["task"]):
        for metric in metrics:
            layers = [lay for lay in dict.fromkeys(s["layer"])
                      if ((s["task"] == task) & (s["metric"] == metric) & (s["layer"] == lay)).any()]
            if layers:
                rows.append((task, metric, layers))
    return rows


def _signal_null_panel(ax: object, d: pd.DataFrame, regs: list[str], metric: str, title: str, attr: pd.DataFrame,
                       base: pd.DataFrame, first: bool) -> None:
    """One panel: the trained model's mean and CI per preset (``d``, indexed by preset), its controls, the
    attribution maps' values, the lesion base rate and the randomization check marks."""
    x = np.arange(len(regs))
    for k, (kind, (color, marker, label)) in enumerate(CONTROL_STYLE.items()):
        col = f"null_{kind}"
        if col in d and d[col].notna().any():
            ax.scatter(x + 0.14 * (k - 1), d[col], color=color, marker=marker, s=20, zorder=2, label=label,
                       facecolors="none" if kind == "surrogate" else color)
    err = np.vstack([d["mean"] - d["ci_low"], d["ci_high"] - d["mean"]])
    ax.errorbar(x, d["mean"], yerr=np.nan_to_num(err), fmt="o", color="black", ms=4, capsize=2, lw=1,
                zorder=3, label="trained model (mean, 95% CI)")
    for _, r in attr.iterrows():
        ax.axhline(r["mean"], color="0.35", ls="--", lw=0.8, zorder=1)
        ax.annotate(r["regularizer"].split(":", 1)[1].replace("_", " "), (1.0, r["mean"]),
                    xycoords=("axes fraction", "data"), fontsize=6, ha="right", va="bottom", color="0.35")
    if metric == "lesion_hit" and len(base):
        ax.axhline(float(base["mean"].iloc[0]), color="0.5", ls=":", lw=1, zorder=1, label="base rate")
    ax.margins(y=0.18)
    if metric in ("lesion_hit", "transfer_prob"):  # shares and probabilities: always on their full scale
        ax.set_ylim(-0.08, 1.12)
    lo, hi = ax.get_ylim()
    for xi, check in zip(x, d["randomization_check"]):
        if check in ("pass", "fail"):
            ax.text(xi, hi, "✓" if check == "pass" else "✗", ha="center", va="top", fontsize=8,
                    color="#1a9641" if check == "pass" else "#d7191c")
    ax.set_xticks(x)
    ax.set_xticklabels(regs, rotation=35, fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=8)
    if first:
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=8)
