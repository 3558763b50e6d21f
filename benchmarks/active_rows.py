"""Transforming only the active elements (``forward(rows=...)``) against the whole batch, to the plateau, in one run.

    .venv/bin/python benchmarks/active_rows.py --model results/models/sex/main/model.pt \
        --dataset results/data/cohort [--presets fourier,maco] [--rounds 6] [--threads 1]

Once some batch elements have converged, the optimisation loop asks a parametrisation that takes ``rows``
(:func:`brainfv.featviz.param.takes_rows`) for the images of the active elements only; before, it made the
whole batch and dropped the stopped ones (a Fourier step: four FFTs of the batch; MACO: two, and its
trigonometry). Per preset and request (8 units of ``--mid``, channel objective; the class logits x 4 seeds), the
same render to the plateau criterion with the whole-batch path (``takes_rows`` patched to False) and with the
subset path, alternating which runs first, ``--rounds`` rounds: medians, the median per-round ratio (whole /
subset: above 1 is a gain), and whether the images are bit-identical. ``--threads 1`` as the study's jobs run
(``compute.threads``).
"""
import argparse
import importlib
import time

import numpy as np


def main():
    import torch
    from common import mid_and_logits, study_arguments, study_inputs

    from brainfv.featviz import render
    from brainfv.featviz.param import takes_rows
    from brainfv.utils import retain_freed_memory

    ap = argparse.ArgumentParser()
    study_arguments(ap, threads=1, presets="fourier,maco", rounds=6)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    retain_freed_memory()  # as the study's visualize jobs run
    R = importlib.import_module("brainfv.featviz.render")
    fv, model, real, mask, shape, drange = study_inputs(a.model, a.dataset)
    reqs = mid_and_logits(a.mid)
    print(f"model {a.model}; grid {shape}; {a.threads} threads; {a.rounds} rounds, alternating order; precision "
          f"as the study (featviz.amp: null)", flush=True)
    for name in a.presets.split(","):
        for rname, obj in reqs.items():
            times, images = {"whole": [], "subset": []}, {}
            for rnd in range(a.rounds):
                for way in (("whole", "subset") if rnd % 2 else ("subset", "whole")):
                    R.takes_rows = (lambda p: False) if way == "whole" else takes_rows
                    t0 = time.perf_counter()
                    r = render(model, obj, shape, fv["regularizers"][name], steps=fv["steps"], lr=fv["lr"],
                               seeds=list(range(8)), mask=mask, real_volumes=real, data_range=drange,
                               converge=fv["converge"])
                    times[way].append(time.perf_counter() - t0)
                    images[way] = r.images
            R.takes_rows = takes_rows
            ratio = np.array(times["whole"]) / np.array(times["subset"])
            print(f"{name:8s} {rname:6s} whole batch {np.median(times['whole']):.2f}s, active only "
                  f"{np.median(times['subset']):.2f}s -> {np.median(ratio):.2f}x "
                  f"({ratio.min():.2f}-{ratio.max():.2f}); "
                  f"element-steps {r.info['element_steps']} of {8 * int(r.info['steps_run'].max())}; images "
                  f"bit-identical: {np.array_equal(images['whole'], images['subset'])}", flush=True)


if __name__ == "__main__":
    main()
