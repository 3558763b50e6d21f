"""Config helpers and target lists shared by all rules (no heavy imports: parsed by every job)."""
import sys
from pathlib import Path

R = config["results"]
# brainfv.arch is torch-free: the DAG can list a layer's units without importing torch
_SRC = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def env(name):
    """Conda env file of a kind of rule (used only with --sdm conda), relative to rules/*.smk."""
    return f"../../envs/{name}.yaml"


def check_config(cfg):
    """Cross-key checks that JSON schema cannot express; fail before any job is scheduled."""
    splits = cfg["cohort"]["splits"]
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"config key cohort.splits: fractions must sum to 1, got {splits} (sum {total:.3f})")
    src = cfg["cohort"]["source"]
    if src == "bids" and not cfg["cohort"]["bids"]["root"]:
        raise ValueError("config key cohort.bids.root: required when cohort.source is 'bids'")
    if src == "csv" and not cfg["cohort"]["csv"]["table"]:
        raise ValueError("config key cohort.csv.table: required when cohort.source is 'csv'")
    for key in ("diameter_mm", "contrast", "count"):
        lo, hi = cfg["lesions"][key]
        if lo > hi:
            raise ValueError(f"config key lesions.{key}: expected [min, max] with min <= max, got {[lo, hi]}")
    (lo, hi) = zip(*cfg["grid"]["bbox_mm"])
    if any(h <= l for l, h in cfg["grid"]["bbox_mm"]):
        raise ValueError(f"config key grid.bbox_mm: each axis needs min < max, got {cfg['grid']['bbox_mm']}")


check_config(config)


def data_params(*sections):
    """The config sections a data rule depends on (changing them reruns it, and only it)."""
    return {k: config[k] for k in ("seed",) + sections}


def cohort_inputs(wildcards):
    src = config["cohort"]["source"]
    if src == "csv":
        return {"table": config["cohort"]["csv"]["table"]}
    if src == "bids":
        root = Path(config["cohort"]["bids"]["root"])
        return {"participants": str(root / config["cohort"]["bids"]["participants"])}
    return {}


def dataset_dir(name):
    return f"{R}/data/{name}"


def task_dataset_dir(task):
    if task not in config["tasks"]:
        raise ValueError(f"unknown task {task!r}; tasks in config: {list(config['tasks'])}")
    return dataset_dir(config["tasks"][task]["dataset"])


def task_training(task):
    """The training section with the task's own overrides applied."""
    merged = {**config["training"], **(config["tasks"][task].get("training") or {})}
    merged.pop("replicates", None)
    return merged


def job_mem_mb(attempt, batch=1):
    """Memory for a heavy job: scales with grid voxels and batch, doubled on each retry."""
    g = config["grid"]
    vox = 1.0
    for lo, hi in g["bbox_mm"]:
        vox *= max(1.0, (hi - lo) / g["voxel_size"])
    return int(1500 + config["compute"]["mem_mb_per_mvox"] * vox / 1e6 * max(batch, 1)) * attempt


def model_targets():
    n = config["training"]["replicates"]
    return [f"{R}/models/{t}/rep-{r}/learning_curve.png" for t in config["tasks"] for r in range(n)]


FEATVIZ_PARAM_KEYS = ("only_unit", "task", "layer", "regularizer", "units", "objective", "preset", "steps", "lr", "n_seeds",
                      "n_real", "device", "seed", "dataset_dir")


def task_layers(task):
    """The featviz layer specs that apply to ``task``."""
    return [s for s in config["featviz"]["layers"] if task in s.get("tasks", config["tasks"])]


def layer_spec(task, layer):
    for s in task_layers(task):
        if s["layer"] == layer:
            return s
    raise ValueError(f"layer {layer!r} is not visualised for task {task!r} (config key featviz.layers); "
                     f"layers: {[s['layer'] for s in task_layers(task)]}")


def layer_unit_list(task, layer):
    """Unit indices of ``layer`` from config, checked against the architecture (no torch import)."""
    from brainfv.arch import layer_units, resolve_units

    units = layer_units(config["model"])
    if layer not in units:
        raise ValueError(f"config key featviz.layers: layer {layer!r} is not in the model; layers: {list(units)}")
    return resolve_units(layer_spec(task, layer).get("units", "all"), units[layer],
                         where=f"featviz.layers[{layer}].units")


def featviz_params(wc, unit=None):
    """Params of a visualize job; for one ``unit``, the same request as its layer's job (so the same
    numbers) with ``only_unit`` telling the script which volume to write, or the unit alone if the
    config does not list it."""
    spec = layer_spec(wc.task, wc.layer)
    fv = config["featviz"]
    units = layer_unit_list(wc.task, wc.layer)
    if unit is not None and unit not in units:
        units = [unit]
    return {
        "only_unit": unit,
        "task": wc.task,
        "layer": wc.layer,
        "regularizer": wc.regularizer,
        "units": units,
        "objective": spec.get("objective", "channel"),
        "preset": config["featviz"]["regularizers"][wc.regularizer],
        "steps": fv["steps"],
        "lr": fv["lr"],
        "n_seeds": fv["seeds"],
        "n_real": fv["n_real"],
        "device": fv["device"],
        "seed": config["seed"],
        "dataset_dir": task_dataset_dir(wc.task),
    }


def regularizer_names():
    """The presets to run: featviz.run_regularizers (checked) or every preset."""
    fv = config["featviz"]
    names = fv.get("run_regularizers") or list(fv["regularizers"])
    unknown = [n for n in names if n not in fv["regularizers"]]
    if unknown:
        raise ValueError(f"config key featviz.run_regularizers: unknown presets {unknown}; "
                         f"presets: {list(fv['regularizers'])}")
    return names


def featviz_entries():
    """One dict per visualization job: task, layer, regularizer."""
    return [{"task": t, "layer": s["layer"], "regularizer": r} for t in config["tasks"] for s in task_layers(t)
            for r in regularizer_names()]


def grid_keys():
    return list(dict.fromkeys((e["task"], e["layer"]) for e in featviz_entries()))


def replicates():
    return list(range(config["training"]["replicates"]))


def featviz_targets():
    return [f"{R}/featviz/{t}/{s['layer']}/{r}/units.tsv" for t in config["tasks"] for s in task_layers(t)
            for r in regularizer_names()]


def data_targets():
    return [f"{R}/data/cohort/qc.png", f"{R}/data/lesions/examples.png"]


def all_targets():
    return data_targets() + model_targets() + featviz_targets() + [f"{R}/report/metrics.png"]
