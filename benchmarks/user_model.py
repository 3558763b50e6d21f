"""Per-step visualization time of a MONAI network against the study's network, on the same grid, in one run.

    .venv/bin/python benchmarks/user_model.py [--model results/models/sex/main/model.pt] [--steps 4] [--repeats 3]

Both are optimised exactly as a visualize job does it (``brainfv.featviz.render``): the class logits, 2
units x 4 seeds = batch 8, MACO preset, on the grid of the study checkpoint. Prints the median seconds per
step of each and their ratio. MONAI's DenseNet121 has random weights: its speed does not depend on them.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def per_step(model, layer, shape, steps, repeats):
    from brainfv.featviz import objectives as O
    from brainfv.featviz import render

    obj = O.channel(layer, [0, 0, 0, 0, 1, 1, 1, 1])
    real = [np.random.default_rng(0).normal(size=shape).astype(np.float32)]
    kw = dict(shape=shape, preset={"param": "maco", "jitter": 2}, seeds=list(range(8)), real_volumes=real,
              converge={"enabled": False})  # every step timed
    render(model, obj, steps=1, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        render(model, obj, steps=steps, **kw)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times), times


def main():
    from monai.networks.nets import DenseNet121

    from brainfv.models import load_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "results/models/sex/main/model.pt"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    study, meta = load_checkpoint(a.model)
    shape = tuple(int(s) for s in meta["grid"]["shape"])
    dn = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in (("study", study), ("densenet", dn))}
    s, st = per_step(study, "classifier", shape, a.steps, a.repeats)
    d, dt = per_step(dn, "class_layers.out", shape, a.steps, a.repeats)
    print(f"grid {shape}, batch 8, maco, {a.threads} threads, median of {a.repeats} x {a.steps} steps")
    print(f"study BrainCNN ({n['study']:,} parameters): {s:.3f} s/step  (runs {[round(x, 3) for x in st]})")
    print(f"MONAI DenseNet121 ({n['densenet']:,} parameters): {d:.3f} s/step  (runs {[round(x, 3) for x in dt]})")
    print(f"ratio DenseNet121 / study = {d / s:.1f}x")


if __name__ == "__main__":
    main()
