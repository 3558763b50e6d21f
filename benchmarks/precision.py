"""Does bf16 autocast change what the study reports? The same visualizations in fp32 and bf16, scored alike.

    .venv/bin/python benchmarks/precision.py [--results results] [--tasks lesion,sex] [--seeds 8]

On a finished default study's trained networks (replicate 0): the class logits of each task under each laptop
preset, ``--seeds`` seeds per class, optimised twice from the same starts — fp32 and bf16 autocast of the steps
(``featviz.amp``) — to the plateau criterion, then scored by the comparison's own code
(:func:`brainfv.report.compare.score_volumes`: lesion_ncc, lesion_map_corr for the lesion task, effect_corr for the
sex task). Printed per task, preset, class and metric: the mean in fp32 and in bf16, the paired difference
(mean and SD over seeds), and the seed-to-seed SD of the fp32 values — the spread the study's intervals already
carry. bf16 is harmless to the study's claims where the paired differences are small against that spread; also
the steps to convergence, the loop's time to the plateau and its time per element-step, which is what bf16 buys.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
METRICS = {"lesion": ["lesion_ncc", "lesion_map_corr"], "sex": ["effect_corr"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--tasks", default="lesion,sex")
    ap.add_argument("--presets", default="none,fourier,maco")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch
    import yaml

    from brainfv.config import complete
    from brainfv.data.store import Dataset
    from brainfv.featviz.study import split_volumes, visualize_layer
    from brainfv.models import load_checkpoint
    from brainfv.report.compare import score_volumes, task_truth

    torch.set_num_threads(a.threads)
    cfg = complete(yaml.safe_load((ROOT / "config/config.yaml").read_text()))
    res = Path(a.results)
    print("task\tpreset\tclass\tmetric\tfp32\tbf16\tdiff_mean\tdiff_sd\tseed_sd_fp32\tsteps_fp32\tsteps_bf16\t"
          "loop_s_fp32\tloop_s_bf16\tms_per_element_step_fp32\tms_per_element_step_bf16")
    for task in a.tasks.split(","):
        target = cfg["tasks"][task]["target"]
        data = res / "data" / cfg["tasks"][task]["dataset"]
        ds = Dataset(data)
        model, _ = load_checkpoint(res / "models" / task / "main" / "model.pt")
        meta = json.loads((res / "models" / task / "main" / "metrics.json").read_text())
        files = {"participants": data / "participants.tsv", "mask": data / "mask.nii.gz",
                 "effect": data / "sex_effect.nii.gz", "effect_regional": data / "sex_effect_regional.nii.gz",
                 "lesion_masks": data / "lesion_masks.npy"}
        files = {k: str(v) for k, v in files.items() if v.exists()}
        truth = task_truth(task, target, meta["classes"], files, cfg["lesions"], cfg["compare"]["n_real"],
                           lambda m: None)
        real, test, val = split_volumes(ds, "train", 32), split_volumes(ds, "test"), split_volumes(ds, "val", 1)
        for name in a.presets.split(","):
            preset = cfg["featviz"]["regularizers"][name]
            runs = {}
            for amp in (False, True):
                runs[amp] = visualize_layer(
                    model, "classifier", [0, 1], preset, shape=ds.grid.shape, mask=ds.mask, real_volumes=real,
                    test_volumes=test, seed=cfg["seed"], task=task, regularizer=name, steps=cfg["featviz"]["steps"],
                    lr=cfg["featviz"]["lr"], n_seeds=a.seeds, converge=cfg["featviz"]["converge"], amp=amp,
                    init_volumes=val)
            scores = {}
            for amp, r in runs.items():
                vols = r.images.reshape((-1,) + tuple(ds.grid.shape))
                units = [0, 1] * a.seeds
                scores[amp] = score_volumes(truth, vols, units, r.region, True)
            ms = {amp: 1000 * r.result.seconds / max(1, r.result.info["element_steps"]) for amp, r in runs.items()}
            for u, cls in enumerate(meta["classes"]):
                idx = [s * 2 + u for s in range(a.seeds)]
                for m in METRICS[truth.kind]:
                    f = np.array([scores[False][i].get(m, np.nan) for i in idx], float)
                    b = np.array([scores[True][i].get(m, np.nan) for i in idx], float)
                    d = b - f
                    st = {amp: runs[amp].table["steps"].to_numpy()[idx] for amp in runs}
                    print(f"{task}\t{name}\t{cls}\t{m}\t{np.nanmean(f):.3f}\t{np.nanmean(b):.3f}\t{np.nanmean(d):+.3f}\t"
                          f"{np.nanstd(d, ddof=1):.3f}\t{np.nanstd(f, ddof=1):.3f}\t{int(np.median(st[False]))}\t"
                          f"{int(np.median(st[True]))}\t{runs[False].result.seconds:.1f}\t"
                          f"{runs[True].result.seconds:.1f}\t{ms[False]:.2f}\t{ms[True]:.2f}", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - t0:.0f}s", file=sys.stderr)
