"""Convergence of the default study's visualizations: steps to the plateau criterion, share converged, cost.

    .venv/bin/python benchmarks/convergence.py --model results/models/lesion/main/model.pt \
        --dataset results/data/lesions [--steps 256] [--presets none,jitter,fourier,maco] [--seeds 2]

For every request of the default config (``featviz.layers``) and preset, runs the visualization with the
plateau criterion (``featviz.converge``) up to ``--steps`` and prints, per request and preset: the share
of elements (unit x seed) converged, the median and max steps they ran, seconds per step of the whole batch
and the element-steps actually computed (with per-element stopping the batch shrinks). ``--variant``
compares ways of bounding the image: ``data`` (the schema's defaults: range data, bound_by project),
``squash`` (range data, tanh squash), ``project``, ``none`` (unbounded) and ``tanh4`` (+-4); ``--no-stop``
runs every element all steps (the cost without stopping); ``--lr`` overrides every preset's lr.

``--vs-lucent`` (the remaining arguments go to benchmarks/vs_lucent.py) prints instead, in one run, the
time per step and the time to convergence of brainfv against a Lucent-style loop run to the same plateau
criterion, with their ratios (medians of interleaved rounds)::

    .venv/bin/python benchmarks/convergence.py --vs-lucent --model results/models/sex/main/model.pt \
        --dataset results/data/cohort [--quick]   # --quick: 7 minutes on 2 quiet cores (both precisions)
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main():
    if "--vs-lucent" in sys.argv:
        sys.argv.remove("--vs-lucent")
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import vs_lucent

        return vs_lucent.main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--presets", default="none,jitter,fourier,maco")
    ap.add_argument("--requests", default="all", help="indices into featviz.layers (comma-separated) or all")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--variant", default="data", help="data, squash, project, none or tanh4")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--no-stop", action="store_true")
    ap.add_argument("--rtol", type=float, default=None, help="featviz.converge.rtol (default: the schema's)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    from brainfv.config import complete, layer_key
    from brainfv.data.store import Dataset
    from brainfv.featviz.study import split_volumes, visualize_layer
    from brainfv.models import load_checkpoint
    from brainfv.models.arch import resolve_units

    torch.set_num_threads(a.threads)
    cfg = complete({})
    fv = cfg["featviz"]
    model, _ = load_checkpoint(a.model)
    ds = Dataset(a.dataset)
    real, val = split_volumes(ds, "train", fv["n_real"]), split_volumes(ds, "val")
    reqs = fv["layers"] if a.requests == "all" else [fv["layers"][int(i)] for i in a.requests.split(",")]
    print("request\tpreset\tvariant\tconverged\tsteps_median\tsteps_max\ts_per_step\telement_steps\tobj_end_median")
    for spec in reqs:
        for name in a.presets.split(","):
            preset = dict(fv["regularizers"][name])
            if a.lr is not None:
                preset["lr"] = a.lr
            if a.variant == "none":
                preset["range"] = "none"
            elif a.variant == "tanh4":
                preset["range"] = "tanh"
            elif a.variant in ("project", "squash"):
                preset["bound_by"] = a.variant
            from brainfv.featviz.units import layer_output_shape

            n = layer_output_shape(model, spec["layer"], (1,) + tuple(ds.grid.shape))[0]
            units = resolve_units(layer_key(spec, "units"), n)
            seeds = a.seeds or spec.get("seeds", fv["seeds"])
            conv = dict(fv["converge"], enabled=not a.no_stop)
            if a.rtol is not None:
                conv["rtol"] = a.rtol
            t0 = time.perf_counter()
            r = visualize_layer(model, spec["layer"], units, preset, shape=ds.grid.shape, mask=ds.mask,
                                real_volumes=real, test_volumes=val, seed=cfg["seed"], task="lesion",
                                regularizer=name, steps=a.steps, lr=fv["lr"], n_seeds=seeds,
                                objective=layer_key(spec, "objective"), converge=conv,
                                log=lambda m: print("#", m, file=sys.stderr, flush=True))
            secs = time.perf_counter() - t0
            t = r.table
            info = r.result.info
            print(f"{spec['layer']}-{layer_key(spec, 'objective')}\t{name}\t{a.variant}\t"
                  f"{t['converged'].mean():.2f}\t{int(t['steps'].median())}\t{int(t['steps'].max())}\t"
                  f"{r.result.seconds / max(1, int(t['steps'].max())):.3f}\t{info['element_steps']}\t"
                  f"{np.median(t['objective_end']):.3f}", flush=True)
            print(f"# {secs:.0f}s total; steps per element {list(t['steps'])}", flush=True)


if __name__ == "__main__":
    main()
