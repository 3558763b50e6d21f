"""The CUDA paths: bf16 autocast in training and in the visualization loop, whole-batch evaluation, fused Adam.

They run where CUDA is available and skip otherwise (CI has no GPU); ``benchmarks/gpu.py`` measures the same
paths' speed. Thresholds: bf16 keeps 8 bits of mantissa, so a bf16 and an fp32 optimisation of the same
element are compared by what the study reads from them (the activation reached, the image's pattern), not bit
for bit; batched and alone runs on CUDA may take different convolution algorithms (cuDNN autotuning per
shape), so they agree to float rounding grown over the steps, not exactly as the CPU's micro-batches of 1 do.
"""
import json

import numpy as np
import pytest
import torch
from conftest import small_model, toy_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SHAPE = (20, 24, 20)
FIXED = dict(converge={"enabled": False}, data_range=(-3.0, 4.0))


def _corr(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_training_runs_on_cuda_with_bf16_autocast(tmp_path):
    from test_training import ARCH, FAST  # the settings that learn the toy set on the CPU (test_toy_set_is_learned)

    from brainfv.models import load_checkpoint
    from brainfv.training import train_task

    root = toy_dataset(tmp_path / "toy", n=24)
    m = train_task(root, "toy", "label", ARCH, {**FAST, "device": "cuda"}, 0, tmp_path / "out", tmp_path / "ck")
    assert m["precision"] == "bf16"
    assert m["device"].startswith("cuda")
    import pandas as pd

    hist = pd.read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    assert np.isfinite(hist["train_loss"]).all() and np.isfinite(hist["val_loss"]).all()
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert m["test"]["balanced_accuracy"] >= 0.75  # the bright cube is learnt in bf16 too
    model, _ = load_checkpoint(tmp_path / "out" / "model.pt")  # saved from CUDA, read on the CPU
    assert next(model.parameters()).device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights fp32
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["device"].startswith("cuda")


def _render(model, units, amp, seeds=None, steps=48, preset=None, **kw):
    from brainfv.featviz import objectives as O
    from brainfv.featviz import render

    return render(model, O.channel("block3.norm", units), SHAPE, preset or {"param": "fourier"},
                  steps=steps, seeds=seeds or [100 + u for u in units], device="cuda", amp=amp, **FIXED, **kw)


def test_visualization_runs_on_cuda_with_bf16_autocast():
    model = small_model().cuda()
    r = _render(model, [0, 1, 2, 3], amp=True)
    assert r.images.shape == (4,) + SHAPE and np.isfinite(r.images).all()
    assert r.images.min() >= -3.0 - 1e-5 and r.images.max() <= 4.0 + 1e-5  # bounded in bf16 too
    assert (r.objective_end > r.objective_start).all(), (r.objective_start, r.objective_end)
    assert r.info["micro_batch"] == 4  # CUDA evaluates the whole batch at once


def _agree(ref, other, tag, rel_tol, min_corr=None, reseeded=None):
    """``other`` agrees with ``ref`` (same units, same seeds): each image correlates with its reference at least
    ``min_corr``, or — ``reseeded``: ``ref``'s units from other seeds, same precision — more than the reference
    correlates with its own unit started elsewhere (the numerical difference changes the picture less than a new
    start does); and the objective reached differs by at most ``rel_tol`` (relative, + 0.02 absolute). The
    figures are printed (``pytest -s``)."""
    n = len(ref.images)
    same = [_corr(ref.images[j], other.images[j]) for j in range(n)]
    end_ref, end = (np.asarray(r.objective_end, np.float64) for r in (ref, other))
    print(f"{tag}: image corr {np.round(same, 3).tolist()}; objective {np.round(end_ref, 3).tolist()} vs "
          f"{np.round(end, 3).tolist()}")
    if reseeded is not None:
        cross = [_corr(ref.images[j], reseeded.images[j]) for j in range(n)]
        print(f"    reference: the same unit from another seed {np.round(cross, 3).tolist()}")
        assert all(s > c for s, c in zip(same, cross)), (same, cross)
    if min_corr is not None:
        assert min(same) >= min_corr, same
    assert (np.abs(end - end_ref) <= rel_tol * np.abs(end_ref) + 0.02).all(), (end_ref, end)


@pytest.mark.parametrize("amp", [False, True])
def test_batched_equals_one_unit_at_a_time_on_cuda(amp):
    import types

    model = small_model().cuda()
    units = [0, 1, 2, 3, 4, 5]
    batched = _render(model, units, amp)
    alone = [_render(model, [u], amp) for u in units]
    joined = types.SimpleNamespace(images=np.stack([a.images[0] for a in alone]),
                                   objective_end=np.array([a.objective_end[0] for a in alone]))
    if amp:  # bf16 rounding differs with the batch's convolution algorithm: judged against a new start
        reseeded = _render(model, units, amp, seeds=[900 + u for u in units])
        _agree(batched, joined, "batched vs alone, bf16", 0.05, reseeded=reseeded)
    else:  # fp32 (TF32 convolutions by default): as close as the CPU's micro-batches of 2 are to one volume at a time
        # on this model (image correlation 0.984-1.0, objective within 1.8e-3 relative; 48 steps, Fourier)
        _agree(batched, joined, "batched vs alone, fp32", 5e-3, min_corr=0.98)


def test_bf16_and_fp32_visualizations_agree():
    model = small_model().cuda()
    units = [0, 1, 2, 3]
    f32, bf = _render(model, units, amp=False), _render(model, units, amp=True)
    reseeded = _render(model, units, amp=False, seeds=[900 + u for u in units])
    _agree(f32, bf, "bf16 vs fp32", 0.05, reseeded=reseeded)


def test_layer_job_path_on_cuda_matches_the_cpu():
    """The study's per-layer call on CUDA (fp32) agrees with the CPU's for a neuron objective with cropping."""
    from brainfv.featviz.study import visualize_layer

    model = small_model()
    rng = np.random.default_rng(0)
    real = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(4)]
    kw = dict(shape=SHAPE, mask=np.ones(SHAPE, bool), real_volumes=real, test_volumes=real, seed=0, task="t",
              regularizer="none", steps=32, n_seeds=2, objective="neuron", converge={"enabled": False})
    cpu = visualize_layer(model, "block2.norm", [0, 1, 2], {"jitter": 1}, device="cpu", micro_batch=1, amp=False,
                          **kw)
    gpu = visualize_layer(small_model().cuda(), "block2.norm", [0, 1, 2], {"jitter": 1}, device="cuda", amp=False,
                          **kw)
    import types

    as_result = [types.SimpleNamespace(images=r.images.reshape(6, -1),
                                       objective_end=r.table["objective_end"].to_numpy()) for r in (cpu, gpu)]
    _agree(*as_result, "CPU vs CUDA (fp32), neuron objective with cropping", 0.02, min_corr=0.99)
