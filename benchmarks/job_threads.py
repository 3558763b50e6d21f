"""Two jobs on one thread each, side by side, against the same two jobs on two threads one after the other.

    .venv/bin/python benchmarks/job_threads.py MODEL DATASET [--rounds 3]
    e.g. results/models/lesion/main/model.pt results/data/lesions

Each job is `brainfv visualize` of the class logits (preset none, 4 seeds, 48 steps, no randomized control),
the shape of the study's visualize jobs. `brainfv` takes its threads from the CPU affinity, so a job pinned
with `taskset -c k` runs on one thread. Prints the wall time of each arrangement per round, the medians and
their ratio: the reason for `compute.threads: 1` in config/config.yaml (Snakemake then runs two jobs at once).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRAINFV = str(Path(sys.executable).with_name("brainfv"))


def job(model, dataset, out, cpus=None):
    cmd = [BRAINFV, "visualize", model, "--dataset", dataset, "--layer", "classifier", "--preset", "none",
           "--config", str(ROOT / "config/config.yaml"), "--seeds", "4", "--steps", "48", "--out", out]
    return subprocess.Popen((["taskset", "-c", cpus] if cpus else []) + cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def timed(procs_in_waves):
    t0 = time.perf_counter()
    for wave in procs_in_waves:
        ps = [start() for start in wave]
        if any(p.wait() for p in ps):
            sys.exit("a brainfv visualize job failed")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    seq, par = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            def out(k):
                return f"{tmp}/{r}{k}"
            seq.append(timed([[lambda: job(a.model, a.dataset, out("a"))],
                              [lambda: job(a.model, a.dataset, out("b"))]]))
            par.append(timed([[lambda: job(a.model, a.dataset, out("c"), "0"),
                               lambda: job(a.model, a.dataset, out("d"), "1")]]))
            print(f"round {r + 1}: two threads, one after the other {seq[-1]:.1f} s; "
                  f"one thread each, side by side {par[-1]:.1f} s", flush=True)
    ms, mp = statistics.median(seq), statistics.median(par)
    print(f"median: {ms:.1f} s vs {mp:.1f} s -> side by side {ms / mp:.2f}x the throughput")


if __name__ == "__main__":
    main()
