"""One source of truth: every default lives in the config schema, and config/config.yaml only changes some."""
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

from brainfv import config as C
from brainfv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [C.TrainingConfig, C.AugmentConfig, C.ModelConfig, C.Preset, C.SexEffectConfig, C.VariabilityConfig,
            C.LesionConfig]


def test_package_schema_is_the_workflow_schema():
    assert C.SCHEMA_PATH.resolve() == (ROOT / "workflow/schemas/config.schema.yaml").resolve()


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_typed_sections_cover_their_schema_section_with_its_defaults(section):
    props = C.node(section._path)["properties"]
    fields = {f.name: f for f in dataclasses.fields(section)}
    assert set(fields) == set(props), f"{section.__name__} vs schema {section._path}"
    obj = section()
    for name, spec in props.items():
        value = getattr(obj, name)
        if isinstance(value, C.Section):
            value = value.as_dict()
        assert value == C.default(f"{section._path}.{name}"), f"{section._path}.{name}"


def defaults_of(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect._empty}


def test_library_defaults_equal_schema_defaults():
    from brainfv.data.synthetic import SyntheticCohort
    from brainfv.featviz.param import FourierParam, MacoParam, VoxelParam
    from brainfv.featviz.render import render
    from brainfv.featviz.study import visualize_layer
    from brainfv.models import BrainCNN, build_model

    d = C.complete({})
    r = defaults_of(render)
    assert (r["steps"], r["lr"]) == (d["featviz"]["steps"], d["featviz"]["lr"])
    v = defaults_of(visualize_layer)
    assert (v["steps"], v["lr"], v["n_seeds"]) == (d["featviz"]["steps"], d["featviz"]["lr"], d["featviz"]["seeds"])
    for cls in (VoxelParam, FourierParam, MacoParam):
        for k, val in defaults_of(cls.__init__).items():
            key = {"value_range": "range"}.get(k, k)
            if key in C.node("preset")["properties"]:
                assert val == C.default(f"preset.{key}"), f"{cls.__name__}.{k}"
    b = defaults_of(BrainCNN.__init__)
    for k, spec in C.node("model")["properties"].items():
        assert list(b[k]) == spec["default"] if isinstance(b[k], tuple) else b[k] == spec["default"], k
    assert build_model().arch == {**C.ModelConfig().as_dict(), "n_classes": 2, "in_channels": 1}
    s = defaults_of(SyntheticCohort.__init__)
    assert s["male_fraction"] == d["cohort"]["synthetic"]["male_fraction"]
    assert C.TrainingConfig().as_dict() == {k: v for k, v in d["training"].items()}


def _leaves(cfg, schema_node, path=()):
    """(dotted key, value) of config leaves; free-form dicts (tasks, presets) and lists are single leaves."""
    props = schema_node.get("properties") if isinstance(schema_node, dict) else None
    if isinstance(cfg, dict) and props:
        for k, v in cfg.items():
            assert k in props, f"config/config.yaml: unknown key {'.'.join(path + (k,))}"
            yield from _leaves(v, C._resolve(props[k]), path + (k,))
    else:
        yield ".".join(path), cfg


def test_default_config_sets_only_what_differs_with_a_reason():
    text = (ROOT / "config/config.yaml").read_text()
    cfg = yaml.safe_load(text) or {}
    defaults = C.complete({})
    lines = text.splitlines()
    for key, value in _leaves(cfg, C.schema()):
        d = defaults
        for k in key.split("."):
            d = d[k]
        assert value != d, f"config/config.yaml sets {key} to its schema default {d!r}: remove it"
        leaf = key.split(".")[-1]
        idx = [i for i, ln in enumerate(lines) if re.match(rf"\s*{re.escape(leaf)}\s*:", ln)]
        assert idx, key
        i = idx[0]
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"config/config.yaml: {key} needs a comment why"


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"tasks\.sex\.training: unknown key\(s\) \['epocs'\]"):
        C.check(C.complete({"tasks": {"sex": {"dataset": "cohort", "target": "sex", "training": {"epocs": 1}}}}))
    with pytest.raises(ConfigError, match=r"tasks\.sex\.training\.epochs"):
        C.check(C.complete({"tasks": {"sex": {"dataset": "cohort", "target": "sex", "training": {"epochs": 0}}}}))
    with pytest.raises(ConfigError, match=r"featviz\.regularizers\.mine: unknown key\(s\) \['jiter'\]"):
        C.complete({"featviz": {"regularizers": {"mine": {"jiter": 2}}}})
    with pytest.raises(ConfigError, match=r"transfer\.model: unknown key\(s\) \['chanels'\]"):
        C.check(C.complete({"transfer": {"model": {"chanels": [4]}}}))


def test_presets_in_a_config_are_added_to_the_defaults():
    cfg = C.complete({"featviz": {"regularizers": {"mine": {"tv": 1.0}, "l2": {"l2": 0.5}}}})
    regs = cfg["featviz"]["regularizers"]
    assert set(C.default("featviz.regularizers")) < set(regs) and regs["mine"]["tv"] == 1.0
    assert regs["l2"]["l2"] == 0.5 and regs["mine"]["param"] == C.default("preset.param")


def test_task_training_overrides_merge_with_the_section():
    cfg = C.check(C.complete({"training": {"lr": 0.01}, "tasks": {"t": {"dataset": "cohort", "target": "sex",
                                                                        "training": {"epochs": 3,
                                                                                     "augment": {"flip": True}}}}}))
    tr = C.task_training(cfg, "t")
    assert (tr["epochs"], tr["lr"], tr["augment"]["flip"], tr["augment"]["shift_vox"]) == (
        3, 0.01, True, C.default("training.augment.shift_vox"))


def test_task_and_preset_names_that_cannot_be_path_parts_are_named():
    with pytest.raises(ConfigError, match=r"tasks: 'my_model' does not match"):
        C.check(C.complete({"tasks": {"my_model": {"dataset": "cohort", "target": "sex"}}}))
    with pytest.raises(ConfigError, match=r"featviz\.regularizers: 'a/b' does not match"):
        C.check(C.complete({"featviz": {"regularizers": {"a/b": {}}}}))


def test_transfer_model_differs_from_the_main_one_by_default():
    cfg = C.complete({})
    assert cfg["transfer"]["bootstrap"] is True
    assert C.transfer_model(cfg) != cfg["model"]


def test_featviz_requests_are_checked_against_the_models_layers_before_any_job(tmp_path):
    """A layer the model lacks, or units out of its range, fail the config check (when the workflow loads,
    before any job), naming the request's key and listing the layers."""
    from brainfv.jobs.requests import check_requests

    def cfg(*layers, **over):
        return C.complete({"results": str(tmp_path / "results"), "featviz": {"layers": list(layers)}, **over})

    def check(c):  # what the workflow runs when it loads (workflow/rules/common.smk)
        c = C.check(c)
        check_requests(c)
        return c

    with pytest.raises(ConfigError) as e:
        check(cfg({"layer": "block2.norm"}, {"layer": "block4.norm", "units": 4}, {"layer": "block9.norm"}))
    msg = str(e.value)
    assert msg.startswith("config key featviz.layers[2].layer: 'block9.norm' is not a layer of the study's model")
    assert "block1.conv (8)" in msg and "classifier (2)" in msg
    with pytest.raises(ConfigError, match=r"featviz.layers\[0\].units \(layer 'block2.norm' of the study's model "
                                          r"\(config: model\) has \d+ units, task 'sex'\): channels \[99\] out "
                                          r"of range"):
        check(cfg({"layer": "block2.norm", "units": [0, 99]}))
    with pytest.raises(ConfigError, match=r"featviz.layers\[0\].units .*classifier.* has 2 units"):
        check(cfg({"layer": "classifier", "units": [2], "objective": "channel"}))
    assert check(cfg({"layer": "block2.norm", "units": [0, 3]}, {"layer": "classifier", "units": [0, 1]}))
    # a given model: checked against its describe_model outputs once they exist (before: by that job)
    import json
    import os

    ck = tmp_path / "net.pt"
    ck.write_bytes(b"x")
    given = {"tasks": {"mine": {"dataset": "cohort", "target": "sex", "model": {"checkpoint": str(ck)}}}}
    assert check(cfg({"layer": "features.conv9"}, **given))
    folder = tmp_path / "results/models/mine/provided"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"checkpoint": str(ck), "modules": ["features", "features.conv1",
                                                                                    "head"]}))
    (folder / "units.tsv").write_text("layer\ttype\tchannels\nfeatures.conv1\tConv3d\t6\nhead\tLinear\t\n")
    with pytest.raises(ConfigError, match=r"featviz.layers\[0\].layer: 'features.conv9' is not a layer of "
                                          r"tasks.mine.model \(task 'mine'\); layers \(units\): features, "
                                          r"features.conv1 \(6\), head"):
        check(cfg({"layer": "features.conv9"}, **given))
    with pytest.raises(ConfigError, match=r"featviz.layers\[0\].units .*has 6 units.*channels \[6\] out of range"):
        check(cfg({"layer": "features.conv1", "units": [6]}, **given))
    os.utime(ck, (os.stat(folder / "model.json").st_mtime + 10,) * 2)  # a new file: describe_model checks it
    assert check(cfg({"layer": "features.conv9"}, **given))


def test_a_replaced_given_model_is_not_checked_against_its_old_description(tmp_path):
    """A checkpoint copied over with its old modification time (cp -p) still has a new change time: its old
    describe_model outputs are not used to judge the requests (describe_model reruns: its content param)."""
    import json
    import os
    import shutil

    from brainfv.jobs.requests import check_requests, checkpoint_stat

    ck, other = tmp_path / "net.pt", tmp_path / "other.pt"
    ck.write_bytes(b"old network")
    other.write_bytes(b"a new network with another layer")
    folder = tmp_path / "results/models/mine/provided"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"checkpoint": str(ck), "modules": ["features", "head"],
                                                   "checkpoint_stat": checkpoint_stat(ck)}))
    (folder / "units.tsv").write_text("layer\ttype\tchannels\nfeatures\tConv3d\t6\nhead\tLinear\t\n")
    mine = {"dataset": "cohort", "target": "sex", "model": {"checkpoint": str(ck)}}
    cfg = C.check(C.complete({"results": str(tmp_path / "results"), "tasks": {"mine": mine},
                              "featviz": {"layers": [{"layer": "features.conv9"}]}}))
    with pytest.raises(ConfigError, match="'features.conv9' is not a layer of tasks.mine.model"):
        check_requests(cfg)
    st = os.stat(ck)
    shutil.copyfile(other, ck)
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p leaves it
    check_requests(cfg)  # the old description no longer speaks for the file: describe_model judges it


def test_request_keys_default_to_the_schema_in_one_place():
    """A featviz.layers entry's optional keys (objective, position, positions, units, replicates) are read
    through ``layer_key``, whose default is the schema's; the job request's fields default to the same."""
    from brainfv.jobs.requests import VisualizeRequest

    entry = C.node("featviz.layers")["items"]["properties"]
    for key in ("objective", "position", "positions", "units", "replicates"):
        assert C.layer_key({}, key) == entry[key]["default"], key
        assert C.layer_key({key: "given"}, key) == "given"
    fields = {f.name: f.default for f in dataclasses.fields(VisualizeRequest)}
    assert (fields["position"], fields["positions"]) == (entry["position"]["default"], entry["positions"]["default"])
    assert C.layer_id({"layer": "block3.norm"}) == "block3.norm"  # the default objective reads the layer's units
    with pytest.raises(ConfigError, match="no key 'featviz.layers.nope'"):
        C.default("featviz.layers.nope")
    # nothing below the config spells these defaults again
    literal = re.compile(r"""\.get\(\s*["'](objective|position|positions|units|replicates)["']\s*[,)]""")
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "workflow").rglob("*.smk"), *(ROOT / "workflow").rglob("*.py"),
             ROOT / "workflow/Snakefile", *(ROOT / "benchmarks").rglob("*.py")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders, offenders
