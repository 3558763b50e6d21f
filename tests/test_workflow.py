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
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def test_dry_run_default_config(tmp_path):
    p = smk("-n", "--config", f"results={tmp_path}/res")
    out = p.stdout + p.stderr
    for rule in ("prepare_cohort", "synthesize_lesions", "train_model", "visualize"):
        assert re.search(rf"^{rule}\s+\d+", out, re.M), rule


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
                     "_setup": None, "brainfv": None}
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


@pytest.mark.workflow
def test_tiny_study_end_to_end(tmp_path):
    res = tmp_path / "res"
    smk("--cores", "2", "--configfile", "config/test.yaml", "--config", f"results={res}")
    parts = (res / "data/cohort/participants.tsv").read_text()
    assert "synthetic" in parts
    for t in ("sex", "lesion"):
        for role in ("main", "transfer"):
            m = json.loads((res / f"models/{t}/{role}/metrics.json").read_text())
            assert m["test"]["n"] > 0 and m["role"] == role
    import nibabel as nib

    img = nib.load(res / "featviz/lesion/block2.norm/fourier/units.nii.gz")
    ref = nib.load(res / "data/cohort/reference.nii.gz")
    assert img.shape == ref.shape + (2,) and (img.affine == ref.affine).all()
    # a single unit on request: same seeds, so the same volume as in the batched job
    target = res / "featviz/lesion/block2.norm/fourier/unit-1.nii.gz"
    smk(str(target), "--cores", "2", "--configfile", "config/test.yaml", "--config", f"results={res}")
    import numpy as np

    assert np.array_equal(nib.load(target).get_fdata()[..., 0], img.get_fdata()[..., 1])
    # the report: every figure listed in the HTML
    report = tmp_path / "report.html"
    smk("--report", str(report), "--configfile", "config/test.yaml", "--config", f"results={res}")
    html = report.read_text(errors="replace")
    for fig in ("metrics.png", "trajectories.png", "models.png", "featviz_lesion_classifier.png", "qc.png",
                "examples.png", "learning_curve.png"):
        assert fig in html, fig
    for fig in res.glob("report/*.png"):
        from matplotlib.image import imread

        assert imread(fig).shape[0] > 200, fig
    table = __import__("pandas").read_csv(res / "report/comparison.tsv", sep="\t")
    assert set(table["regularizer"]) == {"fourier", "maco"} and table["lesion_ncc"].notna().any()
    # nothing to do on a rerun (cached outputs)
    p = smk("-n", "--configfile", "config/test.yaml", "--config", f"results={res}")
    assert "Nothing to be done" in p.stdout + p.stderr
    # every file a visualize / compare job reads is a declared input: a newer one reruns the job
    vis = res / "featviz/lesion/block2.norm/fourier/units.tsv"
    for f in ("models/lesion/main/model.pt", "data/lesions/participants.tsv", "data/lesions/volumes.npy",
              "data/lesions/mask.nii.gz", "data/lesions/reference.nii.gz"):
        assert_newer_input_reruns(res, res / f, vis, "visualize")
    comp = res / "report/comparison.tsv"
    for f in ("featviz/sex/classifier/maco/units.nii.gz", "featviz/lesion/block2.norm/fourier/units.tsv",
              "models/sex/main/model.pt", "models/lesion/transfer/model.pt", "data/cohort/participants.tsv",
              "data/lesions/volumes.npy", "data/cohort/mask.nii.gz", "data/lesions/reference.nii.gz",
              "data/cohort/sex_effect.nii.gz"):
        assert_newer_input_reruns(res, res / f, comp, "compare_regularizers")


def assert_newer_input_reruns(res, path, target, rule):
    st = path.stat()
    os.utime(path, (st.st_atime + 3600, st.st_mtime + 3600))
    try:
        p = smk("-n", str(target), "--configfile", "config/test.yaml", "--config", f"results={res}")
        assert re.search(rf"^{rule}\s+1$", p.stdout, re.M), f"a newer {path.name} does not rerun {rule}"
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
