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

__all__ = ["ALPHA", "END", "START", "fmt", "fmt_p", "read_block", "render", "update_readme"]

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
    for e in missing:
        cls = f" · {e['class']}" if e.get("class") else ""
        out.append(f"- **{e['task']} · {e['request']}{cls} · {e['metric']}**: not run in this study (no summary rows)")
    if not len(prim) and not missing:
        out.append("None named (config `report.primary`).")
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
