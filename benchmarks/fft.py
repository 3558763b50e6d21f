"""FFT where the study computes large correlations, measured in one run and printed as ratios.

    .venv/bin/python benchmarks/fft.py [--model results/models/lesion-known/main/model.pt] [--threads 1]

(a) a positive control's optimisation step: its network's forward + backward to the input (the 9^3 lesion template
    of block 1 on the 4 mm grid, fp32), batch of 2 (the CPU micro-batch), with block 1's convolution direct
    (channels-last, as ``brainfv.models.cnn.frozen`` lays it out) against by FFT
    (``brainfv.featviz.simplify.FFTConv3d``), and the largest difference of their outputs and input gradients;
(b) the comparison's template matching (``brainfv.report.metrics.TemplateBank``, 8 volumes, the default study's
    lesion templates): the smallest FFT
    size without wrap-around (``n + m - 1``; 47 x 56 x 47 on the 4 mm grid, 47 a prime) against the 2,3,5-smooth
    size the bank uses (``brainfv.utils.fast_fft_size``).
Medians of interleaved rounds.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def interleaved(fns, rounds, repeats):
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(median_time(fn, repeats))
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def positive_control_step(model_path, rounds, repeats):
    import torch

    from brainfv.featviz.simplify import fft_large_convs
    from brainfv.models.cnn import frozen
    from brainfv.models.load import load_model

    model, info = load_model(model_path)
    direct = frozen(model)
    fft = frozen(model)
    changed = fft_large_convs(fft)
    shape = tuple(info["meta"]["grid"]["shape"]) if info.get("meta", {}).get("grid") else (39, 48, 39)
    x0 = torch.randn((2, 1) + shape)

    def step(net):
        x = x0.clone().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
        y = net(x)
        (g,) = torch.autograd.grad(y[:, -1].sum(), x)
        return y.detach(), g

    (ya, ga), (yb, gb) = step(direct), step(fft)
    t = interleaved({"direct": lambda: step(direct), "fft": lambda: step(fft)}, rounds, repeats)
    print(f"(a) positive control {model_path}: {', '.join(changed) or 'nothing replaced'}; grid {shape}")
    print(f"    forward + backward of 2 volumes: direct {t['direct'] * 1000:.0f} ms, by FFT {t['fft'] * 1000:.0f} ms"
          f" -> {t['direct'] / t['fft']:.1f}x")
    print(f"    largest difference: logits {float((ya - yb).abs().max()):.2e} (of {float(ya.abs().max()):.2f}),"
          f" input gradient {float((ga - gb).abs().max()):.2e} (of {float(ga.abs().max()):.2e})")


def template_matching(rounds, repeats):
    import numpy as np
    import yaml

    from brainfv.config import LesionConfig, complete
    from brainfv.report.metrics import TemplateBank, lesion_templates

    shape = (39, 48, 39)  # the 4 mm grid's
    cfg = complete(yaml.safe_load((ROOT / "config/config.yaml").read_text()))  # the default study's lesions
    lc = LesionConfig.from_config(cfg["lesions"])  # as the comparison builds its templates (report.compare)
    templates = lesion_templates(lc.template_shapes, np.linspace(*lc.diameter_mm, 3), 4.0, lc.edge_mm)
    fast = TemplateBank(templates, shape)
    m = max(max(t.shape) for _, _, t in templates)
    vols = np.random.default_rng(0).normal(size=(8,) + shape).astype(np.float32)
    exact_shape = tuple(n + m - 1 for n in shape)
    exact = TemplateBank(templates, shape, fft_shape=exact_shape)
    t = interleaved({"exact": lambda: exact.match(vols), "fast": lambda: fast.match(vols)}, rounds, repeats)
    same = all(a["position"] == b["position"] and abs(a["ncc"] - b["ncc"]) < 1e-9
               for a, b in zip(exact.match(vols), fast.match(vols)))
    print(f"(b) template matching, 8 volumes, {len(templates)} templates: FFT size {exact_shape} "
          f"{t['exact'] * 1000:.0f} ms, {fast.fft_shape} {t['fast'] * 1000:.0f} ms -> {t['exact'] / t['fast']:.1f}x; "
          f"same best matches: {same}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "results/models/lesion-known/main/model.pt"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}; medians of {a.rounds} interleaved rounds of {a.repeats}")
    positive_control_step(a.model, a.rounds, a.repeats)
    template_matching(a.rounds, a.repeats)


if __name__ == "__main__":
    main()
