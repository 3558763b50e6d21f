"""Reading a metric against its controls: paired nulls, calibrated scores and bootstrap confidence intervals.

A ground-truth metric of a visualization means something only next to what the same metric gives when
nothing was learned. For every visualization (a unit × optimisation seed of a task's layer under a
preset) the study computes the metric on:

- ``randomized``: the same request optimised on the network with re-initialised weights (Adebayo et al.
  2018's model-randomization check);
- ``other``: the same request (same preset, seeds, steps, units) optimised on a model that cannot know the
  target (another task's model);
- ``surrogate``: phase-randomised copies of the visualization itself (same amplitude spectrum).

Each control is paired with the visualization it mirrors (same unit and seed, and trained replicate when
there are several), so a *gain* (trained minus control) is computed per visualization and averaged;
intervals and one-sided p-values come from :mod:`brainfv.report.stats` (t over the top level's means by
default, chosen by simulated coverage). A visualization beats its controls only if it beats every one:
``min_gain``, the smallest of the gains, with its interval (the intersection–union test). A metric whose
smallest gain is not above zero measures the preset, not the model.

:func:`judge` reads the summary against the questions named before the run (config ``report``): primary
endpoints get a verdict (present / absent below the smallest effect of interest / undecided), every other
row a Benjamini–Hochberg adjusted p-value.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError
from . import stats

__all__ = ["CONTROLS", "bootstrap_mean", "judge", "paired_table", "sanity_table", "summarise", "verdict"]

CONTROLS = ("randomized", "other", "surrogate")


GROUP = ["task", "layer", "regularizer", "class"]
MIN_GAIN = 1e-3  # the randomization check passes when the gain's CI lies above this: a smaller difference of a
# correlation or a probability is no signal (two saturated probabilities, 0.99999 vs 0.99998, must not pass)


def _with_class(df):
    """``df`` with a ``class`` column: its ``intended_class`` ('' where there is none)."""
    cls = df["intended_class"] if "intended_class" in df else pd.Series("", index=df.index)
    return df.assign(**{"class": cls.fillna("").astype(str)})


def bootstrap_mean(values: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of ``values`` (array units × seeds or replicates × units × seeds, NaN = missing) and its
    hierarchical percentile bootstrap CI: ``(mean, low, high, n)``, ``n`` the number of finite values.
    (The summary's intervals are t intervals: :mod:`brainfv.report.stats` says why.)"""
    mean, lo, hi, _, n = stats.mean_interval(values, "bootstrap", level, n_boot, seed)
    return mean, lo, hi, n


def paired_table(trained: pd.DataFrame, controls: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per trained visualization: each metric, its paired control values and calibrated scores.

    ``trained``: rows (task, layer, regularizer, unit, seed, optionally replicate: the trained network's
    training seed, metrics...). ``controls``: rows with the same
    keys plus ``control`` in :data:`CONTROLS` (surrogates may have several rows per visualization: they are
    averaged). Adds, per metric ``m``: ``m_<control>`` (the paired control's value), ``m_z`` (distance from
    the pooled randomized/other control values of the same task, layer, preset, class and probe position
    (``position_index``, where ``trained`` has one: a control's own, else that of the visualization with its
    keys; a position's null is then about 1/K of the request's controls, so ``m_z`` is noisier), in their SD) and
    ``m_pct`` (the share of those control values below it).
    """
    keys = ["task", "layer", "regularizer", "unit", "seed"]
    if "replicate" in trained and "replicate" in controls:
        keys.append("replicate")
    where = None
    if stats.POSITION in trained:  # the pairing needs a visualization's keys to name one probe position
        where = trained[keys + [stats.POSITION]].drop_duplicates()
        twice = where[where.duplicated(keys, keep=False)]
        if len(twice):
            raise ValueError(f"paired_table: the same {', '.join(keys)} at several probe positions "
                             f"({twice.head(3).to_dict('records')}): seeds must be unique across positions")
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
    group = list(GROUP)
    if where is not None:  # a probe position is its own null: each reads a different crop of the brain
        if stats.POSITION not in pooled:  # controls that do not say: the position of the visualization they pair with
            pooled = pooled.merge(where, on=keys, how="left")
        group.append(stats.POSITION)
    for m in metrics:
        z = np.full(len(out), np.nan)
        pct = np.full(len(out), np.nan)
        if m in pooled:
            for values, idx in out.groupby(group, dropna=False).groups.items():
                same = np.ones(len(pooled), bool)
                for col, v in zip(group, values):
                    same &= (pooled[col].isna() if pd.isna(v) else pooled[col] == v).to_numpy()
                null = pooled.loc[same, m].to_numpy(float)
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


def summarise(paired: pd.DataFrame, metrics: Sequence[str], n_boot: int = 2000, seed: int = 0, method: str = "t",
              level: float = 0.95) -> pd.DataFrame:
    """One row per task × layer × preset × class × metric: ``n`` (visualizations with a value), ``n_undefined``
    (those whose metric is undefined, NaN), ``converged_share`` (of the visualizations, those whose optimisation
    met the plateau criterion), ``mean`` with its interval (``ci_low``,
    ``ci_high``), each control's mean (``null_<control>``), the paired gain over each control with its
    interval and one-sided p (``gain_<control>``, ``_low``, ``_high``, ``p_gain_<control>``), the smallest of
    those gains over every control present (``controls``) with its interval and intersection–union p
    (``min_gain``, ``min_gain_lo``, ``min_gain_hi``, ``p_min_gain``), ``z`` (the mean of ``m_z``: distance
    from the pooled controls in their SD, see :func:`paired_table`) and the randomization check. Intervals and
    p: :mod:`brainfv.report.stats` (``method`` t or bootstrap), over trained replicates (a ``replicate``
    column), units and seeds (and probe positions between units and seeds where a ``position_index`` column
    has several: ``n_positions``).

    ``class`` is the intended class of class-logit units (``intended_class``; its visualizations are read on
    their own: a 'present' and an 'absent' logit answer different questions) and empty for other units."""
    rows = []
    nan4 = (np.nan,) * 4
    positions = stats.POSITION in paired and paired[stats.POSITION].nunique() > 1  # a level only where it varies
    for (task, layer, reg, cls), g in _with_class(paired).groupby(GROUP, sort=False):
        for m in metrics:
            if m not in g or not np.isfinite(g[m].to_numpy(float)).any():
                continue
            mean, lo, hi, _, n = stats.mean_interval(stats.grid(g, m), method, level, n_boot, seed)
            row = {"task": task, "layer": layer, "regularizer": reg, "class": cls, "metric": m, "n": n,
                   "n_undefined": int(g[m].isna().sum()),  # e.g. a correlation of a constant image: not a 0
                   "converged_share": float(g["converged"].astype(float).mean()) if "converged" in g else np.nan,
                   "n_units": g["unit"].nunique(),
                   "n_replicates": g["replicate"].nunique() if "replicate" in g else 1,
                   **({"n_positions": g[stats.POSITION].nunique()} if positions else {}),
                   "mean": mean, "ci_low": lo, "ci_high": hi}
            gains = {}
            for kind in CONTROLS:
                col = f"{m}_{kind}"
                if col in g and np.isfinite(g[col].to_numpy(float)).any():
                    row[f"null_{kind}"] = stats.mean_interval(stats.grid(g, col), "t")[0]
                    gains[kind] = stats.grid(g.assign(_d=g[m] - g[col]), "_d")
                else:
                    row[f"null_{kind}"] = np.nan
            per, smallest = stats.joint_gains(gains, method, level, n_boot, seed)
            for kind in CONTROLS:
                gm, gl, gh, gp = per.get(kind, nan4)
                row.update({f"gain_{kind}": gm, f"gain_{kind}_low": gl, f"gain_{kind}_high": gh, f"p_gain_{kind}": gp})
            row["controls"] = ",".join(per)
            row.update(zip(["min_gain", "min_gain_lo", "min_gain_hi", "p_min_gain"], smallest))
            z = g[f"{m}_z"].to_numpy(float) if f"{m}_z" in g else np.array([np.nan])
            row["z"] = float(np.nanmean(z)) if np.isfinite(z).any() else np.nan
            row["randomization_check"] = ("pass" if row["gain_randomized_low"] > MIN_GAIN else "fail") \
                if np.isfinite(row["gain_randomized_low"]) else "no control"
            rows.append(row)
    return pd.DataFrame(rows)


def _matches(summary, endpoint):
    """Rows of ``summary`` a primary endpoint (config ``report.primary[]``) names."""
    s = summary
    sel = (s["task"] == endpoint["task"]) & (s["layer"] == endpoint["request"]) & (s["metric"] == endpoint["metric"])
    sel &= ~s["regularizer"].astype(str).str.startswith("attribution:")
    if endpoint.get("class") is not None:
        sel &= s["class"].fillna("").astype(str) == str(endpoint["class"])
    if endpoint.get("regularizer") is not None:
        sel &= s["regularizer"].isin(endpoint["regularizer"])
    return sel


def verdict(lo: float, hi: float, delta: float) -> str:
    """A primary endpoint's verdict from the 95 % interval ``[lo, hi]`` of its smallest gain over every control:
    present (lo > 0: above every control, by any amount; whether it reaches δ is said beside it), absent
    (hi < δ: any effect over the weakest control is below the smallest effect of interest) or undecided."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undecided (no interval)"
    if lo > 0:
        return "present"
    if hi < delta:
        return f"absent (< {delta:g}, upper 95 % bound {hi:.3f})"
    return "undecided"


def judge(summary: pd.DataFrame, primary: Sequence[dict],
          sesoi: dict[str, float]) -> tuple[pd.DataFrame, list[dict]]:
    """``summary`` with the questions named before the run (config ``report``): ``primary`` (the row belongs
    to an endpoint of ``primary``), ``sesoi`` (the metric's smallest effect of interest), ``verdict`` (primary
    rows, :func:`verdict`) and ``p_adj``: for primary rows their own ``p_min_gain`` (each tested at 95 %),
    for every other row with a p the Benjamini–Hochberg adjusted ``p_min_gain`` over all of them (a false
    discovery rate: the secondary rows are a screen, not claims one by one) — except rows whose smallest gain
    lacks a kind of control the study has (NaN; a primary one is "undecided: no … control"), positive
    controls and attribution rows (NaN: not in the family). Also returns the endpoints that matched no row."""
    s = summary.copy()
    s["primary"] = False
    missing = []
    for i, e in enumerate(primary):
        if e["metric"] not in sesoi:
            raise ConfigError(f"report.primary[{i}]: metric {e['metric']!r} has no report.sesoi entry "
                              f"(has: {sorted(sesoi)})")
        sel = _matches(s, e) if len(s) else pd.Series(dtype=bool)
        if not sel.any():
            missing.append(e)
        s.loc[sel[sel].index, "primary"] = True
    s["sesoi"] = s["metric"].map(sesoi).astype(float) if len(s) else np.nan
    missing_controls = _missing_controls(s)
    s["verdict"] = [("undecided: no " + "/".join(m) + " control" if m else verdict(r.min_gain_lo, r.min_gain_hi,
                                                                                   r.sesoi)) if r.primary else ""
                    for r, m in zip(s.itertuples(), missing_controls)]
    p = s["p_min_gain"].to_numpy(float) if len(s) else np.array([])
    family = ~s["primary"].to_numpy(bool) & np.array([not m for m in missing_controls], bool) & _screened(s)
    adj = stats.adjust(np.where(family, p, np.nan)) if len(s) else p
    s["p_adj"] = np.where(s["primary"], p, np.where(family, adj, np.nan))
    return s, missing


def _missing_controls(s: pd.DataFrame) -> list[list[str]]:
    """Per row, the kinds of control that other rows of the study have and it lacks: its smallest gain is
    then not over every control (e.g. a request the other task does not visualise)."""
    if "controls" not in s or not len(s):
        return [[] for _ in range(len(s))]
    kinds = [set(str(c).split(",")) - {"", "nan"} for c in s["controls"]]
    full = set().union(*kinds)
    return [sorted(full - k) for k in kinds]


def _screened(s: pd.DataFrame) -> np.ndarray:
    """Rows in the Benjamini–Hochberg family: the trained and given models' visualizations; not the positive
    controls (built to be found, they would loosen the threshold for the rest; their own table reports them) nor
    the attribution maps (a reference, not a preset)."""
    ok = ~s["regularizer"].astype(str).str.startswith("attribution")
    if "model" in s:
        ok &= s["model"].astype(str) != "positive control"
    return ok.to_numpy(bool)


def sanity_table(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The model-randomization check per task × layer × preset for the ground-truth ``metrics``: trained and
    randomized means, the paired gain with its CI, and pass (the CI's lower bound is above :data:`MIN_GAIN`)
    or fail."""
    cols = ["task", "layer", "regularizer", "class", "metric", "n", "mean", "null_randomized", "gain_randomized",
            "gain_randomized_low", "gain_randomized_high", "randomization_check"]
    s = summary[summary["metric"].isin(metrics)]
    return s[[c for c in cols if c in s]].reset_index(drop=True)
