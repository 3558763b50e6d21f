"""The ``brainfv`` command line (also ``python -m brainfv``).

``brainfv units MODEL`` lists the layers of any 3D model (a TorchScript file, a state dict with its
architecture, a pickled module, a brainfv study checkpoint) with their output shape, channel count and
receptive field, so users know which ``layer:channel`` units to ask the visualization for.
"""
from __future__ import annotations

# The commands import the library when they run (not here), so `brainfv --help` answers in 0.1 s, not the
# 4.6 s that importing torch, nibabel and the featviz stack at the top takes.
import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "format_table"]

_UNITS_EXAMPLES = """\
examples:
  # a model trained by the brainfv study (grid read from the checkpoint)
  brainfv units results/models/sex/main/model.pt

  # a TorchScript export: torch.jit.save(torch.jit.script(model), "model_ts.pt")
  brainfv units model_ts.pt --shape 182 218 182

  # weights only (torch.save(model.state_dict(), "densenet.pt")) of a MONAI network
  brainfv units densenet.pt --shape 96 112 96 --architecture monai:DenseNet121 \\
      --kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2}'

  # weights of your own class, importable as my_pkg.nets.MyNet (put its folder on PYTHONPATH)
  brainfv units mynet.pt --shape 96 112 96 --architecture my_pkg.nets:MyNet --kwargs '{"width": 16}'

  # a whole pickled model (torch.save(model, path)); unpickling runs code from the file
  brainfv units whole_model.pt --shape 96 112 96 --format full --allow-pickle

  # the model section of a task's config, as YAML or JSON
  brainfv units my_model.yaml --shape 96 112 96

  # only layers with channels, also written as a table
  brainfv units model_ts.pt --shape 96 112 96 --layers-only-with-channels --tsv units.tsv

A unit is then addressed as LAYER:CHANNEL, e.g. features.denseblock2.denselayer4.layers.conv2:7.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``brainfv`` command."""
    parser = argparse.ArgumentParser(
        prog="brainfv",
        description="Feature visualization for 3D CNNs trained on brain MRI: tools for your own models.",
        epilog="Run 'brainfv COMMAND --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_units_command(sub)
    _add_visualize_command(sub)
    return parser


def _add_units_command(sub: argparse._SubParsersAction) -> None:
    units = sub.add_parser(
        "units", help="list a model's layers, output shapes, channels and receptive fields",
        description="Load a model (any supported format), run one zero input of the given grid through it\n"
                    "and list every layer that can be visualised: its name (for LAYER:CHANNEL), type, output\n"
                    "shape (channels x X x Y x Z), number of channels and receptive field in input voxels\n"
                    "('-' where a layer's footprint is not a plain chain of convolutions and poolings).\n"
                    "Runs on the CPU by default; nothing is written unless --tsv is given.",
        epilog=_UNITS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    units.add_argument("model", metavar="MODEL",
                       help="model file (TorchScript, state dict, pickled module or brainfv checkpoint), or a "
                            ".yaml/.json file holding a model spec (the 'model' section of a task)")
    units.add_argument("--shape", nargs=3, type=_positive_int, metavar=("X", "Y", "Z"),
                       help="input grid in voxels (default: the grid stored in a brainfv checkpoint or the "
                            "spec's input.shape)")
    _add_model_options(units)
    units.add_argument("--layers-only-with-channels", action="store_true",
                       help="leave out layers whose output has no channel dimension")
    units.add_argument("--spatial-only", action="store_true",
                       help="list only layers with a spatial (C x X x Y x Z) output")
    units.add_argument("--tsv", type=Path, metavar="PATH", help="also write the table as tab-separated values")
    units.add_argument("--device", default="cpu", help="torch device for the probe pass (default: cpu)")
    units.set_defaults(func=_cmd_units)


def _add_visualize_command(sub: argparse._SubParsersAction) -> None:
    vis = sub.add_parser(
        "visualize", help="optimise inputs that maximise units of one layer, without Snakemake",
        description="Activation maximization of one layer's units under one regularization preset, on the grid\n"
                    "of a brainfv dataset folder (its mask, real volumes for MACO and for the activation at\n"
                    "matched amplitude). Writes the same files as the workflow's visualize rule: units.nii.gz\n"
                    "(4D: seeds x units, seed-major, on the dataset's MNI grid), units.tsv (one row per unit and\n"
                    "seed) and trajectory.tsv; with --randomized also randomized.nii.gz (the same request on the\n"
                    "network with re-initialised weights: the model-randomization check).",
        epilog=_VISUALIZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    vis.add_argument("model", metavar="MODEL", help="model file or model spec, as for 'brainfv units'")
    vis.add_argument("--dataset", required=True, type=Path, metavar="DIR",
                     help="a brainfv dataset folder (e.g. results/data/cohort): participants.tsv, volumes.npy, "
                          "mask.nii.gz, reference.nii.gz")
    vis.add_argument("--layer", required=True, help="module name (see 'brainfv units')")
    vis.add_argument("--units", type=_units_spec, metavar="SPEC",
                     help="'all', a count N (the first N) or a comma-separated list of channels (default: the "
                          "config's featviz.layers default, all)")
    vis.add_argument("--objective", choices=["channel", "neuron", "probability", "contrast"],
                     help="(default: the config's featviz.layers default, channel)")
    vis.add_argument("--preset", default="fourier", metavar="NAME",
                     help="a preset of the config's featviz.regularizers (default: fourier), or JSON such as "
                          "'{\"param\": \"maco\", \"jitter\": 2}'")
    vis.add_argument("--config", type=Path, metavar="YAML", help="a study config whose presets --preset may name")
    vis.add_argument("--steps", type=_positive_int, default=None, help="Adam steps (default: the config's)")
    vis.add_argument("--seeds", type=_positive_int, default=None, help="optimisation seeds per unit")
    vis.add_argument("--lr", type=float, default=None)
    vis.add_argument("--seed", type=int, default=None, help="the study seed (default: the config's)")
    vis.add_argument("--randomized", action="store_true",
                     help="also optimise the same request on the network with re-initialised weights")
    vis.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the outputs")
    _add_model_options(vis)
    vis.add_argument("--device", default="auto", help="torch device (default: auto, CUDA if present)")
    vis.set_defaults(func=_cmd_visualize)


def _add_model_options(p):
    """The options that say how to load MODEL (shared by every command that takes one)."""
    p.add_argument("--in-channels", type=_positive_int, default=None, metavar="C",
                       help="input channels (default: the spec's input.channels, else 1)")
    p.add_argument("--format", choices=["auto", "torchscript", "state_dict", "full", "brainfv"],
                       default=None, help="file format (default: auto, detected from the file's content)")
    p.add_argument("--architecture", metavar="NAME",
                       help="network to load weights into: monai:<Name> (e.g. monai:DenseNet121) or "
                            "module.path:ClassName; needed for state dicts")
    p.add_argument("--kwargs", type=_json_object, default=None, metavar="JSON",
                       help="keyword arguments of the architecture as a JSON object, e.g. "
                            "'{\"spatial_dims\": 3, \"in_channels\": 1, \"out_channels\": 2}'")
    p.add_argument("--state-dict-key", metavar="KEY",
                       help="entry of the checkpoint that holds the weights (default: found automatically "
                            "among state_dict, model_state_dict, model, net, ...); 'a.b' for nested entries")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                       help="prefix to remove from every weight name (default: 'module.' and '_orig_mod.' "
                            "are removed automatically)")
    p.add_argument("--allow-pickle", action="store_true",
                       help="allow unpickling (format full, or checkpoints holding Python objects); this "
                            "executes code from the file: only for files you trust")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainfv`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import BrainFVError

    try:
        return args.func(args) or 0
    except BrainFVError as e:
        print(f"brainfv {args.command}: error: {e}{_option_hint(str(e))}", file=sys.stderr)
        return 2


_OPTIONS = {"architecture": "--architecture/--kwargs", "allow_pickle": "--allow-pickle", "format": "--format",
            "state_dict_key": "--state-dict-key", "strip_prefix": "--strip-prefix",
            "input.channels": "--in-channels"}


def _option_hint(message):
    """Which command-line options set the spec keys an error message names."""
    named = [f"{key} is {opt}" for key, opt in _OPTIONS.items() if key in message]
    return f"\n(on the command line, {'; '.join(named)})" if named else ""


# --------------------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------------------

_COLUMNS = [("layer", "layer"), ("type", "type"), ("output_shape", "output shape"), ("channels", "channels"),
            ("rf_size", "rf size"), ("rf_stride", "rf stride")]


def _cmd_units(args):
    from .errors import ConfigError
    from .featviz.units import describe_units
    from .models.checks import check_model_input
    from .models.load import load_model

    spec, where = _spec_from_args(args)
    model, info = load_model(spec, device=args.device, where=where)
    shape = args.shape or (info["input"] or {}).get("shape")
    if not shape:
        raise ConfigError(f"{args.model}: give the input grid with --shape X Y Z (this model file does not "
                          f"say which grid it was trained on)")
    channels = args.in_channels or (info["input"] or {}).get("channels") or 1
    # a probe pass first, so a wrong grid or channel count gives an explained error, not a stack trace
    check_model_input({"input": {"channels": channels}, "classes": info.get("classes")}, shape, None, model,
                      where=where, grid_label="the --shape grid")
    rows = describe_units(model, (channels, *shape), device=args.device)
    if args.layers_only_with_channels:
        rows = [r for r in rows if r["channels"] is not None]
    if args.spatial_only:
        rows = [r for r in rows if r["spatial"]]
    print(_summary(info, channels, shape, len(rows)))
    print(format_table(rows))
    example = next((r for r in rows if r["spatial"] and r["channels"]), None) or next(
        (r for r in rows if r["channels"]), None)
    if example:
        print(f"\nAddress a unit as LAYER:CHANNEL, e.g. {example['layer']}:0 "
              f"(channels 0..{example['channels'] - 1} of that layer).")
    if not rows and info.get("notes"):
        print("\n" + "\n".join(info["notes"]))
    if args.tsv:
        _write_tsv(rows, args.tsv)
        print(f"table written to {args.tsv}")
    return 0


_VISUALIZE_EXAMPLES = """\
examples:
  # two units of a study model's layer, Fourier preset, on the study's cohort
  brainfv visualize results/models/lesion/main/model.pt --dataset results/data/lesions \\
      --layer block4.norm --units 0,3 --preset fourier --out fv/

  # a MONAI network given as weights, MACO preset from JSON, with the randomization control
  brainfv visualize densenet.pt --architecture monai:DenseNet121 \\
      --kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2}' --dataset results/data/cohort \\
      --layer features.denseblock2 --units 8 --preset '{"param": "maco", "jitter": 2}' --randomized --out fv/
"""


def _units_spec(text):
    if text == "all":
        return "all"
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', a count or a list like 0,3,5; got {text!r}") from None


def _cmd_visualize(args):
    from . import config as C
    from .data.files import DATASET_FILES
    from .errors import ConfigError
    from .jobs.base import Job
    from .jobs.featviz import visualize_job
    from .jobs.requests import visualize_request

    cfg = {}
    if args.config:
        import yaml

        if not args.config.is_file():
            raise ConfigError(f"--config: file not found: {args.config}")
        cfg = yaml.safe_load(args.config.read_text()) or {}
    cfg = C.complete(cfg)
    fv = cfg["featviz"]
    if args.preset.lstrip().startswith("{"):
        preset = C.Preset.from_config(_json_arg(args.preset, "--preset", '{"param": "maco", "jitter": 2}'),
                                      "--preset").as_dict()
    elif args.preset in fv["regularizers"]:
        preset = fv["regularizers"][args.preset]
    else:
        raise ConfigError(f"--preset {args.preset!r}: not a preset of the config (featviz.regularizers: "
                          f"{sorted(fv['regularizers'])}); give one of them or a JSON preset")
    spec, where = _spec_from_args(args)
    ds = args.dataset
    inputs = {"model": spec.pop("checkpoint"),
              **{k: str(ds / DATASET_FILES[k]) for k in ("participants", "volumes", "mask", "reference")}}
    if not Path(inputs["model"]).is_file():
        key = "MODEL" if where == "MODEL" else f"{where}.checkpoint"
        raise ConfigError(f"{key}: model file not found: {inputs['model']}")
    for k, f in inputs.items():
        if not Path(f).exists():
            raise ConfigError(f"--dataset: {f} not found (expected a brainfv dataset folder)")
    _check_writable(args.out, "--out")
    name = args.preset if not args.preset.lstrip().startswith("{") else "custom"
    given = {"units": args.units, "objective": args.objective}  # the others: the config's featviz.layers defaults
    entry = {"layer": args.layer, **{k: v for k, v in given.items() if v is not None}}
    request = visualize_request(cfg, task="cli", layer=args.layer, regularizer=name, preset=preset, spec=entry,
                                steps=args.steps, lr=args.lr, n_seeds=args.seeds, device=args.device, seed=args.seed,
                                randomized=args.randomized)
    out = args.out
    outputs = {"nifti": str(out / "units.nii.gz"), "table": str(out / "units.tsv"),
               "trajectory": str(out / "trajectory.tsv")}
    if args.randomized:
        outputs["randomized"] = str(out / "randomized.nii.gz")
    job = Job(input=inputs, output=outputs, params={"request": request.as_dict(), "model": spec, "model_key": where},
              threads=_threads(), log=lambda m: print(m, flush=True), rule="visualize")
    visualize_job(job)
    print("written: " + ", ".join(outputs.values()))
    return 0


def _check_writable(folder, flag):
    """Create ``folder`` if needed and make sure files can be written in it, before any work is done."""
    import os
    import tempfile

    from .errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".brainfv-write-test-"):
            pass
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise ConfigError(f"{flag}: cannot write to {folder}: {why}"
                          + (f" ({e.filename})" if e.filename and str(e.filename) != str(folder) else "")) from None


def _json_arg(text, flag, example):
    """A JSON object given on the command line; an error naming ``flag`` otherwise."""
    from .errors import ConfigError

    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: not valid JSON ({e.msg} at character {e.pos}): {text!r}; keys and strings need "
                          f"double quotes, e.g. '{example}'") from None
    if not isinstance(v, dict):
        raise ConfigError(f"{flag}: expected a JSON object {{...}}, got {text!r}")
    return v


def _threads():
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _spec_from_args(args):
    """The model spec the options describe (or the one in a YAML/JSON file) and its config key."""
    from .errors import ConfigError

    path = Path(args.model)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or give JSON") from None
            spec = yaml.safe_load(text)
        where = str(path)
        if isinstance(spec, dict) and "model" in spec and isinstance(spec["model"], dict):
            spec, where = spec["model"], f"{path}: model"
        if not isinstance(spec, dict) or "checkpoint" not in spec:
            raise ConfigError(f"{path}: expected a model spec with a 'checkpoint' key (or a 'model' section)")
        ck = Path(spec["checkpoint"]).expanduser()
        if not ck.is_absolute():  # relative to the spec file, as a reader expects
            spec = {**spec, "checkpoint": str(path.parent / ck)}
    else:
        spec, where = {"checkpoint": str(path)}, "MODEL"
    if args.format:
        spec["format"] = args.format
    if args.architecture or args.kwargs is not None:
        if not args.architecture:
            raise ConfigError("--kwargs given without --architecture")
        spec["architecture"] = {"name": args.architecture, "kwargs": args.kwargs or {}}
    if args.state_dict_key:
        spec["state_dict_key"] = args.state_dict_key
    if args.strip_prefix:
        spec["strip_prefix"] = args.strip_prefix
    if args.allow_pickle:
        spec["allow_pickle"] = True
    return spec, where


def _summary(info, channels, shape, n):
    lines = [f"model: {info['checkpoint']} (format {info['format']}; {info.get('architecture')}; "
             f"{info['n_parameters']:,} parameters)",
             f"input: {channels} x {' x '.join(str(s) for s in shape)} voxels"
             + (f"; classes: {', '.join(map(str, info['classes']))}" if info.get("classes") else "")]
    for note in info.get("notes") or []:
        lines.append(f"note: {note}")
    lines.append(f"{n} layers")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Aligned text table of :func:`brainfv.featviz.units.describe_units` rows."""
    cells = [[title for _, title in _COLUMNS]] + [[_cell(r[key]) for key, _ in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _write_tsv(rows, path):
    from .utils import atomic_path

    with atomic_path(path) as tmp:
        lines = ["\t".join(["layer", "type", "output_shape", "channels", "spatial", "rf_size", "rf_stride", "calls"])]
        for r in rows:
            lines.append("\t".join(_cell(r[k], na="") for k in ("layer", "type", "output_shape", "channels", "spatial",
                                                                "rf_size", "rf_stride", "calls")))
        tmp.write_text("\n".join(lines) + "\n")


def _cell(v, na="-"):
    if v is None:
        return na
    if isinstance(v, (tuple, list)):
        return "x".join(str(int(x)) for x in v) if v else "scalar"
    return str(v)


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _json_object(text):
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}; write e.g. "
                                         f"'{{\"spatial_dims\": 3, \"in_channels\": 1}}'") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return v


def _version():
    from . import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
