"""Workflow overhead: time and peak memory of `snakemake -n` as the number of unit results grows.

    .venv/bin/python benchmarks/dag.py

Uses config/paper.yaml (every unit of every layer) against a stub BIDS folder (a participants.tsv
only: a dry run reads no images), with the regularizer presets replicated 1x, 10x and 100x.
"""
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main():
    base = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "bids").mkdir()
        (d / "bids/participants.tsv").write_text("participant_id\tsex\nsub-01\t1\n")
        base["cohort"]["bids"]["root"] = str(d / "bids")
        regs = base["featviz"]["regularizers"]
        print(f"{'scale':>6} {'jobs':>7} {'unit results':>13} {'dry-run s':>10} {'peak MB':>8}")
        for scale in (1, 10, 100):
            cfg = dict(base)
            cfg["featviz"] = {**base["featviz"],
                              "regularizers": {f"{k}_{i}": v for i in range(scale) for k, v in regs.items()}}
            cfg["results"] = str(d / f"res{scale}")
            path = d / f"cfg{scale}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            t0 = time.perf_counter()
            p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "snakemake", "-n", "--quiet", "all",
                                "--configfile", str(path)], cwd=ROOT, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if p.returncode != 0:
                print(p.stdout[-2000:], p.stderr[-3000:])
                raise SystemExit(1)
            rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
            jobs = int(re.search(r"^total\s+(\d+)", p.stdout + p.stderr, re.M).group(1))
            sys.path.insert(0, str(ROOT / "src"))
            from brainfv.models.arch import layer_units

            lu = layer_units(cfg["model"])
            units = sum(lu[s["layer"]] for s in cfg["featviz"]["layers"]) * len(cfg["tasks"]) * len(
                cfg["featviz"]["regularizers"])
            print(f"{scale:>5}x {jobs:>7} {units:>13} {dt:>10.1f} {rss:>8.0f}")


if __name__ == "__main__":
    main()
