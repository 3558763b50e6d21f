"""Feature-visualization speed, measured in one run and printed as ratios.

    .venv/bin/python benchmarks/featviz.py [--model results/models/lesion/rep-0/model.pt] [--steps 20]

(a) brainfv's batched loop (all units in one batch, forward truncated at the target layer) versus a
    straightforward per-unit loop that runs the full network with a forward hook, one unit at a time
    (how Lucent works), for the same units, steps and preset; for a mid-level layer with 8 units and for
    an early layer's neurons with receptive-field cropping;
(c) time per step of the same request at CPU micro-batch sizes 1, 2 and 8 (the default is 2);
(b) the loop's overhead: time per step of ``render`` versus the bare forward+backward of the truncated
    (and simplified, see ``brainfv.featviz.simplify``) network on the same batch (transforms, parametrisation and regularizers should cost <= 25 % extra).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHAPE = (52, 64, 52)


def lucent_style(model, layer, units, steps, neuron=False, lr=0.05, seed=0):
    """One unit at a time, full forward pass, activation grabbed by a forward hook, Adam on voxels."""
    import torch

    from brainfv.featviz.units import get_module

    for u in units:
        g = torch.Generator().manual_seed(seed + u)
        x = (torch.randn((1, 1) + SHAPE, generator=g) * 0.1).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        store = {}
        h = get_module(model, layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        for _ in range(steps):
            model(x)
            a = store["a"][0, u]
            obj = a[tuple(s // 2 for s in a.shape)] if neuron else a.mean()
            opt.zero_grad()
            (-obj).backward()
            opt.step()
        h.remove()


def timed(fn, repeats=3):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def main():
    import torch

    from brainfv.featviz import objectives as O
    from brainfv.featviz import render
    from brainfv.featviz.simplify import simplify_for_featviz
    from brainfv.featviz.units import capture_activations
    from brainfv.models import build_model, load_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "results/models/lesion/rep-0/model.pt"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if Path(a.model).exists():
        model, _ = load_checkpoint(a.model)
        src = a.model
    else:
        torch.manual_seed(0)
        model, src = build_model({}).eval(), "random weights"
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"model: {src}; grid {SHAPE}; {a.steps} steps; {a.threads} threads; medians of 3 runs")
    cases = [("block3.norm", list(range(8)), False), ("block1.norm", list(range(8)), True)]
    for layer, units, neuron in cases:
        obj = (O.neuron if neuron else O.channel)(layer, units)
        ours, _ = timed(lambda: render(model, obj, SHAPE, {}, steps=a.steps, seeds=units))
        theirs, _ = timed(lambda: lucent_style(model, layer, units, a.steps, neuron), repeats=1 if neuron else 3)
        kind = "neuron objective, receptive-field crop" if neuron else "channel objective"
        print(f"(a) {layer}, {len(units)} units, {kind}: brainfv {ours:.2f}s vs per-unit full network "
              f"{theirs:.2f}s -> {theirs / ours:.1f}x faster")
    # (b) overhead of the loop vs the bare truncated forward+backward on the same batch
    layer, units = "block3.norm", list(range(8))
    x = torch.randn((len(units), 1) + SHAPE).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    cl, _ = simplify_for_featviz(model, keep=[layer])  # the network the loop runs (BatchNorm folded, ...)
    cl = cl.to(memory_format=torch.channels_last_3d)

    def bare():  # the same micro-batches of 2 as the loop, nothing else
        for _ in range(a.steps):
            for i in range(0, len(units), 2):
                capture_activations(cl, x[i:i + 2], [layer])[layer].mean().backward()

    base, _ = timed(bare)
    for name, preset in (("fourier (default preset)", {"param": "fourier", "jitter": 2}),
                         ("maco", {"param": "maco", "jitter": 2}),
                         ("all at once", {"param": "fourier", "jitter": 2, "scale": 0.05, "rotate": 5, "tv": 0.1})):
        real = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(4)]
        loop, _ = timed(lambda: render(model, O.channel(layer, units), SHAPE, preset, steps=a.steps, seeds=units,
                                       real_volumes=real))
        print(f"(b) {layer}, batch {len(units)}, {name} {preset}: {1000 * loop / a.steps:.0f} ms/step vs bare "
              f"truncated forward+backward {1000 * base / a.steps:.0f} ms/step -> overhead {100 * (loop / base - 1):+.0f}%")
    preset = {"param": "fourier", "jitter": 2}
    times = {mb: timed(lambda: render(model, O.channel(layer, units), SHAPE, preset, steps=a.steps, seeds=units,
                                      micro_batch=mb))[0] for mb in (1, 2, 8)}
    print(f"(c) {layer}, batch {len(units)}, micro-batch 1/2/8: "
          + " / ".join(f"{1000 * t / a.steps:.0f}" for t in times.values()) + " ms/step")


if __name__ == "__main__":
    main()
