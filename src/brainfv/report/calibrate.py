"""Reading a metric against its controls: paired nulls, calibrated scores and bootstrap confidence intervals.

A ground-truth metric of a visualization means something only next to what the same metric gives when
nothing was learned. For every visualization (a unit × optimisation seed of a task's layer under a
preset) the study computes the metric on:

- ``randomized``: the same request optimised on the network with re-initialised weights (Adebayo et al.
  2018's model-randomization check);
- ``other``: the same request (same preset, seeds, steps, units) optimised on a model that cannot know the
  target (another task's model);
- ``surrogate``: phase-randomised copies of the visualization itself (same amplitude spectrum).

Each control is paired with the visualization it mirrors (same unit and seed), so a *gain* (trained minus
control) is computed per visualization and averaged; confidence intervals come from a hierarchical
bootstrap over units, then seeds within units. A metric whose gain over a control is not above zero
measures the preset, not the model.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["CONTROLS", "bootstrap_mean", "paired_table", "summarise", "sanity_table"]

CONTROLS = ("randomized", "other", "surrogate")


GROUP = ["task", "layer", "regularizer", "class"]
MIN_GAIN = 1e-3  # the randomization check passes when the gain's CI lies above this: a smaller difference of a
# correlation or a probability is no signal (two saturated probabilities, 0.99999 vs 0.99998, must not pass)


def _with_class(df):
    """``df`` with a ``class`` column: its ``intended_class`` ('' where there is none)."""
    cls = df["intended_class"] if "intended_class" in df else pd.Series("", index=df.index)
    return df.assign(**{"class": cls.fillna("").astype(str)})


def _grid(df, value):
    """``df`` (columns unit, seed, value) as an array (units, seeds) with NaN where missing."""
    piv = df.pivot_table(index="unit", columns="seed", values=value, aggfunc="mean")
    return piv.to_numpy(float)


def bootstrap_mean(values, n_boot=2000, seed=0, level=0.95):
    """Mean of ``values`` (array units × seeds, NaN = missing) and its bootstrap CI.

    Units are resampled with replacement, then seeds within each resampled unit; NaNs are ignored.
    Returns ``(mean, low, high, n)`` with ``n`` the number of finite values (NaNs when there are none).
    """
    v = np.atleast_2d(np.asarray(values, float))
    finite = np.isfinite(v)
    n = int(finite.sum())
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    keep = finite.any(1)
    v, finite = v[keep], finite[keep]
    mean = float(np.nanmean(v))
    if n == 1:
        return mean, float("nan"), float("nan"), n
    rng = np.random.default_rng(seed)
    nu, ns = v.shape
    units = rng.integers(0, nu, size=(n_boot, nu))
    seeds = rng.integers(0, ns, size=(n_boot, nu, ns))
    sample = v[units[..., None], seeds]            # (n_boot, nu, ns)
    ok = finite[units[..., None], seeds]
    with np.errstate(invalid="ignore"):
        means = np.where(ok, sample, 0).sum((1, 2)) / ok.sum((1, 2))
    means = means[np.isfinite(means)]
    a = (1 - level) / 2
    return mean, float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), n


def paired_table(trained, controls, metrics):
    """Per trained visualization: each metric, its paired control values and calibrated scores.

    ``trained``: rows (task, layer, regularizer, unit, seed, metrics...). ``controls``: rows with the same
    keys plus ``control`` in :data:`CONTROLS` (surrogates may have several rows per visualization: they are
    averaged). Adds, per metric ``m``: ``m_<control>`` (the paired control's value), ``m_z`` (distance from
    the pooled randomized/other control values of the same task, layer and preset, in their SD) and
    ``m_pct`` (the share of those control values below it).
    """
    keys = ["task", "layer", "regularizer", "unit", "seed"]
    out = trained.copy()
    for kind in CONTROLS:
        sub = controls[controls["control"] == kind]
        if len(sub) == 0:
            for m in metrics:
                out[f"{m}_{kind}"] = np.nan
            continue
        avg = sub.groupby(keys, as_index=False)[[m for m in metrics if m in sub]].mean()
        avg = avg.rename(columns={m: f"{m}_{kind}" for m in metrics})
        out = out.merge(avg, on=keys, how="left")
    pooled = _with_class(controls[controls["control"].isin(["randomized", "other"])])
    out = _with_class(out)
    for m in metrics:
        z = np.full(len(out), np.nan)
        pct = np.full(len(out), np.nan)
        if m in pooled:
            for (t, lay, r, c), idx in out.groupby(GROUP).groups.items():
                null = pooled.loc[(pooled["task"] == t) & (pooled["layer"] == lay) & (pooled["regularizer"] == r)
                                  & (pooled["class"] == c), m].to_numpy(float)
                null = null[np.isfinite(null)]
                if len(null) < 2:
                    continue
                x = out.loc[idx, m].to_numpy(float)
                sd = null.std(ddof=1)
                z[out.index.get_indexer(idx)] = (x - null.mean()) / sd if sd > 0 else np.nan
                pct[out.index.get_indexer(idx)] = [(null < xi).mean() + 0.5 * (null == xi).mean()
                                                   if np.isfinite(xi) else np.nan for xi in x]
        out[f"{m}_z"] = z
        out[f"{m}_pct"] = pct
    return out


def summarise(paired, metrics, n_boot=2000, seed=0):
    """One row per task × layer × preset × class × metric: the mean with its 95 % CI, each control's mean,
    the paired gain over each control with its CI, the calibrated score (the gain over the strongest control,
    i.e. the one with the highest mean) and ``z`` (mean distance from the pooled controls in their SD).

    ``class`` is the intended class of class-logit units (``intended_class``; its visualizations are read on
    their own: a 'present' and an 'absent' logit answer different questions) and empty for other units."""
    rows = []
    for (task, layer, reg, cls), g in _with_class(paired).groupby(GROUP, sort=False):
        for m in metrics:
            if m not in g or not np.isfinite(g[m].to_numpy(float)).any():
                continue
            mean, lo, hi, n = bootstrap_mean(_grid(g, m), n_boot, seed)
            row = {"task": task, "layer": layer, "regularizer": reg, "class": cls, "metric": m, "n": n,
                   "n_units": g["unit"].nunique(),
                   "mean": mean, "ci_low": lo, "ci_high": hi}
            strongest = None
            for kind in CONTROLS:
                col = f"{m}_{kind}"
                if col not in g or not np.isfinite(g[col].to_numpy(float)).any():
                    row.update({f"null_{kind}": np.nan, f"gain_{kind}": np.nan, f"gain_{kind}_low": np.nan,
                                f"gain_{kind}_high": np.nan})
                    continue
                nm, _, _, _ = bootstrap_mean(_grid(g, col), n_boot, seed)
                d = g.assign(_d=g[m] - g[col])
                gm, gl, gh, _ = bootstrap_mean(_grid(d, "_d"), n_boot, seed)
                row.update({f"null_{kind}": nm, f"gain_{kind}": gm, f"gain_{kind}_low": gl, f"gain_{kind}_high": gh})
                if strongest is None or nm > row[f"null_{strongest}"]:
                    strongest = kind
            row["strongest_control"] = strongest or ""
            for k in ("", "_low", "_high"):
                row[f"calibrated{k}"] = row[f"gain_{strongest}{k}"] if strongest else np.nan
            z = g[f"{m}_z"].to_numpy(float) if f"{m}_z" in g else np.array([np.nan])
            row["z"] = float(np.nanmean(z)) if np.isfinite(z).any() else np.nan
            row["randomization_check"] = ("pass" if row.get("gain_randomized_low", np.nan) > MIN_GAIN else "fail") \
                if np.isfinite(row.get("gain_randomized_low", np.nan)) else "no control"
            rows.append(row)
    return pd.DataFrame(rows)


def sanity_table(summary, metrics):
    """The model-randomization check per task × layer × preset for the ground-truth ``metrics``: trained and
    randomized means, the paired gain with its CI, and pass (the CI's lower bound is above :data:`MIN_GAIN`)
    or fail."""
    cols = ["task", "layer", "regularizer", "class", "metric", "n", "mean", "null_randomized", "gain_randomized",
            "gain_randomized_low", "gain_randomized_high", "randomization_check"]
    s = summary[summary["metric"].isin(metrics)]
    return s[[c for c in cols if c in s]].reset_index(drop=True)
