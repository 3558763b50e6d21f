"""Fewer steps to the plateau with another optimiser? (issue 22's learning-rate lever, measured; not used by the study)

    .venv/bin/python benchmarks/optimizers.py --model results/models/sex/main/model.pt \
        --dataset results/data/cohort [--variants adam:0.2,sign:0.2,sign:0.5] [--budget 512]

On the study's ``none`` preset (one variable per voxel, bounded to the data range by projection after each step,
no transforms: a deterministic objective), 8 units of ``--mid`` (channel objective) and the class logits x 4
seeds, each batch element from the study's initialisation with seeds 0-7: Adam at the none preset's learning rate
(featviz.lr), as the study sets it up, in an fp32 reference loop (the full network read by a hook, batch 8, as
benchmarks/vs_lucent.py's; the study's own loop runs bf16 on this CPU, a simplified network and micro-batches of 2,
and took 1,136 / 1,200 element-steps on the same requests and seeds, benchmarks/coarse_to_fine.py: 4-6 % more than
this loop's Adam) against projected **sign** ascent (every voxel moves by ``lr`` in the direction of its
gradient's sign for 20 steps, then by ``lr * 20 / (step + 1)``: a step for an optimum with many voxels at a bound).
Every element runs the whole ``--budget`` (default twice featviz.steps); printed per variant: the element-steps to
the plateau criterion (the schema's ``featviz.converge`` on each element's own objective history, as the study's
loop applies it) and against adam's per element, the gain (objective minus its value at the start, which all
variants share) of the image the study would freeze at the plateau and of the last image, as a share of adam's
gain at the budget, and the share of brain voxels at a bound at the budget.

Measured (the default study's sex model, 4 mm, 2 threads, budget 1,024, 2026-11-28; the step counts repeated
to the step in three runs here), 8 units of block 3 / the logits: adam 1,096 / 1,136 element-steps, its plateau
at 0.940 / 0.933 of its gain at the budget; sign 0.2 920 / 752 (-16 % / -34 %; fewer steps for 6 / 8 of the 8
elements, more for 1 / 0) at a slightly lower gain at the plateau, 0.933 / 0.924; sign 0.5 1,032 / 880 (-6 % /
-23 %; fewer for 6 / 8, more for 2 / 0) at a slightly higher one, 0.967 / 0.959 (per element 0.89-1.03 /
0.91-0.98; at the budget 1.019 / 1.007). Not adopted: the two settings tried cut 6-34 % of the steps, where 10x to
convergence (3.9-4.4x now for `none`) would need 2.3-2.6x fewer, and every image of the study would change; on block
3 the cut is within the 4-6 % by which two versions of the same Adam differ (bf16 study loop vs this fp32 loop),
and whether sign steps cut steps in the study's bf16 loop, or on Fourier and MACO, was not tested. Adam's learning
rate and schedule were not varied here (schedules: the README). Adam's images at the budget have 42 % / 47 % of
brain voxels at a bound (sign 0.5, at a higher objective, 32 % / 37 %): the images are not bang-bang.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(model, mask, pieces, layer, units, logit, variant, lr, budget, converge):
    """One batch: ``(steps to the plateau per element, J history (budget + 1, B), share at a bound)``; row ``k``
    of the history is J before update ``k`` (row ``budget``: after the last), so row ``stop`` is the image the
    study would freeze at the plateau."""
    import torch

    from brainfv.featviz.units import get_module

    params = list(pieces.param.parameters())
    opt = torch.optim.Adam(params, lr=lr) if variant == "adam" else None
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    store = {}
    hook = get_module(model, layer).register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    B = len(units)
    hist, stop = np.zeros((budget + 1, B)), np.full(B, budget)
    rows, cols = torch.arange(B), torch.as_tensor(units)

    def objective():
        model(pieces.param() * m)
        a = store["a"][rows, cols]
        return a if logit else a.flatten(1).mean(1)

    try:
        for step in range(budget):
            j = objective()
            grad, = torch.autograd.grad(j.sum(), params)
            with torch.no_grad():
                if opt is not None:
                    params[0].grad = -grad
                    opt.step()
                else:
                    params[0].add_(lr * min(1.0, 20 / (step + 1)) * grad.sign())
            pieces.param.project_()
            hist[step] = j.detach().numpy()
            n = step + 1
            if n % converge.every == 0 and n >= converge.min_steps:
                stop[(stop == budget) & converge.check(hist, n)] = n
        with torch.no_grad():
            hist[budget] = objective().numpy()  # after the last update
    finally:
        hook.remove()
    with torch.no_grad():
        img = (pieces.param() * m)[:, 0][:, torch.as_tensor(mask)]
        lo, hi = float(pieces.param.squash.lo), float(pieces.param.squash.hi)  # the data range
        at = ((img <= lo + 1e-3) | (img >= hi - 1e-3)).float().mean().item()
    return stop, hist, at


def main():
    import torch
    from common import mid_and_logits, study_arguments, study_inputs

    from brainfv.config import Preset
    from brainfv.featviz.render import Converge, preset_pieces
    from brainfv.featviz.simplify import redirect_relus

    ap = argparse.ArgumentParser()
    study_arguments(ap, threads=2)
    ap.add_argument("--variants", default="adam,sign:0.2,sign:0.5",
                    help="name[:lr], comma-separated, adam first (lr default: the none preset's, featviz.lr)")
    ap.add_argument("--budget", type=int, default=None, help="steps every element runs (default: featviz.steps x 2)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fv, model, real, mask, shape, drange = study_inputs(a.model, a.dataset)
    lr0 = fv["regularizers"]["none"].get("lr") or fv["lr"]
    variants = [(v.split(":")[0], float(v.split(":")[1]) if ":" in v else lr0) for v in a.variants.split(",")]
    if variants[0][0] != "adam" or any(v not in ("adam", "sign") for v, _ in variants):
        ap.error("--variants: adam first (the reference), then adam or sign")
    a.budget = a.budget or 2 * fv["steps"]
    model = redirect_relus(copy.deepcopy(model))  # the study's network gradient
    conv = Converge.from_config(fv["converge"])
    preset = Preset.from_config(fv["regularizers"]["none"])
    print(f"model {a.model}; grid {shape}; preset none; seeds 0-7; budget {a.budget}; plateau {conv}; "
          f"{a.threads} threads; gains (J - J at the start) as a share of adam's gain at the budget", flush=True)
    for rname, obj in mid_and_logits(a.mid).items():
        (layer, units), = obj.units
        ref = None
        for variant, lr in variants:
            gens = [torch.Generator().manual_seed(s) for s in range(len(units))]
            pieces = preset_pieces(preset, shape, gens, real, None, None, drange)
            t0 = time.perf_counter()
            stop, hist, at = run(model, mask, pieces, layer, units, rname == "logits", variant, lr, a.budget, conv)
            gain = hist - hist[0]  # the same start for every variant (same seeds)
            end, at_stop = gain[-1], gain[stop, np.arange(len(units))]
            if ref is None:
                ref, ref_stop = end, stop
            r_stop = at_stop / ref
            fewer, more = int((stop < ref_stop).sum()), int((stop > ref_stop).sum())
            print(f"{rname:6s} {variant:4s} lr {lr}: element-steps to the plateau {int(stop.sum())} "
                  f"(per element {stop.tolist()}; fewer than adam for {fewer}, more for {more}); gain at the "
                  f"plateau {np.median(r_stop):.3f} (per element {r_stop.min():.2f}-{r_stop.max():.2f}), at the "
                  f"budget {np.median(end / ref):.3f}; at a bound at the budget {at:.2f}; "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
