"""One visualization job of the study: a task's model, one layer, its units, one regularizer preset.

:func:`visualize_layer` optimises every unit of a layer (× seeds) in one batch and measures the
results; :func:`brainfv.jobs.featviz.visualize_job` is what the workflow's ``visualize`` rule runs (read the
declared inputs, call it, write the outputs atomically).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import Preset, default
from ..data.store import Dataset
from ..errors import ConfigError
from ..models.arch import resolve_units
from ..utils import stable_seed
from . import objectives as O
from .metrics import correlation, image_stats
from .probes import class_preference
from .render import render
from .units import capture_activations, layer_output_shape

__all__ = ["make_objective", "unit_seeds", "objective_values", "real_activations", "split_volumes", "region_of",
           "parse_region", "LayerResult", "visualize_layer", "position_seed", "visualize_positions", "join_positions",
           "preset_text", "resolve_request_units"]


def make_objective(layer: str, channels: list[int], kind: str = "channel",
                   position: tuple | None = None) -> O.Objective:
    """The objective named in config (``featviz.layers[].objective``) for ``channels`` of ``layer``:
    ``channel`` (mean of the feature map), ``neuron`` (its centre), ``probability`` (softmax of a class) or
    ``contrast`` (a class's logit minus the mean of the others'). ``position``: the map position a neuron
    objective reads (None: the centre; :func:`brainfv.featviz.probes.probe_position`)."""
    if kind == "channel":
        return O.channel(layer, channels)
    if kind == "neuron":
        return O.neuron(layer, channels, position)
    if kind == "probability":
        return O.class_probability(channels, layer)
    if kind == "contrast":
        return O.class_contrast(channels, layer)
    raise ConfigError(f"featviz objective must be channel, neuron, probability or contrast; got {kind!r}")


def unit_seeds(seed: int, layer: str, regularizer: str, units: list[int], n_seeds: int) -> list[int]:
    """One seed per (optimisation seed, unit), seed-major: stable keys without the task, so every task's model
    (and the randomized control) starts from the same images with the same random transforms, and any unit
    can be rerun alone."""
    return [stable_seed(seed, "featviz", layer, regularizer, u, s) for s in range(n_seeds) for u in units]


@torch.no_grad()
def objective_values(model: nn.Module, volumes: Sequence, layer: str, units: list[int], kind: str = "channel",
                     device: str | torch.device = "cpu", batch: int = 4, position: tuple | None = None) -> np.ndarray:
    """Objective values of ``units`` on volumes: array (n_volumes, n_units), one forward per batch."""
    objs = [make_objective(layer, u, kind, position) for u in units]
    out = []
    for i in range(0, len(volumes), batch):
        x = torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in volumes[i:i + batch]]))[:, None]
        acts = capture_activations(model, x.to(device), objs[0].layers)
        out.append(np.stack([o(acts).float().cpu().numpy() for o in objs], 1))
    return np.concatenate(out) if out else np.zeros((0, len(units)), np.float32)


real_activations = objective_values  # the name used for real volumes


@torch.no_grad()
def own_objective_values(model: nn.Module, volumes: Sequence, layer: str, channels: list[int],
                         kind: str = "channel", device: str | torch.device = "cpu", batch: int = 4,
                         position: tuple | None = None) -> np.ndarray:
    """Volume ``b``'s objective on its own unit ``channels[b]``: array (n_volumes,)."""
    obj = make_objective(layer, list(channels), kind, position)
    out = []
    for i in range(0, len(volumes), batch):
        x = torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in volumes[i:i + batch]]))[:, None]
        acts = capture_activations(model, x.to(device), obj.layers)
        out.append(obj(acts, slice(i, i + len(x))).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def starting_volume(preset: Preset, real_volumes: Sequence, init_volumes: Sequence,
                    template: np.ndarray | None = None) -> np.ndarray | None:
    """The image a preset starts from, if not noise: the mean training volume (``init: volume``), the
    template (``template``) or the first of ``init_volumes`` (``subject``: feature accentuation; the study
    passes the validation split, so no test volume, which the metrics use as references, is a start image).
    It depends on the data only, so the trained network and every control start from the same image."""
    if preset.init == "volume":
        return np.mean([np.asarray(v, np.float32) for v in real_volumes], axis=0)
    if preset.init == "template":
        if template is None:
            raise ConfigError("init 'template' needs the grid's template image")
        return np.asarray(template, np.float32)
    if preset.init == "subject":
        if not len(init_volumes):
            raise ConfigError("init 'subject' needs a subject to start from (init_volumes: the validation split)")
        return np.asarray(init_volumes[0], np.float32)
    return None


def split_volumes(dataset: Dataset, split: str, n: int | None = None) -> list:
    """The volumes of one split of a dataset (in participants order; the first ``n`` when given)."""
    parts = dataset.participants
    rows = parts.loc[parts["split"] == split, "index"].to_numpy()
    if n is not None:
        rows = rows[:n]
    vols = dataset.volumes
    return [vols[int(i)] for i in rows]


def region_of(box: tuple | None, shape: Sequence[int]) -> tuple:
    """The optimised region (slices): the receptive-field crop, or the whole volume."""
    return tuple(box) if box is not None else tuple(slice(0, n) for n in shape)


def region_text(region: tuple) -> str:
    return ",".join(f"{s.start}:{s.stop}" for s in region)


def parse_region(text: str) -> tuple:
    """Inverse of :func:`region_text`: ``"a:b,c:d,e:f"`` → slices."""
    return tuple(slice(*map(int, part.split(":"))) for part in str(text).split(","))


@dataclass
class LayerResult:
    """What :func:`visualize_layer` returns: every volume (seeds × units × X × Y × Z, seed-major like the batch),
    a table with one row per unit and seed, the trajectory (seed 0) and the optimisation's result."""

    images: np.ndarray
    table: pd.DataFrame
    trajectory: pd.DataFrame
    result: object
    region: tuple


def visualize_layer(model: nn.Module, layer: str, units: list[int], preset: dict, *, shape: Sequence[int],
                    mask: np.ndarray, real_volumes: Sequence, test_volumes: Sequence, seed: int, task: str,
                    regularizer: str, steps: int = default("featviz.steps"), lr: float = default("featviz.lr"),
                    n_seeds: int = default("featviz.seeds"),
                    objective: str = default("featviz.layers.objective"),
                    device: str | torch.device = "cpu", micro_batch: int | None = None, log: Callable | None = None,
                    record_every: int = 8, network: str = "trained", layer_id: str | None = None,
                    template: np.ndarray | None = None, position: tuple | None = None, labelled: tuple | None = None,
                    converge: dict | None = None, data_range: tuple | None = None,
                    init_volumes: Sequence | None = None, amp: bool | None = None) -> LayerResult:
    """Optimise every unit of ``layer`` (× ``n_seeds`` seeds) in one batch and measure each result.

    Per unit and seed: the objective at start and end; ``steps`` (run) and ``converged`` (the plateau
    criterion held, :class:`~brainfv.featviz.render.Converge`) or ``stalled`` (the objective never moved: a dead
    start, stopped but not converged); the activation at *matched amplitude*
    (``act_matched``: the visualization shifted and rescaled to the mean and standard deviation real test
    volumes have in the optimised region, then scored; ``act_matched_z``/``act_matched_pct``: against the
    unit's values on the real test volumes, which a value of 0 / 0.5 would match); image statistics inside the
    optimised region (``region``); ``stability`` (mean correlation, inside the optimised region and the mask,
    between the unit's volumes from different seeds). ``layer_id`` names the request in seeds and tables.
    ``position``: the map position a neuron objective reads (None: the centre). ``labelled``: ``(volumes,
    labels, classes)`` of validation volumes, on which each unit's preferred class and Cohen's d are measured
    (:func:`brainfv.featviz.probes.class_preference`). ``init_volumes``: the volumes ``init: subject`` starts
    from (default ``test_volumes``; the study passes the validation split). ``amp``: bf16 autocast of the steps (None:
    :func:`brainfv.device.autocast_default`).
    """
    preset = Preset.from_config(preset)
    layer_id = layer_id or layer
    units = list(units)
    seeds = unit_seeds(seed, layer_id, regularizer, units, n_seeds)
    obj = make_objective(layer, units * n_seeds, objective, position)
    init_volume = starting_volume(preset, real_volumes, test_volumes if init_volumes is None else init_volumes,
                                  template)
    res = render(model, obj, shape, preset, steps=steps, lr=lr, seeds=seeds, device=device, mask=mask,
                 real_volumes=real_volumes, init_volume=init_volume, micro_batch=micro_batch, log=log,
                 record_every=record_every, converge=converge, data_range=data_range, amp=amp)
    imgs = res.images.reshape(n_seeds, len(units), *shape)
    region = region_of(res.box, shape)
    in_region = np.zeros(shape, bool)
    in_region[region] = True
    m = (np.asarray(mask, bool) if mask is not None else np.ones(shape, bool)) & in_region
    probe = dict(layer=layer, units=units, objective=objective, device=device, position=position)
    real = objective_values(model, test_volumes, layer, units, objective, device, position=position) \
        if len(test_volumes) else None
    pref, class_d = _class_preference(model, labelled, probe)
    matched = _matched_activations(model, imgs, m, test_volumes, probe)
    meta = {"task": task, "layer": layer_id, "module": layer, "network": network, "regularizer": regularizer,
            "objective": objective}
    rows = _unit_rows(res, imgs, units, seeds, m, region, mask, real, matched, (pref, class_d, position), meta)
    traj = pd.DataFrame([{"unit": u, "step": int(step), "objective": float(res.trajectory[t, j])}
                         for t, step in enumerate(res.trajectory_steps) for j, u in enumerate(units)])
    return LayerResult(imgs, pd.DataFrame(rows), traj, res, region)


def position_seed(seed: int, index: int) -> int:
    """The seed the ``index``-th probe position of a request derives its start images and transforms from: the
    request's own for the first (so one position is the single-position study), one of its own for each other
    (every network of the job, and the other task's model, gets the same seed at the same position)."""
    return seed if index == 0 else stable_seed(seed, "position", index)


def visualize_positions(model: nn.Module, layer: str, units: list[int], preset: dict, *,
                        positions: Sequence[tuple | None], seed: int, **kw: object) -> list[LayerResult]:
    """:func:`visualize_layer` at each of ``positions`` (one call each: its own receptive-field crop), the
    ``index``-th with seed :func:`position_seed`; ``kw``: the other arguments of :func:`visualize_layer`."""
    return [visualize_layer(model, layer, units, preset, position=pos, seed=position_seed(seed, i), **kw)
            for i, pos in enumerate(positions)]


def join_positions(results: Sequence[LayerResult]) -> tuple[np.ndarray, pd.DataFrame]:
    """The volumes and table of one network's :func:`visualize_positions`, laid out as one request's: volumes
    (positions × seeds) × units, seed-major, so position ``i``'s seed ``s`` is seed ``i * n_seeds + s`` (seeds stay
    distinct, and a (unit, seed) pair names the same position on every network); rows get ``position_index``.
    ``stability`` stays each position's own (never across positions)."""
    imgs, tables = [], []
    for i, r in enumerate(results):
        n_seeds, n_units = r.images.shape[:2]
        imgs.append(r.images)
        t = r.table.assign(seed=r.table["seed"] + i * n_seeds, volume=r.table["volume"] + i * n_seeds * n_units)
        t.insert(t.columns.get_loc("position") + 1, "position_index", i)
        tables.append(t)
    return np.concatenate(imgs), pd.concat(tables, ignore_index=True)


def _unit_rows(res: object, imgs: np.ndarray, units: list[int], seeds: list[int], m: np.ndarray, region: tuple,
               mask: np.ndarray | None, real: np.ndarray | None, matched: np.ndarray, probe: tuple,
               meta: dict) -> list[dict]:
    """The table of :func:`visualize_layer`: one row per unit and seed (seed-major volumes)."""
    pref, class_d, position = probe
    n_seeds = imgs.shape[0]
    rows = []
    for j, u in enumerate(units):
        stab = [correlation(imgs[a, j], imgs[b, j], m) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
        r = real[:, j] if real is not None else np.array([np.nan])
        rsd = float(r.std()) if real is not None and len(r) > 1 else float("nan")
        for s in range(n_seeds):
            b = s * len(units) + j
            am = float(matched[s, j])
            rows.append({
                **meta, "unit": u, "seed": s, "volume": b, "seed_value": seeds[b],
                "objective_start": float(res.objective_start[b]), "objective_end": float(res.objective_end[b]),
                "real_max": float(np.max(r)), "real_mean": float(np.mean(r)), "real_sd": rsd,
                "act_matched": am, "act_matched_z": (am - float(np.mean(r))) / rsd if rsd and rsd > 0 else float("nan"),
                "act_matched_pct": float((r < am).mean()) if real is not None else float("nan"),
                "stability": float(np.nanmean(stab)) if stab and not np.all(np.isnan(stab)) else float("nan"),
                "region": region_text(region), "region_voxels": int(m.sum()),
                **image_stats(imgs[s, j][region], np.asarray(mask)[region] if mask is not None else None),
                "position": "" if position is None else ",".join(str(int(q)) for q in position),
                "preferred_class": pref[j], "class_d": float(class_d[j]),
                "steps": int(res.info["steps_run"][b]), "converged": bool(res.info["converged"][b]),
                "stalled": bool(res.info["stalled"][b]), "precision": "bf16" if res.info.get("amp") else "fp32",
                "seconds": res.seconds, "steps_per_s": res.steps_per_s, "batch": len(seeds)})
    return rows


def _class_preference(model: nn.Module, labelled: tuple | None, probe: dict) -> tuple:
    """Each unit's preferred class and Cohen's d on labelled volumes (empty and NaN without them)."""
    n = len(probe["units"])
    if labelled is None or not len(labelled[0]):
        return [""] * n, np.full(n, np.nan)
    vals = objective_values(model, labelled[0], probe["layer"], probe["units"], probe["objective"], probe["device"],
                            position=probe["position"])
    return class_preference(vals, labelled[1], labelled[2])


def _matched_activations(model: nn.Module, imgs: np.ndarray, m: np.ndarray, test_volumes: Sequence,
                         probe: dict) -> np.ndarray:
    """Each visualization's own unit's activation once it is shifted and rescaled, inside ``m``, to the mean and
    SD the real ``test_volumes`` have there (seeds × units)."""
    n_seeds, n = imgs.shape[:2]
    real_sd = float(np.mean([np.asarray(v)[m].std() for v in test_volumes])) if len(test_volumes) else 1.0
    real_mean = float(np.mean([np.asarray(v)[m].mean() for v in test_volumes])) if len(test_volumes) else 0.0
    scaled = []
    for s in range(n_seeds):
        for j in range(n):
            img = imgs[s, j].copy()
            sd = img[m].std()
            img[m] = (img[m] - img[m].mean()) * (real_sd / sd if sd > 0 else 0.0) + real_mean
            scaled.append(img)
    return own_objective_values(model, scaled, probe["layer"], probe["units"] * n_seeds, probe["objective"],
                                probe["device"], position=probe["position"]).reshape(n_seeds, n)


def preset_text(preset: dict) -> str:
    """A preset as the keys that differ from the defaults (what a user wrote), for logs."""
    full = Preset.from_config(preset).as_dict()
    base = Preset().as_dict()
    return "{" + ", ".join(f"{k}: {v}" for k, v in full.items() if base[k] != v) + "}"


def resolve_request_units(model: nn.Module, request: dict, shape: Sequence[int],
                          device: str | torch.device = "cpu") -> list[int]:
    """The request's units (``all``, a count N, or a list), checked against the layer's real channel count;
    for ``only_unit``, the layer's units if it is among them (so the same batch), else the unit alone."""
    n = layer_output_shape(model, request["module"], (1,) + tuple(shape), device)[0]
    units = resolve_units(request["units"], n, where=f"featviz.layers[{request['layer']}].units")
    only = request.get("only_unit")
    if only is not None and only not in units:
        if not 0 <= only < n:
            raise ConfigError(f"unit {only} of layer {request['module']!r} does not exist (it has {n} channels)")
        units = [only]
    return units
