"""Intervals and tests for the study's nested means, and the simulation that chose them.

A summary value is the mean of a metric over visualizations nested as independently trained replicates
(training seeds) → units → optimisation seeds. Its interval must cover the mean of that population, so the
top level that varies is the one whose spread counts: replicates when there are several, else units,
else seeds.

A neuron request probed at several positions (``featviz.layers[].positions``; a ``position_index`` column with
more than one value) has one more level, between units and seeds: :func:`grid` then returns (replicates, units,
positions, seeds) and the intervals see the seeds' mean within each position as the lowest level (seeds within a
position are averaged first, then positions within a unit, then units within a replicate): positions take the
place of seeds. With one position nothing changes.

Methods (``method`` arguments):

``t``          Student t over the top level's means (replicate means, else unit means, else the seeds'
               values): ``k`` means, ``k − 1`` degrees of freedom. The study's default: chosen by
               :func:`simulate_coverage` (run ``benchmarks/coverage.py``), which at the default study's numbers
               (1 unit × 16 seeds, 8 × 2 and 4 × 2 units × seeds) covers at 94-95 % for nominal 95 %.
``bootstrap``  hierarchical percentile bootstrap: replicates resampled, then units within them, then seeds
               within units (the study's earlier interval; about 80 % coverage over 4 values).
``bca``        ``scipy.stats.bootstrap`` (BCa) over the top level's means; compared in the simulation only.

Gains over several controls are read together (:func:`joint_gains`): the smallest mean gain is the
intersection–union statistic (a visualization beats *every* control only if it beats each one). Its 95 %
interval: lower bound the smallest of the controls' lower bounds (each at 97.5 % one-sided; the
intersection–union test needs no multiplicity correction), upper bound the smallest of the controls'
upper bounds each at 1 − 0.025/K (Bonferroni over the K controls, so that "the gain over some control
is below δ" is a claim at 97.5 % whatever the controls' correlation). With ``bootstrap`` the interval is
the percentile interval of the minimum over one joint resample (the same replicates, units and seeds for
every control). p-values are one-sided, for a gain above zero (``p_min_gain``: the largest of the
controls' p, the intersection–union p-value).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as st

__all__ = ["METHODS", "adjust", "collapse", "grid", "hierarchical_bootstrap", "joint_gains", "mean_interval",
           "simulate_coverage", "t_interval", "top_means"]

METHODS = ("t", "bootstrap", "bca")
LEVELS = ("replicate", "unit", "seed")
POSITION = "position_index"  # the level between unit and seed, where a request has several probe positions


def grid(df: pd.DataFrame, value: str) -> np.ndarray:
    """``df`` (columns ``unit``, ``seed``, optionally ``replicate``, and ``value``) as an array
    (replicates, units, seeds) with NaN where missing; with a ``position_index`` column of several values,
    (replicates, units, positions, seeds) (:func:`collapse` makes it three levels)."""
    d = df.assign(replicate=df.get("replicate", 0))
    if POSITION in d and d[POSITION].nunique() > 1:
        piv = d.pivot_table(index=["replicate", "unit", POSITION], columns="seed", values=value, aggfunc="mean",
                            dropna=False)
        reps, units, pos = (sorted(d[k].unique()) for k in ("replicate", "unit", POSITION))
        piv = piv.reindex([(r, u, q) for r in reps for u in units for q in pos])
        return piv.to_numpy(float).reshape(len(reps), len(units), len(pos), -1)
    piv = d.pivot_table(index=["replicate", "unit"], columns="seed", values=value, aggfunc="mean", dropna=False)
    reps = sorted(d["replicate"].unique())
    units = sorted(d["unit"].unique())
    piv = piv.reindex([(r, u) for r in reps for u in units])
    return piv.to_numpy(float).reshape(len(reps), len(units), -1)


def collapse(values: np.ndarray) -> np.ndarray:
    """A (replicates, units, positions, seeds) array as (replicates, units, positions): the mean of each
    position's seeds (NaNs ignored; NaN where a position has none). Fewer dimensions: unchanged."""
    v = np.asarray(values, float)
    if v.ndim < 4:
        return v
    ok = np.isfinite(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, v, 0).sum(-1) / ok.sum(-1)


def top_means(values: np.ndarray) -> np.ndarray:
    """The values a t interval is taken over: the replicates' means when more than one replicate has data,
    else the units' means when more than one unit has, else the seeds' values (NaNs ignored)."""
    v = np.asarray(values, float)
    v = v.reshape((1,) * (3 - v.ndim) + v.shape)
    ok = np.isfinite(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.where(ok, v, 0).sum((1, 2)) / ok.sum((1, 2))
        if np.isfinite(reps).sum() > 1:
            return reps[np.isfinite(reps)]
        v, ok = v[np.isfinite(reps)], ok[np.isfinite(reps)]
        if not len(v):
            return np.array([])
        units = np.where(ok[0], v[0], 0).sum(1) / ok[0].sum(1)
    if np.isfinite(units).sum() > 1:
        return units[np.isfinite(units)]
    return v[0][ok[0]]


def t_interval(top: np.ndarray, level: float = 0.95,
               tail: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``top`` (…, k) over its last axis with its t interval and one-sided p (mean > 0).
    ``tail``: the one-sided miss probability of each bound (default (1 − level) / 2).
    Returns arrays ``(mean, low, high, p)``; k < 2 gives NaN bounds and p."""
    top = np.asarray(top, float)
    k = top.shape[-1]
    tail = (1 - level) / 2 if tail is None else tail
    mean = top.mean(-1) if k else np.full(top.shape[:-1], np.nan)
    if k < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy(), nan.copy()
    se = top.std(-1, ddof=1) / np.sqrt(k)
    half = st.t.ppf(1 - tail, k - 1) * se
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(se > 0, st.t.sf(mean / np.where(se > 0, se, 1), k - 1), np.where(mean > 0, 0.0, 1.0))
    return mean, mean - half, mean + half, p


def _resample_index(shape, n_boot, rng):
    """Indices of a hierarchical resample of an array (replicates, units, seeds)."""
    nr, nu, ns = shape
    r = rng.integers(0, nr, size=(n_boot, nr)) if nr > 1 else np.zeros((n_boot, 1), int)
    u = rng.integers(0, nu, size=(n_boot, nr, nu))
    s = rng.integers(0, ns, size=(n_boot, nr, nu, ns))
    return r[..., None, None], u[..., None], s


def hierarchical_bootstrap(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` hierarchical resamples of ``values`` (…, replicates, units, seeds), NaN = missing,
    the same resample for every leading index (a joint resample): array (n_boot, …)."""
    v = np.asarray(values, float)
    v = v.reshape((1,) * (3 - v.ndim) + v.shape) if v.ndim < 3 else v
    rng = np.random.default_rng(seed)
    r, u, s = _resample_index(v.shape[-3:], n_boot, rng)
    sample = v[..., r, u, s]                                  # (…, n_boot, R, U, S)
    ok = np.isfinite(sample)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(ok, sample, 0).sum((-1, -2, -3)) / ok.sum((-1, -2, -3))
    return np.moveaxis(means, -1, 0)


def mean_interval(values: np.ndarray, method: str = "t", level: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> tuple[float, float, float, float, int]:
    """Mean of ``values`` (array replicates × units × seeds, or units × seeds, or replicates × units × positions ×
    seeds; NaN = missing) with its interval and one-sided p for a mean above zero: ``(mean, low, high, p, n)``,
    ``n`` the number of finite values."""
    v = np.asarray(values, float)
    n = int(np.isfinite(v).sum())
    v = collapse(v)
    if n == 0:
        return np.nan, np.nan, np.nan, np.nan, 0
    top = top_means(v)
    mean, lo, hi, p = (float(x) for x in t_interval(top, level))
    if method == "bootstrap" and len(top) > 1:
        b = hierarchical_bootstrap(v, n_boot, seed)
        b = b[np.isfinite(b)]
        a = (1 - level) / 2
        lo, hi = float(np.quantile(b, a)), float(np.quantile(b, 1 - a))
        p = float((b <= 0).mean())
    elif method not in ("t", "bootstrap"):
        raise ValueError(f"compare.interval: unknown method {method!r} (t or bootstrap)")
    return mean, lo, hi, p, n


def joint_gains(gains: dict[str, np.ndarray], method: str = "t", level: float = 0.95, n_boot: int = 2000,
                seed: int = 0) -> tuple[dict[str, tuple[float, ...]], tuple[float, float, float, float]]:
    """Each control's mean gain and the smallest of them, read together (see the module docstring).

    ``gains``: dict control -> array (replicates, units, seeds) of paired gains, all of one shape (the same
    visualizations). Returns ``(per_control, smallest)``: dict control -> ``(mean, low, high, p)`` and the
    tuple ``(min_gain, low, high, p)`` (NaNs when no control has values)."""
    gains = {k: collapse(g) for k, g in gains.items()}  # several probe positions: seeds averaged within each
    kinds = [k for k, g in gains.items() if np.isfinite(g).any()]
    per = {}
    for k in kinds:
        per[k] = mean_interval(gains[k], method, level, n_boot, seed)[:4]
    if not kinds:
        return per, (np.nan,) * 4
    est = min(per[k][0] for k in kinds)
    if method == "bootstrap":
        b = hierarchical_bootstrap(np.stack([gains[k] for k in kinds]), n_boot, seed).min(1)
        b = b[np.isfinite(b)]
        a = (1 - level) / 2
        if len(b):
            return per, (est, float(np.quantile(b, a)), float(np.quantile(b, 1 - a)), float((b <= 0).mean()))
        return per, (est, np.nan, np.nan, np.nan)
    tail = (1 - level) / 2
    lo = min(per[k][1] for k in kinds)
    hi = min(float(t_interval(top_means(gains[k]), tail=tail / len(kinds))[2]) for k in kinds)
    p = max(per[k][3] for k in kinds)
    return per, (est, lo, hi, p)


def adjust(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) of the finite ``p``;
    NaN stays NaN."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = st.false_discovery_control(p[ok], method="bh")
    return out


def _draw(rng, dist, size):
    if dist == "normal":
        return rng.standard_normal(size)
    if dist == "skewed":  # standardised gamma(2): skewness 1.4 (bounded metrics near a floor or ceiling)
        return (rng.gamma(2.0, size=size) - 2.0) / np.sqrt(2.0)
    raise ValueError(f"dist: {dist!r} (normal or skewed)")


def simulate_coverage(replicates: int, units: int, seeds: int, methods: Sequence[str] = METHODS,
                      n_studies: int = 2000, sd: tuple[float, float, float] = (1.0, 1.0, 1.0), dist: str = "normal",
                      level: float = 0.95, n_boot: int = 1000, seed: int = 0, controls: int = 1) -> dict[str, float]:
    """The share of ``n_studies`` simulated studies whose interval covers the true mean, per method.

    Each study has ``replicates × units × seeds`` values: true mean 0, plus a replicate effect, a unit
    effect within the replicate and a seed effect within the unit with standard deviations ``sd`` (drawn
    from ``dist``: normal or a skewed gamma). ``controls`` > 1 simulates that many gains with the same
    mean (the hardest case for their minimum), correlated through shared unit and replicate effects, and
    scores the interval of their minimum (:func:`joint_gains`'s construction). Vectorised; ``bca`` uses
    ``scipy.stats.bootstrap`` over the top level's means (NaN: it needs 3 of them). Returns dict method ->
    coverage."""
    rng = np.random.default_rng(seed)
    shape = (n_studies, replicates, units, seeds)
    sr, su, ss = sd

    def study():  # values (studies, R, U, S) and the mean they estimate (effects above the varying top fixed)
        rep = sr * _draw(rng, dist, (n_studies, replicates, 1, 1))
        unit = su * _draw(rng, dist, (n_studies, replicates, units, 1))
        v = rep + unit + ss * _draw(rng, dist, shape)
        truth = 0.0 if replicates > 1 else rep[:, 0, 0, 0] if units > 1 else (rep + unit)[:, 0, 0, 0]
        return v, truth + np.zeros(n_studies)

    base, base_truth = study()
    vals, truths = [], []
    for _ in range(controls):
        v, t = study() if controls > 1 else (0.0, 0.0)
        vals.append(base + v)
        truths.append(base_truth + t)
    vals = np.stack(vals, 1)                              # (studies, K, R, U, S)
    truth = np.min(truths, 0)                             # the smallest of the K true mean gains
    top = vals.mean((-1, -2)) if replicates > 1 else vals.mean(-1)[..., 0, :] if units > 1 else vals[..., 0, 0, :]
    out = {}
    a = (1 - level) / 2
    for m in methods:
        if m == "t":
            lo, hi = t_interval(top, level)[1], t_interval(top, tail=a / controls)[2]
            lo, hi = lo.min(1), hi.min(1)
        elif m == "bootstrap":
            lo, hi = np.empty(n_studies), np.empty(n_studies)
            for i in range(0, n_studies, 100):
                b = hierarchical_bootstrap(vals[i:i + 100], n_boot, seed + i).min(-1)   # (n_boot, studies)
                lo[i:i + 100], hi[i:i + 100] = np.quantile(b, a, 0), np.quantile(b, 1 - a, 0)
        elif m == "bca":
            if controls > 1:
                raise ValueError("bca: one control only")
            k = top.shape[-1]
            if k < 3:
                lo = hi = np.full(n_studies, np.nan)
            else:
                with np.errstate(all="ignore"):
                    res = st.bootstrap((top[:, 0],), np.mean, axis=-1, vectorized=True, method="BCa",
                                       confidence_level=level, n_resamples=n_boot, random_state=rng)
                lo, hi = res.confidence_interval.low, res.confidence_interval.high
        else:
            raise ValueError(f"method: {m!r} (one of {METHODS})")
        out[m] = float(np.mean((lo <= truth) & (truth <= hi))) if np.isfinite(lo).any() else float("nan")
    return out
