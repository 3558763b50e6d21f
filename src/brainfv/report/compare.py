"""The comparison: every visualization scored against the ground truth, next to controls that cannot know it.

For each task × layer × preset × unit × optimisation seed (``comparison.tsv``, one row per trained
visualization) the ground-truth metrics are computed on the visualization and on its paired controls
(``controls.tsv``): the same request optimised on the network with re-initialised weights
(``randomized``), on another task's model (``other``), and phase-randomised surrogates of the
visualization (``surrogate``); :mod:`brainfv.report.calibrate` turns them into paired gains, z-scores,
intervals and p-values, the smallest gain over every control, verdicts on the primary endpoints
(``summary.tsv``) and the model-randomization check (``sanity.tsv``); :mod:`brainfv.report.findings` writes
``findings.md`` from them.

Ground-truth metrics (defined in :mod:`brainfv.report.metrics`):

``lesion_ncc``        lesion task: best normalised cross-correlation with a dark lesion template of the
                      configured shapes and sizes, inside the optimised region, templates that fit it only
                      (not for the 'absent' logit, whose evidence is no lesion: NaN there, as lesion_hit)
``lesion_hit``        lesion task: 1 if that best match lies where lesions were planted in the training
                      volumes (``lesion_hit_base_rate``: chance, the share of the positions a match can
                      take where they were)
``lesion_map_corr``   lesion task: partial correlation, inside the region, of the visualization's darkness
                      (−value) with the frequency of planted training lesions, white-matter probability (the
                      MNI152 map on the grid) partialled out of both — lesions are planted in deep white
                      matter, so a map that is merely dark in white matter would correlate otherwise (for the
                      'absent' logit, of its brightness: its evidence is the absence of a dark lesion)
``effect_corr``       sex task, class logits and contrasts: correlation with the *regional* component of the
                      planted sex effect (the part the model can use; male with M−F, female with F−M)
``effect_corr_full``  the same with the full planted map (dominated by the global size difference)
``known_corr``        positive-control networks (``tasks.<t>.positive_control``), class logits whose optimum
                      is one known image (the sex control): correlation with it inside the region, over the
                      voxels the network reads — how much of the known pattern a preset recovers
``transfer_prob``     class logits and contrasts: probability the independent transfer model gives the
                      intended class

Other columns: the visualization table's (``act_matched_z``: activation at matched amplitude against real
volumes, ``stability``, image statistics inside the optimised region), ``tv_ratio``/``hf_ratio`` (relative to
real volumes in the same region).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import LesionConfig
from ..utils import release_memory
from .metrics import (
    TemplateBank,
    base_rate,
    lesion_hit,
    lesion_templates,
    phase_surrogates,
    quality_ratios,
    region_slices,
    sex_effect_fidelity,
)
from .stats import POSITION

__all__ = ["GT_METRICS", "Truth", "score_volumes", "compare_entries", "task_truth", "transfer_agreement"]

GT_METRICS = {"lesion": ["lesion_ncc", "lesion_hit", "lesion_map_corr"], "sex": ["effect_corr", "effect_corr_full"]}
SUMMARY_EXTRA = ["transfer_prob", "act_matched_z", "stability", "tv_ratio", "hf_ratio", "energy_inside_mask",
                 "lesion_hit_base_rate"]


@dataclass
class Truth:
    """What a task's visualizations are scored against: its classes, mask and ground-truth maps."""

    task: str
    target: str
    classes: list
    mask: np.ndarray
    voxel_size: float
    lesion_map: np.ndarray | None = None       # frequency of planted lesions in the training volumes
    wm: np.ndarray | None = None                # white-matter probability (partialled out of lesion_map_corr)
    templates: list | None = None
    effect: np.ndarray | None = None            # regional component of the planted sex effect
    effect_full: np.ndarray | None = None
    known: np.ndarray | None = None             # a positive control's known optimum per class (NaN: none/free)
    real_volumes: list = field(default_factory=list)
    _banks: dict = field(default_factory=dict)
    _real: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.lesion_map is not None:
            return "lesion"
        return "sex" if self.effect is not None else ""

    def bank(self) -> TemplateBank:
        if "bank" not in self._banks:
            self._banks["bank"] = TemplateBank(self.templates, self.mask.shape)
        return self._banks["bank"]

    def real_stats(self, region: tuple) -> tuple[float, float]:
        """Mean relative TV and high-frequency share of real volumes inside ``region``."""
        from ..featviz.metrics import high_frequency_fraction, relative_tv

        key = tuple((s.start, s.stop) for s in region)
        if key not in self._real:
            m = self.mask[region]
            real = [np.asarray(v)[region] for v in self.real_volumes]
            self._real[key] = (float(np.mean([relative_tv(v, m) for v in real])),
                               float(np.mean([high_frequency_fraction(v) for v in real])))
        return self._real[key]

    def lesion_sign(self, unit: int, is_output: bool, preferred: str = "") -> float:
        """Which way lesion evidence points for a unit: the 'absent' logit's evidence is *no* dark lesion
        where lesions were planted (−1), as is that of an intermediate unit that prefers lesion-free volumes
        (``preferred``: its preferred class measured on validation volumes); every other unit is read as
        looking for dark lesions (+1)."""
        if is_output and unit < len(self.classes) and str(self.classes[unit]) == "absent":
            return -1.0
        if not is_output and str(preferred) == "absent":
            return -1.0
        return 1.0

    def sign(self, unit: int, is_output: bool) -> float:
        """+1 for a unit that should look male, −1 for female, 0 when the unit has no class."""
        if not is_output or unit >= len(self.classes):
            return 0.0
        return {"M": 1.0, "F": -1.0}.get(str(self.classes[unit]), 0.0)


def score_volumes(truth: Truth, volumes: Sequence, units: list[int], region: tuple | None, is_output: bool,
                  batch: int = 16, preferred: dict | None = None) -> list[dict]:
    """Ground-truth metrics of ``volumes`` (n, X, Y, Z), volume ``i`` being a visualization of ``units[i]``,
    optimised inside ``region``: a list of dicts (see the module docstring). ``preferred``: unit -> its preferred
    class (intermediate units; the sign of their lesion metrics)."""
    preferred = preferred or {}
    from ..featviz.metrics import partial_correlation

    region = region_slices(region, truth.mask.shape)
    out = [dict() for _ in volumes]
    rmask = np.zeros_like(truth.mask)
    rmask[region] = True
    rmask &= truth.mask
    if truth.kind == "lesion":
        signs = [truth.lesion_sign(u, is_output, preferred.get(u, "")) for u in units]
        # shape and location of a *dark lesion* say nothing of the 'absent' logit: not matched (NaN) there
        dark = [i for i, s in enumerate(signs) if s > 0]
        matches = {}
        for k in range(0, len(dark), batch):
            idx = dark[k:k + batch]
            matches.update(zip(idx, truth.bank().match(np.stack([np.asarray(volumes[i]) for i in idx]), region,
                                                       truth.mask)))
        none = {"ncc": float("nan"), "shape": None, "diameter_mm": float("nan"), "position": None}
        for i, (o, v, s) in enumerate(zip(out, volumes, signs)):
            m = matches.get(i, none)
            o.update(lesion_ncc=m["ncc"], lesion_shape=m["shape"] or "", lesion_diameter_mm=m["diameter_mm"],
                     lesion_hit=lesion_hit(m["position"], truth.lesion_map),
                     lesion_map_corr=partial_correlation(-s * np.asarray(v), truth.lesion_map, truth.wm, rmask))
    if truth.known is not None:
        for o, v, u in zip(out, volumes, units):
            o["known_corr"] = _known_corr(truth.known, v, u, rmask) if is_output else float("nan")
    if truth.kind == "sex":
        for o, v, u in zip(out, volumes, units):
            s = truth.sign(u, is_output)
            o.update(effect_corr=sex_effect_fidelity(v, truth.effect, rmask, s) if s else float("nan"),
                     effect_corr_full=sex_effect_fidelity(v, truth.effect_full, rmask, s)
                     if s and truth.effect_full is not None else float("nan"))
    return out


def _known_corr(known, v, u, rmask):
    """Correlation of visualization ``v`` with the known optimum of class ``u`` over the region's voxels the
    network reads (NaN when that class has no known optimum)."""
    if u >= len(known):
        return float("nan")
    k = known[u]
    sel = rmask & np.isfinite(k)
    if sel.sum() < 3:
        return float("nan")
    from ..featviz.metrics import correlation

    return float(correlation(np.asarray(v)[sel], k[sel]))


def _transfer_probs(model, volumes, units):
    import torch

    if model is None or not len(volumes):
        return [float("nan")] * len(volumes)
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(volumes, np.float32))[:, None]
        p = torch.cat([torch.softmax(model(x[i:i + 8]), 1) for i in range(0, len(x), 8)]).numpy()
    return [float(p[i, u]) if u < p.shape[1] else float("nan") for i, u in enumerate(units)]


def other_tasks(task: str, truths: dict, heads: dict | None = None) -> list[str]:
    """The tasks whose models serve as ``task``'s other-model control: those that never saw its target (another
    kind of truth), of the same network head where one exists (a flatten-head lesion model is compared with the
    flatten-head sex model), in config order."""
    heads = heads or {}
    others = [t for t in truths if t != task and truths[t].kind != truths[task].kind]
    same = [t for t in others if heads.get(t) == heads.get(task)]
    return same or others


def compare_entries(entries: list[dict], truths: dict, transfer_models: dict, output_layers: dict | str | None,
                    n_surrogates: int = 2, seed: int = 0, log: Callable | None = None,
                    heads: dict | None = None) -> tuple:
    """Score every entry (dict: ``task, layer, module, regularizer, table`` (the visualize table),
    ``trained`` and ``randomized`` (seeds × units × X × Y × Z: arrays, or what has their ``reshape``, such as
    a reader that loads them when used; randomized may be None), optionally
    ``replicate``: the independently trained network it comes from, the top level of the summary's
    hierarchy; the other task's control is then that task's network of the same replicate index, or its first
    where it has fewer replicates) against its
    task's :class:`Truth`, with its controls. ``transfer_models``: task -> the model its class-logit
    visualizations are tested on, or (task, replicate) -> that replicate's (first looked up). ``output_layers``:
    the class-logit module of each task (a name for all tasks, or a dict task -> name or None); ``heads``: task ->
    network head (chooses the other-model control, :func:`other_tasks`). Returns ``(trained rows, control rows)``
    as DataFrames."""
    import pandas as pd

    log = log or (lambda m: None)
    by_key = {(e["task"], e["layer"], e["regularizer"], e.get("replicate")): e for e in entries}
    trained_rows, control_rows = [], []
    for e in entries:
        c = _entry_context(e, truths[e["task"]], output_layers)
        c["transfer"] = transfer_models.get((e["task"], e.get("replicate")), transfer_models.get(e["task"]))
        trained_rows += _trained_rows(e, c)
        if e.get("randomized") is not None:
            control_rows += _control_rows(e, c, "randomized", e["randomized"].reshape((-1,) + c["truth"].mask.shape),
                                          c["unit_of"], c["seed_of"], "re-initialised weights")
        for other_task in other_tasks(e["task"], truths, heads)[:1]:
            o = by_key.get((other_task, e["layer"], e["regularizer"], e.get("replicate"))) or by_key.get(
                (other_task, e["layer"], e["regularizer"], 0))  # a task with fewer replicates: its first network
            if o is None:
                continue
            idx = _paired_volumes(o, c)
            if idx is None:
                log(f"{e['task']} {e['layer']} {e['regularizer']}: {other_task}'s request lacks some of its units "
                    "or seeds; no other-model control")
                continue
            vols = o["trained"].reshape((-1,) + c["truth"].mask.shape)
            control_rows += _control_rows(e, c, "other", vols[idx], c["unit_of"], c["seed_of"], f"{other_task} model")
        if n_surrogates:
            control_rows += _surrogate_rows(e, c, n_surrogates, seed)
        log(f"compared {e['task']} {e['layer']} {e['regularizer']}: {len(c['vols'])} visualizations with controls")
        release_memory()  # one job's volumes and scores at a time (utils.release_memory)
    return pd.DataFrame(trained_rows), pd.DataFrame(control_rows)


def _paired_volumes(o: dict, c: dict) -> np.ndarray | None:
    """Indices of the other task's trained volumes with the same unit (channel), seed and probe position (map
    index, where the tables say) as each of this entry's visualizations, in its order (a subset of the other's:
    e.g. a positive control visualising one logit of two), or None when one is missing."""
    ot = o["table"]
    ot = ot[ot["network"] == "trained"]
    by_pos = "position" in ot and "position" in c["tt"]
    pos = (lambda t: t["position"].fillna("").astype(str).tolist()) if by_pos else (lambda t: [""] * len(t))
    where = {(int(u), int(sd), p): int(v) for u, sd, p, v in zip(ot["unit"], ot["seed"], pos(ot), ot["volume"])}
    idx = [where.get((u, sd, p)) for u, sd, p in zip(c["unit_of"], c["seed_of"], pos(c["tt"]))]
    return None if any(i is None for i in idx) else np.asarray(idx)


def _entry_context(e, truth, output_layers):
    """What scoring one visualization job needs: its truth, trained table (volume i is the row with volume == i,
    never an assumed order), region, volumes, units and seeds, whether it reads the class logits, and the
    preferred class of each intermediate unit (its lesion metrics and its controls' read with that sign).
    A request probed at several positions (``position_index``) has a region and preferred classes per position:
    ``groups`` holds, per position, its volumes' indices, region and preferred classes (one group otherwise)."""
    from ..featviz.study import parse_region

    tab = e["table"]
    tt = tab[tab["network"] == "trained"].sort_values("volume").reset_index(drop=True)
    out_layer = output_layers.get(e["task"]) if isinstance(output_layers, dict) else output_layers
    vols = e["trained"].reshape((-1,) + truth.mask.shape)
    if tt["volume"].tolist() != list(range(len(vols))):
        raise ValueError(f"{e['task']} {e['layer']} {e['regularizer']}: units.tsv rows do not index the "
                         f"{len(vols)} volumes of units.nii.gz one to one")
    unit_of, seed_of = tt["unit"].astype(int).tolist(), tt["seed"].astype(int).tolist()
    rt = tab[tab["network"] == "randomized"].sort_values("volume")
    if len(rt) and (rt["unit"].tolist() != unit_of or rt["seed"].tolist() != seed_of):
        raise ValueError(f"{e['task']} {e['layer']} {e['regularizer']}: randomized.nii.gz is not laid out "
                         "like units.nii.gz")
    groups = []
    for _, g in tt.groupby(tt["position_index"] if "position_index" in tt else np.zeros(len(tt), int), sort=True):
        preferred = dict(zip(g["unit"].astype(int), g["preferred_class"].fillna("").astype(str))) \
            if "preferred_class" in g else {}
        groups.append({"index": g.index.to_numpy(), "region": parse_region(g["region"].iloc[0]),
                       "preferred": preferred})
    return {"truth": truth, "tt": tt, "groups": groups, "vols": vols,
            "unit_of": unit_of, "seed_of": seed_of,
            "is_output": out_layer is not None and e["module"] == out_layer}


def _group_of(c: dict) -> np.ndarray:
    """The position group (index into ``c["groups"]``) of each trained volume."""
    of = np.zeros(len(c["vols"]), int)
    for k, g in enumerate(c["groups"]):
        of[g["index"]] = k
    return of


def _grouped(c: dict, volumes: Sequence, units_: list, score: Callable, pair: Sequence | None = None) -> list:
    """``score(volumes, units, group)`` per probe position of the entry, reassembled in the order of ``volumes``;
    volume ``i`` is (a control paired with) trained volume ``pair[i]`` (default ``i``)."""
    member = _group_of(c)[np.arange(len(volumes)) if pair is None else np.asarray(pair, int)]
    out = [None] * len(volumes)
    for k, g in enumerate(c["groups"]):
        idx = np.flatnonzero(member == k)
        for i, r in zip(idx, score([volumes[i] for i in idx], [units_[i] for i in idx], g)):
            out[i] = r
    return out


def _class_of(c, u):
    """The intended class of unit ``u`` of a class-logit request ('' for other units)."""
    return str(c["truth"].classes[u]) if c["is_output"] and u < len(c["truth"].classes) else ""


def _replicate(e):
    return {"replicate": e["replicate"]} if e.get("replicate") is not None else {}


def _trained_rows(e, c):
    """One row per trained visualization: its table row, ground-truth scores, quality ratios, transfer
    probability and the lesion hit's chance (over the positions a best match can take in region and mask)."""
    truth, vols = c["truth"], c["vols"]

    def score(volumes, units_, g):
        region = g["region"]
        real_tv, real_hf = truth.real_stats(region)
        base = base_rate(truth.lesion_map, truth.bank().valid_positions(region, truth.mask)) \
            if truth.kind == "lesion" else float("nan")
        sc = score_volumes(truth, volumes, units_, region, c["is_output"], preferred=g["preferred"])
        return [{**s, **quality_ratios(v, real_tv, real_hf, truth.mask, region), "lesion_hit_base_rate": base}
                for s, v in zip(sc, volumes)]

    scores = _grouped(c, vols, c["unit_of"], score)
    probs = _transfer_probs(c["transfer"], vols, c["unit_of"]) if c["is_output"] else [np.nan] * len(vols)
    rows = []
    for i, u in enumerate(c["unit_of"]):
        row = c["tt"].iloc[i].to_dict()
        base = scores[i].pop("lesion_hit_base_rate")
        row.update(scores[i], transfer_prob=probs[i], lesion_hit_base_rate=base, intended_class=_class_of(c, u))
        row.update(_replicate(e))
        rows.append(row)
    return rows


def _control_rows(e, c, kind, volumes, units_, seeds_, source, pair=None):
    """Rows of one kind of control, scored like the trained visualizations they pair with (``volumes[i]`` with
    trained volume ``i``, or with ``pair[i]`` when given: the surrogates' several copies of each), in the region
    of that visualization's probe position (its ``position_index``)."""
    sc = _grouped(c, volumes, units_, lambda v, u, g: score_volumes(c["truth"], v, u, g["region"], c["is_output"],
                                                                      preferred=g["preferred"]), pair)
    pr = _transfer_probs(c["transfer"], volumes, units_) if c["is_output"] else [np.nan] * len(volumes)
    of = range(len(volumes)) if pair is None else pair
    return [{"task": e["task"], "layer": e["layer"], "regularizer": e["regularizer"], "unit": u, "seed": s,
             "control": kind, "source": source, **v_sc, "transfer_prob": p, "intended_class": _class_of(c, u),
             **_replicate(e), **_position(c, i)} for v_sc, p, u, s, i in zip(sc, pr, units_, seeds_, of)]


def _position(c, i):
    """The probe position (``position_index``) of trained volume ``i``, where the entry has the column."""
    return {POSITION: c["tt"][POSITION].iloc[i]} if POSITION in c["tt"] else {}


def _surrogate_rows(e, c, n_surrogates, seed):
    """Phase-randomised copies of every visualization (same amplitude spectrum, no spatial structure)."""
    from ..utils import stable_seed

    rep = () if e.get("replicate") is None else (e["replicate"],)
    rng = np.random.default_rng(stable_seed(seed, "surrogate", e["task"], e["layer"], e["regularizer"], *rep))
    sur, su, ss, pair = [], [], [], []
    group_of = _group_of(c)
    for i, v in enumerate(c["vols"]):
        for sv in phase_surrogates(v, n_surrogates, rng, c["groups"][group_of[i]]["region"], c["truth"].mask):
            sur.append(sv)
            su.append(c["unit_of"][i])
            ss.append(c["seed_of"][i])
            pair.append(i)
    return _control_rows(e, c, "surrogate", np.asarray(sur), su, ss, "phase-randomised copy", pair)


def attribution_rows(truth: Truth, maps: dict, method: str, layer: str, output_layer: str | None) -> list[dict]:
    """The positive control: attribution maps of the class logits (positive = evidence for the class), scored
    with the metrics that apply to an evidence map averaged over subjects: where the evidence lies (lesion
    task: correlation with the planted-lesion frequency, for 'present' positive and for 'absent' negative
    evidence) and how it matches the sex effect (male evidence with M−F, female with F−M)."""
    from ..featviz.metrics import partial_correlation

    rows = []
    for u in sorted(maps):
        cls = str(truth.classes[u]) if u < len(truth.classes) else ""
        sc = {}
        if truth.kind == "lesion":
            sign = truth.lesion_sign(u, True)  # evidence for 'present' where lesions were, for 'absent' against
            sc["lesion_map_corr"] = partial_correlation(sign * maps[u], truth.lesion_map, truth.wm, truth.mask)
        if truth.kind == "sex":
            s = truth.sign(u, True)
            sc["effect_corr"] = sex_effect_fidelity(maps[u], truth.effect, truth.mask, s) if s else np.nan
            sc["effect_corr_full"] = sex_effect_fidelity(maps[u], truth.effect_full, truth.mask, s) \
                if s and truth.effect_full is not None else np.nan
        rows.append({"task": truth.task, "layer": layer, "module": output_layer, "unit": u, "seed": 0,
                     "regularizer": f"attribution:{method}", "network": "trained", "intended_class": cls, **sc})
    return rows


def task_truth(task: str, target: str, classes: list, files: dict, lesions: dict, n_real: int,
               log: Callable) -> Truth:
    """A task's :class:`Truth` from its dataset files."""
    import nibabel as nib

    from ..data.store import Dataset, open_volumes

    ds = Dataset(Path(files["participants"]).parent)
    mask = np.asarray(nib.load(files["mask"]).dataobj) > 0
    parts = ds.participants
    test_rows = parts.loc[parts["split"] == "test", "index"].to_numpy()[:n_real]
    vols = ds.volumes
    t = Truth(task, target, list(classes), mask, ds.grid.voxel_size, real_volumes=[vols[int(i)] for i in test_rows])
    if target == "lesion" and files.get("lesion_masks"):
        masks = open_volumes(files["lesion_masks"])
        acc = np.zeros(mask.shape, np.float64)
        train = parts.loc[parts["split"] == "train", "index"].to_numpy()
        for i in train:
            acc += masks[int(i)]
        t.lesion_map = (acc / max(len(train), 1)).astype(np.float32)
        from ..data.template import template_on_grid
        t.wm = template_on_grid(ds.grid)["wm"]
        lc = LesionConfig.from_config(lesions)
        t.templates = lesion_templates(lc.template_shapes, np.linspace(*lc.diameter_mm, 3), t.voxel_size, lc.edge_mm)
        log(f"task {task}: planted lesions cover {float((t.lesion_map[mask] > 0).mean()):.1%} of the brain mask "
            f"({len(train)} training volumes)")
    if files.get("known"):  # a positive control: its known optimum per class, if one is a single image
        known = np.moveaxis(np.asarray(nib.load(files["known"]).dataobj, np.float32), -1, 0)
        t.known = known if np.isfinite(known).any() else None
    if target == "sex":
        img = nib.load(files["effect"])
        t.effect_full = img.get_fdata()
        t.effect = nib.load(files["effect_regional"]).get_fdata() if files.get("effect_regional") else t.effect_full
        what = bytes(np.asarray(img.header["descrip"]).tobytes()).split(b"\0")[0].decode("ascii", "replace")
        if "planted" not in what:  # real data: no ground truth, only the training split's M-F difference
            t.effect_full = None
            log(f"task {task}: no planted sex effect ({what or 'unlabelled map'}): effect_corr measures agreement "
                "with the training split's mean M-F difference, not a known truth; effect_corr_full is left out")
    return t


def transfer_agreement(task: str, main_pred: str, transfer_pred: str, meta: dict, tmeta: dict) -> dict:
    """How independent the transfer model is: the correlation of both models' test margins, and what differs."""
    import pandas as pd

    a, b = pd.read_csv(main_pred, sep="\t"), pd.read_csv(transfer_pred, sep="\t")
    classes = meta["classes"]
    m = a.merge(b, on="subject", suffixes=("_main", "_transfer"))
    pos = f"p_{classes[-1]}"
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))  # noqa: E731
    r = float(np.corrcoef(logit(m[pos + "_main"]), logit(m[pos + "_transfer"]))[0, 1]) if len(m) > 2 else np.nan
    differs = [f"seed ({meta.get('seed')} vs {tmeta.get('seed')})"]
    if tmeta.get("arch") and meta.get("arch") and tmeta["arch"] != meta["arch"]:
        changed = [f"{k}: {meta['arch'].get(k)} -> {v}" for k, v in tmeta["arch"].items() if meta["arch"].get(k) != v]
        differs.append("architecture (" + ", ".join(changed) + ")")
    if tmeta.get("bootstrap"):
        differs.append("training subjects (bootstrap resample)")
    return {"task": task, "test_margin_corr": r,
            "main_accuracy": float((m["label_main"] == m["predicted_main"]).mean()),
            "transfer_accuracy": float((m["label_transfer"] == m["predicted_transfer"]).mean()),
            "differs_in": "; ".join(differs)}
