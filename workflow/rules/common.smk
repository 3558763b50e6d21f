"""Config, paths and target lists shared by all rules (no heavy imports: every job parses this file).

The config is completed and checked by the library (brainfv.config: the schema's defaults, then the
cross-key checks), once, here. Every output path pattern is defined once below; rules and input
functions build paths from these patterns and never retype them.
"""
import sys
from pathlib import Path

# the library (brainfv.config, brainfv.data.files, brainfv.jobs.requests: yaml + jsonschema only, no torch)
# from this checkout
_RULES = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).resolve()  # workflow/rules
_SRC = _RULES.parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from brainfv import config as bfv_config  # noqa: E402
from brainfv.data.files import DATASET_FILES, KNOWN_FILE  # noqa: E402
from brainfv.jobs import requests as bfv_requests  # noqa: E402
from brainfv.provenance import code_hash  # noqa: E402

_SCRIPTS = _RULES.parent / "scripts"


def code(script):
    """A rule's `code` param: the hash of the library modules its script runs, so that editing the logic
    (not only the 8-line script) reruns the steps that use it."""
    return code_hash(_SCRIPTS / f"{script}.py")


config.update(bfv_config.check(bfv_config.complete(config)))
bfv_requests.check_requests(config)  # every featviz.layers request against its tasks' layers, before any job
# the data source's files, once at load: a key that matches nothing (cohort.bids.space, an entry of cohort.qc.accept)
# is named as a plain config error before any job, not inside an input function's traceback
from brainfv.data.sources import source_files  # noqa: E402

source_files(config["cohort"])

R = config["results"]

# ------------------------------------------------------------------------------------------- paths
DATASET = f"{R}/data/{{dataset}}"
MODEL = f"{R}/models/{{task}}/{{role}}"
# {layer}: a request's id (bfv_config.layer_id); {rep}: the trained replicate, "" for replicate 0 (models/{task}/main)
# and "rep{r}/" for replicate r >= 1 (rep_folder), so replicate 0's paths are those of a study without replicates
FEATVIZ = f"{R}/featviz/{{task}}/{{rep}}{{layer}}/{{regularizer}}"
REP = r"(rep[1-9][0-9]*/)?"  # the {rep} wildcard's values
EXEMPLARS = f"{R}/exemplars/{{task}}/{{layer}}"
ATTRIBUTION = f"{R}/attribution/{{task}}"
REPORT = f"{R}/report"
LOGS = f"{R}/logs"
BENCH = f"{R}/benchmarks"
CHECKPOINTS = f"{R}/.checkpoints"  # resumable training state: not a rule output (Snakemake would delete it)


def env(name):
    """Conda env file of a kind of rule (used only with --sdm conda), relative to rules/*.smk."""
    return f"../../envs/{name}.yaml"


def dataset_file(dataset, kind):
    return f"{DATASET.format(dataset=dataset)}/{DATASET_FILES[kind]}"


def task_dataset(task):
    if task not in config["tasks"]:
        raise ValueError(f"unknown task {task!r}; tasks in config: {list(config['tasks'])}")
    return config["tasks"][task]["dataset"]


def dataset_files(task, *kinds):
    """Input function: the named files of ``task``'s dataset."""
    return {k: dataset_file(task_dataset(task), k) for k in kinds}


def per_task(kind):
    """One dataset file of ``kind`` per task, in config order."""
    return [dataset_file(task_dataset(t), kind) for t in config["tasks"]]


def model_and_dataset(*kinds):
    """Input function: the task's visualised model (of the job's replicate, wildcard {rep}; else replicate 0), its
    description (for a given model: checked against the cohort first) and the named files of its dataset."""
    return lambda wc: {"model": model_file(wc.task, replicate_role(wildcard_replicate(wc))),
                       "info": model_info(wc.task, wildcard_replicate(wc)), **dataset_files(wc.task, *kinds)}


def replicates(task):
    """How many independently trained networks ``task`` has (training.replicates; one for a given or built model)."""
    return bfv_config.task_replicates(config, task)


def replicate_role(replicate):
    """The models/{task}/ folder of a trained replicate: main (replicate 0, the one without replicates) or rep{r}."""
    return "main" if replicate == 0 else f"rep{replicate}"


def rep_folder(replicate):
    """The {rep} part of a featviz path: "" for replicate 0, "rep{r}/" for replicate r >= 1."""
    return f"rep{replicate}/" if replicate else ""


def wildcard_replicate(wc):
    """The replicate of a job's {rep} wildcard (0 for the exemplars and attribution jobs, which have none)."""
    rep = getattr(wc, "rep", "")
    return int(rep[len("rep"):-1]) if rep else 0


def provided(task):
    """Whether ``task`` visualises a model the user gives (``tasks.<task>.model``) instead of training one."""
    return bfv_requests.provided(config, task)


def model_file(task, role="main", name="model.pt"):
    """A task's model file: the user's checkpoint for a given model, else a file of a trained one."""
    if provided(task) and role == "main" and name == "model.pt":
        return config["tasks"][task]["model"]["checkpoint"]
    return f"{MODEL.format(task=task, role=role)}/{name}"


def model_param(task):
    """How jobs load ``task``'s model (brainfv.models.load.load_model): the user's spec, or a study checkpoint."""
    return bfv_requests.model_param(config, task)


def model_info(task, replicate=0):
    """The JSON naming a task's model's target, classes and output layer (read by the jobs after training)."""
    if provided(task):
        return f"{MODEL.format(task=task, role='provided')}/model.json"
    return model_file(task, replicate_role(replicate), "metrics.json")


def featviz_file(entry, name):
    """A file of the visualization job ``entry`` (task, layer, regularizer; replicate, default 0)."""
    folder = FEATVIZ.format(task=entry["task"], rep=rep_folder(entry.get("replicate", 0)), layer=entry["layer"],
                            regularizer=entry["regularizer"])
    return f"{folder}/{name}"


# ---------------------------------------------------------------------------------- config helpers
def data_params(*sections):
    """The config sections a data rule depends on (changing them reruns it, and only it)."""
    return {k: config[k] for k in ("seed",) + sections}


def cohort_inputs(wildcards):
    """Every file the cohort is built from (tables, images, masks): an added, removed or replaced image
    reruns the cohort and everything after it."""
    from brainfv.data.sources import source_files

    return source_files(config["cohort"])


def model_content(task):
    """The content hash of a given model's file (a describe_model param: a new file with the old modification
    time, as after cp -p, reruns it and so every visualization of the task); empty for a study model."""
    from brainfv.data.sources import inputs_digest

    if not provided(task):
        return ""
    return inputs_digest([config["tasks"][task]["model"]["checkpoint"]], f"{R}/.inputs/models.json")  # own cache


def cohort_content(wildcards):
    """The content hash of those files (a param: new content reruns the cohort also when a file keeps its
    modification time, as after cp -p or rsync -a; hashes cached on size, mtime, ctime and inode)."""
    from brainfv.data.sources import inputs_digest, source_files

    return inputs_digest(source_files(config["cohort"]), f"{R}/.inputs/hashes.json")


def constructed(task):
    """Whether ``task``'s model is a positive control built by hand (``tasks.<task>.positive_control``)."""
    return bool(config["tasks"][task].get("positive_control"))


def constructed_tasks():
    return [t for t in config["tasks"] if constructed(t)]


#: what each target's positive control reads from its dataset (input name -> dataset file kind; brainfv.models.positive)
POSITIVE_CONTROL_READS = {
    "lesion": {"lesions": "lesions", "frequency": "lesion_frequency"},
    "sex": {"effect": "sex_effect_regional", "mask": "mask"},
}


def positive_control_inputs(wildcards):
    """Input function of construct_model: the dataset files the task's positive control reads."""
    task, target = wildcards.task, config["tasks"][wildcards.task]["target"]
    if target not in POSITIVE_CONTROL_READS:
        raise ValueError(f"tasks.{task}.positive_control: no positive control is built for target {target!r} "
                         f"(targets with one: {sorted(POSITIVE_CONTROL_READS)})")
    kinds = {"participants": "participants", "reference": "reference", **POSITIVE_CONTROL_READS[target]}
    return {name: dataset_file(task_dataset(task), kind) for name, kind in kinds.items()}


def transfer_role(task):
    """The models/{task}/ folder of the model on which ``task``'s class-logit visualizations are tested: transfer
    (trained for that), rep1 (transfer.from_replicate, with two or more replicates) or None (transfer off, or a
    given or constructed model)."""
    if provided(task) or constructed(task) or not config["tasks"][task].get("transfer",
                                                                            config["transfer"]["enabled"]):
        return None
    return "rep1" if config["transfer"]["from_replicate"] and replicates(task) >= 2 else "transfer"


def roles(task):
    """The models trained for ``task``: its replicates (``main``, the visualised one, and ``rep{r}``) and, if
    enabled and not a replicate, ``transfer``; none for a given or constructed model."""
    if provided(task) or constructed(task):
        return []
    return [replicate_role(r) for r in range(replicates(task))] + (
        ["transfer"] if transfer_role(task) == "transfer" else [])


def trained_tasks():
    return [t for t in config["tasks"] if not provided(t) and not constructed(t)]


def transfer_tasks():
    return [t for t in config["tasks"] if transfer_role(t)]


def transfer_pairs(task):
    """(replicate, its model's folder, its transfer model's folder) for each trained replicate of a task with a
    transfer model: the trained transfer model for every replicate; with transfer.from_replicate, replicate 1 for
    the others and replicate 0 for replicate 1 (a visualization is never tested on its own network)."""
    other = transfer_role(task)
    return [(r, replicate_role(r), other if other != replicate_role(r) else replicate_role(0))
            for r in range(replicates(task))]


def model_spec(task, role):
    """What ``train_model`` needs for one model: its architecture, training settings and seed key (the study seed
    with the replicate index: main 0, rep{r} r; the transfer model the index after the last replicate, so that it
    shares no seed with one). The number of replicates is left out of the training settings: adding replicates
    trains the new ones only."""
    arch = bfv_config.transfer_model(config, task) if role == "transfer" else bfv_config.task_arch(config, task)
    replicate = replicates(task) if role == "transfer" else 0 if role == "main" else int(role[len("rep"):])
    training = {k: v for k, v in bfv_config.task_training(config, task).items() if k != "replicates"}
    return {"task": task, "role": role, "replicate": replicate, "target": config["tasks"][task]["target"],
            "arch": arch, "training": training, "seed": config["seed"],
            "bootstrap": role == "transfer" and config["transfer"]["bootstrap"]}


def job_mem_mb(attempt, batch=1):
    """Memory for a heavy job: scales with grid voxels and batch, doubled on each retry."""
    g = config["grid"]
    vox = 1.0
    for lo, hi in g["bbox_mm"]:
        vox *= max(1.0, (hi - lo) / g["voxel_size"])
    return int(1500 + config["compute"]["mem_mb_per_mvox"] * vox / 1e6 * max(batch, 1)) * attempt


def task_layers(task):
    """The featviz requests (``featviz.layers`` entries) that apply to ``task``, keyed by their id."""
    return bfv_config.task_requests(config, task)


def layer_spec(task, layer):
    """The request ``layer`` (an id) of ``task``."""
    return bfv_requests.layer_spec(config, task, layer)


def layer_unit_count(task, layer):
    """How many units a request asks for (for memory estimates; the job resolves them on the real model)."""
    return bfv_requests.layer_unit_count(config, task, layer)


def layer_seeds(task, layer):
    return layer_spec(task, layer).get("seeds", config["featviz"]["seeds"])


def visualize_request(wc, unit=None):
    """Everything a visualize job optimises (brainfv.jobs.requests.VisualizeRequest, as plain data); for one
    ``unit``, the same request as its layer's job (so the same numbers) with ``only_unit`` saying which unit's
    volumes to write (a given model's layers are checked at load by check_requests, against its description when
    that describes the current checkpoint)."""
    spec = layer_spec(wc.task, wc.layer)
    return bfv_requests.visualize_request(config, task=wc.task, layer=wc.layer, spec=spec, regularizer=wc.regularizer,
                                          only_unit=unit, replicate=wildcard_replicate(wc)).as_dict()


def probe_inputs(wc):
    """Input function: the lesion frequency map a request probing at ``position: lesions`` reads."""
    spec = layer_spec(wc.task, wc.layer)
    if bfv_config.layer_key(spec, "position") != "lesions":
        return {}
    if "lesions" not in {t["dataset"] for t in config["tasks"].values()}:
        raise ValueError(f"config key featviz.layers ({wc.layer}): position 'lesions' needs a task on the lesion "
                         "dataset")
    return {"position_map": dataset_file("lesions", "lesion_frequency")}


def exemplars_request(wc):
    return bfv_requests.exemplars_request(config, wc.task, wc.layer)


def exemplar_layers(task):
    """The requests of ``task`` whose units get dataset exemplars (channel and neuron objectives)."""
    return bfv_requests.exemplar_layers(config, task)


def regularizer_names():
    """The presets to run: featviz.run_regularizers or every preset."""
    fv = config["featviz"]
    return fv["run_regularizers"] or list(fv["regularizers"])


def featviz_entries():
    """One dict per visualization job: task, layer (the request's id), module, regularizer and the trained
    replicate it runs on (bfv_requests.layer_replicates: every one, or 0 for a request with replicates: first)."""
    return [{"task": t, "layer": lid, "module": s["layer"], "regularizer": r, "replicate": rep}
            for t in config["tasks"] for lid, s in task_layers(t).items() for r in regularizer_names()
            for rep in bfv_requests.layer_replicates(config, t, lid)]


def attribution_files():
    """(task, method) and the attribution map of every task and configured method."""
    keys = [(t, m) for t in config["tasks"] for m in config["attribution"]["methods"]]
    return keys, [f"{ATTRIBUTION.format(task=t)}/{m}.nii.gz" for t, m in keys]


def lesion_tasks():
    return [t for t in config["tasks"] if task_dataset(t) == "lesions"]


def compare_records():
    """What compare_regularizers reads, as records that carry their own paths (brainfv.jobs.compare): one per
    visualization job (its volumes and table, and its trained replicate: the top level of the summary's
    hierarchy), per task (its model's description, dataset files, head and kind), per trained replicate tested on
    a transfer model (transfer_pairs) and per attribution map."""
    randomized = config["compare"]["randomized"]
    entries = [{**e, "nifti": featviz_file(e, "units.nii.gz"), "table": featviz_file(e, "units.tsv"),
                "randomized": featviz_file(e, "randomized.nii.gz") if randomized else None}
               for e in featviz_entries()]
    tasks = [{"task": t, "info": model_info(t), "head": bfv_config.task_head(config, t),
              "model_kind": bfv_config.task_model_kind(config, t),
              **{k: dataset_file(task_dataset(t), k) for k in ("participants", "volumes", "reference", "mask",
                                                              "sex_effect", "sex_effect_regional")},
              "lesion_masks": dataset_file("lesions", "lesion_masks") if t in lesion_tasks() else None,
              "known": model_file(t, "main", KNOWN_FILE) if constructed(t) else None}
             for t in config["tasks"]]
    transfer = [{"task": t, "replicate": r, "model": model_file(t, role),
                 "predictions": model_file(t, role, "predictions.tsv"), "transfer_model": model_file(t, other),
                 "transfer_predictions": model_file(t, other, "predictions.tsv")}
                for t in transfer_tasks() for r, role, other in transfer_pairs(t)]
    keys, paths = attribution_files()
    attributions = [{"task": t, "method": m, "path": p} for (t, m), p in zip(keys, paths)]
    return {"entries": entries, "tasks": tasks, "transfer": transfer, "attributions": attributions}


def record_paths(records):
    """Every file the records name (the rule's declared inputs: a newer one reruns the comparison)."""
    path_keys = {"nifti", "table", "randomized", "info", "participants", "volumes", "reference", "mask", "sex_effect",
                 "sex_effect_regional", "lesion_masks", "model", "predictions", "transfer_model",
                 "transfer_predictions", "path", "known"}
    return list(dict.fromkeys(v for group in records.values() for r in group for k, v in r.items()
                              if k in path_keys and v))


def grid_keys():
    return list(dict.fromkeys((e["task"], e["layer"]) for e in featviz_entries()))


def model_targets():
    return [model_file(t, r, "learning_curve.png") for t in config["tasks"] for r in roles(t)] + [
        model_info(t) for t in config["tasks"] if provided(t)]


def data_targets():
    return [dataset_file("cohort", "qc_figure"),
            dataset_file("lesions", "lesion_examples")]


def exemplar_source(task, layer):
    """The exemplars shown beside a request: its own, or those of a request on the same layer that has them."""
    return bfv_requests.exemplar_source(config, task, layer)


def unit_figure_inputs(wc):
    """What a request's figure and viewer show: its visualizations under every preset, its exemplars and, for
    the model's output units, the attribution maps."""
    regs = regularizer_names()
    entry = lambda r: {"task": wc.task, "layer": wc.layer, "regularizer": r}  # noqa: E731
    out = {"niftis": [featviz_file(entry(r), "units.nii.gz") for r in regs],
           "tables": [featviz_file(entry(r), "units.tsv") for r in regs],
           "mask": dataset_file(task_dataset(wc.task), "mask"),
           "reference": dataset_file(task_dataset(wc.task), "reference"),
           "info": model_info(wc.task)}
    ex = exemplar_source(wc.task, wc.layer)
    if ex:
        out["exemplars"] = f"{EXEMPLARS.format(task=wc.task, layer=ex)}/exemplars.nii.gz"
        out["exemplar_table"] = f"{EXEMPLARS.format(task=wc.task, layer=ex)}/exemplars.tsv"
    out["attributions"] = [f"{ATTRIBUTION.format(task=wc.task)}/{m}.nii.gz" for m in config["attribution"]["methods"]]
    return out


def unit_figure_params(wc):
    spec = layer_spec(wc.task, wc.layer)
    return {"task": wc.task, "layer": wc.layer, "module": spec["layer"], "regularizers": regularizer_names(),
            "methods": config["attribution"]["methods"]}


def unit_figure_targets():
    return [f"{REPORT}/{kind}_{k[0]}_{k[1]}.{ext}" for k in grid_keys()
            for kind, ext in (("units", "png"), ("viewer", "html"))]


def exemplar_targets():
    return [f"{EXEMPLARS.format(task=t, layer=l)}/exemplars.tsv" for t in config["tasks"] for l in exemplar_layers(t)]


def all_targets():
    return data_targets() + model_targets() + [featviz_file(e, "units.tsv") for e in featviz_entries()] + \
        exemplar_targets() + attribution_files()[1] + unit_figure_targets() + [f"{REPORT}/metrics.png"]
