"""The workflow as users run it: dry runs, lint, env files, and the tiny study end to end."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(*args, cwd=ROOT, check=True, timeout=1200):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(SNAKEMAKE + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-6000:]}")
    return p


def test_dry_run_default_config(tmp_path):
    p = smk("-n", "--config", f"results={tmp_path}/res")
    out = p.stdout + p.stderr
    for rule in ("prepare_cohort", "synthesize_lesions", "train_model", "visualize"):
        assert re.search(rf"^{rule}\s+\d+", out, re.M), rule


def test_sex_positive_control_is_built_from_the_cohort_effect_map(tmp_path):
    """construct_model for a sex control declares the files it reads: the cohort's regional effect map and mask."""
    target = f"{tmp_path}/res/models/sex-known-flatten/main/model.pt"
    p = smk("-n", target, "--configfile", "config/test.yaml", "--config", f"results={tmp_path}/res")
    out = p.stdout + p.stderr
    job = out[out.index("rule construct_model:"):].split("\n\n")[0]
    inputs = re.search(r"input: (.*)", job).group(1).split(", ")
    assert sorted(Path(f).name for f in inputs) == ["mask.nii.gz", "participants.tsv", "reference.nii.gz",
                                                    "sex_effect_regional.nii.gz"]
    assert all("/data/cohort/" in f for f in inputs) and "task=sex-known-flatten" in job


def test_dry_run_trains_and_visualises_each_replicate(tmp_path):
    """config/test.yaml: the lesion task has two replicates, replicate 1 its transfer model; the sex task one
    replicate and a trained transfer model. Requests with replicates: first run on replicate 0 only."""
    p = smk("-n", "--configfile", "config/test.yaml", "--config", f"results={tmp_path}/res")
    out = p.stdout + p.stderr
    trained = set(re.findall(r"wildcards: task=([\w.-]+), role=(\w+)", out))
    assert {("lesion", "main"), ("lesion", "rep1"), ("sex", "main"), ("sex", "transfer")} <= trained
    assert ("lesion", "transfer") not in trained and ("sex", "rep1") not in trained
    assert re.search(r"log: \S+/logs/train_model/lesion_rep1\.log", out)
    vis = set(re.findall(r"wildcards: task=([\w.-]+), rep=(\S*), layer=([\w.-]+), regularizer=\w+", out))
    assert {(t, layer) for t, rep, layer in vis if rep == "rep1/"} == {("lesion", "classifier")}
    assert ("lesion", "", "block1.norm") in vis and ("lesion", "rep1/", "block1.norm") not in vis
    assert re.search(r"input: \S+/models/lesion/rep1/model\.pt, \S+/models/lesion/rep1/metrics\.json", out)
    assert f"{tmp_path}/res/featviz/lesion/rep1/classifier/maco/units.tsv" in out


def common(override=None):
    """The rules' shared helpers (workflow/rules/common.smk) on config/config.yaml with ``override`` merged in as
    Snakemake merges a --configfile (dict by dict), without Snakemake."""
    from types import SimpleNamespace

    def merge(a, b):
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    rules = ROOT / "workflow/rules"
    ns = {"config": merge(yaml.safe_load((ROOT / "config/config.yaml").read_text()), override or {}),
          "workflow": SimpleNamespace(current_basedir=SimpleNamespace(get_path_or_uri=lambda **_: str(rules)))}
    exec(compile((rules / "common.smk").read_text(), str(rules / "common.smk"), "exec"), ns)
    return SimpleNamespace(**ns)


def test_replicates_in_models_requests_and_comparison_records():
    c = common({"results": "res"})
    assert c.roles("sex") == ["main", "rep1"] and c.roles("lesion-known") == [] and c.transfer_role("sex") == "rep1"
    assert [c.model_spec("sex", r)["replicate"] for r in ("main", "rep1")] == [0, 1]
    assert "replicates" not in c.model_spec("sex", "rep1")["training"]  # a third replicate retrains no other
    reps = {}
    for e in c.featviz_entries():
        reps.setdefault((e["task"], e["layer"]), set()).add(e["replicate"])
    assert reps["lesion", "block2.norm"] == {0} and reps["sex", "classifier"] == {0, 1}  # replicates: first / all
    assert reps["lesion-known", "classifier"] == {0}                                  # a built network: one
    rec = c.compare_records()
    by_rep = {(e["task"], e["layer"], e["regularizer"], e["replicate"]): e for e in rec["entries"]}
    assert by_rep["sex", "classifier", "none", 1]["nifti"] == "res/featviz/sex/rep1/classifier/none/units.nii.gz"
    assert by_rep["sex", "classifier", "none", 0]["nifti"] == "res/featviz/sex/classifier/none/units.nii.gz"
    transfer = {(r["task"], r["replicate"]): r for r in rec["transfer"]}
    assert transfer["sex", 0]["transfer_model"] == "res/models/sex/rep1/model.pt"  # never its own network
    assert transfer["sex", 1]["transfer_model"] == "res/models/sex/main/model.pt"
    assert "res/models/sex/rep1/predictions.tsv" in c.record_paths(rec)
    assert "res/models/sex/rep1/learning_curve.png" in c.model_targets()
    # a trained transfer model beside the replicates, its seed after theirs; a task's own number of replicates
    c = common({"results": "res", "transfer": {"from_replicate": False},
                "tasks": {"lesion": {"training": {"replicates": 3}}}})
    assert c.roles("lesion") == ["main", "rep1", "rep2", "transfer"] and c.model_spec("lesion", "transfer")[
        "replicate"] == 3
    assert {r["transfer_model"] for r in c.compare_records()["transfer"] if r["task"] == "lesion"} == {
        "res/models/lesion/transfer/model.pt"}


def test_bad_config_fails_before_any_job(tmp_path):
    p = smk("-n", "--config", "grid={'voxel_size': -3}", check=False)
    assert p.returncode != 0 and "voxel_size" in p.stdout + p.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cohort: {splits: {train: 0.9, val: 0.2, test: 0.2}}\n")
    p = smk("-n", "--configfile", str(cfg), check=False)
    assert p.returncode != 0 and "cohort.splits" in p.stdout + p.stderr
    cfg.write_text("cohort: {sourse: synthetic}\n")
    p = smk("-n", "--configfile", str(cfg), check=False)
    assert p.returncode != 0 and "sourse" in p.stdout + p.stderr
    cfg.write_text("featviz: {layers: [{layer: block9.conv}]}\n")
    p = smk("-n", "--configfile", str(cfg), check=False)
    assert p.returncode != 0 and "block9.conv" in p.stdout + p.stderr
    cfg.write_text("tasks: {sex: {dataset: cohort, target: sex, training: {epocs: 1}}}\n")  # a misspelt override
    p = smk("-n", "--configfile", str(cfg), check=False)
    assert p.returncode != 0 and "tasks.sex.training: unknown key(s) ['epocs']" in p.stdout + p.stderr


def test_lint_clean():
    p = smk("--lint", "json", check=False)
    if not p.stdout.strip():  # no lints: snakemake prints only a congratulation
        assert "good condition" in p.stderr, p.stderr
        return
    report = json.loads(p.stdout)
    problems = [(r.get("rule") or r.get("snakefile"), lint["title"]) for kind in ("snakefiles", "rules")
                for r in report.get(kind, []) for lint in r.get("lints", [])]
    assert problems == [], problems


# which conda package provides each import
IMPORT_TO_PACKAGE = {"torch": "pytorch", "yaml": "pyyaml", "sklearn": "scikit-learn", "torchio": "torchio",
                     "nibabel": "nibabel", "nilearn": "nilearn", "numpy": "numpy", "scipy": "scipy",
                     "pandas": "pandas", "matplotlib": "matplotlib", "seaborn": "seaborn", "snakemake": None,
                     "_setup": None, "brainfv": None, "captum": "captum", "jsonschema": "jsonschema", "monai": None,
                     "PIL": "pillow"}
STDLIB = set(sys.stdlib_module_names)


def imports_of(path, seen=None):
    """Top-level packages a script imports, following brainfv modules transitively."""
    seen = seen if seen is not None else set()
    if path in seen:
        return set()
    seen.add(path)
    tree = ast.parse(Path(path).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside brainfv
                base = Path(path).parent
                for _ in range(node.level - 1):
                    base = base.parent
                mod = (node.module or "").split(".") if node.module else []
                targets = [base.joinpath(*mod)] if mod else [base / a.name for a in node.names]
                for t in targets:
                    for cand in (t.with_suffix(".py"), t / "__init__.py"):
                        if cand.exists():
                            found |= imports_of(cand, seen)
                continue
            names = [node.module]
        else:
            continue
        for n in names:
            top = n.split(".")[0]
            if top == "brainfv":
                t = ROOT / "src" / Path(*n.split("."))
                for cand in (t.with_suffix(".py"), t / "__init__.py"):
                    if cand.exists():
                        found |= imports_of(cand, seen)
            found.add(top)
    return found


def rule_envs():
    """Map script name -> env file names from the rules (conda: env("...") / script: "...")."""
    out = {}
    for smk_file in (ROOT / "workflow/rules").glob("*.smk"):
        text = smk_file.read_text()
        for block in re.split(r"\nrule ", text)[1:]:
            script = re.search(r'script:\s*\n\s*"\.\./scripts/([\w]+\.py)"', block)
            envs = re.findall(r'env\((?:"([\w-]+)"(?: if [^)]* else "([\w-]+)")?)\)', block)
            if script:
                names = {e for pair in envs for e in pair if e}
                out.setdefault(script.group(1), set()).update(names)
    return out


def env_packages(name):
    spec = yaml.safe_load((ROOT / "envs" / f"{name}.yaml").read_text())
    pkgs = set()
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            pkgs |= {re.split(r"[<>=!\[ ]", d)[0] for d in dep.get("pip", [])}
        else:
            pkgs.add(re.split(r"[<>=! ]", dep)[0])
    assert any(p == "python" for p in pkgs), f"envs/{name}.yaml must pin python="
    return pkgs


def test_every_script_has_an_env_covering_its_imports():
    mapping = rule_envs()
    scripts = {p.name for p in (ROOT / "workflow/scripts").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(mapping), f"scripts without a rule/env: {scripts ^ set(mapping)}"
    for script, envs in mapping.items():
        assert envs, f"{script}: its rule has no conda env"
        needed = {IMPORT_TO_PACKAGE.get(m, m) for m in imports_of(ROOT / "workflow/scripts" / script)
                  if m not in STDLIB} - {None}
        for env in envs:
            pkgs = env_packages(env)
            pkgs |= {"pytorch"} if "pytorch-gpu" in pkgs else set()
            missing = needed - pkgs
            assert not missing, f"{script}: envs/{env}.yaml lacks {sorted(missing)}"


def user_models(folder):
    """Two models "trained elsewhere" for the tiny grid: a MONAI DenseNet saved as a state dict and a small CNN
    exported to TorchScript; returns the config (YAML text) of two tasks that use them, and their layers."""
    import torch
    from monai.networks.nets import DenseNet
    from torch import nn

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 8, "growth_rate": 4,
              "block_config": [2, 2], "bn_size": 2}
    torch.save(DenseNet(**kwargs).state_dict(), folder / "densenet.pt")
    cnn = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    torch.jit.save(torch.jit.script(cnn), str(folder / "scripted.pt"))
    study = yaml.safe_load((ROOT / "config/test.yaml").read_text())
    for spec in study["featviz"]["layers"]:
        spec.setdefault("tasks", list(study["tasks"]))  # the study's tasks, not the user models
    study["featviz"]["layers"] += [
        {"layer": "features.denseblock1.denselayer2.layers.conv2", "units": 2, "tasks": ["densenet"]},
        {"layer": "class_layers.out", "units": "all", "tasks": ["densenet"]},
        {"layer": "3", "units": 2, "objective": "neuron", "tasks": ["scripted"]},
        {"layer": "7", "units": "all", "tasks": ["scripted"]},
    ]
    cfg = {"tasks": {
        "densenet": {"dataset": "cohort", "target": "sex", "model": {
            "checkpoint": str(folder / "densenet.pt"), "format": "state_dict",
            "architecture": {"name": "monai:DenseNet", "kwargs": kwargs}, "classes": ["F", "M"],
            "input": {"shape": [20, 24, 20], "voxel_size": 8.0, "normalisation": "zscore-brain"}}},
        "scripted": {"dataset": "lesions", "target": "lesion", "model": {
            "checkpoint": str(folder / "scripted.pt"), "format": "torchscript", "classes": ["absent", "present"]}}},
        "featviz": {"layers": study["featviz"]["layers"]}}
    return yaml.safe_dump(cfg)


@pytest.mark.workflow
def test_tiny_study_end_to_end(tmp_path):
    import nibabel as nib
    import numpy as np
    import pandas as pd

    res = tmp_path / "res"
    extra = tmp_path / "user_models.yaml"
    extra.write_text(user_models(tmp_path / "models"))
    cfg = ["--configfile", "config/test.yaml", str(extra), "--config", f"results={res}"]
    smk("--cores", "2", *cfg)
    parts = (res / "data/cohort/participants.tsv").read_text()
    assert "synthetic" in parts
    for t, role, replicate in (("sex", "main", 0), ("sex", "transfer", 1), ("lesion", "main", 0),
                               ("lesion", "rep1", 1)):  # lesion: two replicates, replicate 1 its transfer model
        m = json.loads((res / f"models/{t}/{role}/metrics.json").read_text())
        assert m["test"]["n"] > 0 and m["role"] == role and m["replicate"] == replicate
    assert not (res / "models/lesion/transfer").exists() and not (res / "models/sex/rep1").exists()
    assert (res / "featviz/lesion/rep1/classifier/fourier/units.nii.gz").exists()
    assert not (res / "featviz/lesion/rep1/block2.norm").exists()  # replicates: first
    img = nib.load(res / "featviz/lesion/block2.norm/fourier/units.nii.gz")
    ref = nib.load(res / "data/cohort/reference.nii.gz")
    assert img.shape == ref.shape + (4,) and (img.affine == ref.affine).all()  # 2 units x 2 seeds
    assert nib.load(res / "featviz/lesion/block2.norm/fourier/randomized.nii.gz").shape == img.shape
    # a single unit on request: same seeds, so the same volumes as in the batched job
    target = res / "featviz/lesion/block2.norm/fourier/unit-1.nii.gz"
    smk(str(target), "--cores", "2", *cfg)
    assert np.array_equal(nib.load(target).get_fdata()[..., 0], img.get_fdata()[..., 1])
    # models given by the user: described, checked, visualised, compared and reported without training
    for task, out_layer in (("densenet", "class_layers.out"), ("scripted", "7")):
        info = json.loads((res / f"models/{task}/provided/model.json").read_text())
        assert info["output_layer"] == out_layer and not (res / f"models/{task}/main").exists()
        assert (res / f"report/units_{task}_{out_layer}.png").exists()
    # the comparison: raw, null and calibrated columns; the randomization check; CIs in the summary
    table = pd.read_csv(res / "report/comparison.tsv", sep="\t")
    vis = table[~table["regularizer"].str.startswith("attribution:")]
    assert set(vis["regularizer"]) == {"fourier", "maco"} and vis["lesion_ncc"].notna().any()
    for col in ("lesion_ncc_randomized", "lesion_ncc_other", "lesion_ncc_surrogate", "lesion_ncc_z",
                "effect_corr_surrogate", "transfer_prob_surrogate", "act_matched_z"):
        assert col in table, col
    assert table["regularizer"].str.startswith("attribution:").any()  # the positive control
    assert set(vis["task"]) == {"sex", "lesion", "sex-flatten", "lesion-flatten", "lesion-known",
                                "lesion-known-flatten", "sex-known-flatten", "densenet", "scripted"}
    # the positive controls: built (not trained), per head, summarised per head and model kind
    known = json.loads((res / "models/lesion-known-flatten/main/metrics.json").read_text())
    assert known["role"] == "positive control" and known["construction"]["head"] == "flatten"
    assert not (res / "models/lesion-known/transfer").exists() and not (res / "models/sex-flatten/transfer").exists()
    # block 1 neurons probe where lesions were planted, at two positions (positions: 2), the same for both tasks
    probes = {t: pd.read_csv(res / f"featviz/{t}/block1.norm/fourier/units.tsv", sep="\t") for t in ("sex", "lesion")}
    pos = {t: set(zip(d["position_index"], d["position"])) for t, d in probes.items()}
    assert pos["sex"] == pos["lesion"] and len(pos["sex"]) == 2 and all("," in str(p) for _, p in pos["sex"])
    assert {i for i, _ in pos["sex"]} == {0, 1} and probes["lesion"]["region"].nunique() == 2
    assert nib.load(res / "featviz/lesion/block1.norm/fourier/units.nii.gz").shape[-1] == 2 * 2 * 2  # K x units x seeds
    summary = pd.read_csv(res / "report/summary.tsv", sep="\t")
    probed = summary[(summary["task"] == "lesion") & (summary["layer"] == "block1.norm")]
    assert len(probed) and (probed["n_positions"] == 2).all()
    # the lesion task's class logits on both replicates: the top level of their intervals
    logits = vis[(vis["task"] == "lesion") & (vis["layer"] == "classifier")]
    assert set(logits["replicate"]) == {0, 1} and set(vis.loc[vis["layer"] == "block2.norm", "replicate"]) == {0}
    rows = summary[(summary["task"] == "lesion") & (summary["layer"] == "classifier")
                   & ~summary["regularizer"].str.startswith("attribution:")]  # attribution maps: replicate 0
    assert len(rows) and (rows["n_replicates"] == 2).all()
    tm = pd.read_csv(res / "report/transfer_models.tsv", sep="\t")
    assert set(tm.loc[tm["task"] == "lesion", "replicate"]) == {0, 1}
    for col in ("mean", "ci_low", "ci_high", "null_randomized", "gain_randomized_low", "min_gain", "min_gain_lo",
                "p_min_gain", "p_adj", "primary", "verdict", "z", "randomization_check", "head", "model"):
        assert col in summary, col
    kinds = summary.drop_duplicates("task").set_index("task")
    assert kinds.loc["lesion-known-flatten", "head"] == "flatten" and kinds.loc["lesion-known", "head"] == "pool"
    assert kinds.loc["lesion-known", "model"] == "positive control"
    assert kinds.loc["sex-known-flatten", "model"] == "positive control"
    assert vis.loc[vis["task"] == "sex-known-flatten", "effect_corr"].notna().any()  # scored with the sex truth
    assert kinds.loc["lesion-flatten", "model"] == "trained"
    assert kinds.loc["lesion", "head"] == "pool" and kinds.loc["densenet", "model"] == "given"
    checks = set(pd.read_csv(res / "report/sanity.tsv", sep="\t")["randomization_check"])
    assert checks <= {"pass", "fail", "no control"}
    # exemplars and attribution maps on the grid
    ex = nib.load(res / "exemplars/lesion/block2.norm/exemplars.nii.gz")
    assert ex.shape == ref.shape + (2 * 2,) and (ex.affine == ref.affine).all()
    attr = nib.load(res / "attribution/sex/integrated_gradients.nii.gz")
    assert attr.shape == ref.shape + (2,) and (attr.affine == ref.affine).all()
    # the report: every figure and viewer listed in the HTML
    report = tmp_path / "report.html"
    smk("--report", str(report), *cfg)
    html = report.read_text(errors="replace")
    for fig in ("metrics.png", "trajectories.png", "models.png", "signal_vs_null.png", "units_lesion_classifier.png",
                "viewer_lesion_classifier.html", "qc.png", "examples.png", "learning_curve.png", "sanity.tsv"):
        assert fig in html, fig
    for fig in res.glob("report/*.png"):
        from matplotlib.image import imread

        assert imread(fig).shape[0] > 200, fig
    from test_viewer import check_page_in_browser

    check_page_in_browser(res / "report/viewer_lesion_classifier.html", tmp_path / "shots")
    # nothing to do on a rerun (cached outputs)
    p = smk("-n", *cfg)
    assert "Nothing to be done" in p.stdout + p.stderr
    # every file a visualize / compare job reads is a declared input: a newer one reruns the job
    vis_target = res / "featviz/lesion/block2.norm/fourier/units.tsv"
    for f in ("models/lesion/main/model.pt", "data/lesions/participants.tsv", "data/lesions/volumes.npy",
              "data/lesions/mask.nii.gz", "data/lesions/reference.nii.gz"):
        assert_newer_input_reruns(cfg, res / f, vis_target, "visualize")
    comp = res / "report/comparison.tsv"
    for f in ("featviz/sex/classifier/maco/units.nii.gz", "featviz/lesion/block2.norm/fourier/units.tsv",
              "featviz/sex/classifier/maco/randomized.nii.gz", "models/sex/main/metrics.json",
              "models/lesion/rep1/model.pt", "featviz/lesion/rep1/classifier/maco/units.tsv",
              "models/sex/transfer/model.pt", "data/cohort/participants.tsv", "data/lesions/volumes.npy",
              "data/cohort/mask.nii.gz", "data/lesions/lesion_masks.npy", "data/cohort/sex_effect_regional.nii.gz",
              "attribution/sex/saliency.nii.gz"):
        assert_newer_input_reruns(cfg, res / f, comp, "compare_regularizers")


def assert_newer_input_reruns(cfg, path, target, rule):
    """A newer ``path`` reruns ``rule`` (Snakemake skips a newer small file whose checksum it recorded as
    unchanged; with that turned off, the mtime alone shows whether the file is a declared input)."""
    st = path.stat()
    os.utime(path, (st.st_atime + 3600, st.st_mtime + 3600))
    try:
        p = smk("-n", "--max-checksum-file-size", "0", str(target), *cfg)
        assert re.search(rf"^{rule}\s+1$", p.stdout, re.M), f"a newer {path.name} does not rerun {rule}"
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
