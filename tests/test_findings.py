"""Findings are generated, never typed: verdicts follow the intervals, the text says what the table says, and
the README's block is that text."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainfv.config import default
from brainfv.errors import ConfigError
from brainfv.report.calibrate import judge, paired_table, summarise, verdict
from brainfv.report.findings import (
    END,
    START,
    fmt,
    fmt_p,
    p_text,
    read_block,
    render,
    update_readme,
)

ROOT = Path(__file__).resolve().parents[1]


def paired(gains, reps=1, units=1, seeds=16, task="lesion", layer="classifier", reg="jitter", cls="present",
           metric="lesion_ncc", sd=0.02, seed=0):
    """Visualizations whose gains over the three controls have the given means (trained = 0.5 + max gain)."""
    rng = np.random.default_rng(seed)
    top = max(gains.values())
    rows, ctrl = [], []
    for r in range(reps):
        for u in range(units):
            for s in range(seeds):
                key = {"task": task, "layer": layer, "regularizer": reg, "unit": u, "seed": s, "replicate": r}
                v = 0.5 + top + sd * rng.standard_normal()
                rows.append({**key, "intended_class": cls, metric: v})
                for kind, g in gains.items():
                    ctrl.append({**key, "control": kind, "intended_class": cls,
                                 metric: v - g + sd * rng.standard_normal()})
    return paired_table(pd.DataFrame(rows), pd.DataFrame(ctrl), [metric])


def study():
    """A small study: a clear win, a win over two controls only, a clear null and a secondary row."""
    parts = [paired({"randomized": 0.3, "other": 0.25, "surrogate": 0.2}, reg="jitter"),
             paired({"randomized": 0.3, "other": 0.25, "surrogate": 0.0}, reg="none"),
             paired({"randomized": 0.0, "other": 0.0, "surrogate": 0.0}, metric="lesion_map_corr", reg="none",
                    sd=0.005),
             paired({"randomized": 0.2, "other": 0.2, "surrogate": 0.2}, layer="block4.norm", cls="", units=4,
                    seeds=2, seed=3)]
    s = pd.concat([summarise(p, ["lesion_ncc", "lesion_map_corr"]) for p in parts], ignore_index=True)
    return judge(s, default("report.primary"), default("report.sesoi"))


def test_a_win_is_a_win_over_every_control():
    s, missing = study()
    row = s.set_index(["layer", "regularizer", "metric"])
    win = row.loc[("classifier", "jitter", "lesion_ncc")]
    assert win["min_gain"] == pytest.approx(0.2, abs=0.02) and win["min_gain_lo"] > 0 and win["verdict"] == "present"
    assert win["controls"] == "randomized,other,surrogate"
    # above the re-initialised network and the other model, but not above its own surrogates: no win
    half = row.loc[("classifier", "none", "lesion_ncc")]
    assert half["gain_randomized_low"] > 0.2 and half["min_gain_lo"] < 0 < half["min_gain_hi"]
    assert half["verdict"] in ("undecided",) or half["verdict"].startswith("absent")
    assert half["p_min_gain"] == max(half[f"p_gain_{k}"] for k in ("randomized", "other", "surrogate"))
    # a null measured precisely is bounded: absent, below δ, with its upper bound
    null = row.loc[("classifier", "none", "lesion_map_corr")]
    assert null["verdict"] == f"absent (< 0.05, upper 95 % bound {null['min_gain_hi']:.3f})"
    # the sex endpoint has no rows here: listed, not silently dropped
    assert [e["task"] for e in missing] == ["sex"]
    sec = row.loc[("block4.norm", "jitter", "lesion_ncc")]
    assert not sec["primary"] and sec["verdict"] == "" and 0 <= sec["p_min_gain"] <= sec["p_adj"] < 0.05
    assert s.loc[s["primary"], "p_adj"].equals(s.loc[s["primary"], "p_min_gain"])


def test_verdicts():
    assert verdict(0.01, 0.3, 0.05) == "present"
    assert verdict(-0.01, 0.03, 0.05) == "absent (< 0.05, upper 95 % bound 0.030)"
    assert verdict(-0.01, 0.3, 0.05) == "undecided"
    assert verdict(np.nan, np.nan, 0.05).startswith("undecided")
    assert (p_text("p", 0.0004), p_text("p", 0.0123), p_text("p", np.nan)) == ("p < 0.001", "p = 0.012", "p = n/a")
    s, _ = study()
    with pytest.raises(ConfigError, match="report.sesoi"):
        judge(s, [{"task": "lesion", "request": "classifier", "metric": "stability"}], {"lesion_ncc": 0.05})


def test_replicates_are_the_top_level_of_the_hierarchy():
    """Two trained networks that disagree: the interval is over the two replicate means (1 degree of freedom),
    far wider than the 16 seeds of one network would make it."""
    a = paired({"randomized": 0.1, "other": 0.1, "surrogate": 0.1}, reps=2, seed=4)
    a.loc[a["replicate"] == 1, "lesion_ncc"] += 0.2      # the second network's logit looks more lesion-like
    s = summarise(a, ["lesion_ncc"]).iloc[0]
    one = summarise(a[a["replicate"] == 0], ["lesion_ncc"]).iloc[0]
    assert s["n_replicates"] == 2 and s["n"] == 32
    assert s["ci_high"] - s["ci_low"] > 10 * (one["ci_high"] - one["ci_low"])


def test_findings_text_agrees_with_the_table():
    s, missing = study()
    text = render(s, missing)
    for _, r in s[s["primary"]].iterrows():
        head = f"- **{r['task']} · {r['layer']} · {r['class']} · {r['regularizer']} · {r['metric']}**"
        line = next(line for line in text.splitlines() if line.startswith(head))
        assert line.split("**: ")[1].startswith(r["verdict"])
        assert f"{fmt(r['min_gain'])} [{fmt(r['min_gain_lo'])}, {fmt(r['min_gain_hi'])}]" in line
        assert f"{p_text('p', r['p_min_gain'])}," in line and f"{p_text('adjusted p', r['p_adj'])};" in line
        assert fmt_p(r["p_adj"]) in line
    assert "**sex · classifier · effect_corr**: not run in this study" in text
    table = [line for line in text.splitlines() if line.startswith("| lesion")]
    survivors = s[~s["primary"] & (s["p_adj"] < 0.05)]
    assert len(table) == len(survivors) == 1 and "block4.norm" in table[0]
    assert re.search(r"Secondary rows that survive correction \(1 of 1\)", text)


def test_findings_from_a_written_summary_and_the_readme_block(tmp_path):
    s, missing = study()
    s.to_csv(tmp_path / "summary.tsv", sep="\t", index=False)
    text = render(s, missing)
    assert render(tmp_path / "summary.tsv", missing) == text           # what compare_regularizers writes, re-read
    readme = (ROOT / "README.md").read_text()
    read_block(readme)                                                   # the README has the block
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "findings.md").write_text(text)
    new = update_readme(tmp_path / "README.md", tmp_path / "findings.md")
    assert read_block(new) == text
    assert new.replace(text, "") == readme.replace(read_block(readme), "")   # nothing else changed
    assert update_readme(tmp_path / "README.md", text) == new                 # idempotent
    with pytest.raises(ValueError, match=START):
        (tmp_path / "bare.md").write_text("no markers")
        update_readme(tmp_path / "bare.md", text)
    assert END in new


def test_findings_state_the_lesion_logit_per_head_and_the_positive_controls_recovery():
    """The per-head table reads the trained lesion models' 'present' rows (shape, location, hits: the smallest
    gain over every control and its interval); the recovery table the positive controls' known-pattern metrics;
    each names the converged share; both come out of render, nothing typed."""
    parts = [paired({"randomized": 0.3, "other": 0.25, "surrogate": 0.2}, task=t, metric=m, reg=reg)
             for t in ("lesion", "lesion-flatten", "lesion-known") for m in ("lesion_ncc", "lesion_map_corr")
             for reg in ("none", "maco")]
    s = pd.concat([summarise(p, ["lesion_ncc", "lesion_map_corr"]) for p in parts], ignore_index=True)
    s["head"] = s["task"].map({"lesion": "pool", "lesion-flatten": "flatten", "lesion-known": "pool"})
    s["model"] = s["task"].map({"lesion": "trained", "lesion-flatten": "trained", "lesion-known": "positive control"})
    s, missing = judge(s, default("report.primary"), default("report.sesoi"))
    text = render(s, missing)
    head = text.split("### The lesion models' 'present' logit, per head")[1].split("###")[0]
    lines = [ln for ln in head.splitlines() if ln.startswith("| ") and "preset" not in ln]
    assert len(lines) == 4 and {ln.split(" | ")[0] for ln in lines} == {"| pool", "| flatten"}
    r = s[(s["task"] == "lesion-flatten") & (s["regularizer"] == "maco") & (s["metric"] == "lesion_ncc")].iloc[0]
    assert f"| flatten | lesion-flatten | maco | {fmt(r['min_gain'])} [{fmt(r['min_gain_lo'])}, " in head
    assert "lesion-known" not in head
    rec = text.split("### Positive controls")[1].split("###")[0]
    k = s[(s["task"] == "lesion-known") & (s["regularizer"] == "none") & (s["metric"] == "lesion_ncc")].iloc[0]
    assert f"| lesion-known | pool | present | none | {fmt(k['mean'])} [{fmt(k['ci_low'])}, {fmt(k['ci_high'])}]" in rec


def test_positive_controls_attribution_and_rows_without_every_control_are_not_in_the_family():
    """Benjamini–Hochberg runs over the trained models' secondary rows only: a positive control (built to be
    found) or an attribution row would loosen its threshold for the rest, and a row whose smallest gain lacks a
    kind of control the study has is not a win over every control (a primary one is undecided)."""
    parts = [paired({"randomized": 0.3, "other": 0.25, "surrogate": 0.2}, task=t, layer="block4.norm", cls="",
                    reg=reg, seed=i) for i, (t, reg) in enumerate([("lesion", "none"), ("lesion-known", "none"),
                                                                   ("lesion", "attribution:saliency")])]
    parts.append(paired({"randomized": 0.3, "surrogate": 0.2}, layer="block2.norm", cls="", reg="none"))
    parts.append(paired({"randomized": 0.3, "surrogate": 0.2}, reg="maco"))   # a primary row, no other model
    s = pd.concat([summarise(p, ["lesion_ncc"]) for p in parts], ignore_index=True)
    s["model"] = np.where(s["task"] == "lesion-known", "positive control", "trained")
    s, _ = judge(s, default("report.primary"), default("report.sesoi"))
    adj = s.set_index(["task", "layer", "regularizer"])["p_adj"]
    assert np.isfinite(adj["lesion", "block4.norm", "none"])
    for key in [("lesion-known", "block4.norm", "none"), ("lesion", "block4.norm", "attribution:saliency"),
                ("lesion", "block2.norm", "none")]:
        assert np.isnan(adj[key]), key
    prim = s[s["primary"]].iloc[0]
    assert prim["verdict"] == "undecided: no other control"
