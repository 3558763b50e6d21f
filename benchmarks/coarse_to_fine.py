"""Coarse-to-fine optimisation, measured (issue 22's first lever; not used by the study: it did not pay).

    .venv/bin/python benchmarks/coarse_to_fine.py --model results/models/sex/main/model.pt \
        --dataset results/data/cohort [--presets none,fourier] [--rounds 3] [--factor 2]

Per preset and request (8 units of ``--mid``, channel objective; the class logits x 4 seeds), in interleaved
rounds: **direct**, the study's render on the dataset's grid to the plateau criterion; **coarse-to-fine**, the same
render on a grid ``--factor`` times coarser (volumes trilinear, mask nearest; the pooled head takes any grid) to
the same criterion, its images brought back to the study grid (trilinear, clipped to the data range, masked) as
each element's start, then the render on the study grid to the criterion again. Printed: medians of both times,
the median per-round ratio (direct / coarse-to-fine: above 1 is a gain), the element-steps of each stage, the
objective at the fine stage's start and end against direct's end (per element, the study's fp32 value on the
untransformed image), and the share converged. Voxel and Fourier parametrisations (MACO's phase-only variables
cannot take a start image's amplitude).

Measured (the default study's sex model, 4 mm, 2 threads, 2026-11-28): 0.53-0.94x on a quiet machine (one round
each of this script and its first version), 0.26-0.90x with ``--rounds 2`` in a run that shared the cores; the upsampled
coarse optimum starts the fine stage barely above noise (block 3: objective 0.10 against 2.76 at the end), and
the fine stage then runs about as many element-steps as direct does
from noise (1,072 vs 1,136 for block 3 without a parametrisation, 1,384 vs 1,200 for the logits, 736 vs 680 and
704 vs 512 under Fourier), ending at the same objective (per element 0.88-1.13 of direct's). This tests the network
on a coarser grid first; a coarse parametrisation on the study grid was not tried.
"""
import argparse
import time

import numpy as np


def main():
    import torch
    import torch.nn.functional as F
    from common import mid_and_logits, resample, study_arguments, study_inputs

    from brainfv.config import Preset
    from brainfv.featviz import render
    from brainfv.featviz.render import preset_pieces
    from brainfv.utils import retain_freed_memory

    ap = argparse.ArgumentParser()
    study_arguments(ap, threads=2, presets="none,fourier", rounds=3)  # 2 threads as measured; the study's jobs run 1
    ap.add_argument("--factor", type=float, default=2.0, help="coarse voxel size / the study's")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    retain_freed_memory()  # as the study's visualize jobs run
    fv, model, real, mask, shape, drange = study_inputs(a.model, a.dataset)
    cshape = tuple(int(round(s / a.factor)) for s in shape)
    creal, cmask = resample(real, mask, cshape)
    reqs = mid_and_logits(a.mid)
    kw = dict(lr=fv["lr"], seeds=list(range(8)), data_range=drange, converge=fv["converge"], steps=fv["steps"])
    msk = torch.as_tensor(mask, dtype=torch.float32)
    print(f"model {a.model}; study grid {shape}, coarse grid {cshape}; plateau {fv['converge']}; {a.threads} "
          f"threads; {a.rounds} interleaved rounds, medians", flush=True)
    for name in a.presets.split(","):
        preset = Preset.from_config(fv["regularizers"][name])
        if preset.param == "maco":
            print(f"{name}: skipped (MACO's phase-only variables cannot start from an image)")
            continue
        for rname, obj in reqs.items():
            times = {"direct": [], "c2f": []}
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                d = render(model, obj, shape, preset, mask=mask, real_volumes=real, **kw)
                times["direct"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                c = render(model, obj, cshape, preset, mask=cmask, real_volumes=creal, **kw)
                up = F.interpolate(torch.as_tensor(c.images)[:, None], size=shape, mode="trilinear",
                                   align_corners=False).clamp(*drange) * msk

                def pieces(work_shape, gens, box, up=up):
                    pc = preset_pieces(preset, work_shape, gens, real, None, box, drange)
                    with torch.no_grad():
                        if preset.param == "voxel":
                            pc.param.x.copy_(up)
                        else:
                            pc.param.spectrum.copy_(pc.param.to_spectrum(up[:, 0])[:, None])
                        pc.param.project_()
                    return pc

                f = render(model, obj, shape, preset, mask=mask, real_volumes=real, pieces=pieces, crop=False, **kw)
                times["c2f"].append(time.perf_counter() - t0)
            ratio = np.median(np.array(times["direct"]) / np.array(times["c2f"]))
            rel = f.objective_end / d.objective_end
            print(f"{name:8s} {rname:6s} direct {np.median(times['direct']):.2f}s ({d.info['element_steps']} "
                  f"element-steps, converged {d.info['converged'].mean():.2f}, "
                  f"objective {np.median(d.objective_end):.3f}) "
                  f"| coarse-to-fine {np.median(times['c2f']):.2f}s (coarse {c.info['element_steps']} + fine "
                  f"{f.info['element_steps']} element-steps, converged {f.info['converged'].mean():.2f}; fine start "
                  f"{np.median(f.objective_start):.3f}, end {np.median(f.objective_end):.3f}; end / direct's "
                  f"per element "
                  f"median {np.median(rel):.2f}, {rel.min():.2f}-{rel.max():.2f}) -> {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
