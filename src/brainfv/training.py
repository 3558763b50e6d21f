"""Training and evaluation of a task's CNN, streaming volumes from the on-disk store.

The pieces, each usable alone: :func:`make_loaders` (seeded, streaming data loaders),
:class:`Checkpointer` (a resumable per-epoch state keyed on what the model is made from),
:func:`fit` (the epochs), :func:`evaluate`, :func:`write_outputs`; :func:`train_task` composes them
and :func:`train_job` is the workflow's ``train_model`` rule.

* memory does not depend on the cohort size (volumes are read one at a time from the store);
* shuffling and augmentation are seeded by ``(seed, epoch, subject)``, dropout by a saved RNG state,
  so a job killed part-way resumes from its last epoch checkpoint and ends with the same model as an
  uninterrupted run (on CPU); the checkpoint is keyed on the config, the seed, the code version and the
  dataset's content, and removed once the model is written;
* class-balanced cross-entropy, AdamW with linear warm-up then cosine decay, early stopping on
  validation balanced accuracy; on CUDA bf16 autocast of the training steps (``training.amp``; metrics in fp32)
  and cuDNN autotuning (restored afterwards).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm
from torch import nn

from .config import AugmentConfig, TrainingConfig
from .data.files import DATASET_FILES
from .data.store import Dataset, VolumeReader
from .device import compute_settings, pick_device
from .errors import InputDataError
from .models.cnn import build_model, save_checkpoint
from .provenance import code_hash
from .utils import atomic_path, get_logger, stable_seed, write_json

__all__ = ["VolumeDataset", "task_labels", "make_loaders", "Checkpointer", "checkpoint_key", "fit", "evaluate",
           "binary_metrics", "write_outputs", "train_task", "pick_device", "epochs_without_gain"]

#: bumped when the checkpoint's content or the training loop changes what a resumed run computes
CHECKPOINT_FORMAT = 3


class VolumeDataset(torch.utils.data.Dataset):
    """Volumes ``rows`` of a ``volumes.npy`` store with integer ``labels``, read lazily.

    Augmentation (training only): random integer shift of up to ``shift_vox`` voxels
    (zero-filled), optional left-right flip, random intensity scale and offset of
    relative size ``intensity``; its randomness derives from ``(seed, epoch, row)``.
    """

    def __init__(self, volumes_path, rows, labels, augment=None, seed=0):
        self.path = str(volumes_path)
        self.rows = np.asarray(rows, dtype=int)
        self.labels = np.asarray(labels, dtype=int)
        # an AugmentConfig or a dict of its fields (the rest from the schema's training.augment defaults)
        self.augment = AugmentConfig.from_config(augment, "training.augment") if augment else None
        self.seed = seed
        self.epoch = 0
        self._mm = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if self._mm is None:  # opened lazily, once per worker process
            self._mm = VolumeReader(self.path)
        vol = np.asarray(self._mm[self.rows[i]], dtype=np.float32)
        if self.augment:
            vol = _augment(vol, self.augment, np.random.default_rng(stable_seed(self.seed, self.epoch, self.rows[i])))
        return torch.from_numpy(vol)[None], int(self.labels[i])


def _augment(vol, aug, rng):
    """Shift, flip and intensity-scale one volume (``aug``: :class:`~brainfv.config.AugmentConfig`)."""
    s = int(aug.shift_vox)
    if s > 0:
        shift = rng.integers(-s, s + 1, size=3)
        out = np.zeros_like(vol)
        src = tuple(slice(max(-d, 0), n - max(d, 0)) for d, n in zip(shift, vol.shape))
        dst = tuple(slice(max(d, 0), n - max(-d, 0)) for d, n in zip(shift, vol.shape))
        out[dst] = vol[src]
        vol = out
    if aug.flip and rng.random() < 0.5:
        vol = vol[::-1].copy()
    a = float(aug.intensity)
    if a > 0:
        inside = vol != 0
        vol = np.where(inside, vol * (1 + rng.uniform(-a, a)) + rng.uniform(-a, a), 0).astype(np.float32)
    return vol


def task_labels(participants: pd.DataFrame, target: str, task: str = "task") -> tuple[list, pd.DataFrame, pd.DataFrame]:
    """Class names and integer labels of ``target``; rows with an unusable label are dropped.

    Returns ``(classes, table with a 'y' column)``. Classes are the sorted distinct
    values in the training split; raises :class:`InputDataError` for a missing
    column, an empty split or a single class in training.
    """
    if target not in participants.columns:
        raise InputDataError(f"task {task!r}: target column {target!r} not in participants "
                             f"(columns: {list(participants.columns)})")
    df = participants[participants[target].notna()].copy()
    df[target] = df[target].astype(str)
    train = df[df["split"] == "train"]
    classes = sorted(train[target].unique())
    if len(classes) < 2:
        raise InputDataError(f"task {task!r}: the training split has {len(classes)} class(es) of {target!r} "
                             f"({classes}); need at least 2")
    dropped = df[~df[target].isin(classes)]
    df = df[df[target].isin(classes)].copy()
    df["y"] = df[target].map({c: i for i, c in enumerate(classes)}).astype(int)
    for split in ("train", "val", "test"):
        if (df["split"] == split).sum() == 0:
            raise InputDataError(f"task {task!r}: the {split} split is empty")
    return classes, df, dropped


def binary_metrics(y: np.ndarray, prob: np.ndarray, n_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present), ROC AUC (one-vs-rest mean over the
    classes with positives and negatives), confusion matrix, n per class (scikit-learn's metrics)."""
    y = np.asarray(y, int)
    prob = np.asarray(prob, float)
    pred = prob.argmax(1) if len(y) else np.zeros(0, int)
    cm = skm.confusion_matrix(y, pred, labels=list(range(n_classes))) if len(y) else np.zeros((n_classes,) * 2, int)
    present = [c for c in range(n_classes) if (y == c).any()]
    aucs = []
    for c in range(n_classes if n_classes > 2 else 1):
        cls = 1 if n_classes == 2 else c
        if 0 < (y == cls).sum() < len(y):
            aucs.append(float(skm.roc_auc_score(y == cls, prob[:, cls])))
    return {
        "accuracy": float(skm.accuracy_score(y, pred)) if len(y) else float("nan"),
        "balanced_accuracy": float(skm.recall_score(y, pred, labels=present, average="macro", zero_division=0))
        if present else float("nan"),
        "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "confusion_matrix": cm.tolist(),
        "n_per_class": cm.sum(1).tolist(),
        "n": len(y),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, n_classes: int,
             amp: bool = False) -> tuple[dict, np.ndarray]:
    """Mean loss, metrics and per-sample probabilities of ``model`` on ``loader``."""
    model.eval()
    ys, probs, loss_sum = [], [], 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True, memory_format=torch.channels_last_3d), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
        ys.append(y.cpu().numpy())
    y = np.concatenate(ys)
    p = np.concatenate(probs)
    m = binary_metrics(y, p, n_classes)
    m["loss"] = loss_sum / max(len(y), 1)
    return m, p


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable | None, device: torch.device) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``loader`` ("precise BN").

    With small batches the exponential running averages lag the weights, and an eval-mode
    model then misplaces its decision threshold (high AUC, chance-level accuracy).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for x, _ in loader:
        model(x.to(device, non_blocking=True, memory_format=torch.channels_last_3d))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


def _lr_lambda(warmup, total):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


@dataclass
class Loaders:
    """The data of one training run: the (augmented) training set, and loaders for validation, test and the
    BatchNorm recalibration subset."""

    train_set: VolumeDataset
    train_kw: dict
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    bn: torch.utils.data.DataLoader

    def train(self, epoch: int, seed: int) -> torch.utils.data.DataLoader:
        """The training loader of ``epoch``: augmentation and shuffling seeded by ``(seed, epoch)``."""
        self.train_set.set_epoch(epoch)
        g = torch.Generator().manual_seed(stable_seed(seed, "shuffle", epoch))
        return torch.utils.data.DataLoader(self.train_set, shuffle=True, generator=g, drop_last=False, **self.train_kw)


def make_loaders(volumes_path: str | Path, splits: dict, cfg: TrainingConfig, seed: int, pin_memory: bool = False,
                 bootstrap: bool = False) -> Loaders:
    """Loaders over the ``splits`` (DataFrames with ``index`` and ``y``) of a volume store.

    With ``bootstrap`` the training set is a resample (with replacement, seeded) of the training rows.
    """
    def dataset(split, augment, rows=None):
        d = splits[split]
        idx = np.arange(len(d)) if rows is None else rows
        return VolumeDataset(volumes_path, d["index"].to_numpy()[idx], d["y"].to_numpy()[idx],
                             cfg.augment if augment else None, seed)

    rows = None
    if bootstrap:
        n = len(splits["train"])
        rows = np.random.default_rng(stable_seed(seed, "bootstrap")).integers(0, n, n)
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin_memory)
    bn_set = dataset("train", False, rows)
    bn = torch.utils.data.DataLoader(torch.utils.data.Subset(bn_set, range(min(len(bn_set), cfg.bn_volumes))),
                                     shuffle=False, batch_size=max(cfg.batch_size, 8), num_workers=cfg.num_workers)
    return Loaders(dataset("train", True, rows), kw,
                   torch.utils.data.DataLoader(dataset("val", False), shuffle=False, **kw),
                   torch.utils.data.DataLoader(dataset("test", False), shuffle=False, **kw), bn)


def checkpoint_key(**parts: object) -> str:
    """A short hash of everything a training run is made from (config, seed, classes, data content, code)."""
    # the training code only (its learning-curve plot is drawn by brainfv.jobs.train): a figure edit must not
    # throw resumable checkpoints away
    parts = {**parts, "code": code_hash(__name__), "format": CHECKPOINT_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpointer:
    """The resumable state of one training run in ``folder/last.pt``, valid only for ``key``."""

    def __init__(self, folder, key, log=None):
        self.path = Path(folder) / "last.pt"
        self.key = key
        self.log = log or (lambda m: None)

    def load(self, device: torch.device) -> dict | None:
        """The saved state if it was made with the same key, else ``None`` (a stale one is removed)."""
        if not self.path.exists():
            return None
        ck = torch.load(self.path, map_location=device, weights_only=False)
        if ck.get("key") != self.key:
            self.log(f"ignoring and removing {self.path}: it was made from other data, config or code")
            self.clear()
            return None
        return ck

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({"key": self.key, **state}, tmp)

    def clear(self) -> None:
        """Remove the state (once the model is written: a finished run is never resumed)."""
        if self.path.exists():
            self.path.unlink()


def step_autocast(cfg: TrainingConfig, device: torch.device) -> bool:
    """Whether the training steps run under bf16 autocast: ``training.amp``, or where it is null on CUDA only. Not
    on the CPU by default, even with native bf16: there it made a step 1.4x faster (4 mm grid), but in the default
    study the sex-flatten network trained with it collapsed to constant outputs from epoch 3 (test balanced accuracy
    0.50) where the same seed in fp32 reached 1.00."""
    return device.type == "cuda" if cfg.amp is None else bool(cfg.amp)


def fit(model: nn.Module, loaders: Loaders, cfg: TrainingConfig, device: torch.device, loss_fn: nn.Module,
        n_classes: int, checkpointer: Checkpointer, seed: int, log: Callable,
        stop_after_epoch: int | None = None) -> tuple[list, dict] | None:
    """Train ``model`` for ``cfg.epochs`` epochs (early stopping on validation balanced accuracy, ties broken by
    validation loss), resuming from ``checkpointer``; returns ``(history, best_state)``, or ``None`` when
    stopped after ``stop_after_epoch`` (a simulated interruption, for tests)."""
    amp = step_autocast(cfg, device)  # the training steps; metrics in fp32
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(loaders.train_set) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch))
    history, best, best_state, start_epoch, bad_epochs = [], (-1.0, -float("inf")), None, 0, 0
    best_loss = float("inf")  # early stopping: patience counts epochs without a val bacc or val loss gain
    ck = checkpointer.load(device)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        history, best, best_state = ck["history"], ck["best"], ck["best_state"]
        best_loss = ck.get("best_loss", min((h["val_loss"] for h in history), default=float("inf")))
        start_epoch, bad_epochs = ck["epoch"] + 1, ck["bad_epochs"]
        log(f"resuming from {checkpointer.path} after epoch {start_epoch}")
    epoch_times = []
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        loss_sum, correct, seen = _train_epoch(model, loaders.train(epoch, seed), opt, sched, loss_fn, device, amp)
        recalibrate_batchnorm(model, loaders.bn, device)
        val, _ = evaluate(model, loaders.val, device, n_classes)
        dt = time.perf_counter() - t0
        epoch_times.append(dt)
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_balanced_accuracy": val["balanced_accuracy"], "val_roc_auc": val["roc_auc"],
               "lr": opt.param_groups[0]["lr"], "seconds": dt, "samples_per_s": seen / dt}
        history.append(rec)
        score = (val["balanced_accuracy"], -val["loss"])
        improved = best_state is None or score > tuple(best)
        if improved:
            best, best_state = score, copy.deepcopy(model.state_dict())
        bad_epochs = epochs_without_gain(bad_epochs, improved, val["loss"], best_loss)
        best_loss = min(best_loss, val["loss"])
        remaining = cfg.epochs - epoch - 1
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.3f} | "
            f"val loss {val['loss']:.4f} bacc {val['balanced_accuracy']:.3f} auc {val['roc_auc']:.3f} | "
            f"{rec['samples_per_s']:.1f} vol/s {dt:.1f}s/epoch ETA {remaining * np.mean(epoch_times):.0f}s"
            + (" *" if improved else ""))
        checkpointer.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "rng": torch.get_rng_state(), "history": history, "best": best, "best_state": best_state,
                           "epoch": epoch, "bad_epochs": bad_epochs, "best_loss": best_loss})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            log(f"stopping after epoch {epoch + 1} as asked (simulated interruption)")
            return None
    if bad_epochs >= cfg.patience:
        log(f"early stopping: no val balanced-accuracy or val-loss gain for {cfg.patience} epochs")
    return history, best_state


def epochs_without_gain(bad_epochs: int, improved: bool, val_loss: float, best_loss: float) -> int:
    """Early stopping's count: reset by a gain in val balanced accuracy (``improved``) or in val loss (a bacc
    that ties, as it does on a small validation split, no longer stops a model whose loss still falls)."""
    return 0 if improved or val_loss < best_loss else bad_epochs + 1


def _train_epoch(model: nn.Module, batches: Iterable, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, device: torch.device,
                 amp: bool) -> tuple[float, int, int]:
    """One pass over the training batches: (summed loss, correct predictions, volumes seen)."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True, memory_format=torch.channels_last_3d), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    return loss_sum, correct, seen


def write_outputs(out_dir: str | Path, model: nn.Module, meta: dict, metrics: dict, predictions: pd.DataFrame,
                  history: list) -> None:
    """``model.pt``, ``metrics.json``, ``predictions.tsv`` and ``history.tsv`` in ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "model.pt", model.cpu(), **meta)
    write_json(metrics, out_dir / "metrics.json")
    with atomic_path(out_dir / "predictions.tsv") as tmp:
        predictions.to_csv(tmp, sep="\t", index=False)
    with atomic_path(out_dir / "history.tsv") as tmp:
        pd.DataFrame(history).to_csv(tmp, sep="\t", index=False)


def _train_and_evaluate(arch: dict, n_classes: int, weights: torch.Tensor, loaders: Loaders, cfg: TrainingConfig,
                        device: torch.device, checkpointer: Checkpointer, run_seed: int, log: Callable,
                        stop_after_epoch: int | None, input_shape: tuple | None = None) -> tuple | None:
    """A new model fitted with its seed (the caller's global RNG restored afterwards), at its best state, and
    its test and validation metrics: (model, history, test, test probabilities, val); None if stopped early."""
    with torch.random.fork_rng(devices=[]), compute_settings(device, deterministic_cpu=True):
        torch.manual_seed(run_seed)  # weights and dropout; the caller's global RNG is restored afterwards
        # channels-last 3D convolutions: 2.6x the CPU throughput of the default layout (benchmarks/training.py)
        model = build_model(arch, n_classes=n_classes, input_shape=input_shape).to(
            device, memory_format=torch.channels_last_3d)
        loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
        fitted = fit(model, loaders, cfg, device, loss_fn, n_classes, checkpointer, run_seed, log, stop_after_epoch)
        if fitted is None:
            return None
        history, best_state = fitted
        model.load_state_dict(best_state)
        test, test_prob = evaluate(model, loaders.test, device, n_classes)
        val, _ = evaluate(model, loaders.val, device, n_classes)
    return model, history, test, test_prob, val


def _predictions(te: pd.DataFrame, target: str, classes: list, test_prob: np.ndarray) -> pd.DataFrame:
    """One row per test subject: its label, the predicted class and each class's probability."""
    pred = pd.DataFrame({"subject": te["subject"].to_numpy(), "split": "test", "label": te[target].to_numpy(),
                         "y": te["y"].to_numpy(), "predicted": [classes[i] for i in test_prob.argmax(1)]})
    for i, c in enumerate(classes):
        pred[f"p_{c}"] = test_prob[:, i]
    return pred


def train_task(dataset_dir: str | Path, task: str, target: str, arch: dict, training: dict, seed: int,
               out_dir: str | Path, checkpoint_dir: str | Path, log: Callable | None = None, replicate: int = 0,
               stop_after_epoch: int | None = None, role: str = "main", bootstrap: bool = False) -> dict | None:
    """Train one model for ``task`` on a dataset folder; write the outputs into ``out_dir``.

    Outputs: ``model.pt`` (best validation state, loadable with :func:`brainfv.models.load_checkpoint`),
    ``metrics.json`` (test and validation metrics, timing), ``predictions.tsv`` (test subjects),
    ``history.tsv`` (per epoch). A per-epoch checkpoint in ``checkpoint_dir`` (not a rule output) makes the
    job resumable; it is removed once the outputs are written. ``replicate`` enters the seed (trained replicate r;
    a ``transfer`` model the index after the last); ``bootstrap`` resamples the training subjects;
    ``stop_after_epoch`` simulates a kill."""
    log = log or get_logger().info
    cfg = TrainingConfig.from_config(training, "training")
    ds = Dataset(dataset_dir)
    parts = ds.participants
    classes, df, dropped = task_labels(parts, target, task)
    if len(dropped):
        log(f"task {task}: leaving out {len(dropped)} subjects whose {target!r} is not a training class "
            f"({sorted(dropped[target].astype(str).unique())})")
    grid = ds.grid
    vol_path = ds.root / DATASET_FILES["volumes"]
    if tuple(ds.volumes.shape[1:]) != tuple(grid.shape):
        raise InputDataError(f"{vol_path}: volumes of shape {ds.volumes.shape[1:]} do not match the grid "
                             f"{grid.shape} of {ds.root / DATASET_FILES['reference']}")
    run_seed = stable_seed(seed, "train", task, replicate)
    device = pick_device(cfg.device)
    splits = {s: df[df["split"] == s] for s in ("train", "val", "test")}
    counts = {s: d["y"].value_counts().reindex(range(len(classes)), fill_value=0).tolist() for s, d in splits.items()}
    log(f"task {task} ({role} model): target {target!r}, classes {classes}, n per class {counts}, "
        f"device {device}, grid {grid.shape}" + (", bootstrap resample of the training subjects" if bootstrap else ""))
    loaders = make_loaders(vol_path, splits, cfg, run_seed, pin_memory=device.type == "cuda", bootstrap=bootstrap)
    n_train = counts["train"]
    weights = torch.tensor([sum(n_train) / (len(classes) * max(c, 1)) for c in n_train], dtype=torch.float32)
    key = checkpoint_key(arch=arch, training=cfg.as_dict(), seed=run_seed, classes=classes, bootstrap=bootstrap,
                         data=ds.fingerprint(), subjects=len(df))
    checkpointer = Checkpointer(checkpoint_dir, key, log)
    t_start = time.perf_counter()
    trained = _train_and_evaluate(arch, len(classes), weights, loaders, cfg, device, checkpointer, run_seed, log,
                                  stop_after_epoch, grid.shape)
    if trained is None:
        return None
    model, history, test, test_prob, val = trained
    best_epoch = max(range(len(history)), key=lambda i: (history[i]["val_balanced_accuracy"],
                                                         -history[i]["val_loss"])) + 1
    meta = {"task": task, "target": target, "classes": classes, "replicate": replicate, "role": role,
            "seed": run_seed, "grid": {"shape": list(grid.shape), "voxel_size": grid.voxel_size,
                                       "origin": list(grid.origin)},
            "normalisation": "z-score within brain mask", "dataset": str(dataset_dir), "best_epoch": best_epoch,
            "bootstrap": bool(bootstrap), "output_layer": "classifier"}
    metrics = {"task": task, "target": target, "classes": classes, "replicate": replicate, "role": role,
               "test": test, "val": val, "best_epoch": best_epoch, "epochs_run": len(history),
               "train_seconds": float(sum(h["seconds"] for h in history)),
               "mean_samples_per_s": float(np.mean([h["samples_per_s"] for h in history])),
               "device": str(device), "precision": "bf16" if step_autocast(cfg, device) else "fp32",
               "cohort": str(parts["cohort"].iloc[0]) if "cohort" in parts else "", "output_layer": "classifier"}
    write_outputs(out_dir, model, meta, metrics, _predictions(splits["test"], target, classes, test_prob), history)
    checkpointer.clear()
    log(f"task {task}: test balanced accuracy {test['balanced_accuracy']:.3f}, accuracy {test['accuracy']:.3f}, "
        f"AUC {test['roc_auc']:.3f} (best epoch {best_epoch}, {time.perf_counter() - t_start:.0f}s)")
    return metrics
