"""brainfv.jobs.requests: what the rules and the command line ask of the jobs, built once from the config."""

import pytest

from brainfv import config as C
from brainfv.errors import ConfigError
from brainfv.jobs import requests as Q


@pytest.fixture
def cfg():
    return C.complete({})


def test_visualize_request_reads_the_config(cfg):
    spec = Q.layer_spec(cfg, "sex", "classifier")
    r = Q.visualize_request(cfg, task="sex", layer="classifier", spec=spec, regularizer="tv", only_unit=1)
    fv = cfg["featviz"]
    assert r.as_dict() == {
        "only_unit": 1, "task": "sex", "layer": "classifier", "module": "classifier", "regularizer": "tv",
        "units": "all", "objective": "channel", "preset": fv["regularizers"]["tv"], "steps": fv["steps"],
        "lr": fv["lr"], "n_seeds": spec["seeds"], "n_real": fv["n_real"], "micro_batch": fv["micro_batch"],
        "device": fv["device"], "seed": cfg["seed"], "randomized": cfg["compare"]["randomized"],
        "converge": fv["converge"], "position": "centre", "positions": 1, "replicate": 0, "amp": fv["amp"]}
    assert list(r.as_dict())[:3] == ["only_unit", "task", "layer"]  # the rule param's order, kept between runs
    # a request without its own seeds takes featviz.seeds
    r2 = Q.visualize_request(cfg, task="sex", layer="block4.norm", spec=Q.layer_spec(cfg, "sex", "block4.norm"),
                             regularizer="none")
    assert r2.n_seeds == fv["seeds"] and r2.only_unit is None and r2.module == "block4.norm"


def test_command_line_options_override_the_config(cfg):
    r = Q.visualize_request(cfg, task="cli", layer="x", spec={"layer": "x", "units": [0, 3], "objective": "neuron"},
                            regularizer="custom", preset={"param": "fourier"}, steps=7, lr=0.5, n_seeds=3,
                            device="cpu", seed=11, randomized=False)
    assert (r.steps, r.lr, r.n_seeds, r.device, r.seed, r.randomized, r.preset, r.units) == (
        7, 0.5, 3, "cpu", 11, False, {"param": "fourier"}, [0, 3])
    assert r.n_real == cfg["featviz"]["n_real"]


def test_a_job_names_missing_and_unknown_request_keys(cfg):
    d = Q.visualize_request(cfg, task="sex", layer="classifier", spec=Q.layer_spec(cfg, "sex", "classifier"),
                            regularizer="tv").as_dict()
    assert Q.VisualizeRequest.from_dict(d).as_dict() == d
    d.pop("steps")
    with pytest.raises(ConfigError, match=r"unknown keys \['step'\], missing keys \['steps'\]"):
        Q.VisualizeRequest.from_dict({**d, "step": 3})


def test_several_probe_positions_are_a_neuron_request_at_lesions():
    """featviz.layers[].positions: K reaches the job's request and the exemplars'; an old request dict without
    the key still loads (K = 1); K > 1 anywhere but a neuron objective at position: lesions fails at DAG time."""
    layers = [{"layer": "block2.norm", "units": 2, "objective": "neuron", "position": "lesions", "positions": 3},
              {"layer": "block4.norm", "units": 2}]
    cfg = C.complete({"featviz": {"layers": layers}})
    Q.check_requests(cfg)
    assert cfg["featviz"]["layers"][1]["positions"] == 1  # the schema's default
    spec = Q.layer_spec(cfg, "lesion", "block2.norm")
    d = Q.visualize_request(cfg, task="lesion", layer="block2.norm", spec=spec, regularizer="tv").as_dict()
    assert d["positions"] == 3 and Q.exemplars_request(cfg, "lesion", "block2.norm")["positions"] == 3
    d.pop("positions")
    assert Q.VisualizeRequest.from_dict(d).positions == 1
    for bad in ({"position": "centre"}, {"position": [0, -20, 10]}, {"objective": "channel"}):
        c = C.complete({"featviz": {"layers": [{**layers[0], **bad}, layers[1]]}})
        with pytest.raises(ConfigError, match=r"featviz.layers\[0\].positions: 3 probe positions need"):
            Q.check_requests(c)
    with pytest.raises(ConfigError, match=r"featviz.layers.0.positions"):
        C.complete({"featviz": {"layers": [{**layers[0], "positions": 0}]}})


def test_unknown_request_is_named(cfg):
    with pytest.raises(ConfigError, match="'nope' is not visualised for task 'sex'"):
        Q.layer_spec(cfg, "sex", "nope")


def test_unit_counts_for_memory(cfg):
    assert Q.layer_unit_count(cfg, "sex", "block4.norm") == 4
    assert Q.layer_unit_count(cfg, "sex", "classifier") == 2  # "all" of the two logits
    given = {**cfg, "tasks": {**cfg["tasks"], "own": {"dataset": "cohort", "target": "sex",
                                                      "model": {"checkpoint": "m.pt", "format": "torchscript"}}}}
    assert Q.provided(given, "own") and not Q.provided(given, "sex")
    assert Q.model_param(given, "own") == {"format": "torchscript"} and Q.model_param(given, "sex") == {
        "format": "brainfv"}
    assert Q.layer_unit_count(given, "own", "classifier") == Q.UNKNOWN_UNIT_COUNT  # its layers: unknown yet
    assert Q.layer_unit_count(given, "own", "block4.norm") == 4
    bad = {**cfg, "featviz": {**cfg["featviz"], "layers": [{"layer": "block9.conv", "units": 2,
                                                            "objective": "channel"}]}}
    with pytest.raises(ConfigError, match="block9.conv"):
        Q.layer_unit_count(bad, "sex", "block9.conv")


def test_exemplars_shown_beside_each_request(cfg):
    assert Q.exemplar_layers(cfg, "sex") == ["block2.norm", "block4.norm", "classifier"]
    assert Q.exemplar_source(cfg, "sex", "classifier-contrast") == "classifier"  # same layer's exemplars
    assert Q.exemplar_source(cfg, "sex", "block4.norm") == "block4.norm"
    assert Q.exemplars_request(cfg, "sex", "block4.norm") == {
        "task": "sex", "layer": "block4.norm", "module": "block4.norm", "units": 4, "objective": "channel",
        "k": cfg["featviz"]["exemplars"], "device": cfg["featviz"]["device"], "position": "centre",
        "positions": 1}
    off = {**cfg, "featviz": {**cfg["featviz"], "exemplars": 0}}
    assert Q.exemplar_layers(off, "sex") == [] and Q.exemplar_source(off, "sex", "block4.norm") is None
