"""Training throughput: the full streaming pipeline vs pure compute, and peak memory vs cohort size.

    .venv/bin/python benchmarks/training.py [--n 96] [--epochs 2]

(a) volumes/s of the real training path (memmap store → VolumeDataset with augmentation → DataLoader
    → forward+backward+step) versus the same model's forward+backward+step on tensors already in
    memory, measured in one run; the ratio should be >= 0.85 (the data path is not the bottleneck);
(b) peak RSS of a training epoch on a store of N and of 4N volumes (separate processes): the ratio
    should be ~1 (memory does not grow with the cohort).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHAPE = (52, 64, 52)


def make_store(path, n):
    from brainfv.data.store import VolumeWriter

    rng = np.random.default_rng(0)
    with VolumeWriter(path, n, SHAPE) as w:
        for _ in range(n):
            w.append(rng.normal(size=SHAPE).astype(np.float32))


def pipeline_epoch(store, n, batch, epochs, threads):
    import torch

    from brainfv.models import build_model
    from brainfv.training import VolumeDataset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    labels = np.arange(n) % 2
    ds = VolumeDataset(store, np.arange(n), labels, {"shift_vox": 2, "intensity": 0.1}, seed=0)
    model = build_model({}).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    seen, t0 = 0, None
    for ep in range(epochs + 1):
        ds.set_epoch(ep)
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True):
            x = x.contiguous(memory_format=torch.channels_last_3d)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t0 is not None:
                seen += len(y)
        if t0 is None:  # first epoch is warm-up
            t0 = time.perf_counter()
    return seen / (time.perf_counter() - t0)


def pure_compute(n, batch, epochs, threads):
    import torch

    from brainfv.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x_all = torch.randn(batch, 1, *SHAPE).contiguous(memory_format=torch.channels_last_3d)
    y = torch.arange(batch) % 2
    model = build_model({}).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    steps = (n // batch) * epochs
    for i in range(steps + n // batch):
        if i == n // batch:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x_all), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def child(store, n, batch):
    pipeline_epoch(store, n, batch, 1, 2)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.batch)
    with tempfile.TemporaryDirectory() as d:
        small, large = Path(d) / "small.npy", Path(d) / "large.npy"
        make_store(small, a.n)
        make_store(large, 4 * a.n)
        rates = {"pipeline": [], "compute": []}
        for _ in range(3):  # interleaved repeats; medians
            rates["pipeline"].append(pipeline_epoch(small, a.n, a.batch, a.epochs, a.threads))
            rates["compute"].append(pure_compute(a.n, a.batch, a.epochs, a.threads))
        med = {k: float(np.median(v)) for k, v in rates.items()}
        rss = {}
        for name, path, n in (("N", small, a.n), ("4N", large, 4 * a.n)):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(n), "--batch", str(a.batch)],
                                 capture_output=True, text=True, check=True).stdout
            rss[name] = json.loads(out.strip().splitlines()[-1])["maxrss_mb"]
    print(f"grid {SHAPE}, batch {a.batch}, {a.threads} threads, {a.n} volumes x {a.epochs} epochs, 3 repeats")
    print(f"full pipeline  : {med['pipeline']:.1f} vol/s (runs: {', '.join(f'{r:.1f}' for r in rates['pipeline'])})")
    print(f"pure compute   : {med['compute']:.1f} vol/s (runs: {', '.join(f'{r:.1f}' for r in rates['compute'])})")
    print(f"ratio pipeline/compute = {med['pipeline'] / med['compute']:.2f}  (target >= 0.85)")
    print(f"peak RSS of one epoch: N={a.n}: {rss['N']:.0f} MB, 4N={4 * a.n}: {rss['4N']:.0f} MB, "
          f"ratio {rss['4N'] / rss['N']:.2f}  (target ~1: memory does not grow with the cohort)")


if __name__ == "__main__":
    main()
