"""The optimisation loop: all units of a request in one batch, truncated forward, seeded per unit."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..errors import ConfigError
from . import regularizers as R
from .simplify import simplify_for_featviz
from .param import build_param, mean_amplitude_spectrum
from .transforms import gaussian_blur, jitter, random_affine
from .units import capture_activations, check_channels, receptive_field

__all__ = ["Preset", "RenderResult", "render", "crop_box"]


@dataclass
class Preset:
    """A regularization strategy (config ``featviz.regularizers.<name>``); every field optional.

    param: ``voxel`` | ``fourier`` | ``maco``; decay: Fourier 1/f exponent; init: ``noise`` | ``zeros`` |
    ``volume``; init_std; range: ``none`` | ``tanh`` | ``sigmoid`` with ``bound``; mask: keep the image
    inside the brain mask; l1, l2, tv, freq: penalty weights; jitter (voxels), scale (fraction),
    rotate (degrees): random transforms per step; blur_sigma/blur_every: blur the voxel image every k
    steps; pre_blur: blur before the forward pass (sigma, voxels).
    """

    param: str = "voxel"
    decay: float = 1.0
    init: str = "noise"
    init_std: float = 0.1
    range: str | None = None
    bound: float = 4.0
    mask: bool = True
    l1: float = 0.0
    l2: float = 0.0
    tv: float = 0.0
    freq: float = 0.0
    jitter: int = 0
    scale: float = 0.0
    rotate: float = 0.0
    blur_sigma: float = 0.0
    blur_every: int = 0
    pre_blur: float = 0.0

    @classmethod
    def from_dict(cls, d, name="preset"):
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"featviz.regularizers.{name}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def weights(self):
        return {k: getattr(self, k) for k in R.PENALTIES}


@dataclass
class RenderResult:
    images: np.ndarray            # (B, X, Y, Z) on the full input shape
    objective_start: np.ndarray   # (B,) on the untransformed initial image
    objective_end: np.ndarray     # (B,) on the untransformed final image
    trajectory: np.ndarray        # (n_records, B) objective during optimisation (with transforms)
    trajectory_steps: np.ndarray  # (n_records,)
    seconds: float
    steps_per_s: float
    box: tuple | None = None      # crop used (slices), None for the full volume
    info: dict = field(default_factory=dict)


def crop_box(model, layer, input_shape, position=None, device="cpu"):
    """Input crop (slices) holding the receptive field of ``layer``'s unit at ``position``.

    Returns ``(box, position_in_crop)`` or ``(None, position)`` if the receptive field cannot be
    derived. The crop is aligned to the layer's total stride so the cropped forward pass computes
    exactly the same activation at that unit.
    """
    from .units import layer_output_shape

    out_shape = layer_output_shape(model, layer, (1,) + tuple(input_shape), device)[1:]
    if position is None:
        position = tuple(s // 2 for s in out_shape)
    if len(out_shape) != 3:
        return None, position
    rf = receptive_field(model, layer, (1,) + tuple(input_shape), device)
    if rf is None:
        return None, position
    box, newpos = [], []
    for (size, stride, offset), p, n in zip(rf, position, input_shape):
        lo = max(0, p * stride - offset)
        lo = (lo // stride) * stride
        hi = min(n, p * stride - offset + size)
        hi = min(n, lo + int(np.ceil((hi - lo) / stride)) * stride)
        box.append(slice(lo, hi))
        newpos.append(p - lo // stride)
    return tuple(box), tuple(newpos)


def render(model, objective, shape, preset=None, steps=256, lr=0.05, seeds=None, device=None, mask=None,
           real_volumes=None, init_volume=None, crop=True, record_every=8, log=None, amp=None,
           truncate=True, verify_crop=True, micro_batch=None, simplify=True):
    """Optimise one input volume per batch element to maximise ``objective``.

    Parameters
    ----------
    model : nn.Module taking ``(B, 1, X, Y, Z)``; a frozen eval-mode copy is optimised against.
    objective : :class:`~brainfv.featviz.objectives.Objective` (its channel list sets the batch size).
    shape : (X, Y, Z) input shape.
    preset : :class:`Preset` or dict.
    seeds : one int per batch element; element ``b``'s initialisation and random transforms come
        from its own generator, so a unit gives the same result alone or in a batch.
    mask : bool array (X, Y, Z); with ``preset.mask`` the image is zero outside.
    real_volumes : sequence of real volumes (MACO magnitude spectrum).
    crop : for neuron objectives, optimise only the unit's receptive field (same activation,
        far less work); the result is placed back into a full-size volume.
    truncate : stop each forward pass at the deepest layer the objective reads.
    micro_batch : evaluate the network on chunks of this many elements per step (default: 2 on the
        CPU, where channels-last batches of 2 run 2.2x faster per volume than 1 and 1.3x faster than 8;
        the whole batch on CUDA). Elements are independent: with ``micro_batch=1`` a unit gives
        bit-identical results alone or in a batch; larger micro-batches use other CPU kernels, whose
        last-bit differences max-pool ties can amplify over many steps.
    simplify : run a simplified copy of the network (BatchNorm folded into convolutions, activations
        moved after max-pooling; see :mod:`~brainfv.featviz.simplify`): the same activations at the
        objective's layers for less work. The caller's model is not modified either way.
    """
    preset = preset if isinstance(preset, Preset) else Preset.from_dict(preset)
    log = log or (lambda m: None)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = device.type == "cuda" if amp is None else amp
    channels = objective.info.get("channels")
    B = len(seeds) if seeds is not None else (len(channels) if channels is not None and not isinstance(channels, int) else 1)
    seeds = list(seeds) if seeds is not None else list(range(B))
    layer = objective.info.get("layer")
    # a copy either way: the caller's model keeps its mode, memory format and requires_grad flags
    model = simplify_for_featviz(model, keep=objective.layers, log=log)[0] if simplify else copy.deepcopy(model)
    model = model.eval().to(memory_format=torch.channels_last_3d)
    for p in model.parameters():
        p.requires_grad_(False)
    if layer is not None and channels is not None:
        check_channels(model, layer, [channels] if isinstance(channels, int) else channels,
                       (1,) + tuple(shape), device)

    box = None
    work_shape = tuple(shape)
    if crop and objective.kind == "neuron":
        box, pos = crop_box(model, layer, shape, objective.info.get("position"), device)
        if box is not None:
            from .objectives import neuron

            cropped = neuron(layer, channels, pos)
            if verify_crop:
                with torch.no_grad():
                    x = torch.randn((1, 1) + tuple(shape), generator=torch.Generator().manual_seed(0)).to(device)
                    ch = [channels[0]] if not isinstance(channels, int) else channels
                    full = neuron(layer, ch, objective.info.get("position"))(
                        capture_activations(model, x, [layer]))
                    part = neuron(layer, ch, pos)(capture_activations(model, x[(...,) + box], [layer]))
                if not torch.allclose(full, part, rtol=1e-4, atol=1e-5):
                    log(f"receptive-field crop changes the activation ({float(full[0]):.5f} vs "
                        f"{float(part[0]):.5f}); optimising the full volume")
                    box = None
            if box is not None:
                objective = cropped
                work_shape = tuple(s.stop - s.start for s in box)
                log(f"neuron objective: optimising the {work_shape} receptive field instead of {tuple(shape)}")

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    magnitude = None
    if preset.param == "maco":
        if real_volumes is None:
            raise ConfigError("MACO needs real_volumes for its amplitude spectrum")
        magnitude = mean_amplitude_spectrum(real_volumes, box=box)
    init_vol = None
    if init_volume is not None:
        init_vol = np.asarray(init_volume)[box] if box is not None else np.asarray(init_volume)
    param = build_param(preset, work_shape, gens, magnitude, init_vol).to(device)
    mask_t = None
    if preset.mask and mask is not None:
        m = np.asarray(mask)[box] if box is not None else np.asarray(mask)
        mask_t = torch.as_tensor(m, dtype=torch.float32, device=device)[None, None]
    try:  # the fused kernel: one pass over the variables, 5x faster than the default on the CPU (1 vs 5 ms a step)
        opt = torch.optim.Adam(param.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device without it
        opt = torch.optim.Adam(param.parameters(), lr=lr)
    layers = objective.layers

    def image():
        img = param()
        return img * mask_t if mask_t is not None else img

    def score(img, rows=None):
        if img.dim() == 5:  # channels-last 3D convolutions are much faster on CPU (see benchmarks/training.py)
            img = img.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            acts = capture_activations(model, img, layers, truncate=truncate)
        return objective(acts, rows)

    B = len(seeds)
    mb = micro_batch or (B if device.type == "cuda" else 2)
    chunks = [slice(i, min(i + mb, B)) for i in range(0, B, mb)]

    def score_all(img):
        return torch.cat([score(img[rows], rows) for rows in chunks])

    with torch.no_grad():
        obj_start = score_all(image()).float().cpu().numpy()
    traj, traj_steps = [], []
    t0 = time.perf_counter()
    last_log = t0
    for step in range(steps):
        img = image()
        # the network runs on chunks of the batch; gradients meet at the image, then flow into the parameters
        # (one leaf per chunk: gradients stay chunk-sized instead of materialising the whole batch)
        leaves = [c.detach().requires_grad_(True) for c in img.split(mb)]
        objs = []
        for rows, leaf in zip(chunks, leaves):
            x = leaf
            if preset.pre_blur > 0:
                x = gaussian_blur(x, preset.pre_blur)
            x = jitter(x, preset.jitter, gens[rows])
            x = random_affine(x, gens[rows], preset.scale, preset.rotate)
            obj_c = score(x, rows)
            loss = -(obj_c - R.penalty(leaf, preset.weights)).sum()
            loss.backward()
            objs.append(obj_c.detach())
        obj = torch.cat(objs)
        opt.zero_grad(set_to_none=True)
        img.backward(torch.cat([leaf.grad for leaf in leaves]))
        opt.step()
        if preset.blur_every and preset.blur_sigma > 0 and (step + 1) % preset.blur_every == 0 \
                and hasattr(param, "blur_"):
            param.blur_(preset.blur_sigma)
        if step % record_every == 0 or step == steps - 1:
            traj.append(obj.detach().float().cpu().numpy())
            traj_steps.append(step)
        now = time.perf_counter()
        if now - last_log > 10 or step == steps - 1:
            last_log = now
            rate = (step + 1) / (now - t0)
            log(f"step {step + 1}/{steps} objective mean {float(obj.detach().mean()):.4f} "
                f"[{float(obj.detach().min()):.3f}, {float(obj.detach().max()):.3f}] {rate:.2f} steps/s "
                f"ETA {(steps - step - 1) / rate:.0f}s")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        final = image()
        obj_end = score_all(final).float().cpu().numpy()
        final = final[:, 0].float().cpu().numpy()
    if box is not None:
        full = np.zeros((len(seeds),) + tuple(shape), np.float32)
        full[(slice(None),) + box] = final
        final = full
    return RenderResult(images=final.astype(np.float32), objective_start=obj_start, objective_end=obj_end,
                        trajectory=np.array(traj), trajectory_steps=np.array(traj_steps), seconds=seconds,
                        steps_per_s=steps / seconds if seconds > 0 else float("inf"), box=box,
                        info={"work_shape": work_shape, "batch": len(seeds)})
