"""The study's findings, written from ``summary.tsv`` and never typed: ``report/findings.md`` and the README block.

:func:`render` turns a judged summary (:func:`brainfv.report.calibrate.judge`) into Markdown: each primary
endpoint (config ``report.primary``) with its verdict, estimate (the smallest gain over every control),
95 % interval, p and adjusted p, then the secondary rows that survive the Benjamini–Hochberg correction.
:func:`update_readme` copies that text between the README's markers::

    python -m brainfv.report.findings results/report/findings.md README.md
"""
from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["ALPHA", "END", "START", "fmt", "fmt_p", "fmt_share", "read_block", "render", "update_readme",
           "per_head_lines", "recovery_lines"]

ALPHA = 0.05
START, END = "<!-- findings:start -->", "<!-- findings:end -->"


def fmt(x: float) -> str:
    """A summary number as the findings print it (3 decimals; 'n/a' when missing)."""
    return "n/a" if not np.isfinite(x) else f"{x:.3f}"


def fmt_p(p: float) -> str:
    """A p-value as the findings print it ('< 0.001' below 0.001, else 3 decimals)."""
    if not np.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_text(label: str, p: float) -> str:
    """``label = p`` as the findings print it (``label < 0.001`` below 0.001)."""
    v = fmt_p(p)
    return f"{label} {v}" if v.startswith("<") else f"{label} = {v}"


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def _name(r):
    cls = f" · {r['class']}" if isinstance(r["class"], str) and r["class"] else ""
    return f"{r['task']} · {r['layer']}{cls} · {r['regularizer']} · {r['metric']}"


def _primary_line(r):
    delta = r["sesoi"]
    size = ""
    if str(r["verdict"]).startswith("present"):
        size = f"; at least δ = {delta:g}" if r["min_gain_lo"] >= delta else \
            (f"; below δ = {delta:g} (upper bound {fmt(r['min_gain_hi'])})" if r["min_gain_hi"] < delta
             else f"; may be below δ = {delta:g}")
    controls = ", ".join(str(r["controls"]).split(",")) if isinstance(r["controls"], str) and r["controls"] else "none"
    return (f"- **{_name(r)}**: {r['verdict']}{size} — smallest gain over every control ({controls}) "
            f"{fmt(r['min_gain'])} [{fmt(r['min_gain_lo'])}, {fmt(r['min_gain_hi'])}], {p_text('p', r['p_min_gain'])}, "
            f"{p_text('adjusted p', r['p_adj'])}; mean {fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] "
            f"over {_plural(int(r['n']), 'visualization')} ({_plural(int(r['n_units']), 'unit')}, "
            f"{_plural(int(r.get('n_replicates', 1)), 'trained network')})")


#: what the per-head table reads on the lesion models' 'present' logit: shape and location of the dark lesions
LESION_ASPECTS = (("shape", "lesion_ncc"), ("location", "lesion_map_corr"), ("hits", "lesion_hit"))
#: how a positive control's recovery of its known pattern is measured, per target
RECOVERY = ("known_corr", "lesion_ncc", "lesion_hit", "lesion_map_corr")


def _gain_cell(r):
    if r is None:
        return "—"
    return f"{fmt(r['min_gain'])} [{fmt(r['min_gain_lo'])}, {fmt(r['min_gain_hi'])}]"


def _class_logit_rows(s):
    """The class-logit visualizations (not a contrast or probability request, nor an attribution map)."""
    logit = ~s["layer"].astype(str).str.contains(r"-(?:contrast|probability)$")
    return s[logit & ~s["regularizer"].astype(str).str.startswith("attribution")]


def _row(s, metric):
    m = s[s["metric"] == metric]
    return m.iloc[0] if len(m) else None


def per_head_lines(s: pd.DataFrame) -> list[str]:
    """Per network head and preset: whether the trained lesion models' 'present' logit shows dark lesions of
    the planted shape and where they were planted — the smallest gain over every control, with its interval
    — and the share of those visualizations that converged."""
    c = _class_logit_rows(s)
    rows = c[(c["model"].astype(str) == "trained") & (c["class"] == "present")]
    if not len(rows):
        return []
    out = ["", "### The lesion models' 'present' logit, per head", "",
           "Smallest gain over every control [95 % CI] of the shape (`lesion_ncc`), the location (`lesion_map_corr`)"
           " and the hits (`lesion_hit`) of the dark lesions the visualizations show; a gain whose interval holds 0"
           " is within noise, and its upper bound is how large it could still be.", "",
           "| head | task | preset | shape | location | hits | converged |", "|---|---|---|---|---|---|---|"]
    for (head, task, reg), g in rows.groupby(["head", "task", "regularizer"], sort=True):
        cells = [_gain_cell(_row(g, m)) for _, m in LESION_ASPECTS]
        conv = g["converged_share"].astype(float).mean()
        out.append(f"| {head} | {task} | {reg} | " + " | ".join(cells) + f" | {fmt_share(conv)} |")
    return out


def fmt_share(x: float) -> str:
    """A share as a percentage ('n/a' when missing)."""
    return "n/a" if not np.isfinite(x) else f"{100 * x:.0f} %"


def recovery_lines(s: pd.DataFrame) -> list[str]:
    """Per positive-control network and preset: how much of its known pattern the class-logit visualizations
    recover (mean [95 % CI] of each recovery metric; the fidelity ceiling of the preset)."""
    c = _class_logit_rows(s)
    rows = c[(c["model"].astype(str) == "positive control") & c["metric"].isin(RECOVERY)]
    rows = rows[rows["class"].isin(["present", "M"])]
    if not len(rows):
        return []
    metrics = [m for m in RECOVERY if m in set(rows["metric"])]
    out = ["", "### Positive controls: how much of the known pattern each preset recovers", "",
           "Mean [95 % CI] over the visualizations of the logit whose preferred input is known by construction "
           "(`known_corr`: correlation with the known optimum; the lesion controls' optimum is a dark lesion of "
           "the planted size anywhere, or in the read cells, measured by the lesion metrics).", "",
           "| network | head | logit | preset | " + " | ".join(metrics) + " | converged |",
           "|---|---|---|---|" + "---|" * len(metrics) + "---|"]
    for (task, head, cls, reg), g in rows.groupby(["task", "head", "class", "regularizer"], sort=True):
        cells = []
        for m in metrics:
            r = _row(g, m)
            cells.append("—" if r is None else f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]")
        out.append(f"| {task} | {head} | {cls} | {reg} | " + " | ".join(cells)
                   + f" | {fmt_share(g['converged_share'].astype(float).mean())} |")
    return out


def _few_networks_note(prim):
    """A line on how wide intervals over few trained networks are by design (their degrees of freedom)."""
    if "n_replicates" not in prim or not len(prim):
        return []
    k = int(prim["n_replicates"].astype(int).min())
    if not 1 < k < 5:
        return []
    from scipy.stats import t

    return ["", f"Intervals over {k} trained networks have {k - 1} degree{'s' * (k > 2)} of freedom "
            f"(t = {t.ppf(0.975, k - 1):.1f} at 95 %): wide by design, so 'undecided' says little and 'absent' "
            "needs two networks that agree closely; `config/paper.yaml` trains 5 networks per task."]


def render(summary: pd.DataFrame | str | Path, missing: Sequence[dict] = (), alpha: float = ALPHA,
           method: str = "t") -> str:
    """The findings as Markdown from a judged summary (columns of :func:`brainfv.report.calibrate.summarise`
    and :func:`~brainfv.report.calibrate.judge`); ``missing``: primary endpoints with no rows."""
    s = summary if isinstance(summary, pd.DataFrame) else pd.read_csv(summary, sep="\t", keep_default_na=False,
                                                                       na_values=[""])
    s = s.copy()
    s["class"] = s["class"].fillna("").astype(str)
    interval = {"t": "t intervals over the top level's means (trained replicates, else units, else seeds)",
                "bootstrap": "hierarchical percentile bootstrap intervals"}.get(method, method)
    out = [("Generated from `summary.tsv` by `brainfv.report.findings` (never edited by hand). Estimates are "
           "the smallest paired gain of the trained model's visualizations over every control (re-initialised "
           f"network, other task's model, phase surrogates), with 95 % {interval}; p is one-sided for a gain "
           "above zero over every control (intersection–union: the largest of the controls' p). Primary "
           "endpoints (config `report.primary`) are tested at 95 % each: present when the interval's lower "
           "bound is above 0, absent when its upper bound is below the smallest effect of interest δ "
           f"(`report.sesoi`), else undecided. Secondary rows: Benjamini–Hochberg adjusted p < {alpha:g}."), "",
           "### Primary endpoints", ""]
    prim = s[s["primary"].astype(bool)]
    for _, r in prim.iterrows():
        out.append(_primary_line(r))
    out += _few_networks_note(prim)
    for e in missing:
        cls = f" · {e['class']}" if e.get("class") else ""
        out.append(f"- **{e['task']} · {e['request']}{cls} · {e['metric']}**: not run in this study (no summary rows)")
    if not len(prim) and not missing:
        out.append("None named (config `report.primary`).")
    if "model" in s and "head" in s:
        out += per_head_lines(s) + recovery_lines(s)
    sec = s[~s["primary"].astype(bool) & (s["p_adj"].astype(float) < alpha)].sort_values("p_adj", kind="stable")
    n_sec = int((~s["primary"].astype(bool) & np.isfinite(s["p_adj"].astype(float))).sum())
    out += ["", f"### Secondary rows that survive correction ({len(sec)} of {n_sec})", ""]
    if len(sec):
        out += ["| row | smallest gain [95 % CI] | p | adjusted p |", "|---|---|---|---|"]
        for _, r in sec.iterrows():
            out.append(f"| {_name(r)} | {fmt(r['min_gain'])} [{fmt(r['min_gain_lo'])}, {fmt(r['min_gain_hi'])}] "
                       f"| {fmt_p(r['p_min_gain'])} | {fmt_p(r['p_adj'])} |")
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


def read_block(text: str) -> str:
    """The text between the findings markers of ``text`` (a README)."""
    m = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.DOTALL)
    if not m:
        raise ValueError(f"no {START} ... {END} block")
    return m.group(1)


def update_readme(readme: str | Path, findings: str | Path) -> str:
    """Replace the findings block of the file ``readme`` with ``findings`` (text, or a findings.md path)."""
    readme = Path(readme)
    text = readme.read_text()
    body = Path(findings).read_text() if isinstance(findings, Path) or (
        isinstance(findings, str) and "\n" not in findings and Path(findings).is_file()) else findings
    read_block(text)  # the markers must be there
    new = re.sub(re.escape(START) + r"\n.*?" + re.escape(END), lambda _: f"{START}\n{body}{END}", text, flags=re.DOTALL)
    readme.write_text(new)
    return new


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m brainfv.report.findings FINDINGS.md README.md")
    update_readme(sys.argv[2], Path(sys.argv[1]))
    print(f"{sys.argv[2]}: findings block replaced by {sys.argv[1]}")
