"""The GPU path measured on a GPU: training throughput and the visualization loop, at the laptop grid and the paper's.

    .venv/bin/python benchmarks/gpu.py --pack .gpu     # here, on the CPU: what the GPU run needs (about 10 MB)
    python3 benchmarks/gpu.py --data .gpu --out OUT    # on the GPU machine (after pytest tests/test_cuda.py)

On the GPU machine the library needs, beyond its image's torch/numpy/scipy/pandas/scikit-learn/pyyaml/pytest,
the wheels of nibabel, nilearn, jsonschema, jsonschema-specifications, referencing and rpds-py (cp312), and an
empty stand-in package ``torchio`` (imported by the synthetic cohort, which the GPU run never builds); start the
command with ``python3 -c "import nibabel, nilearn, jsonschema, sklearn, yaml, brainfv.training"`` so a missing
package fails in seconds, not after the machine's start.

``--pack`` takes from a finished default study (``results/``) 160 volumes of the lesion dataset (80 subjects, each
with and without planted lesions, their splits kept; float16), its mask and reference image, and the trained lesion
networks of both heads. On the GPU the volumes become two dataset folders: the laptop grid as they are (4 mm,
39 x 48 x 39) and the paper grid (``config/paper.yaml``: 1.5 mm, 104 x 128 x 104), upsampled trilinearly — a
stand-in with the same lesions at the paper's voxel count; throughput does not depend on the content, and the
paper network trained on it gives the visualization loop a trained network to converge on.

Measured, each in one run on one card (``torch.cuda.synchronize`` around every timing; peak memory from
``torch.cuda.max_memory_allocated`` per case):

1. training: volumes/s of the real path (memmap store -> augmentation -> DataLoader -> bf16 autocast forward,
   backward, fused AdamW), mean of epochs 2.., and of bare forward+backward+step on tensors already on the GPU,
   bf16 versus fp32 (TF32 convolutions, PyTorch's default), at both grids with their networks;
2. the visualization loop: steps/s and wall time to convergence (``featviz.converge``, the schema's criterion) for
   a full layer — every unit x seeds in one batch against one unit at a time (the first units alone, to
   convergence; the full layer's time extrapolated from their mean) — bf16 autocast against fp32, and whole-batch
   forward passes against micro-batches; at the laptop grid on the trained lesion network (block4.norm 64 units x 2
   seeds; class logits 2 x 16 seeds) and at the paper grid on its flatten network (block4.norm 64 units x 1 seed,
   32 of fc's 100 units, class logits 2 x 16 seeds).

Writes ``gpu.tsv`` (one row per measurement) and prints each row as it is measured. ``--budget`` seconds: cases
that would start after it are skipped (and said so), so the run ends inside a lease.
"""
import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
N_SUBJECTS = 80


def pack(out, results):
    """Write what the GPU run needs into ``out`` (run here, from a finished default study)."""
    import pandas as pd

    from brainfv.data.store import Dataset

    out, results = Path(out), Path(results)
    out.mkdir(parents=True, exist_ok=True)
    ds = Dataset(results / "data" / "lesions")
    parts = ds.participants
    keep = sorted(parts["subject"].unique())[:N_SUBJECTS]
    rows = parts[parts["subject"].isin(keep)].copy()
    vols = ds.volumes
    np.savez_compressed(out / "volumes.npz", volumes=np.stack([np.asarray(vols[int(i)]) for i in rows["index"]])
                        .astype(np.float16))
    rows["index"] = range(len(rows))
    rows.to_csv(out / "participants.tsv", sep="\t", index=False)
    for name in ("mask.nii.gz", "reference.nii.gz"):
        shutil.copy(ds.root / name, out / name)
    shutil.copy(results / "models" / "lesion" / "main" / "model.pt", out / "lesion.pt")
    counts = pd.crosstab(rows["split"], rows["lesion"]).to_dict()
    print(f"packed {len(rows)} volumes of {len(keep)} subjects ({counts}) into {out}: "
          f"{sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB")


def write_dataset(root, volumes, rows, grid, mask):
    """A dataset folder as prepare_cohort writes one (volumes.npy, participants.tsv, reference, mask, manifest)."""
    from brainfv.data.store import VolumeWriter, write_manifest

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with VolumeWriter(root / "volumes.npy", len(volumes), grid.shape) as w:
        for v in volumes:
            w.append(np.asarray(v, np.float32))
    rows.to_csv(root / "participants.tsv", sep="\t", index=False)
    grid.to_nifti(np.mean(volumes[:16], axis=0).astype(np.float32)).to_filename(root / "reference.nii.gz")
    grid.to_nifti(mask.astype(np.uint8), dtype=np.uint8).to_filename(root / "mask.nii.gz")
    write_manifest(root, files=["reference.nii.gz", "mask.nii.gz"])
    return root


def datasets(data, work, paper_voxel=1.5):
    """The laptop-grid and paper-grid dataset folders (see the module docstring)."""
    import nibabel as nib
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from brainfv.data.grid import Grid

    data, work = Path(data), Path(work)
    vols = np.load(data / "volumes.npz")["volumes"].astype(np.float32)
    rows = pd.read_csv(data / "participants.tsv", sep="\t", dtype={"subject": str})
    g4 = Grid.from_image(nib.load(str(data / "reference.nii.gz")))
    mask4 = np.asarray(nib.load(str(data / "mask.nii.gz")).dataobj) > 0
    lo = g4.origin
    hi = [o + (s - 1) * g4.voxel_size for o, s in zip(g4.origin, g4.shape)]
    g15 = Grid.from_bbox(paper_voxel, [[a, b] for a, b in zip(lo, hi)])
    ds4 = write_dataset(work / "ds4", vols, rows, g4, mask4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    up = []
    for v in vols:
        t = torch.from_numpy(v)[None, None].to(dev)
        up.append(F.interpolate(t, size=g15.shape, mode="trilinear", align_corners=True)[0, 0].cpu().numpy())
    m = F.interpolate(torch.from_numpy(mask4.astype(np.float32))[None, None], size=g15.shape, mode="nearest")
    ds15 = write_dataset(work / "ds15", np.stack(up), rows, g15, m[0, 0].numpy() > 0)
    return ds4, ds15


class Recorder:
    def __init__(self, out, budget):
        self.out, self.rows, self.t0, self.budget = Path(out), [], time.perf_counter(), budget

    def left(self):
        return self.budget - (time.perf_counter() - self.t0)

    def add(self, **row):
        import pandas as pd

        self.rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        pd.DataFrame(self.rows).to_csv(self.out / "gpu.tsv", sep="\t", index=False)

    def case(self, name, need, fn):
        if self.left() < need:
            print(f"SKIPPED {name}: {self.left():.0f}s left of the budget, it needs about {need}s", flush=True)
            return
        print(f"== {name} ({self.left():.0f}s left)", flush=True)
        try:
            fn()
        except Exception:  # one failed case must not cost the others their lease time
            traceback.print_exc()
            print(f"FAILED {name}", flush=True)


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def train_case(rec, grid, ds, arch, training, work, device):
    """The real training path (train_task, bf16 autocast on CUDA); returns the trained model's path."""
    import pandas as pd

    from brainfv.training import train_task

    peak_reset()
    out = Path(work) / f"train-{grid}"
    t0 = time.perf_counter()
    m = train_task(ds, f"lesion-{grid}", "lesion", arch, {**training, "device": device}, 0, out, out / "ck",
                   log=lambda s: print("#", s, flush=True))
    wall = time.perf_counter() - t0
    hist = pd.read_csv(out / "history.tsv", sep="\t")
    rate = hist["samples_per_s"].iloc[1:] if len(hist) > 1 else hist["samples_per_s"]
    rec.add(section="train", grid=grid, case="real path (bf16 autocast)", batch=training["batch_size"],
            epochs=len(hist), vol_per_s=round(float(rate.mean()), 1), seconds=round(wall, 1),
            peak_gb=round(peak_gb(), 2), test_bacc=round(m["test"]["balanced_accuracy"], 3))
    return out / "model.pt"


def bare_training(rec, grid, arch, shape, batch, device, steps=12):
    """Forward+backward+step on tensors already on the device, bf16 autocast against fp32."""
    import torch

    from brainfv.models import build_model

    for amp in (True, False):
        peak_reset()
        torch.manual_seed(0)
        model = build_model(arch, input_shape=shape).to(device, memory_format=torch.channels_last_3d).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        x = torch.randn((batch, 1) + tuple(shape), device=device).contiguous(memory_format=torch.channels_last_3d)
        y = torch.randint(0, 2, (batch,), device=device)
        times = []
        for i in range(steps + 3):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        rec.add(section="train", grid=grid, case=f"bare compute ({'bf16' if amp else 'fp32'})", batch=batch,
                vol_per_s=round(batch / float(np.median(times)), 1), ms_per_step=round(1000 * np.median(times), 2),
                peak_gb=round(peak_gb(), 2))


def render_case(model, layer, units, seeds_per_unit, ds, device, *, amp, steps, preset, objective="channel",
                micro_batch=None, converge=True, fixed_steps=None):
    """One render of ``units`` x seeds in one batch; returns (wall seconds, RenderResult)."""
    from brainfv.featviz import render
    from brainfv.featviz.study import make_objective, split_volumes

    real = split_volumes(ds, "train", 32)
    all_units = list(units) * seeds_per_unit
    obj = make_objective(layer, all_units, objective)
    seeds = [1000 + i for i in range(len(all_units))]
    sync()
    t0 = time.perf_counter()
    r = render(model, obj, ds.grid.shape, preset, steps=fixed_steps or steps, seeds=seeds, device=device,
               mask=ds.mask, real_volumes=real, amp=amp, micro_batch=micro_batch,
               converge={"enabled": converge and not fixed_steps})
    sync()
    return time.perf_counter() - t0, r


def viz_layer(rec, grid, model, ds, layer, n_units, seeds, device, steps, preset_name, preset, alone=4,
              micro_batches=(), objective="channel"):
    """Full layer batched (bf16, fp32) to convergence; the first ``alone`` units one at a time; throughput."""
    units = list(range(n_units))
    base = dict(grid=grid, section="visualize", layer=layer, preset=preset_name)
    res = {}
    for amp in (True, False):
        peak_reset()
        wall, r = render_case(model, layer, units, seeds, ds, device, amp=amp, steps=steps, preset=preset,
                              objective=objective)
        res[amp] = r
        st = r.info["steps_run"]
        rec.add(**base, case=f"batched to convergence ({'bf16' if amp else 'fp32'})", batch=len(st),
                seconds=round(wall, 2), steps_median=int(np.median(st)), steps_max=int(st.max()),
                converged=round(float(np.mean(r.info["converged"])), 3),
                element_steps_per_s=round(r.info["element_steps"] / r.seconds, 1),
                objective_end_median=round(float(np.median(r.objective_end)), 4), peak_gb=round(peak_gb(), 2))
    a, b = res[True], res[False]
    d = np.abs(a.objective_end - b.objective_end) / (np.abs(b.objective_end) + 1e-6)
    corr = lambda x, y: float(np.corrcoef(x.ravel(), y.ravel())[0, 1])  # noqa: E731
    c = [corr(a.images[j], b.images[j]) for j in range(len(a.images))]
    # the reference: fp32 images of the same unit from another seed (elements are seed-major)
    ref = [corr(b.images[j], b.images[j + n_units]) for j in range(len(b.images) - n_units)] or [float("nan")]
    rec.add(**base, case="bf16 vs fp32 agreement", batch=len(c), objective_rel_diff_median=round(float(np.median(d)),
            4), objective_rel_diff_max=round(float(d.max()), 4), image_corr_median=round(float(np.median(c)), 3),
            image_corr_other_seed_fp32_median=round(float(np.median(ref)), 3))
    for amp in (True, False):
        walls, loops, steps_run = [], [], []
        peak_reset()
        for u in units[:alone]:
            wall, r = render_case(model, layer, [u], 1, ds, device, amp=amp, steps=steps, preset=preset,
                                  objective=objective)
            walls.append(wall)
            loops.append(r.seconds)  # the loop alone (the wall time includes the objective's scale on 32 volumes)
            steps_run.append(int(r.info["steps_run"][0]))
        per = float(np.mean(walls))
        rec.add(**base, case=f"one unit at a time to convergence ({'bf16' if amp else 'fp32'})", batch=1,
                units_measured=len(walls), seconds_per_element=round(per, 3),
                loop_seconds_per_element=round(float(np.mean(loops)), 3),
                element_steps_per_s=round(sum(steps_run) / sum(walls), 1),
                seconds_full_layer_extrapolated=round(per * n_units * seeds, 1),
                steps_median=int(np.median(steps_run)), peak_gb=round(peak_gb(), 2))
    for mb in micro_batches:
        peak_reset()
        wall, r = render_case(model, layer, units, seeds, ds, device, amp=True, steps=steps, preset=preset,
                              objective=objective, micro_batch=mb, fixed_steps=24)
        rec.add(**base, case=f"fixed 24 steps, micro-batch {mb or 'whole'} (bf16)", batch=n_units * seeds,
                seconds=round(wall, 2), ms_per_step=round(1000 * r.seconds / 24, 1), peak_gb=round(peak_gb(), 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", help="write the GPU run's inputs into this folder (from --results) and stop")
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--data", help="a folder written by --pack")
    ap.add_argument("--out", default=".")
    ap.add_argument("--work", default="/tmp/brainfv-gpu")
    ap.add_argument("--budget", type=float, default=420)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a CPU rehearsal: tiny layers, few steps")
    a = ap.parse_args()
    if a.pack:
        return pack(a.pack, a.results)
    import torch

    from brainfv.data.store import Dataset
    from brainfv.device import pick_device
    from brainfv.models import load_checkpoint

    device = pick_device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, a.budget)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); torch {torch.__version__}; budget {a.budget:.0f}s", flush=True)
    t0 = time.perf_counter()
    ds4, ds15 = datasets(a.data, a.work, 3.0 if a.quick else 1.5)
    print(f"datasets written in {time.perf_counter() - t0:.1f}s", flush=True)
    d4, d15 = Dataset(ds4), Dataset(ds15)
    q = a.quick
    laptop_arch = {"channels": [8, 16, 32, 64]}
    paper_arch = {"head": "flatten", "channels": [8, 32, 64, 64], "activation": "elu", "spatial_dropout": 0.3,
                  "dropout": 0.3, "hidden": 100}
    workers = 0 if q else 8
    laptop_train = {"epochs": 2 if q else 4, "batch_size": 4, "lr": 1e-3, "patience": 10, "num_workers": workers}
    paper_train = {"epochs": 2 if q else 12, "batch_size": 8, "lr": 1e-3, "patience": 15, "num_workers": workers}
    rec.case("training, laptop grid", 20, lambda: train_case(rec, "4mm", ds4, laptop_arch, laptop_train, a.work,
                                                             a.device))
    rec.case("bare training compute, laptop grid", 10,
             lambda: bare_training(rec, "4mm", laptop_arch, d4.grid.shape, 4 if q else 16, device))
    rec.case("bare training compute, paper grid", 15,
             lambda: bare_training(rec, "1.5mm", paper_arch, d15.grid.shape, 2 if q else 8, device, 3 if q else 12))
    paper_model = {}
    rec.case("training, paper grid", 60, lambda: paper_model.setdefault(
        "path", train_case(rec, "1.5mm", ds15, paper_arch, paper_train, a.work, a.device)))
    steps4, steps15 = (16, 16) if q else (256, 512)
    fourier = {"param": "fourier", "decay": 1.0, "jitter": 2, "lr": 0.05}
    lesion, _ = load_checkpoint(Path(a.data) / "lesion.pt")
    lesion = lesion.to(device)
    n4 = 4 if q else 64
    rec.case("laptop grid: block4.norm, fourier", 20, lambda: viz_layer(
        rec, "4mm", lesion, d4, "block4.norm", n4, 2, device, steps4, "fourier", fourier, 2 if q else 4,
        micro_batches=(8, 32, None)))
    rec.case("laptop grid: class logits, voxel (none)", 20, lambda: viz_layer(
        rec, "4mm", lesion, d4, "classifier", 2, 2 if q else 16, device, steps4, "none", {}, 2))
    if "path" in paper_model:
        pm, _ = load_checkpoint(paper_model["path"])
        pm = pm.to(device)
        rec.case("paper grid: class logits, fourier", 60, lambda: viz_layer(
            rec, "1.5mm", pm, d15, "classifier", 2, 2 if q else 16, device, steps15, "fourier", fourier, 2))
        rec.case("paper grid: block4.norm, fourier", 90, lambda: viz_layer(
            rec, "1.5mm", pm, d15, "block4.norm", n4, 1, device, steps15, "fourier", fourier,
            2 if q else 3, micro_batches=(16, 64, None)))
        rec.case("paper grid: fc, voxel (none)", 60, lambda: viz_layer(
            rec, "1.5mm", pm, d15, "fc", 4 if q else 32, 1, device, steps15, "none", {}, 2))
    print(f"done in {time.perf_counter() - rec.t0:.0f}s; {len(rec.rows)} rows in {out / 'gpu.tsv'}", flush=True)


if __name__ == "__main__":
    main()
