"""What several benchmarks load the same way: a finished study's model and data, and the two requests they time."""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def study_arguments(ap, *, threads: int, presets: str | None = None, rounds: int | None = None) -> None:
    """The options of a benchmark on a finished study's sex model: ``--model``, ``--dataset``, ``--mid`` (the mid
    layer of :func:`mid_and_logits`), ``--threads`` and, where given a default, ``--presets`` and ``--rounds``."""
    ap.add_argument("--model", default=str(ROOT / "results/models/sex/main/model.pt"))
    ap.add_argument("--dataset", default=str(ROOT / "results/data/cohort"))
    ap.add_argument("--mid", default="block3.norm")
    ap.add_argument("--threads", type=int, default=threads)
    if presets is not None:
        ap.add_argument("--presets", default=presets)
    if rounds is not None:
        ap.add_argument("--rounds", type=int, default=rounds)


def study_inputs(model_path: str, dataset_path: str) -> tuple:
    """``(featviz config, frozen eval model, real training volumes, brain mask, grid shape, data range)`` as a
    visualize job of the default study sees them."""
    from brainfv.config import complete
    from brainfv.data.store import Dataset
    from brainfv.featviz.param import data_range
    from brainfv.featviz.study import split_volumes
    from brainfv.models import load_checkpoint

    fv = complete({})["featviz"]
    model, _ = load_checkpoint(model_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = Dataset(dataset_path)
    real, mask = split_volumes(ds, "train", fv["n_real"]), np.asarray(ds.mask, bool)
    return fv, model, real, mask, tuple(ds.grid.shape), data_range(real, mask, 0.5)


def mid_and_logits(mid: str) -> dict:
    """The two requests: 8 units of ``mid`` (channel objective) and the 2 class logits x 4 seeds."""
    from brainfv.featviz import objectives as O

    return {"mid": O.channel(mid, list(range(8))), "logits": O.channel("classifier", [0] * 4 + [1] * 4)}


def resample(volumes, mask, shape):
    """Volumes (trilinear) and mask (nearest) on ``shape``."""
    import torch
    import torch.nn.functional as F

    v = torch.as_tensor(np.stack([np.asarray(x, np.float32) for x in volumes]))[:, None]
    v = F.interpolate(v, size=shape, mode="trilinear", align_corners=False)[:, 0].numpy()
    mk = F.interpolate(torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None], size=shape,
                       mode="nearest")[0, 0].numpy() > 0.5
    return list(v), mk
