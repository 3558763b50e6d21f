"""brainfv.provenance: a step's code hash follows the library modules it runs, and only those."""
import shutil
from pathlib import Path

import pytest

from brainfv import provenance as P

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_reach_the_modules_that_hold_their_logic():
    vis = P.modules_used(ROOT / "workflow/scripts/visualize.py")
    assert {"brainfv.featviz.study", "brainfv.featviz.render", "brainfv.featviz.objectives", "brainfv.config",
            "brainfv.jobs.featviz", "brainfv.jobs.base", "brainfv.models.load", "brainfv"} <= set(vis)
    prep = P.modules_used(ROOT / "workflow/scripts/prepare_cohort.py")
    assert "brainfv.data.cohort" in prep and "brainfv.featviz.render" not in prep


def test_editing_a_module_changes_the_hash_of_the_steps_that_run_it_only(tmp_path, monkeypatch):
    pkg = tmp_path / "brainfv"
    shutil.copytree(ROOT / "src/brainfv", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(P, "ROOT", pkg)
    P._closure.cache_clear()
    P._file_digest.cache_clear()
    scripts = {s: ROOT / f"workflow/scripts/{s}.py" for s in ("visualize", "prepare_cohort", "train_model")}
    before = {s: P.code_hash(f) for s, f in scripts.items()}
    render = pkg / "featviz/render.py"
    render.write_text(render.read_text() + "\n# an edit\n")
    P._file_digest.cache_clear()
    after = {s: P.code_hash(f) for s, f in scripts.items()}
    assert after["visualize"] != before["visualize"]
    assert after["prepare_cohort"] == before["prepare_cohort"] and after["train_model"] == before["train_model"]
    P._closure.cache_clear()
    P._file_digest.cache_clear()


@pytest.mark.parametrize("module", ["brainfv.training", "brainfv.featviz.study", "brainfv.jobs.featviz"])
def test_module_entries(module):
    assert module in P.modules_used(module) and len(P.code_hash(module)) == 16


def test_excluded_modules_leave_the_hash_alone():
    mods = P.modules_used("brainfv.jobs.train")
    assert "brainfv.report.figures" in mods and "brainfv.training" in mods
    assert P.code_hash("brainfv.jobs.train", exclude=("brainfv.report",)) != P.code_hash("brainfv.jobs.train")


def test_training_code_reaches_no_plot():
    """The training checkpoint is keyed on the training code; its learning-curve plot is the job's."""
    assert not any(m.startswith("brainfv.report") for m in P.modules_used("brainfv.training"))
