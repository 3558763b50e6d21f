"""Time to a converged visualization and time per step, brainfv against a Lucent-style loop, in one run.

    .venv/bin/python benchmarks/vs_lucent.py --model results/models/sex/main/model.pt \
        --dataset results/data/cohort [--grid 4] [--presets none,jitter,fourier,maco] [--rounds 3] [--quick]

The Lucent-style loop (Lucent's ``render_vis``): one unit at a time, the full network (no truncation, no
simplification, default memory layout) with the unit read by a forward hook, batch 1. It optimises the same
thing as brainfv, so only the engineering differs: the same parametrisation, transforms and penalties (the
preset's :func:`~brainfv.featviz.render.preset_pieces`, built for that one element from the same seed), the
same Adam and learning rate, the same brain mask, and it stops at the same plateau criterion
(:class:`~brainfv.featviz.render.Converge`, the schema's ``featviz.converge``) on its own objective history.
(The per-step figure (a) uses the same loop with the convergence test off, as in benchmarks/featviz.py. Beside
it, (a) times brainfv's network alone — the simplified, truncated network's forward and backward, as many passes
of the loop's CPU micro-batch as a step makes, on fixed random images — as a share of brainfv's step (what is
left for the loop to win) and against the same round's Lucent-style steps: about the ratio a loop that did
nothing but run this network would reach. That ceiling moves with the Lucent-style loop's own time, which varies
between runs far more than brainfv's; the share does not.)

Requests: 8 units of a mid layer (``--mid``, channel objective) and the class logits (every class x
``--logit-seeds`` seeds). Per preset and request, brainfv (one batch, every element stopping at its plateau)
and the Lucent-style loop (the units one after the other, each to its plateau) run in interleaved rounds;
printed: medians, the median of the per-round ratios, steps per element and the share converged.
``--grid 4`` resamples the volumes to 4 mm (the laptop grid, 39x48x39; trilinear; nothing to do on the laptop
study's own data; a pooled-head model accepts any grid), ``--grid 3`` to 3 mm.
``--quick`` (7 minutes on 2 quiet cores, fp32 and bf16): 4 mm,
presets none and fourier, 3 rounds, 10 steps for the per-step figure. One round is not enough: a round that
shares the cores with other work makes the Lucent-style loop (many small batch-1 calls) several times slower.
"""
import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AMP = {"off": False, "on": True, "auto": None}
sys.path.insert(0, str(ROOT / "src"))


def lucent_converge(model, layer, unit, preset, seed, shape, mask, real, data_range, *, steps, lr, converge,
                    logit=False):
    """One unit, Lucent-style, until the plateau criterion or ``steps``; returns the steps run and the flag."""
    import torch

    from brainfv.config import Preset
    from brainfv.featviz.render import preset_pieces
    from brainfv.featviz.units import get_module

    preset = Preset.from_config(preset)
    gens = [torch.Generator().manual_seed(seed)]
    pc = preset_pieces(preset, shape, gens, real, None, None, data_range)
    opt = torch.optim.Adam(pc.param.parameters(), lr=lr)
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    store = {}
    h = get_module(model, layer).register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    hist = np.zeros((steps, 1))
    try:
        for step in range(steps):
            img = pc.param() * m
            x = img
            for t in pc.transforms:
                x = t(x, gens)
            model(x)
            a = store["a"][0, unit]
            j = (a if logit else a.mean()) - pc.penalty(img)[0]
            opt.zero_grad()
            (-j).backward()
            opt.step()
            if pc.after_step is not None:
                pc.after_step(pc.param, step)
            if hasattr(pc.param, "project_"):
                pc.param.project_()
            hist[step, 0] = float(j.detach())
            n = step + 1
            if converge.enabled and n % converge.every == 0 and n >= converge.min_steps and converge.check(hist, n)[0]:
                return n, True
    finally:
        h.remove()
    return steps, bool(converge.check(hist, steps)[0])


def main():
    import torch
    from common import resample, study_arguments

    from brainfv.config import complete
    from brainfv.data.store import Dataset
    from brainfv.featviz import objectives as O
    from brainfv.featviz import render
    from brainfv.featviz.param import data_range
    from brainfv.featviz.render import Converge
    from brainfv.featviz.simplify import redirect_relus
    from brainfv.featviz.study import split_volumes
    from brainfv.featviz.units import layer_output_shape
    from brainfv.models import load_checkpoint

    ap = argparse.ArgumentParser()
    study_arguments(ap, threads=2, presets="none,jitter,fourier,maco", rounds=3)
    ap.add_argument("--grid", type=int, default=4, help="4: resample to 39x48x39; 3: the dataset's grid")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--logit-seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=256, help="budget (the study's featviz.steps is 512; every element "
                    "of the default study's sex model converges within 232 steps in both loops)")
    ap.add_argument("--step-steps", type=int, default=20, help="steps of the per-step figure")
    ap.add_argument("--lr", type=float, default=None, help="override every preset's lr")
    ap.add_argument("--requests", default="mid,logits")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--amp", default="off,auto",
                    help="bf16 autocast of brainfv's steps, comma-separated, each printed: off (fp32 like the "
                         "Lucent-style loop, so the ratio is the engineering alone), on, or auto (what the study "
                         "runs, featviz.amp: null: bf16 on CUDA and on CPUs with native bf16)")
    a = ap.parse_args()
    a.amp = a.amp.split(",")
    if set(a.amp) - set(AMP):
        ap.error(f"--amp: each of {sorted(AMP)}")
    labels = {}
    for m in a.amp:  # one run per precision (auto is fp32 on a CPU without native bf16)
        labels.setdefault(label(m, render_amp_auto()), m)
    a.amp = list(labels.values())
    if a.quick:
        a.grid, a.presets, a.rounds, a.step_steps = 4, "none,fourier", 3, 10
    torch.set_num_threads(a.threads)
    from brainfv.utils import retain_freed_memory

    retain_freed_memory()  # as the study's visualize jobs run (brainfv.jobs.base.run); both loops share the process
    cfg = complete({})
    fv = cfg["featviz"]
    conv = Converge.from_config(fv["converge"])
    model, _ = load_checkpoint(a.model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    lucent_model = redirect_relus(copy.deepcopy(model))  # the same redirected ReLU gradient as brainfv's network
    ds = Dataset(a.dataset)
    real, mask = split_volumes(ds, "train", fv["n_real"]), np.asarray(ds.mask, bool)
    shape = tuple(ds.grid.shape)
    if a.grid and abs(a.grid - ds.grid.voxel_size) > 1e-6:  # resample to the asked voxel size (the data's own)
        shape = tuple(int(round(s * ds.grid.voxel_size / a.grid)) for s in shape)
        real, mask = resample(real, mask, shape)
    drange = data_range(real, mask, 0.5)
    n_cls = layer_output_shape(model, "classifier", (1,) + shape)[0]
    reqs = {"mid": (a.mid, list(range(a.units)), list(range(a.units)), False),
            "logits": ("classifier", [c for c in range(n_cls) for _ in range(a.logit_seeds)],
                       list(range(n_cls * a.logit_seeds)), True)}
    reqs = {k: reqs[k] for k in a.requests.split(",")}
    auto = render_amp_auto()
    print(f"model {a.model}; grid {shape}; budget {a.steps} steps; plateau {conv}; {a.threads} threads; "
          f"{a.rounds} interleaved rounds after a warm-up: medians and median per-round ratios; brainfv with "
          f"amp {', '.join(f'{m} ({label(m, auto)})' for m in a.amp)}, the Lucent-style loop in fp32", flush=True)
    per_step(model, reqs, shape, mask, real, drange, fv, a)
    for name in a.presets.split(","):
        preset = dict(fv["regularizers"][name])
        if a.lr is not None:
            preset["lr"] = a.lr
        lr = preset.get("lr") or fv["lr"]
        for rname, (layer, units, seeds, logit) in reqs.items():
            obj = O.channel(layer, units)
            out = {}

            def ours(amp):  # the whole render: its setup (network copy, objective scale) counts too
                r = render(model, obj, shape, preset, steps=a.steps, lr=fv["lr"], seeds=seeds, mask=mask,
                           real_volumes=real, data_range=drange, converge=fv["converge"], amp=AMP[amp])
                return r.info["steps_run"], r.info["converged"]

            def theirs():
                res = [lucent_converge(lucent_model, layer, u, preset, s, shape, mask, real, drange, steps=a.steps,
                                       lr=lr, converge=conv, logit=logit) for u, s in zip(units, seeds)]
                return np.array([r[0] for r in res]), np.array([r[1] for r in res])

            fns = {**{m: functools.partial(ours, m) for m in a.amp}, "lucent": theirs}
            rounds = interleave(fns, a.rounds, out)
            med = {k: float(np.median([r[k] for r in rounds])) for k in fns}
            s_l, c_l = out["lucent"]
            for m in a.amp:
                ratio = float(np.median([r["lucent"] / r[m] for r in rounds]))
                s_o, c_o = out[m]
                print(f"(b) {name:8s} {rname:6s} {layer} x{len(units)}, brainfv {label(m, auto)}: to convergence "
                      f"brainfv {med[m]:.1f}s (steps median {int(np.median(s_o))}, max {int(s_o.max())}, sum "
                      f"{int(s_o.sum())}, converged {c_o.mean():.2f}) vs Lucent-style {med['lucent']:.1f}s (steps "
                      f"median {int(np.median(s_l))}, max {int(s_l.max())}, sum {int(s_l.sum())}, converged "
                      f"{c_l.mean():.2f}) -> {ratio:.1f}x", flush=True)


def render_amp_auto():
    """What ``amp: auto`` (the study's ``featviz.amp: null``) runs on this machine's CPU."""
    from brainfv.device import autocast_default

    return autocast_default("cpu")


def label(mode, auto):
    return {"off": "fp32", "on": "bf16"}.get(mode) or ("bf16" if auto else "fp32")


def interleave(fns, rounds, out):
    """``rounds`` rounds of every fn (times in seconds per round); ``out[name]`` keeps the last return value."""
    res = []
    for _ in range(rounds):
        r = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            r[name] = time.perf_counter() - t0
        res.append(r)
    return res


def per_step(model, reqs, shape, mask, real, drange, fv, a):
    """(a) seconds per step of a fixed number of steps (no stopping), brainfv vs the Lucent-style loop."""
    import torch

    from brainfv.featviz import objectives as O
    from brainfv.featviz import render
    from brainfv.featviz.render import CPU_MICRO_BATCH, Converge, prepare_network
    from brainfv.featviz.simplify import redirect_relus
    from brainfv.featviz.units import capture_activations

    off = Converge(enabled=False)
    lucent_model = redirect_relus(copy.deepcopy(model))
    auto = render_amp_auto()
    for rname, (layer, units, seeds, logit) in reqs.items():
        preset = dict(fv["regularizers"]["none"])
        obj = O.channel(layer, units)

        def ours(n, amp):  # the loop's own seconds (render's setup, e.g. the objective scale, is not a step)
            return render(model, obj, shape, preset, steps=n, lr=fv["lr"], seeds=seeds, mask=mask, real_volumes=real,
                          data_range=drange, converge=off, amp=AMP[amp]).seconds

        def theirs(n):
            t0 = time.perf_counter()
            for u, s in zip(units, seeds):
                lucent_converge(lucent_model, layer, u, preset, s, shape, mask, real, drange, steps=n, lr=fv["lr"],
                                converge=off, logit=logit)
            return time.perf_counter() - t0

        net = prepare_network(model, [layer])  # the loop's own network (simplified, channels-last, redirected)
        lo, hi = drange
        m_t = torch.as_tensor(mask, dtype=torch.float32)[None, None]

        def network(n, amp):  # the network's forward and backward alone, as the loop runs it: a ceiling
            bf16 = AMP[amp] if AMP[amp] is not None else auto
            gen = torch.Generator().manual_seed(0)
            mb = CPU_MICRO_BATCH
            xs = [(lo + (hi - lo) * torch.rand((min(mb, len(units) - i), 1) + shape, generator=gen)) * m_t
                  for i in range(0, len(units), mb)]
            t0 = time.perf_counter()
            for _ in range(n):
                for i, x in zip(range(0, len(units), mb), xs):
                    leaf = x.requires_grad_(True)
                    v, rows = leaf, slice(i, i + len(x))
                    if len(x) == 1:  # as the loop runs a lone volume (_Loop.score: a detached copy beside it)
                        v, rows = torch.cat([leaf, leaf.detach()]), [i, i]
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        acts = capture_activations(net, v.contiguous(memory_format=torch.channels_last_3d),
                                                   obj.layers)
                    obj(acts, rows)[:len(x)].sum().backward()
                    leaf.grad = None
            return time.perf_counter() - t0

        fns = {**{m: functools.partial(ours, amp=m) for m in a.amp}, "lucent": theirs,
               **{f"net {m}": functools.partial(network, amp=m) for m in a.amp}}
        for fn in fns.values():
            fn(2)  # warm-up: kernel selection, allocation
        rounds = [{k: f(a.step_steps) for k, f in fns.items()} for _ in range(max(a.rounds, 3))]
        med = {k: float(np.median([r[k] for r in rounds])) for k in fns}
        for m in a.amp:
            ratio = float(np.median([r["lucent"] / r[m] for r in rounds]))
            ceiling = float(np.median([r["lucent"] / r[f"net {m}"] for r in rounds]))
            share = float(np.median([r[f"net {m}"] / r[m] for r in rounds]))
            net_ms = 1000 * med[f"net {m}"] / a.step_steps
            print(f"(a) per step, preset none, {rname} {layer} x{len(units)}, {a.step_steps} steps, brainfv "
                  f"{label(m, auto)}: brainfv {1000 * med[m] / a.step_steps:.0f} ms/step vs Lucent-style "
                  f"{1000 * med['lucent'] / a.step_steps:.0f} ms/step -> {ratio:.2f}x; its network alone (forward "
                  f"and backward, {min(len(units), CPU_MICRO_BATCH)} volumes a pass) {net_ms:.0f} ms/step, "
                  f"{share:.2f} of the loop's time -> {ceiling:.2f}x against this run's Lucent-style steps, about "
                  f"the most a loop around this network at this pass size could reach", flush=True)


if __name__ == "__main__":
    main()
