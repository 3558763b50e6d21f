"""The study configuration: one schema for every default, typed sections for the library.

The single source of every default is ``workflow/schemas/config.schema.yaml`` (shipped inside the
package as ``brainfv/config.schema.yaml``, a link to it). Snakemake and the library read it the same
way:

- :func:`complete` fills in the defaults and validates a config (errors name the config key);
- :func:`check` adds the cross-key checks the schema cannot express;
- :func:`default` reads one default (``default("training.epochs")``, ``default("preset.param")`` for
  a ``$defs`` entry, ``default("featviz.layers.positions")`` for a key of an array's entries);
  :func:`layer_key` reads a ``featviz.layers`` entry's key or its default;
- typed sections (:class:`TrainingConfig`, :class:`ModelConfig`, :class:`Preset`, ...) are
  dataclasses whose field defaults are read from the schema, built with ``from_config(dict)``.

Only ``pyyaml`` and ``jsonschema`` are imported: Snakemake parses this in every job.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError

__all__ = ["SCHEMA_PATH", "schema", "node", "default", "complete", "check", "check_source",
           "layer_key", "layer_id", "Section", "AugmentConfig",
           "TrainingConfig", "ModelConfig", "Preset", "SexEffectConfig", "VariabilityConfig", "LesionConfig",
           "task_training", "task_replicates", "task_arch", "task_head", "task_model_kind", "transfer_model"]

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    """The parsed config schema (cached; treat as read-only)."""
    import yaml

    if not SCHEMA_PATH.exists():
        raise ConfigError(f"config schema not found at {SCHEMA_PATH}")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _resolve(n):
    while isinstance(n, dict) and "$ref" in n:
        ref = n["$ref"]
        if not ref.startswith("#/"):
            raise ConfigError(f"config schema: only local $ref is supported, got {ref!r}")
        n = functools.reduce(lambda d, k: d[k], ref[2:].split("/"), schema())
    return n


def node(path: str) -> dict:
    """The schema node of a dotted config path: ``"training"``, ``"training.augment"``; a first part naming a
    ``$defs`` entry (``"preset"``) selects it; after an array, a part names a key of its entries
    (``"featviz.layers.positions"``)."""
    s = schema()
    parts = [p for p in path.split(".") if p]
    if parts and parts[0] in s.get("$defs", {}):
        n = s["$defs"][parts.pop(0)]
    else:
        n = s
    for p in parts:
        n = _resolve(n)
        if "properties" not in n and isinstance(n.get("items"), dict):  # an array: the keys of its entries
            n = _resolve(n["items"])
        props = n.get("properties", {})
        if p not in props:
            raise ConfigError(f"config schema has no key {path!r} (at {p!r}; keys: {sorted(props)})")
        n = props[p]
    return _resolve(n)


def default(path: str) -> object:
    """The schema default of the key at ``path`` (a deep copy, with its own keys' defaults filled in)."""
    n = node(path)
    if "default" not in n:
        raise ConfigError(f"config schema key {path!r} has no default")
    return _fill(copy.deepcopy(n["default"]), n)


def _fill(instance, n):
    """Fill schema defaults into ``instance`` in place (recursively); returns it."""
    n = _resolve(n)
    if isinstance(instance, dict):
        props = n.get("properties", {})
        for key, sub in props.items():
            sub = _resolve(sub)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            elif key in instance and sub.get("x-merge-default") and isinstance(instance[key], dict):
                instance[key] = {**copy.deepcopy(sub.get("default", {})), **instance[key]}
            if key in instance:
                _fill(instance[key], sub)
        extra = n.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance:
                if key not in props:
                    _fill(instance[key], extra)
    elif isinstance(instance, list) and isinstance(n.get("items"), dict):
        for item in instance:
            _fill(item, n["items"])
    return instance


def _key(prefix, parts):
    return ".".join([p for p in [prefix] if p] + [str(p) for p in parts]) or "(top level)"


def _validate(instance, n, where=""):
    """Validate ``instance`` against schema node ``n``; raise ConfigError naming the first bad key."""
    from jsonschema import Draft202012Validator

    sub = dict(_resolve(n))
    sub["$defs"] = schema().get("$defs", {})
    errors = sorted(Draft202012Validator(sub).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    e = errors[0]
    key = _key(where, e.absolute_path)
    if e.validator == "additionalProperties":
        allowed = sorted(_resolve(e.schema).get("properties", {}))
        unknown = sorted(set(e.instance) - set(allowed))
        raise ConfigError(f"config key {key}: unknown key(s) {unknown}; allowed: {allowed}")
    raise ConfigError(f"config key {key}: {e.message}")


def complete(cfg: dict | None = None, validate: bool = True) -> dict:
    """A copy of ``cfg`` with every schema default filled in, validated against the schema.

    Presets under ``featviz.regularizers`` are added to the default presets (schema keyword
    ``x-merge-default``). Raises :class:`~brainfv.errors.ConfigError` naming the first bad key.
    """
    out = _fill(copy.deepcopy(dict(cfg or {})), schema())
    if validate:
        _validate(out, schema())
    return out


def check(cfg: dict) -> dict:
    """Cross-key checks of a completed config that JSON schema cannot express; raise ConfigError."""
    splits = cfg["cohort"]["splits"]
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"config key cohort.splits: fractions must sum to 1, got {splits} (sum {total:.3f})")
    check_source(cfg["cohort"])
    for key in ("diameter_mm", "contrast", "count"):
        lo, hi = cfg["lesions"][key]
        if lo > hi:
            raise ConfigError(f"config key lesions.{key}: expected [min, max] with min <= max, got {[lo, hi]}")
    if any(h <= lo for lo, h in cfg["grid"]["bbox_mm"]):
        raise ConfigError(f"config key grid.bbox_mm: each axis needs min < max, got {cfg['grid']['bbox_mm']}")
    for task, spec in cfg["tasks"].items():
        _validate(spec.get("training") or {}, _no_defaults(node("training")), f"tasks.{task}.training")
        _validate(spec.get("arch") or {}, _no_defaults(node("model")), f"tasks.{task}.arch")
        if spec.get("positive_control"):
            _check_positive_control(cfg, task, spec)
        if "arch" in spec and "model" in spec:
            raise ConfigError(f"config key tasks.{task}: `arch` changes a trained model, `model` gives one; "
                              "set one of them")
    _validate(cfg["transfer"]["model"], _no_defaults(node("model")), "transfer.model")
    fv = cfg["featviz"]
    unknown = [n for n in (fv.get("run_regularizers") or []) if n not in fv["regularizers"]]
    if unknown:
        raise ConfigError(f"config key featviz.run_regularizers: unknown presets {unknown}; "
                          f"presets: {list(fv['regularizers'])}")
    seen = {}
    for i, spec in enumerate(fv["layers"]):
        bad = [t for t in spec.get("tasks", []) if t not in cfg["tasks"]]
        if bad:
            raise ConfigError(f"config key featviz.layers[{i}].tasks: unknown tasks {bad}; tasks: {list(cfg['tasks'])}")
        for t in spec.get("tasks", list(cfg["tasks"])):
            lid = layer_id(spec)
            if (t, lid) in seen:
                raise ConfigError(f"config key featviz.layers[{i}]: request {lid!r} of task {t!r} repeats "
                                  f"featviz.layers[{seen[t, lid]}]; give one of them a different `name`")
            seen[t, lid] = i
    return cfg


def check_source(cohort_cfg: dict) -> None:
    """The cheap part of finding the data: the configured folder or table exists. Raises
    :class:`ConfigError` naming ``cohort.bids.root``, ``cohort.bids.participants`` or ``cohort.csv.table``;
    run before any job (:func:`check`), so a mistyped path never reuses an earlier cohort."""
    source = cohort_cfg.get("source", "synthetic")
    if source == "bids":
        cfg = cohort_cfg.get("bids") or {}
        root = cfg.get("root")
        if not root:
            raise ConfigError("cohort.bids.root: not given; it must name the BIDS dataset (or derivatives) folder "
                              "when cohort.source is 'bids'")
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"cohort.bids.root: folder not found: {root}")
        table = root / cfg.get("participants", "participants.tsv")
        if not table.is_file():
            raise ConfigError(f"cohort.bids.participants: participants table not found: {table} "
                              f"(cohort.bids.root: {root})")
    elif source == "csv":
        path = (cohort_cfg.get("csv") or {}).get("table")
        if not path:
            raise ConfigError("cohort.csv.table: not given; it must name the CSV/TSV table of subjects when "
                              "cohort.source is 'csv'")
        if not Path(path).is_file():
            raise ConfigError(f"cohort.csv.table: table not found: {path}")


def layer_key(spec: dict, key: str) -> object:
    """``key`` of a ``featviz.layers`` entry, or of a request made from one: its value, else the schema default
    (``objective``, ``position``, ``positions``, ``units``, ``replicates``; defined there once)."""
    return spec[key] if key in spec else default(f"featviz.layers.{key}")


def layer_id(spec: dict) -> str:
    """The name of a featviz request (``featviz.layers[]``) in paths and tables: its ``name``, else the layer,
    with ``-<objective>`` for objectives that read a layer differently than its units (probability, contrast)."""
    if spec.get("name"):
        return spec["name"]
    obj = layer_key(spec, "objective")
    return spec["layer"] if obj in ("channel", "neuron") else f"{spec['layer']}-{obj}"


def task_requests(cfg: dict, task: str) -> dict[str, dict]:
    """The ``featviz.layers`` requests that apply to ``task`` (those without ``tasks`` apply to every task),
    keyed by :func:`layer_id`."""
    return {layer_id(s): s for s in cfg["featviz"]["layers"] if task in s.get("tasks", [task])}


def _no_defaults(n):
    """``n`` without ``default`` entries (to validate partial overrides without filling them)."""
    if isinstance(n, dict):
        return {k: _no_defaults(v) for k, v in n.items() if k != "default"}
    if isinstance(n, list):
        return [_no_defaults(v) for v in n]
    return n


def task_training(cfg: dict, task: str) -> dict:
    """The training section with ``tasks.<task>.training`` overrides applied (both already validated)."""
    over = cfg["tasks"][task].get("training") or {}
    merged = {**cfg["training"], **over}
    merged["augment"] = {**cfg["training"]["augment"], **(over.get("augment") or {})}
    return merged


def _check_positive_control(cfg: dict, task: str, spec: dict) -> None:
    """A built positive control exists for target lesion (lesion dataset, either head) and for target sex
    (flatten head only: a pooled head's optimum is a uniform image); see :mod:`brainfv.models.positive`."""
    key = f"config key tasks.{task}.positive_control"
    if "model" in spec:
        raise ConfigError(f"{key}: a built positive control takes no `model`")
    if spec["target"] == "lesion" and spec["dataset"] != "lesions":
        raise ConfigError(f"{key}: target lesion needs dataset: lesions (its planted lesions)")
    if spec["target"] == "sex" and task_head(cfg, task) != "flatten":
        raise ConfigError(f"{key}: target sex has a control only with a flatten head (tasks.{task}.arch: "
                          "{head: flatten}); a pooled head's preferred input is a uniform image")
    if spec["target"] not in ("lesion", "sex"):
        raise ConfigError(f"{key}: no positive control is built for target {spec['target']!r} (lesion and sex "
                          "have one)")


def task_replicates(cfg: dict, task: str) -> int:
    """How many independently trained networks ``task`` has (``training.replicates`` with the task's override):
    one for a positive control or a model the user gives."""
    spec = cfg["tasks"][task]
    if "model" in spec or spec.get("positive_control"):
        return 1
    return int(task_training(cfg, task)["replicates"])


def task_arch(cfg: dict, task: str) -> dict:
    """The architecture of ``task``'s trained main model: the model section with ``tasks.<task>.arch``
    overrides (both validated)."""
    return {**cfg["model"], **(cfg["tasks"][task].get("arch") or {})}


def task_head(cfg: dict, task: str) -> str:
    """``pool`` or ``flatten`` for a trained task's network; ``given`` for a model the user gives."""
    if "model" in cfg["tasks"][task]:
        return "given"
    return task_arch(cfg, task).get("head", default("model.head"))


def task_model_kind(cfg: dict, task: str) -> str:
    """``trained``, ``positive control`` (built by hand, brainfv.models.positive) or ``given`` (the user's model)."""
    spec = cfg["tasks"][task]
    return "given" if "model" in spec else "positive control" if spec.get("positive_control") else "trained"


def transfer_model(cfg: dict, task: str | None = None) -> dict:
    """The transfer model's architecture: the task's architecture (:func:`task_arch`; the model section
    without a task) with ``transfer.model`` overrides."""
    base = task_arch(cfg, task) if task is not None else cfg["model"]
    return {**base, **cfg["transfer"]["model"]}


# --------------------------------------------------------------------------------------- typed sections

class Section:
    """Base of the typed config sections: a frozen dataclass whose defaults come from the schema node
    ``_path``; :meth:`from_config` validates a (partial) dict against that node, naming bad keys."""

    _path: ClassVar[str] = ""

    @classmethod
    def from_config(cls, values: dict | Section | None = None, where: str | None = None) -> Section:
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        n = node(cls._path)
        _validate(values, _no_defaults(n), where if where is not None else cls._path)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            sub = _section_type(f)
            kwargs[f.name] = sub.from_config(v, f"{where or cls._path}.{f.name}") if sub else v
        return cls(**kwargs)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_type(f):
    t = f.type if isinstance(f.type, type) else globals().get(str(f.type))
    return t if isinstance(t, type) and issubclass(t, Section) else None


def _d(path):
    """A dataclass field whose default is the schema default at ``path`` (lists/dicts copied per instance)."""
    value = default(path)
    if isinstance(value, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value))
    return dataclasses.field(default=value)


@dataclasses.dataclass(frozen=True)
class AugmentConfig(Section):
    """Training-time augmentation (config ``training.augment``)."""

    _path: ClassVar[str] = "training.augment"
    shift_vox: int = _d("training.augment.shift_vox")
    flip: bool = _d("training.augment.flip")
    intensity: float = _d("training.augment.intensity")


@dataclasses.dataclass(frozen=True)
class TrainingConfig(Section):
    """Optimisation of a task's model (config ``training``, with a task's overrides)."""

    _path: ClassVar[str] = "training"
    epochs: int = _d("training.epochs")
    batch_size: int = _d("training.batch_size")
    lr: float = _d("training.lr")
    weight_decay: float = _d("training.weight_decay")
    warmup_epochs: int = _d("training.warmup_epochs")
    patience: int = _d("training.patience")
    bn_volumes: int = _d("training.bn_volumes")
    num_workers: int = _d("training.num_workers")
    device: str = _d("training.device")
    amp: bool | None = _d("training.amp")
    replicates: int = _d("training.replicates")
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """The paper-style CNN's architecture (config ``model``)."""

    _path: ClassVar[str] = "model"
    channels: list = _d("model.channels")
    kernel_size: int = _d("model.kernel_size")
    norm: str = _d("model.norm")
    activation: str = _d("model.activation")
    dropout: float = _d("model.dropout")
    spatial_dropout: float = _d("model.spatial_dropout")
    hidden: int = _d("model.hidden")
    global_pool: str = _d("model.global_pool")
    head: str = _d("model.head")


@dataclasses.dataclass(frozen=True)
class Preset(Section):
    """A regularization strategy (config ``featviz.regularizers.<name>``); see the schema's ``$defs.preset``
    for every field's meaning. Adding a new kind of penalty is one function in
    :mod:`brainfv.featviz.regularizers` plus its field here and in the schema."""

    _path: ClassVar[str] = "preset"
    param: str = _d("preset.param")
    decay: float = _d("preset.decay")
    lr: float | None = _d("preset.lr")
    init: str = _d("preset.init")
    anchor: float = _d("preset.anchor")
    init_std: float = _d("preset.init_std")
    range: str | None = _d("preset.range")
    range_pct: float = _d("preset.range_pct")
    bound_by: str = _d("preset.bound_by")
    bound: float = _d("preset.bound")
    mask: bool = _d("preset.mask")
    l1: float = _d("preset.l1")
    l2: float = _d("preset.l2")
    tv: float = _d("preset.tv")
    freq: float = _d("preset.freq")
    jitter: int = _d("preset.jitter")
    scale: float = _d("preset.scale")
    rotate: float = _d("preset.rotate")
    blur_sigma: float = _d("preset.blur_sigma")
    blur_every: int = _d("preset.blur_every")
    pre_blur: float = _d("preset.pre_blur")

    @classmethod
    def from_dict(cls, d: dict, name: str = "preset") -> Preset:
        """A preset from a config dict; unknown keys raise ConfigError naming ``featviz.regularizers.<name>``."""
        return cls.from_config(d, f"featviz.regularizers.{name}")


@dataclasses.dataclass(frozen=True)
class SexEffectConfig(Section):
    """The synthetic cohort's planted sex effect (config ``cohort.synthetic.sex_effect``)."""

    _path: ClassVar[str] = "cohort.synthetic.sex_effect"
    global_volume: float = _d("cohort.synthetic.sex_effect.global_volume")
    regional: float = _d("cohort.synthetic.sex_effect.regional")
    strength: float = _d("cohort.synthetic.sex_effect.strength")


@dataclasses.dataclass(frozen=True)
class VariabilityConfig(Section):
    """Nuisance variability of synthetic subjects (config ``cohort.synthetic.variability``)."""

    _path: ClassVar[str] = "cohort.synthetic.variability"
    scale_sd: float = _d("cohort.synthetic.variability.scale_sd")
    rotation_deg: float = _d("cohort.synthetic.variability.rotation_deg")
    translation_mm: float = _d("cohort.synthetic.variability.translation_mm")
    deformation_mm: float = _d("cohort.synthetic.variability.deformation_mm")
    bias: float = _d("cohort.synthetic.variability.bias")
    gamma_sd: float = _d("cohort.synthetic.variability.gamma_sd")
    noise_sd: float = _d("cohort.synthetic.variability.noise_sd")


@dataclasses.dataclass(frozen=True)
class LesionConfig(Section):
    """Artificial lesions (config ``lesions``)."""

    _path: ClassVar[str] = "lesions"
    labelling: str = _d("lesions.labelling")
    shapes: list = _d("lesions.shapes")
    shape_a: str = _d("lesions.shape_a")
    shape_b: str = _d("lesions.shape_b")
    diameter_mm: list = _d("lesions.diameter_mm")
    contrast: list = _d("lesions.contrast")
    edge_mm: float = _d("lesions.edge_mm")
    count: list = _d("lesions.count")
    paired: bool = _d("lesions.paired")
    fraction_positive: float = _d("lesions.fraction_positive")
    wm_threshold: float = _d("lesions.wm_threshold")
    depth_margin_mm: float = _d("lesions.depth_margin_mm")
    min_gap_mm: float = _d("lesions.min_gap_mm")
    random_orientation: bool = _d("lesions.random_orientation")
    region_mm: list | None = _d("lesions.region_mm")

    @property
    def template_shapes(self) -> list[str]:
        """The shapes a class can show: all configured shapes (presence) or shape A/B (shapes labelling)."""
        return list(self.shapes) if self.labelling == "presence" else [self.shape_a, self.shape_b]
