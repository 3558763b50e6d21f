"""Config helpers and target lists shared by all rules (no heavy imports: parsed by every job)."""
import sys
from pathlib import Path

R = config["results"]


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


def data_params():
    """The config sections the data stage depends on (changing them reruns it)."""
    return {k: config[k] for k in ("seed", "grid", "cohort", "lesions")}


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


def data_targets():
    return [f"{R}/data/cohort/qc.png", f"{R}/data/lesions/examples.png"]


def all_targets():
    return data_targets()
