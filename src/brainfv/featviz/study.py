"""One visualization job of the study: a task's model, one layer, its units, one regularizer preset.

Kept out of the workflow script so it is usable (and tested) without Snakemake.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arch import resolve_units
from ..errors import ConfigError
from ..utils import stable_seed
from . import objectives as O
from .metrics import correlation, image_stats
from .render import render

__all__ = ["make_objective", "unit_seeds", "real_activations", "visualize_layer"]


def make_objective(layer, channels, kind="channel"):
    if kind == "channel":
        return O.channel(layer, channels)
    if kind == "neuron":
        return O.neuron(layer, channels)
    if kind == "probability":
        return O.class_probability(channels, layer)
    raise ConfigError(f"featviz objective must be channel, neuron or probability; got {kind!r}")


def unit_seeds(seed, task, layer, regularizer, units, n_seeds):
    """One seed per (unit, optimisation seed): stable keys, so any unit can be rerun alone."""
    return [stable_seed(seed, "featviz", task, layer, regularizer, u, s) for s in range(n_seeds) for u in units]


@torch.no_grad()
def real_activations(model, volumes, layer, units, kind="channel", device="cpu", batch=4):
    """Objective values of ``units`` on real volumes: array (n_volumes, n_units), one forward per batch."""
    from .units import capture_activations

    objs = [make_objective(layer, u, kind) for u in units]
    out = []
    for i in range(0, len(volumes), batch):
        x = torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in volumes[i:i + batch]]))[:, None]
        acts = capture_activations(model, x.to(device), [layer])
        out.append(np.stack([o(acts).float().cpu().numpy() for o in objs], 1))
    return np.concatenate(out)


def visualize_layer(model, layer, units, preset, *, shape, mask, real_volumes, test_volumes, seed, task,
                    regularizer, steps=256, lr=0.05, n_seeds=2, objective="channel", device="cpu", log=None,
                    record_every=8):
    """Optimise every unit of ``layer`` (× ``n_seeds`` seeds) in one batch.

    Returns ``(images, table, trajectory)``: the seed-0 volume of each unit (n_units, X, Y, Z), a
    per-unit table (dict of lists) and a long trajectory table. Stability is the mean correlation
    (inside the mask) between a unit's volumes from different seeds.
    """
    units = list(units)
    seeds = unit_seeds(seed, task, layer, regularizer, units, n_seeds)
    channels = units * n_seeds
    obj = make_objective(layer, channels, objective)
    init_volume = None
    if (preset or {}).get("init") == "volume":  # start from the mean training image
        init_volume = np.mean([np.asarray(v, np.float32) for v in real_volumes], axis=0)
    res = render(model, obj, shape, preset, steps=steps, lr=lr, seeds=seeds, device=device, mask=mask,
                 real_volumes=real_volumes, init_volume=init_volume, log=log, record_every=record_every)
    n = len(units)
    imgs = res.images.reshape(n_seeds, n, *shape)
    real = real_activations(model, test_volumes, layer, units, objective, device) if len(test_volumes) else None
    rows = {k: [] for k in ("task", "layer", "unit", "regularizer", "objective", "objective_start", "objective_end",
                            "real_max", "real_mean", "activation_ratio", "stability", "total_variation",
                            "high_freq_fraction", "energy_inside_mask", "std", "max_abs", "seconds",
                            "steps_per_s", "batch")}
    for j, u in enumerate(units):
        st = image_stats(imgs[0, j], mask)
        stab = [correlation(imgs[a, j], imgs[b, j], mask) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
        rmax = float(real[:, j].max()) if real is not None else float("nan")
        row = {"task": task, "layer": layer, "unit": u, "regularizer": regularizer, "objective": objective,
               "objective_start": float(res.objective_start[j]), "objective_end": float(res.objective_end[j]),
               "real_max": rmax, "real_mean": float(real[:, j].mean()) if real is not None else float("nan"),
               "activation_ratio": float(res.objective_end[j] / rmax) if rmax and rmax > 0 else float("nan"),
               "stability": float(np.mean(stab)) if stab else float("nan"), "seconds": res.seconds,
               "steps_per_s": res.steps_per_s, "batch": len(seeds), **st}
        for k in rows:
            rows[k].append(row[k])
    traj = {"unit": [], "step": [], "objective": []}
    for t, step in enumerate(res.trajectory_steps):
        for j, u in enumerate(units):
            traj["unit"].append(u)
            traj["step"].append(int(step))
            traj["objective"].append(float(res.trajectory[t, j]))
    return imgs[0], rows, traj, res
