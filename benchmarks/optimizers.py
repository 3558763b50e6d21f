"""Fewer steps to the plateau with another optimiser? (issue 22's learning-rate lever, measured; not used by the study)

    .venv/bin/python benchmarks/optimizers.py --model results/models/sex/main/model.pt \
        --dataset results/data/cohort [--variants adam:0.2,sign:0.2,sign:0.5] [--budget 512]

On the study's ``none`` preset (one variable per voxel, bounded to the data range by projection after each step,
no transforms: a deterministic objective), 8 units of ``--mid`` (channel objective) and the class logits x 4
seeds, each batch element from the study's seeded start: the study's optimiser (**adam**, Adam at the given
learning rate) against projected **sign** ascent (every voxel moves by ``lr`` in the direction of its gradient's
sign for 20 steps, then by ``lr * 20 / (step + 1)``: a step for an optimum with many voxels at a bound).
Every element runs the whole ``--budget`` (fp32, the full network read by a hook, as
benchmarks/vs_lucent.py's loop); printed per variant: the element-steps to the plateau criterion (the schema's
``featviz.converge``, on each element's own objective history), the objective at its plateau and at the budget, both
as the median per-element ratio to adam's at the budget (the reference: 1.00 is as high as the study's optimiser
gets in the whole budget), and the share of brain voxels at a bound at the end.

Measured (the default study's sex model, 4 mm, 2 threads, 2026-11-28; the step counts are deterministic, they
matched a first version of this script to the step): element-steps to the plateau, 8 units of block 3 / the logits:
adam 0.2 1,096 / 1,136; sign 0.2 920 / 752 (-16 % / -34 %), its objective at the plateau 0.949 / 0.936 of adam's
at the budget against adam's own 0.957 / 0.945 (slightly lower); sign 0.5 1,032 / 880 (-6 % / -23 %) at 0.980 /
0.969 (slightly higher; at the budget 1.024 / 1.012). So a sign step buys at most a third fewer steps — far from
the halving that the 10x time-to-convergence target would need — and every image of the study would change; not
adopted (a lead: sign 0.5 is both a little faster and a little higher on this preset; Fourier and MACO not tried).
Adam's plateau (rtol 0.02) sits at about 95 % of what it reaches in 512 steps; 41 % / 46 % of brain voxels end at
a bound, so the optimum is not bang-bang.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(model, mask, pieces, layer, units, logit, variant, lr, budget, converge):
    """One batch: ``(element-steps to the plateau per element, J history (budget, B), share at a bound)``."""
    import torch

    from brainfv.featviz.units import get_module

    params = list(pieces.param.parameters())
    opt = torch.optim.Adam(params, lr=lr) if variant == "adam" else None
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    store = {}
    hook = get_module(model, layer).register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    B = len(units)
    hist, stop = np.zeros((budget, B)), np.full(B, budget)
    rows, cols = torch.arange(B), torch.as_tensor(units)
    try:
        for step in range(budget):
            model(pieces.param() * m)
            a = store["a"][rows, cols]
            j = a if logit else a.flatten(1).mean(1)
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
    finally:
        hook.remove()
    with torch.no_grad():
        img = (pieces.param() * m)[:, 0][:, torch.as_tensor(mask)]
        lo, hi = float(pieces.param.squash.lo), float(pieces.param.squash.hi)  # the data range
        at = ((img <= lo + 1e-3) | (img >= hi - 1e-3)).float().mean().item()
    return stop, hist, at


def main():
    import torch
    from common import mid_and_logits, study_inputs

    from brainfv.config import Preset
    from brainfv.featviz.render import Converge, preset_pieces
    from brainfv.featviz.simplify import redirect_relus

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--mid", default="block3.norm")
    ap.add_argument("--variants", default="adam:0.2,sign:0.2,sign:0.5", help="name:lr, comma-separated (adam first)")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in a.variants.split(",")]
    if variants[0][0] != "adam" or any(v not in ("adam", "sign") for v, _ in variants):
        ap.error("--variants: adam first (the reference), then adam or sign")
    torch.set_num_threads(a.threads)
    fv, model, real, mask, shape, drange = study_inputs(a.model, a.dataset)
    model = redirect_relus(copy.deepcopy(model))  # the study's network gradient
    conv = Converge.from_config(fv["converge"])
    preset = Preset.from_config(fv["regularizers"]["none"])
    print(f"model {a.model}; grid {shape}; preset none; budget {a.budget}; plateau {conv}; {a.threads} threads")
    for rname, obj in mid_and_logits(a.mid).items():
        (layer, units), = obj.units
        ref = None
        for variant, lr in variants:
            gens = [torch.Generator().manual_seed(s) for s in range(len(units))]
            pieces = preset_pieces(preset, shape, gens, real, None, None, drange)
            t0 = time.perf_counter()
            stop, hist, at = run(model, mask, pieces, layer, units, rname == "logits", variant, lr, a.budget, conv)
            end = hist[-1]
            ref = end if ref is None else ref
            at_stop = hist[stop - 1, np.arange(len(units))]
            print(f"{rname:6s} {variant:4s} lr {lr}: element-steps to the plateau {int(stop.sum())} "
                  f"(per element {stop.tolist()}); objective at the plateau {np.median(at_stop / ref):.3f}, at the "
                  f"budget {np.median(end / ref):.3f} of adam's at the budget (per element at the plateau "
                  f"{np.min(at_stop / ref):.2f}-{np.max(at_stop / ref):.2f}); at a bound {at:.2f}; "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
