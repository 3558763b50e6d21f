"""The ``brainfv`` command: ``brainfv units`` on a study checkpoint and on a MONAI state dict."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainfv.cli import build_parser, main
from brainfv.models import build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DENSENET_KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 8, "growth_rate": 4,
                   "block_config": [2, 2], "bn_size": 2}


def run_cli(*args, cwd=None):
    """``python -m brainfv ARGS`` with this worktree's library (and the tests' helper modules) importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
               PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "brainfv", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def table_rows(stdout):
    """``{layer: [cells...]}`` of the printed table."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    rows = {}
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        cells = ln.split()
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def study_checkpoint(tmp_path):
    path = tmp_path / "results/models/sex/main/model.pt"
    save_checkpoint(path, build_model({"channels": [4, 8]}).eval(), classes=["F", "M"],
                    grid={"shape": [16, 20, 16], "voxel_size": 8.0, "origin": [0, 0, 0]},
                    normalisation="z-score within brain mask")
    return path


@pytest.fixture
def monai_state_dict(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    path = tmp_path / "densenet.pt"
    torch.save(nets.DenseNet(**DENSENET_KWARGS).state_dict(), path)
    return path


def test_units_of_a_study_checkpoint_subprocess(study_checkpoint):
    res = run_cli("units", study_checkpoint)
    assert res.returncode == 0, res.stderr
    assert "format brainfv" in res.stdout and "input: 1 x 16 x 20 x 16 voxels; classes: F, M" in res.stdout
    rows = table_rows(res.stdout)
    assert list(rows)[:5] == ["block1.conv", "block1.norm", "block1.act", "block1.drop", "block1.pool"]
    assert rows["block1.conv"] == ["Conv3d", "4x16x20x16", "4", "3x3x3", "1x1x1"]
    assert rows["block2.pool"] == ["MaxPool3d", "8x4x5x4", "8", "10x10x10", "4x4x4"]
    assert rows["classifier"] == ["Linear", "2", "2", "-", "-"]
    assert "e.g. block1.conv:0 (channels 0..3" in res.stdout


def test_units_of_a_monai_state_dict_subprocess(monai_state_dict, tmp_path):
    res = run_cli("units", monai_state_dict, "--shape", 16, 16, 16, "--architecture", "monai:DenseNet",
                  "--kwargs", json.dumps(DENSENET_KWARGS), "--spatial-only", "--tsv", tmp_path / "units.tsv")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert rows["features.conv0"] == ["Conv3d", "8x8x8x8", "8", "7x7x7", "2x2x2"]
    assert rows["features.denseblock1.denselayer1.layers.conv2"][:3] == ["Conv3d", "4x4x4x4", "4"]
    assert rows["features.denseblock1.denselayer2"][:3] == ["_DenseLayer", "16x4x4x4", "16"]
    assert "class_layers.out" not in rows and "features" not in rows  # --spatial-only; container
    with open(tmp_path / "units.tsv") as f:
        tsv = list(csv.DictReader(f, delimiter="\t"))
    assert [r["layer"] for r in tsv] == list(rows)
    assert tsv[0] == {"layer": "features.conv0", "type": "Conv3d", "output_shape": "8x8x8x8", "channels": "8",
                      "spatial": "True", "rf_size": "7x7x7", "rf_stride": "2x2x2", "calls": "1"}


def test_units_of_torchscript_full_and_spec_file(monai_state_dict, tmp_path, capsys):
    from monai.networks.nets import DenseNet

    net = DenseNet(**DENSENET_KWARGS).eval()
    net.load_state_dict(torch.load(monai_state_dict))
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    assert main(["units", str(tmp_path / "ts.pt"), "--shape", "16", "16", "16", "--layers-only-with-channels"]) == 0
    ts_out = capsys.readouterr().out
    assert "format torchscript; DenseNet" in ts_out
    ts_rows = table_rows(ts_out)
    # a compiled graph does not say whether layers form a chain: no receptive fields ("-")
    assert ts_rows["features.conv0"] == ["Conv3d", "8x8x8x8", "8", "-", "-"]
    assert ts_rows["class_layers.out"] == ["Linear", "2", "2", "-", "-"]
    # the same network from a config-style spec file (checkpoint relative to the file)
    (tmp_path / "spec.json").write_text(json.dumps({"model": {
        "checkpoint": monai_state_dict.name, "format": "state_dict",
        "architecture": {"name": "monai:DenseNet", "kwargs": DENSENET_KWARGS},
        "input": {"shape": [16, 16, 16], "channels": 1}, "classes": ["control", "patient"]}}))
    assert main(["units", str(tmp_path / "spec.json"), "--layers-only-with-channels"]) == 0
    spec_out = capsys.readouterr().out
    spec_rows = table_rows(spec_out)
    assert "classes: control, patient" in spec_out and spec_rows["features.conv0"][3:] == ["7x7x7", "2x2x2"]
    assert {k: v[:3] for k, v in spec_rows.items()} == {k: v[:3] for k, v in ts_rows.items()}
    # a whole pickled model: refused, then loaded with --allow-pickle
    torch.save(net, tmp_path / "full.pt")
    assert main(["units", str(tmp_path / "full.pt"), "--shape", "16", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "arbitrary code" in err and "--allow-pickle" in err
    assert main(["units", str(tmp_path / "full.pt"), "--shape", "16", "16", "16", "--allow-pickle"]) == 0
    assert "format full" in capsys.readouterr().out


def test_units_errors_are_explained(monai_state_dict, study_checkpoint, capsys):
    assert main(["units", str(monai_state_dict), "--shape", "16", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "holds weights only" in err and "--architecture/--kwargs" in err
    assert main(["units", str(monai_state_dict)]) == 2  # no --shape and nothing in the file says the grid
    assert "architecture" in capsys.readouterr().err
    assert main(["units", str(study_checkpoint), "--shape", "2", "2", "2"]) == 2
    err = capsys.readouterr().err
    assert "fails on an input of the --shape grid (tensor 1x1x2x2x2" in err
    assert main(["units", str(study_checkpoint.parent / "missing.pt")]) == 2
    assert "MODEL.checkpoint: file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["units", str(monai_state_dict), "--kwargs", "{spatial_dims: 3}"])
    assert "not valid JSON" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["units", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--architecture monai:DenseNet121", "--format full --allow-pickle", "LAYER:CHANNEL",
                 "results/models/sex/main/model.pt", "--layers-only-with-channels", "--tsv"):
        assert text in out
    assert "visualize" in build_parser().format_help()


def test_visualize_without_snakemake_writes_what_the_rule_writes(tmp_path):
    """`brainfv visualize` on a study-style checkpoint and a dataset folder: the rule's NIfTI and table."""
    import nibabel as nib
    import pandas as pd
    from conftest import toy_dataset

    ds = toy_dataset(tmp_path / "toy", n=12, shape=(12, 14, 12))
    ck = tmp_path / "model.pt"
    save_checkpoint(ck, build_model({"channels": [4, 8]}).eval(), classes=["A", "B"], task="toy", target="label")
    out = tmp_path / "fv"
    assert main(["visualize", str(ck), "--dataset", str(ds), "--layer", "block2.norm", "--units", "0,3",
                 "--steps", "3", "--seeds", "2", "--preset", '{"param": "fourier", "jitter": 1}', "--randomized",
                 "--out", str(out), "--device", "cpu"]) == 0
    img = nib.load(out / "units.nii.gz")
    ref = nib.load(ds / "reference.nii.gz")
    assert img.shape == (12, 14, 12, 4) and (img.affine == ref.affine).all()
    assert nib.load(out / "randomized.nii.gz").shape == img.shape
    t = pd.read_csv(out / "units.tsv", sep="\t")
    assert set(t["network"]) == {"trained", "randomized"} and sorted(t["unit"].unique()) == [0, 3]
    for col in ("objective_start", "objective_end", "act_matched_z", "stability", "region"):
        assert col in t
    assert (out / "trajectory.tsv").exists()
    assert main(["visualize", str(ck), "--dataset", str(ds), "--layer", "block2.norm", "--preset", "nope",
                 "--out", str(out)]) == 2  # an unknown preset is a one-line error


# --- never a silent wrong answer (issue 21) --------------------------------------------------------------

def _toy_and_checkpoint(tmp_path, grid):
    from conftest import toy_dataset

    ds = toy_dataset(tmp_path / "toy", n=12, shape=(12, 14, 12))  # 8 mm voxels
    ck = tmp_path / "model.pt"
    save_checkpoint(ck, build_model({"channels": [4, 8]}).eval(), classes=["A", "B"], task="toy", target="label",
                    grid=grid)
    return ds, ck


def _visualize(ck, ds, out, *extra):
    return main(["visualize", str(ck), "--dataset", str(ds), "--layer", "block2.norm", "--units", "0,1",
                 "--steps", "1", "--seeds", "1", "--out", str(out), "--device", "cpu", *extra])


def test_visualize_checks_the_model_grid_against_the_dataset(tmp_path, capsys):
    """A model trained on another grid (a brainfv checkpoint's own grid, or a spec's stated input) is refused:
    networks with adaptive pooling would run on any grid and give a confident picture of unseen data."""
    ds, ck = _toy_and_checkpoint(tmp_path, {"shape": [52, 64, 52], "voxel_size": 3.0, "origin": [0, 0, 0]})
    assert _visualize(ck, ds, tmp_path / "fv") == 2
    err = capsys.readouterr().err
    assert f"MODEL: the model does not match the dataset {ds}" in err
    assert ("expects input 52x64x52 (MODEL.input.shape) and 3 mm voxels (MODEL.input.voxel_size) but the dataset "
            f"{ds}'s grid is 12x14x12 voxels of 8 mm") in err
    assert not (tmp_path / "fv" / "units.nii.gz").exists()
    # a spec's stated input is checked too, and the message names the spec file's key
    _, ok = _toy_and_checkpoint(tmp_path / "b", {"shape": [12, 14, 12], "voxel_size": 8.0, "origin": [0, 0, 0]})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"checkpoint": str(ok), "input": {"shape": [121, 145, 121], "voxel_size": 1.5}}))
    assert _visualize(spec, ds, tmp_path / "fv") == 2
    err = capsys.readouterr().err
    assert f"{spec}: the model does not match the dataset" in err and "121x145x121" in err and "1.5 mm" in err
    # the same model on its own grid runs; a model that states no grid runs with a warning that says so
    assert _visualize(ok, ds, tmp_path / "fv") == 0
    assert "WARNING" not in capsys.readouterr().out
    _, bare = _toy_and_checkpoint(tmp_path / "c", None)
    assert _visualize(bare, ds, tmp_path / "fv2") == 0
    assert "WARNING: MODEL does not state the grid it was trained on" in capsys.readouterr().out


def test_visualize_command_line_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    ds, ck = _toy_and_checkpoint(tmp_path, None)

    def error(*args, out=tmp_path / "fv", model=ck):
        assert _visualize(model, ds, out, *args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    err = error("--preset", "{jitter: 2}")
    assert err.startswith("brainfv visualize: error: --preset: not valid JSON") and '{"param": "maco"' in err
    (tmp_path / "afile").write_text("x")
    err = error(out=tmp_path / "afile" / "fv")
    assert err.startswith(f"brainfv visualize: error: --out: cannot write to {tmp_path / 'afile' / 'fv'}")
    err = error(model=tmp_path / "missing.pt")
    assert f"MODEL: model file not found: {tmp_path / 'missing.pt'}" in err and "--dataset" not in err
    # an architecture for a file that carries its own network is an error, not ignored in silence
    err = error("--architecture", "monai:DenseNet121")
    assert "MODEL.architecture:" in err and "is a brainfv file, which brings its own network" in err
    assert "architecture is --architecture/--kwargs" in err
    ts = tmp_path / "model_ts.pt"
    torch.jit.save(torch.jit.trace(build_model({"channels": [4, 8]}).eval(), torch.zeros(1, 1, 12, 14, 12)), ts)
    err = error("--architecture", "monai:DenseNet121", model=ts)
    assert "is a torchscript file, which brings its own network" in err
