"""Feature-visualization speed, measured in one run and printed as ratios.

    .venv/bin/python benchmarks/featviz.py [--model results/models/lesion/main/model.pt] [--steps 20] [--repeats 3]

(a) brainfv's batched loop (all units in one batch, forward truncated at the target layer) versus a
    straightforward per-unit loop that runs the full network with a forward hook, one unit at a time
    (how Lucent works), for the same units, steps and preset; for a mid-level layer with 8 units and for
    an early layer's neurons with receptive-field cropping;
(c) time per step of the same request at CPU micro-batch sizes 1, 2, 4 and 8 (the default is 2);
(b) the loop's overhead: time per step of ``render`` versus the bare forward+backward of the truncated
    (and simplified, see ``brainfv.featviz.simplify``) network on the same batch (transforms, parametrisation and
    regularizers should cost <= 25 % extra).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHAPE = (52, 64, 52)
# every step of every element timed: no early stopping; a fixed intensity range (range: data needs one)
FIXED = dict(data_range=(-3.0, 4.0), converge={"enabled": False})


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


def interleaved(fns, steps, repeats=3, warmup_steps=2):
    """Time ``fn(steps)`` for each named fn, one of each per round after a short warm-up round (first calls
    pay for kernel selection and allocation); returns ``{name: median seconds}`` and the per-round times."""
    for fn in fns.values():
        fn(warmup_steps)
    rounds = []
    for _ in range(repeats):
        r = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(steps)
            r[name] = time.perf_counter() - t0
        rounds.append(r)
    return {n: float(np.median([r[n] for r in rounds])) for n in fns}, rounds


def median_ratio(rounds, num, den):
    """Median over rounds of ``num / den`` measured in the same round (robust to a noisy shared machine)."""
    return float(np.median([r[num] / r[den] for r in rounds]))


def main():
    import torch

    from brainfv.featviz import objectives as O
    from brainfv.featviz import render
    from brainfv.featviz.simplify import simplify_for_featviz
    from brainfv.featviz.units import capture_activations
    from brainfv.models import build_model, load_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "results/models/lesion/main/model.pt"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
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
    print(f"model: {src}; grid {SHAPE}; {a.steps} steps; {a.threads} threads; after a warm-up round, "
          f"{a.repeats} interleaved rounds: medians, and median of the per-round ratios")
    cases = [("block3.norm", list(range(8)), False), ("block1.norm", list(range(8)), True)]
    for layer, units, neuron in cases:
        obj = (O.neuron if neuron else O.channel)(layer, units)
        fns = {"brainfv": lambda n: render(model, obj, SHAPE, {}, steps=n, seeds=units, **FIXED),
               "per-unit": lambda n: lucent_style(model, layer, units, n, neuron)}
        if not neuron:  # what the network simplification (brainfv.featviz.simplify) contributes
            fns["unsimplified"] = lambda n: render(model, obj, SHAPE, {}, steps=n, seeds=units, simplify=False,
                                                                  **FIXED)
        med, rounds = interleaved(fns, a.steps, a.repeats)
        kind = "neuron objective, receptive-field crop" if neuron else "channel objective"
        print(f"(a) {layer}, {len(units)} units, {kind}: brainfv {med['brainfv']:.2f}s vs per-unit full network "
              f"{med['per-unit']:.2f}s -> {median_ratio(rounds, 'per-unit', 'brainfv'):.1f}x faster")
        if not neuron:
            print(f"    without the network simplification: {med['unsimplified']:.2f}s -> "
                  f"{median_ratio(rounds, 'per-unit', 'unsimplified'):.1f}x; simplification alone "
                  f"{median_ratio(rounds, 'unsimplified', 'brainfv'):.2f}x")
    # (b) overhead of the loop vs the bare truncated forward+backward on the same batch
    layer, units = "block3.norm", list(range(8))
    x = torch.randn((len(units), 1) + SHAPE).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    cl, _ = simplify_for_featviz(model, keep=[layer])  # the network the loop runs (BatchNorm folded, ...)
    cl = cl.to(memory_format=torch.channels_last_3d)

    def bare(n):  # the same micro-batches of 2 as the loop, nothing else
        for _ in range(n):
            for i in range(0, len(units), 2):
                capture_activations(cl, x[i:i + 2], [layer])[layer].mean().backward()

    real = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(4)]
    presets = {"fourier (default preset)": {"param": "fourier", "jitter": 2},
               "maco": {"param": "maco", "jitter": 2},
               "all at once": {"param": "fourier", "jitter": 2, "scale": 0.05, "rotate": 5, "tv": 0.1}}
    fns = {"bare": bare}
    for name, preset in presets.items():
        fns[name] = lambda n, preset=preset: render(model, O.channel(layer, units), SHAPE, preset, steps=n,
                                                    seeds=units, real_volumes=real, **FIXED)
    med, rounds = interleaved(fns, a.steps, a.repeats)
    for name, preset in presets.items():
        print(f"(b) {layer}, batch {len(units)}, {name} {preset}: {1000 * med[name] / a.steps:.0f} ms/step vs bare "
              f"truncated forward+backward {1000 * med['bare'] / a.steps:.0f} ms/step -> overhead "
              f"{100 * (median_ratio(rounds, name, 'bare') - 1):+.0f}%")
    preset = {"param": "fourier", "jitter": 2}
    med, _ = interleaved({mb: lambda n, mb=mb: render(model, O.channel(layer, units), SHAPE, preset, steps=n,
                                                      seeds=units, micro_batch=mb, **FIXED) for mb in (1, 2, 4, 8)},
                         a.steps, a.repeats)
    print(f"(c) {layer}, batch {len(units)}, micro-batch 1/2/4/8: "
          + " / ".join(f"{1000 * t / a.steps:.0f}" for t in med.values()) + " ms/step")


if __name__ == "__main__":
    main()
