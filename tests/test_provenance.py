"""brainfv.provenance: a step's code hash follows the library modules it runs, and only those."""
import shutil
from pathlib import Path

import pytest

from brainfv import provenance as P

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A copy of the package (the schema link's target copied) that provenance reads instead of src/brainfv;
    the caches are emptied before and after, so no other test sees the copy's parses."""
    copy = tmp_path / "brainfv"
    shutil.copytree(ROOT / "src/brainfv", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(P, "ROOT", copy)
    P._forget()
    yield copy
    P._forget()


def test_scripts_reach_the_modules_that_hold_their_logic():
    vis = P.modules_used(ROOT / "workflow/scripts/visualize.py")
    assert {"brainfv.featviz.study", "brainfv.featviz.render", "brainfv.featviz.objectives", "brainfv.config",
            "brainfv.jobs.featviz", "brainfv.jobs.base", "brainfv.models.load", "brainfv"} <= set(vis)
    prep = P.modules_used(ROOT / "workflow/scripts/prepare_cohort.py")
    assert "brainfv.data.cohort" in prep and "brainfv.featviz.render" not in prep


def test_editing_a_module_changes_the_hash_of_the_steps_that_run_it_only(pkg):
    scripts = {s: ROOT / f"workflow/scripts/{s}.py" for s in ("visualize", "prepare_cohort", "train_model")}
    before = {s: P.code_hash(f) for s, f in scripts.items()}
    render = pkg / "featviz/render.py"
    render.write_text(render.read_text() + "\nCHANGED = 1\n")
    P._forget()
    after = {s: P.code_hash(f) for s, f in scripts.items()}
    assert after["visualize"] != before["visualize"]
    assert after["prepare_cohort"] == before["prepare_cohort"] and after["train_model"] == before["train_model"]


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


def test_comments_docstrings_and_layout_leave_the_hash_alone(pkg):
    """A doc-only edit of a module every step imports (brainfv.config) reruns nothing; a code edit there, even
    a string that is not a docstring, reruns every step that imports it."""
    script = ROOT / "workflow/scripts/visualize.py"
    cfg = pkg / "config.py"
    text = cfg.read_text()
    before = P.code_hash(script)

    def hash_of(new):
        cfg.write_text(new)
        P._forget()
        return P.code_hash(script)

    head, sep, rest = text.partition('"""')  # the module docstring's opening quotes
    assert sep
    doc_edit = head + sep + "An edited sentence. " + rest
    comment_edit = text.replace("\n\n\n", "\n\n\n# a new comment\n\n\n", 1)
    def_line = next(line for line in text.splitlines() if line.startswith("def "))  # code, not a docstring
    layout_edit = text.replace(def_line, def_line.replace("(", "(  ", 1).replace(",", " ,"), 1) + "\n\n"
    assert doc_edit != text and comment_edit != text and layout_edit != text
    assert hash_of(doc_edit) == before
    assert hash_of(comment_edit) == before
    assert hash_of(layout_edit) == before
    assert hash_of(text + '\nMESSAGE = "not a docstring"\n') != before
    assert hash_of(text.replace("def ", "def _renamed_", 1)) != before


def test_code_text_drops_docstrings_only():
    src = '"""Module doc."""\nimport os  # why\n\n\nclass A:\n    """Class doc."""\n\n\ndef f(x):\n' \
          '    """Function doc."""\n    return "kept"  # a comment\n'
    out = P.code_text(src)
    assert "doc" not in out and "why" not in out and "comment" not in out
    assert "'kept'" in out and "import os" in out and "class A:\n    pass" in out
    assert P.code_text(src.replace('"kept"', '"other"')) != out


def test_a_coding_declaration_is_read_as_python_reads_it():
    body = '"caf\u00e9"\nX = "caf\u00e9"\n'.encode("utf-8")
    assert P.code_text(b"# -*- coding: utf-8 -*-\n" + body) != P.code_text(b"# -*- coding: latin-1 -*-\n" + body)


def test_the_schema_is_in_the_hash_of_every_step_that_reads_the_config(pkg):
    """Library functions take their defaults from the schema where a job passes no value: a schema edit reruns
    the steps that import brainfv.config (byte for byte: a description edit too)."""
    from brainfv.config import SCHEMA_PATH

    assert P.DATA_FILES["brainfv.config"] == (SCHEMA_PATH.name,)  # the file brainfv.config reads
    script = ROOT / "workflow/scripts/visualize.py"
    assert "brainfv.config" in P.modules_used(script)
    before = P.code_hash(script)
    schema = pkg / "config.schema.yaml"
    schema.write_text(schema.read_text().replace("default: 512", "default: 256", 1))
    P._forget()
    assert P.code_hash(script) != before
