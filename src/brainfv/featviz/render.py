"""The optimisation loop, and the pieces it composes.

As in Lucid/Lucent ``optvis``, a visualization is made of separate pieces that a user can also pass in:

- a **parametrisation** (an ``nn.Module`` whose ``forward()`` returns ``(B, 1, X, Y, Z)``; see
  :mod:`~brainfv.featviz.param`),
- **transforms** applied before each forward pass (callables ``t(x, gens) -> x``; see
  :mod:`~brainfv.featviz.transforms`),
- a **penalty** (``x -> (B,)``, subtracted from the objective; see :mod:`~brainfv.featviz.regularizers`),
- an **objective** (:mod:`~brainfv.featviz.objectives`).

:func:`preset_pieces` builds the first three from a config :class:`~brainfv.config.Preset`;
:func:`optimize` is the loop; :func:`render` prepares the network (a frozen, simplified copy), plans a
receptive-field crop (:mod:`~brainfv.featviz.crop`), runs the loop and puts the result back on the full
volume. Every batch element has its own seeded ``torch.Generator``, so a unit gives the same result alone
or in a batch, and nothing depends on global randomness.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..config import Preset, default
from ..device import autocast_default, compute_settings
from ..errors import ConfigError
from . import regularizers as R
from .crop import CropPlan, crop_box, plan_crop
from .param import build_param, mean_amplitude_spectrum, takes_rows
from .param import data_range as param_data_range
from .simplify import redirect_relus, simplify_for_featviz
from .transforms import gaussian_blur, jitter, random_affine
from .units import capture_activations, check_channels

__all__ = ["Preset", "RenderResult", "Pieces", "Converge", "preset_pieces", "prepare_network", "objective_scale",
           "optimize", "render", "crop_box", "CropPlan"]


@dataclass
class RenderResult:
    images: np.ndarray            # (B, X, Y, Z) on the full input shape
    objective_start: np.ndarray   # (B,) on the untransformed initial image
    objective_end: np.ndarray     # (B,) on the untransformed final image
    trajectory: np.ndarray        # (n_records, B) objective during optimisation (with transforms; after an
    #                               element stopped, its last value)
    trajectory_steps: np.ndarray  # (n_records,)
    seconds: float
    steps_per_s: float
    box: tuple | None = None      # crop used (slices), None for the full volume
    info: dict = field(default_factory=dict)


@dataclass
class Pieces:
    """What is optimised and how: ``param`` (module -> (B, 1, X, Y, Z); with ``forward(rows=idx)``, see
    :func:`~brainfv.featviz.param.takes_rows`, the loop asks it for the active elements only), ``transforms`` (list of
    ``t(x, gens) -> x``), ``penalty`` (``x -> (B,)``) and ``after_step`` (``f(param, step)``, e.g. a blur
    of the variables every k steps; may be None)."""

    param: torch.nn.Module
    transforms: list
    penalty: object
    after_step: object = None


def preset_transforms(preset: Preset) -> list:
    """The transforms a preset asks for, in order: pre-blur, jitter, random scale/rotation."""
    out = []
    if preset.pre_blur > 0:
        out.append(lambda x, gens: gaussian_blur(x, preset.pre_blur))
    if preset.jitter > 0:
        out.append(functools.partial(_jitter, n=preset.jitter))
    if preset.scale > 0 or preset.rotate > 0:
        out.append(lambda x, gens: random_affine(x, gens, preset.scale, preset.rotate))
    return out


def _jitter(x, gens, n):
    return jitter(x, n, gens)


def preset_penalty(preset: Preset) -> Callable:
    """``x -> (B,)``: the weighted sum of the penalty terms a preset names."""
    weights = {k: getattr(preset, k) for k in R.PENALTIES}
    return lambda x: R.penalty(x, weights)


def preset_pieces(preset: Preset, shape: Sequence[int], gens: list, real_volumes: Sequence | None = None,
                  init_volume: np.ndarray | None = None, box: tuple | None = None,
                  data_range: tuple | None = None) -> Pieces:
    """:class:`Pieces` for a :class:`~brainfv.config.Preset` on inputs of ``shape`` (already cropped to
    ``box`` when given; ``real_volumes`` and ``init_volume`` are full-size and cropped here; ``data_range``:
    ``(lo, hi)`` for ``range: data``)."""
    magnitude = None
    if preset.param == "maco":
        if real_volumes is None:
            raise ConfigError("MACO needs real volumes for its amplitude spectrum (real_volumes)")
        magnitude = mean_amplitude_spectrum(real_volumes, box=box)
    init = None
    if init_volume is not None:
        init = np.asarray(init_volume)[box] if box is not None else np.asarray(init_volume)
    param = build_param(preset, shape, gens, magnitude, init, data_range)
    penalty = preset_penalty(preset)
    if preset.anchor > 0:
        if init is None:
            raise ConfigError("preset anchor needs a starting volume (init: volume, template or subject)")
        seed_img = torch.as_tensor(init, dtype=torch.float32)[None, None]

        def penalty(x, base=penalty):  # noqa: F811 (the preset's terms plus the distance to the seed image)
            return base(x) + preset.anchor * ((x - seed_img.to(x.device)) ** 2).flatten(1).mean(1)
    after = None
    if preset.blur_every and preset.blur_sigma > 0:
        def after(p, step):
            if (step + 1) % preset.blur_every == 0 and hasattr(p, "blur_"):
                p.blur_(preset.blur_sigma)
    return Pieces(param, preset_transforms(preset), penalty, after)


def prepare_network(model: torch.nn.Module, layers: list[str], simplify: bool = True,
                    log: Callable | None = None) -> torch.nn.Module:
    """A frozen eval-mode copy of ``model`` (simplified unless ``simplify=False``, see
    :mod:`~brainfv.featviz.simplify`) in channels-last layout, its ReLUs passing Lucid's redirected gradient
    to an element that is dead behind them (:class:`~brainfv.featviz.simplify.RedirectedReLU`); the caller's
    model is not modified."""
    from ..models.cnn import frozen

    if simplify:
        return redirect_relus(frozen(simplify_for_featviz(model, keep=layers, log=log)[0], copy=False))
    return redirect_relus(frozen(model))


# Volumes per forward pass on the CPU (benchmarks/featviz.py (c); block3 of the trained sex model, 8 units,
# 2 threads; time per step relative to 2 a pass, median of per-round ratios). On a quiet machine: 4 a pass 1.28
# at 3 mm and 0.95 at 4 mm, 8 a pass 1.26 and 1.19. Only with the two cores shared by other work (load 5-6) do
# larger passes win (8: 0.65 at 3 mm, 0.42 at 4 mm); the study's jobs run on a machine of their own, so 2.
CPU_MICRO_BATCH = 2
# real volumes per forward pass in objective_scale: 32 volumes at 4 mm, 1 thread, 0.28 s one by one, 0.08 s in pairs
SCALE_BATCH = 2


def _chunks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass(frozen=True)
class Converge:
    """The plateau criterion (config ``featviz.converge``).

    Let ``J`` be what is maximised — the objective divided by its scale, minus the penalties — per batch
    element, ``n`` the steps it has run and ``q = n // 4``. Every ``every`` steps from ``min_steps`` on, the
    element has converged when the least-squares slope of ``J`` over its last ``q`` steps, times ``q``, is
    below ``rtol`` times its total gain (``|mean J of the last every steps - J(step 0)|``): at its present
    rate the last quarter of its run added less than ``rtol`` of everything it gained. The fitted slope, not
    a difference of two values, so the jitter of random transforms neither fakes nor hides a plateau.
    The test uses only the element's own values, so a unit stops at the same step alone or in a batch.
    A converged element stops: its variables are frozen and it leaves the batch. With ``enabled=False``
    every element runs all steps and the flag is still computed at the end.

    An element whose ``J`` never moved (its range over every step run at most ``1e-6 (1 + |J|)``: a dead start,
    every unit after some ReLU at zero, so its gradient is exactly 0) is *stalled*, not converged: a flat line
    is no plateau reached by climbing. :meth:`stalled` finds them; the loop stops them too (nothing would ever
    change) but records ``converged`` False and ``stalled`` True."""

    enabled: bool = default("featviz.converge.enabled")
    rtol: float = default("featviz.converge.rtol")
    every: int = default("featviz.converge.every")
    min_steps: int = default("featviz.converge.min_steps")

    @classmethod
    def from_config(cls, c: dict | Converge | None) -> Converge:
        if c is None or isinstance(c, Converge):
            return c or cls()
        unknown = set(c) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"featviz.converge: unknown keys {sorted(unknown)}")
        return cls(**c)

    def check(self, hist: np.ndarray, n: int) -> np.ndarray:
        """Which elements have converged after ``n`` steps; ``hist`` is ``(steps, B)`` of ``J`` (rows ``< n`` set)."""
        q = n // 4
        if q < 2:
            return np.zeros(hist.shape[1], bool)
        last = hist[n - q:n]
        t = np.arange(q) - (q - 1) / 2
        slope = (t[:, None] * (last - last.mean(0))).sum(0) / (t ** 2).sum()
        now = hist[n - max(1, min(self.every, q)):n].mean(0)
        gain = np.abs(now - hist[0])
        plateau = np.abs(slope) * q <= self.rtol * np.maximum(gain, 1e-12 * (1 + np.abs(now)))
        return plateau & ~self.stalled(hist, n)

    @staticmethod
    def stalled(hist: np.ndarray, n: int) -> np.ndarray:
        """Which elements' ``J`` has not moved in ``n`` steps (``hist`` as in :meth:`check`): never converged."""
        if n < 2:
            return np.zeros(hist.shape[1], bool)
        h = hist[:n]
        return np.ptp(h, 0) <= 1e-6 * (1 + np.abs(h).max(0))


@torch.no_grad()
def objective_scale(net: torch.nn.Module, objective: object, volumes: Sequence, B: int, *, device: torch.device,
                    plan: CropPlan | None = None, amp: bool = False, truncate: bool = True,
                    box: tuple | None = None) -> torch.Tensor:
    """Per batch element, the standard deviation of its objective over real ``volumes`` (its unit's natural
    spread on real brains; ``box`` crops them to the optimised region): the objective is divided by it
    before penalties are subtracted, so a penalty weight means the same on every network and unit (a unit
    whose activation is 100 times larger gives the same image). A unit with no spread over the volumes (dead
    on real data) is scaled by its mean absolute value, and by 1 when that is 0 too."""
    vals = []
    for rows in _chunks(len(volumes), SCALE_BATCH):  # in pairs: one volume alone takes the CPU's slow 3D convolution
        vols = [np.asarray(volumes[i], np.float32) for i in range(rows.start, rows.stop)]
        x = torch.as_tensor(np.stack([v[box] if box is not None else v for v in vols]), device=device)[:, None]
        n = x.shape[0]
        if n == 1 and device.type == "cpu":
            x = torch.cat([x, x])
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            acts = capture_activations(net, x, objective.layers, truncate=truncate)
        for i in range(n):
            one = {k: a[i:i + 1].expand((B,) + tuple(a.shape[1:])) for k, a in acts.items()}
            vals.append(objective(plan.activations(one) if plan is not None else one, slice(0, B)).float().cpu())
    if not vals:
        return torch.ones(B)
    vals = torch.stack(vals)
    sd = vals.std(0) if len(vals) > 1 else torch.zeros(B)
    ma = vals.abs().mean(0)
    return torch.where(sd > 1e-12, sd, torch.where(ma > 1e-12, ma, torch.ones(B)))


def optimize(net: torch.nn.Module, objective: object, pieces: Pieces, gens: list, *, steps: int, lr: float,
             device: torch.device, mask: torch.Tensor | None = None, plan: CropPlan | None = None,
             micro_batch: int | None = None, amp: bool = False, truncate: bool = True, record_every: int = 8,
             log: Callable | None = None, scale: Sequence | None = None, converge: dict | Converge | None = None,
             betas: tuple = (0.9, 0.999)) -> RenderResult:
    """Maximise ``objective / scale - penalty`` over ``pieces.param`` with Adam until every element has
    converged (``converge``, a :class:`Converge`; None: the defaults) or ``steps`` ran out; returns a
    :class:`RenderResult` on the parametrisation's (possibly cropped) shape, with ``steps_run`` and
    ``converged`` per element in ``info``.

    ``scale`` (``(B,)``, default 1) is each element's objective scale (:func:`objective_scale`). The
    network sees the active elements in chunks of ``micro_batch`` (each chunk its own leaf, so gradients
    stay chunk-sized); every chunk gets its own elements' generators for the random transforms. A converged
    element leaves the batch (the work per step shrinks) and its variables are restored after every later
    Adam step, so they stay exactly as they were: every parameter of ``pieces.param`` must hold the batch
    in its first dimension. A parametrisation that makes a subset of its batch (``forward(rows=idx)``,
    :func:`~brainfv.featviz.param.takes_rows`: brainfv's own) is asked for the active elements only.
    ``mask`` (``(1, 1, X, Y, Z)`` tensor) zeroes the image outside the brain.
    """
    loop = _Loop(net, objective, pieces, gens, device=device, mask=mask, plan=plan, micro_batch=micro_batch, amp=amp,
                 truncate=truncate, scale=scale, lr=lr, betas=betas, steps=steps)
    converge = Converge.from_config(converge)
    log = log or (lambda m: None)
    with torch.no_grad():
        obj_start = loop.score_all(loop.image(), amp=False).float().cpu().numpy()  # reported values: fp32
    loop.last_obj = np.array(obj_start, np.float64)  # the raw objective, carried on after an element stops
    traj, traj_steps = [], []
    t0 = last_log = time.perf_counter()
    for step in range(steps):
        loop.step(step)
        n = step + 1
        if converge.enabled and n % converge.every == 0 and n >= converge.min_steps or n == steps:
            loop.settle(converge.check(loop.hist, n), converge.stalled(loop.hist, n), converge.enabled, n == steps)
        if step % record_every == 0 or step == steps - 1 or not loop.active.any():
            traj.append(loop.last_obj.astype(np.float32))
            traj_steps.append(step)
        now = time.perf_counter()
        if now - last_log > 10 or step == steps - 1 or not loop.active.any():
            last_log = now
            o = loop.last_obj
            log(f"step {step + 1}/{steps} objective mean {float(o.mean()):.4f} [{float(o.min()):.3f}, "
                f"{float(o.max()):.3f}] converged {int(loop.converged.sum())}/{loop.B} "
                f"{(step + 1) / (now - t0):.2f} steps/s")
        if not loop.active.any():
            break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        final = loop.image().detach()
        obj_end = loop.score_all(final, amp=False).float().cpu().numpy()
    n_steps = int(loop.steps_run.max()) if loop.B else 0
    return RenderResult(images=final[:, 0].float().cpu().numpy(), objective_start=obj_start, objective_end=obj_end,
                        trajectory=np.array(traj), trajectory_steps=np.array(traj_steps), seconds=seconds,
                        steps_per_s=n_steps / seconds if seconds > 0 else float("inf"),
                        box=plan.box if plan is not None else None,
                        info={"batch": loop.B, "micro_batch": loop.mb, "steps_run": loop.steps_run,
                              "converged": loop.converged, "stalled": loop.stalled,
                              "element_steps": int(loop.work), "scale": loop.scale.cpu().numpy()})


class Adam:
    """Adam (``torch.optim.Adam``'s update, by its fused kernel where this torch has one for the device: one pass
    over the variables, 5x faster than the unfused update on the CPU, 1 vs 5 ms; else the single-tensor update)
    without ``torch.optim``: constructing a ``torch.optim`` optimiser imports ``torch._dynamo``, 1.4 s of every
    visualize job's start (cProfile)."""

    def __init__(self, params: list, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, float(lr), tuple(betas), eps
        self.m = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.v = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.t = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        self.fused = hasattr(torch, "_fused_adam_") and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                                            for p in params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every variable with a gradient (``torch.optim.Adam``, no weight decay, no amsgrad)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        ps, gs = [self.params[i] for i in live], [self.params[i].grad for i in live]
        ms, vs, ts = ([x[i] for i in live] for x in (self.m, self.v, self.t))
        b1, b2 = self.betas
        torch._foreach_add_(ts, 1)
        if self.fused:
            try:
                torch._fused_adam_(ps, gs, ms, vs, [], ts, lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0,
                                   eps=self.eps, amsgrad=False, maximize=False)
                return
            except (RuntimeError, NotImplementedError):  # no fused kernel for this device in this torch (CPU < 2.4)
                self.fused = False
        for p, g, m, v, t in zip(ps, gs, ms, vs, ts):
            n = float(t)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** n) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** n))


class _Loop:
    """The state of :func:`optimize`: the parametrisation, its Adam, the active and converged elements, the
    objective history, and the variables of converged elements (restored after every later step)."""

    def __init__(self, net, objective, pieces, gens, *, device, mask, plan, micro_batch, amp, truncate, scale, lr,
                 betas, steps):
        self.net, self.objective, self.pieces, self.gens = net, objective, pieces, gens
        self.device, self.mask, self.plan, self.amp, self.truncate = device, mask, plan, amp, truncate
        self.param = pieces.param.to(device)
        self.B = B = len(gens)
        self.mb = micro_batch or (B if device.type == "cuda" else min(B, CPU_MICRO_BATCH))
        self.scale = (torch.ones(B) if scale is None else torch.as_tensor(scale, dtype=torch.float32)).to(device)
        self.batched = [p for p in self.param.parameters() if p.dim() and p.shape[0] == B]
        if len(self.batched) != len(list(self.param.parameters())):
            raise ConfigError("every parameter of the parametrisation must hold the batch in its first dimension")
        self.opt = Adam(list(self.param.parameters()), lr=lr, betas=betas)
        # once elements stop, make the images of the active ones only (a Fourier step is four FFTs: the image, its
        # gradient and the projection's two; per element as in the whole batch, so nothing else changes)
        self.subset = takes_rows(self.param)
        self.hist = np.zeros((steps, B))         # J per step and element (what is maximised)
        self.active = np.ones(B, bool)
        self.converged = np.zeros(B, bool)
        self.stalled = np.zeros(B, bool)         # J never moved (a dead start): stopped, not converged
        self.gradless = np.ones(B, bool)         # no gradient reached the image at any step yet
        self.steps_run = np.zeros(B, int)
        self.frozen = {}                         # parameter -> its values, restored for converged elements
        self.work = 0
        self.last_obj = np.zeros(B)

    def image(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The masked images of the batch, or of the elements ``rows`` (an index tensor; the
        parametrisation must :func:`~brainfv.featviz.param.takes_rows`)."""
        img = self.param() if rows is None else self.param(rows=rows)
        return img * self.mask if self.mask is not None else img

    def score(self, x: torch.Tensor, rows: slice | list, amp: bool | None = None) -> torch.Tensor:
        # One volume alone on the CPU runs PyTorch's slow 3D convolution (its oneDNN test counts batch x channels
        # x two dimensions, under 20480 for one volume): a detached copy beside it takes oneDNN, and the pair's
        # forward and backward cost 10 instead of 15 ms on the 4 mm grid (block3); the copy's score is dropped.
        pad = x.shape[0] == 1 and x.dim() == 5 and x.device.type == "cpu"
        if pad:
            x = torch.cat([x, x.detach()])
            r = rows.start if isinstance(rows, slice) else rows[0]
            rows = [r, r]
        if x.dim() == 5:  # channels-last 3D convolutions are much faster on the CPU (benchmarks/training.py)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp if amp is None else amp):
            acts = capture_activations(self.net, x, self.objective.layers, truncate=self.truncate)
        out = self.objective(self.plan.activations(acts) if self.plan is not None else acts, rows)
        return out[:1] if pad else out

    def score_all(self, img: torch.Tensor, amp: bool | None = None) -> torch.Tensor:
        return torch.cat([self.score(img[rows], rows, amp) for rows in _chunks(self.B, self.mb)])

    def step(self, step: int) -> None:
        """One Adam step of the active elements: chunked forward and backward, then projection and freezing."""
        idx = np.flatnonzero(self.active)
        some = torch.as_tensor(idx, device=self.device) if len(idx) < self.B else None
        if some is not None and self.subset:  # only the active elements' images
            img = sub = self.image(some)
        else:
            img = self.image()
            sub = img if some is None else img[some]
        leaves = [c.detach().requires_grad_(True) for c in sub.split(self.mb)]
        objs, js = [], []
        for k, leaf in enumerate(leaves):
            rows = [int(i) for i in idx[k * self.mb:k * self.mb + len(leaf)]]
            rows = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
            x = leaf
            for t in self.pieces.transforms:
                x = t(x, self.gens[rows] if isinstance(rows, slice) else [self.gens[i] for i in rows])
            obj_c = self.score(x, rows)
            j_c = obj_c.float() / self.scale[rows] - self.pieces.penalty(leaf).float()
            (-j_c.sum()).backward()
            objs.append(obj_c.detach())
            js.append(j_c.detach())
        self.work += len(idx)
        self.opt.zero_grad(set_to_none=True)
        grad = torch.cat([leaf.grad for leaf in leaves])
        if self.gradless[idx].any():  # until a gradient has reached every element (one device sync a step)
            self.gradless[idx] &= (grad.flatten(1).abs().amax(1) == 0).cpu().numpy()
        if img is not sub:
            grad = torch.zeros_like(img).index_copy_(0, some, grad)
        img.backward(grad)  # gradients meet at the image, then the variables
        self.opt.step()
        self._after_step(step, some if self.subset else None)
        self.last_obj[idx] = torch.cat(objs).float().cpu().numpy()
        self.hist[step, idx] = torch.cat(js).float().cpu().numpy()
        self.steps_run[idx] += 1

    def _after_step(self, step, rows=None):
        if self.pieces.after_step is not None:
            self.pieces.after_step(self.param, step)
        if hasattr(self.param, "project_"):  # hard bounds: back into the range (projected Adam); of the active
            self.param.project_(**({} if rows is None else {"rows": rows}))  # elements (the stopped are restored)
        if self.frozen:
            with torch.no_grad():
                done = torch.as_tensor(~self.active, device=self.device)
                for p in self.batched:
                    p[done] = self.frozen[p][done]

    def settle(self, plateau: np.ndarray, stalled: np.ndarray, freeze: bool, last: bool = False) -> None:
        """Mark the active elements whose objective reached its plateau as converged, and those whose objective
        never moved and got no gradient as stalled; with ``freeze`` both leave the batch and their variables are
        kept as they are. (At the ``last`` step, every active element whose J never moved is stalled.)"""
        self.converged |= self.active & plateau
        stuck = stalled & self.gradless  # an element climbing out of a dead start (RedirectedReLU) runs on
        self.stalled |= self.active & (stuck | stalled & last)
        newly = self.active & (plateau | stuck)
        if freeze and newly.any():
            self.active &= ~newly
            sel = torch.as_tensor(newly, device=self.device)
            with torch.no_grad():
                for p in self.batched:
                    self.frozen.setdefault(p, p.detach().clone())[sel] = p.detach()[sel]


def _batch_seeds(objective, seeds):
    if seeds is not None:
        return [int(s) for s in seeds]
    return list(range(objective.batch or 1))


def render(model: torch.nn.Module, objective: object, shape: Sequence[int], preset: Preset | dict | None = None, *,
           steps: int = default("featviz.steps"), lr: float = default("featviz.lr"), seeds: list | None = None,
           device: str | torch.device | None = None, mask: np.ndarray | None = None,
           real_volumes: Sequence | None = None, init_volume: np.ndarray | None = None,
           pieces: Callable | None = None, crop: bool = True, simplify: bool = True, truncate: bool = True,
           micro_batch: int | None = None, amp: bool | None = None, record_every: int = 8,
           log: Callable | None = None, data_range: tuple | None = None, converge: dict | Converge | None = None,
           normalise: bool = True, betas: tuple = (0.9, 0.999)) -> RenderResult:
    """Optimise one input volume per batch element to maximise ``objective``. Parameters:

    model : nn.Module taking ``(B, 1, X, Y, Z)``; a frozen eval-mode copy is optimised against. ``objective``:
    an :class:`~brainfv.featviz.objectives.Objective` (its channel lists set the batch size); ``shape``: (X, Y, Z).
    preset : :class:`~brainfv.config.Preset` or a dict of its fields (ignored for what ``pieces`` gives).
    seeds : one int per batch element (its own generator: a unit gives the same result alone or in a batch).
    mask : bool array (X, Y, Z); with ``preset.mask`` the image is zero outside.
    real_volumes : real (z-scored) volumes: MACO's amplitude spectrum, the intensity range of ``range: data``
        (with ``mask``; see :func:`~brainfv.featviz.param.data_range`) and the objective's scale.
    init_volume, data_range : the start for ``init: volume``; ``(lo, hi)`` for ``range: data``.
    converge : :class:`Converge` or its config dict (``featviz.converge``): when an element stops.
    normalise : divide each element's objective by its spread over ``real_volumes``
        (:func:`objective_scale`) before the penalties are subtracted (without real volumes: by 1).
    pieces : a callable ``(work_shape, gens, box) -> Pieces``: your own parametrisation, transforms, penalty.
    crop : optimise only the receptive field when the objective reads known positions (placed back after).
    simplify, truncate : run a simplified copy of the network (:mod:`~brainfv.featviz.simplify`); stop each
        forward pass at the deepest layer the objective reads.
    micro_batch : volumes per forward pass (default: ``CPU_MICRO_BATCH`` (2) on the CPU, the whole batch on
        CUDA). With ``micro_batch=1`` a unit is bit-identical alone or in a batch (other CPU kernels' last-bit
        differences can grow through max-pool ties).
    amp : bf16 autocast of the steps (default: :func:`~brainfv.device.autocast_default`); scale, start and end values
        in fp32 whatever it is (``info["amp"]`` says which ran). ``record_every``, ``log``, ``betas``: :func:`optimize`.
    """
    preset = Preset.from_config(preset)
    lr = preset.lr if preset.lr is not None else lr
    log = log or (lambda m: None)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = autocast_default(device) if amp is None else amp
    seeds = _batch_seeds(objective, seeds)
    net = prepare_network(model, objective.layers, simplify, log)
    for layer, channels in objective.units:
        check_channels(net, layer, channels, (1,) + tuple(shape), device)
    plan = plan_crop(net, objective, shape, device, log=log) if crop else None
    box = plan.box if plan is not None else None
    work_shape = plan.shape if plan is not None else tuple(shape)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if pieces is None:
        if preset.range == "data" and data_range is None and real_volumes is not None and len(real_volumes):
            data_range = param_data_range(real_volumes, mask, preset.range_pct)
        pc = preset_pieces(preset, work_shape, gens, real_volumes, init_volume, box, data_range)
    else:
        pc = pieces(work_shape, gens, box)
    mask_t = _mask_tensor(mask, box, device) if preset.mask else None
    with compute_settings(device):
        scale = objective_scale(net, objective, real_volumes, len(seeds), device=device, plan=plan, amp=False,
                                truncate=truncate, box=box) if normalise and _have(real_volumes) else None
        res = optimize(net, objective, pc, gens, steps=steps, lr=lr, device=device, mask=mask_t, plan=plan,
                       micro_batch=micro_batch, amp=amp, truncate=truncate, record_every=record_every, log=log,
                       scale=scale, converge=converge, betas=betas)
    res.images = _uncrop(res.images, box, shape)
    res.info.update(work_shape=work_shape, data_range=data_range, amp=bool(amp))
    return res


def _have(volumes):
    return volumes is not None and len(volumes) > 0


def _uncrop(images, box, shape):
    """Optimised (possibly cropped) images placed into full-size float32 volumes."""
    if box is None:
        return images.astype(np.float32)
    full = np.zeros((len(images),) + tuple(shape), np.float32)
    full[(slice(None),) + box] = images
    return full


def _mask_tensor(mask, box, device):
    """The brain mask (cropped to ``box``) as a ``(1, 1, X, Y, Z)`` tensor, or None without a mask."""
    if mask is None:
        return None
    m = np.asarray(mask)[box] if box is not None else np.asarray(mask)
    return torch.as_tensor(m, dtype=torch.float32, device=device)[None, None]
