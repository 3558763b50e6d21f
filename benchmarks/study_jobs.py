"""Where a study run's time and memory went: its Snakemake benchmark files summed per rule.

    .venv/bin/python benchmarks/study_jobs.py [results]

Prints, per rule, the jobs, their summed and largest wall time (s) and the largest peak RSS (MB), from
``results/benchmarks/`` (written by every heavy rule's ``benchmark:``). The whole run's wall time and peak are
measured outside (``/usr/bin/time -v make study``); this says which rule to make faster.
"""
import sys
from pathlib import Path

import pandas as pd


def main(results: str = "results") -> None:
    root = Path(results) / "benchmarks"
    rows = []
    for f in sorted(root.rglob("*.tsv")):
        b = pd.read_csv(f, sep="\t")
        rule = f.relative_to(root).parts[0] if f.parent != root else f.stem
        rows.append({"rule": rule, "job": f.stem, "s": float(b["s"].iloc[0]), "max_rss": float(b["max_rss"].iloc[0])})
    if not rows:
        sys.exit(f"no benchmark files under {root}")
    df = pd.DataFrame(rows)
    by = df.groupby("rule").agg(jobs=("job", "size"), total_s=("s", "sum"), max_s=("s", "max"),
                                max_rss_mb=("max_rss", "max")).sort_values("total_s", ascending=False)
    print(by.round(1).to_string())
    print(f"\nall jobs: {len(df)}, {df['s'].sum():.0f} s of job time, largest peak RSS {df['max_rss'].max():.0f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:])
