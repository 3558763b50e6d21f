"""Dataset exemplars: the real volumes that drive each unit most, and where in them it responds.

The natural companion of a synthetic visualization: for every unit of a layer, the ``k`` volumes of a
set of rows (e.g. the test split) with the highest activation, found in one streaming pass. Scores
follow :mod:`~brainfv.featviz.objectives`:

- ``kind="channel"``: the spatial mean of the unit's feature map (``objectives.channel``); the unit's
  location in an exemplar is the argmax of its feature map;
- ``kind="neuron"``: the activation at the feature map's centre position (``objectives.neuron``); the
  location is that centre;
- Linear layers (no spatial axes): the output itself; no location.

A feature-map position ``p`` is mapped to the input grid through the layer's receptive field
(:func:`~brainfv.featviz.units.receptive_field`, ``(size, stride, offset)`` per axis): its centre is
``p * stride - offset + (size - 1) / 2`` (clipped to the grid) and its box the input voxels
``[p * stride - offset, p * stride - offset + size)`` (clipped).

Memory is flat in the number of rows: the pass holds one batch of ``batch_size`` volumes and, per
unit, the best ``k`` scores, rows and positions (a running top-k); volumes are read again only for
the selected exemplars (:func:`exemplar_volumes`, :func:`write_exemplars`, ``k`` at a time).

Example::

    ds = Dataset("results/data/cohort")
    test = ds.participants.query("split == 'test'")["index"]
    res = top_exemplars(model, ds.volumes, test, "block3.norm", range(32), k=4)
    res.table(ds.participants, ds.grid)
    write_exemplars(res, ds.volumes, ds.grid, "exemplars.nii.gz", "exemplars.tsv", participants=ds.participants)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from nibabel.openers import ImageOpener
from nibabel.volumeutils import seek_tell
from torch import nn

from ..data.grid import Grid
from ..errors import ConfigError, InputDataError, UnitError
from ..models.cnn import frozen
from ..utils import Progress, atomic_path
from .units import capture_activations, parse_unit, receptive_field

__all__ = ["ExemplarResult", "top_exemplars", "exemplar_volumes", "exemplar_table", "write_exemplars"]


@dataclass
class ExemplarResult:
    """Top-``k`` exemplars of ``units`` of ``layer``; arrays are indexed ``[unit_index, rank]``.

    ``rank`` 0 is the most activating volume. Entries beyond the number of rows evaluated have
    ``rows == -1`` and ``scores`` NaN. Positions are -1 (feature, box) or NaN (centre) for Linear
    layers and when the receptive field is unknown (then exemplars are not cropped).
    """

    layer: str
    units: list
    kind: str
    k: int
    scores: np.ndarray          # (U, k) float64, descending
    rows: np.ndarray            # (U, k) int64, index into ``volumes``
    feature_pos: np.ndarray     # (U, k, 3) int64, position in the layer's feature map
    centre: np.ndarray          # (U, k, 3) float64, receptive-field centre on the input grid (voxels)
    voxel: np.ndarray           # (U, k, 3) int64, floor(centre): the input voxel of the maximum
    box: np.ndarray             # (U, k, 3, 2) int64, receptive-field box [lo, hi) per axis, clipped
    input_shape: tuple
    feature_shape: tuple
    receptive_field: tuple | None
    n_rows: int
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def spatial(self) -> bool:
        return len(self.feature_shape) == 3

    def unit_index(self, unit: int | str) -> int:
        """Index in ``units`` of ``unit`` (a channel number or a ``"layer:channel"`` address)."""
        if isinstance(unit, str):
            layer, ch = parse_unit(unit)
            if layer != self.layer:
                raise UnitError(f"unit {unit!r} is not of layer {self.layer!r}")
            unit = ch
        try:
            return self.units.index(int(unit))
        except ValueError:
            raise UnitError(f"unit {unit!r} of {self.layer!r} was not searched; searched units: {self.units}") \
                from None

    def slices(self, unit: int | str, rank: int) -> tuple | None:
        """The receptive-field box of exemplar ``rank`` of ``unit`` as a tuple of slices, or ``None``."""
        b = self.box[self.unit_index(unit), rank]
        if b[0, 0] < 0:
            return None
        return tuple(slice(int(lo), int(hi)) for lo, hi in b)

    def table(self, participants: pd.DataFrame | None = None, grid: Grid | None = None,
              columns: Sequence[str] = ("subject",)) -> pd.DataFrame:
        """See :func:`exemplar_table`."""
        return exemplar_table(self, participants, grid, columns)


def _frozen_copy(model, device):
    return frozen(model, device)


def _scores_and_positions(act, units, kind, position=None):
    """``act`` (B, C, ...) -> scores (B, U) and feature positions (B, U, 3) (or None) for ``units``; a neuron
    is read at ``position`` (default: the map's centre)."""
    a = act[:, units].float()
    if a.dim() == 2:
        return a, None
    if a.dim() != 5:
        raise UnitError(f"exemplars need a Linear (B, C) or 3D feature map (B, C, X, Y, Z) output; got shape "
                        f"{tuple(act.shape)}")
    shape = a.shape[2:]
    if kind == "channel":
        flat = a.flatten(2)
        score = flat.mean(2)
        idx = flat.argmax(2)  # the first maximum in C order on ties
        pos = torch.stack(torch.unravel_index(idx, tuple(shape)), -1)
    elif kind == "neuron":
        c = tuple(int(q) for q in position) if position is not None else tuple(s // 2 for s in shape)
        score = a[(slice(None), slice(None)) + c]
        pos = torch.as_tensor(c, device=a.device).expand(a.shape[0], a.shape[1], 3)
    else:
        raise ConfigError(f"exemplar kind must be 'channel' or 'neuron'; got {kind!r}")
    return score, pos


def _merge_topk(top, new, k):
    """Merge running top-k ``(scores, rows, pos)`` (U, m[, 3]) with a batch's; rank by score, then row."""
    s = np.concatenate([top[0], new[0]], 1)
    r = np.concatenate([top[1], new[1]], 1)
    p = np.concatenate([top[2], new[2]], 1)
    key = np.where(np.isnan(s), np.inf, -s)  # NaN last; equal scores: the smaller row first
    order = np.lexsort((r, key), axis=-1)[:, :k]
    take = np.take_along_axis
    return take(s, order, 1), take(r, order, 1), take(p, order[..., None], 1)


def top_exemplars(model: nn.Module, volumes: Sequence, rows: Sequence[int] | None, layer: str,
                  units: int | list[int], *, k: int = 4, kind: str = "channel", batch_size: int = 4,
                  device: str | torch.device = "cpu", log: Callable | None = None,
                  position: tuple | None = None) -> ExemplarResult:
    """The ``k`` most activating volumes of each unit, in one pass over ``rows``.

    Parameters
    ----------
    model : nn.Module taking ``(B, 1, X, Y, Z)``; not modified (an eval-mode copy is run).
    volumes : indexable of 3D arrays (a :class:`~brainfv.data.store.VolumeReader`, a list); ``volumes[r]``
        is read for every ``r`` in ``rows``, ``batch_size`` at a time.
    rows : sequence of int, the rows to rank (e.g. ``participants.query("split == 'test'")["index"]``);
        ``None`` for all.
    layer : module name (``model.named_modules()``); a Conv/norm/activation/pool layer or a Linear one.
    units : channel indices of ``layer``.
    k : exemplars per unit.
    kind : ``channel`` (spatial mean; location = argmax) or ``neuron`` (at ``position`` of the map, default
        its centre: :func:`brainfv.featviz.probes.probe_position`).
    batch_size, device, log : volumes per forward pass, the torch device, a callable for progress lines.

    Returns an :class:`ExemplarResult`. Ties are broken by row (the smaller first), so the result does not
    depend on ``batch_size`` (beyond float rounding of batched convolutions).
    """
    units, rows, k, batch_size = _checked_arguments(volumes, rows, layer, units, k, kind, batch_size)
    device = torch.device(device)
    log = log or (lambda m: None)
    net = _frozen_copy(model, device)
    top = (np.zeros((len(units), 0)), np.zeros((len(units), 0), np.int64), np.zeros((len(units), 0, 3), np.int64))
    input_shape = feature_shape = None
    prog = Progress(len(rows), f"exemplars {layer}", log=log, unit="volumes")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            x = _read_batch(volumes, chunk, input_shape)
            if input_shape is None:
                input_shape = tuple(x.shape[1:])
            x = torch.as_tensor(x, device=device)[:, None]
            act = capture_activations(net, x, [layer])[layer]
            del x
            if feature_shape is None:
                feature_shape = tuple(act.shape[2:])
                bad = [u for u in units if not 0 <= u < act.shape[1]]
                if bad:
                    raise UnitError(f"units {bad} out of range for layer {layer!r}, which has {act.shape[1]} "
                                    f"channels (0..{act.shape[1] - 1})")
            score, pos = _scores_and_positions(act, units, kind, position)
            del act
            score = score.double().cpu().numpy().T
            pos = (pos.cpu().numpy().transpose(1, 0, 2).astype(np.int64) if pos is not None
                   else np.full(score.shape + (3,), -1, np.int64))
            top = _merge_topk(top, (score, np.broadcast_to(chunk, score.shape), pos), k)
            prog.update(len(chunk))
    scores, sel, fpos = _padded(top, k)
    rf = receptive_field(net, layer, (1,) + input_shape, device) if len(feature_shape) == 3 else None
    centre, voxel, box = _map_to_input(fpos, sel >= 0, rf, input_shape)
    return ExemplarResult(layer=layer, units=units, kind=kind, k=k, scores=scores, rows=sel, feature_pos=fpos,
                          centre=centre, voxel=voxel, box=box, input_shape=input_shape,
                          feature_shape=feature_shape, receptive_field=rf, n_rows=len(rows),
                          seconds=time.perf_counter() - t0)


def _checked_arguments(volumes: object, rows: object, layer: str, units: int | list[int], k: int, kind: str,
                       batch_size: int) -> tuple[list[int], np.ndarray, int, int]:
    """:func:`top_exemplars`'s arguments checked: (units, rows, k, batch_size)."""
    units = [int(u) for u in (units if not isinstance(units, int) else [units])]
    if not units:
        raise UnitError(f"no units given for layer {layer!r}")
    if int(k) < 1 or int(batch_size) < 1:
        raise ConfigError(f"k and batch_size must be >= 1; got k={k}, batch_size={batch_size}")
    if kind not in ("channel", "neuron"):
        raise ConfigError(f"exemplar kind must be 'channel' or 'neuron'; got {kind!r}")
    rows = np.arange(len(volumes)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        raise InputDataError("top_exemplars: no rows to evaluate")
    return units, rows, int(k), int(batch_size)


def _padded(top: tuple, k: int) -> tuple:
    """The running top-k (scores, rows, feature positions) padded to ``k`` columns when there were fewer rows."""
    scores, sel, fpos = top
    U, n = scores.shape
    if n < k:  # fewer rows than k
        scores = np.concatenate([scores, np.full((U, k - n), np.nan)], 1)
        sel = np.concatenate([sel, np.full((U, k - n), -1, np.int64)], 1)
        fpos = np.concatenate([fpos, np.full((U, k - n, 3), -1, np.int64)], 1)
    return scores, sel, fpos


def _read_batch(volumes, chunk, shape):
    """Stack ``volumes[r]`` for ``r`` in ``chunk`` as float32 (B, X, Y, Z); errors name the row."""
    out = None
    for j, r in enumerate(chunk):
        v = np.asarray(volumes[int(r)], dtype=np.float32)
        expected = shape if shape is not None else (out.shape[1:] if out is not None else None)
        if v.ndim != 3 or (expected is not None and v.shape != expected):
            raise InputDataError(f"volume row {int(r)} has shape {v.shape}; expected a 3D volume"
                                 + (f" of shape {expected} like the others" if expected is not None else ""))
        if out is None:
            out = np.empty((len(chunk),) + v.shape, np.float32)
        out[j] = v
        del v  # at most one volume alive beside the batch array
    return out


def _map_to_input(fpos, valid, rf, input_shape):
    """Receptive-field centre (float voxels), voxel (int) and box (lo, hi) on the input of feature positions."""
    U, k = valid.shape
    centre = np.full((U, k, 3), np.nan)
    voxel = np.full((U, k, 3), -1, np.int64)
    box = np.full((U, k, 3, 2), -1, np.int64)
    if rf is None:
        return centre, voxel, box
    size, stride, offset = (np.asarray(v, float) for v in zip(*rf))
    hi_idx = np.asarray(input_shape, float) - 1
    lo = fpos * stride - offset
    c = np.clip(lo + (size - 1) / 2, 0, hi_idx)
    centre[valid] = c[valid]
    voxel[valid] = np.floor(c[valid]).astype(np.int64)
    b = np.stack([np.clip(lo, 0, hi_idx + 1), np.clip(lo + size, 0, hi_idx + 1)], -1).astype(np.int64)
    box[valid] = b[valid]
    return centre, voxel, box


def exemplar_volumes(result: ExemplarResult, volumes: Sequence, unit: int | str, crop: bool = True) -> np.ndarray:
    """The exemplar volumes of ``unit`` (rank order), float32 ``(n, X, Y, Z)``, ``n <= k``.

    With ``crop``, voxels outside each exemplar's receptive-field box (around the unit's maximum) are
    set to 0, so the volumes stay on the grid and overlay on the template. Linear layers and layers
    with an unknown receptive field are returned uncropped. Reads only these ``n`` volumes.
    """
    u = result.unit_index(unit)
    out = []
    for rank in range(result.k):
        r = int(result.rows[u, rank])
        if r < 0:
            break
        v = np.asarray(volumes[r], dtype=np.float32).copy()
        box = result.slices(result.units[u], rank) if crop else None
        if box is not None:
            keep = np.zeros(v.shape, bool)
            keep[box] = True
            v[~keep] = 0.0
        out.append(v)
    if not out:
        return np.zeros((0,) + tuple(result.input_shape), np.float32)
    return np.stack(out)


def exemplar_table(result: ExemplarResult, participants: pd.DataFrame | None = None, grid: Grid | None = None,
                   columns: Sequence[str] = ("subject",)) -> pd.DataFrame:
    """One row per (unit, rank): the exemplars of ``result`` as a DataFrame.

    Columns: layer, unit, rank (0 = most activating), volume (index in :func:`write_exemplars`' 4D
    NIfTI: ``unit_index * k + rank``), row (index into ``volumes``), ``columns`` of ``participants`` (its
    ``index`` column names the volume row; without one, its row order is used), activation, kind,
    feature_i/j/k (position in the feature map), voxel_x/y/z (receptive-field centre on the input
    grid, floored), with ``grid`` x_mm/y_mm/z_mm (world coordinates of the unfloored centre), and the
    receptive-field box box_x0, box_x1, box_y0, ... ([lo, hi) voxels). Missing exemplars (fewer rows than
    ``k``) are left out.
    """
    lookup = None
    if participants is not None:
        p = participants.set_index("index", drop=False) if "index" in participants.columns else participants
        missing = [c for c in columns if c not in p.columns]
        if missing:
            raise InputDataError(f"participants table has no column(s) {missing}; it has {list(p.columns)}")
        lookup = p
    recs = []
    for ui, unit in enumerate(result.units):
        for rank in range(result.k):
            r = int(result.rows[ui, rank])
            if r < 0:
                continue
            rec = {"layer": result.layer, "unit": unit, "rank": rank, "volume": ui * result.k + rank, "row": r}
            if lookup is not None:
                if r not in lookup.index:
                    raise InputDataError(f"volume row {r} is not in the participants table")
                for c in columns:
                    rec[c] = lookup.loc[r, c]
            rec.update({"activation": float(result.scores[ui, rank]), "kind": result.kind})
            for a, ax in enumerate("ijk"):
                rec[f"feature_{ax}"] = int(result.feature_pos[ui, rank, a])
            for a, ax in enumerate("xyz"):
                rec[f"voxel_{ax}"] = int(result.voxel[ui, rank, a])
            if grid is not None:
                mm = grid.world_coords(result.centre[ui, rank])
                for a, ax in enumerate("xyz"):
                    rec[f"{ax}_mm"] = float(mm[a])
            for a, ax in enumerate("xyz"):
                rec[f"box_{ax}0"], rec[f"box_{ax}1"] = (int(v) for v in result.box[ui, rank, a])
            recs.append(rec)
    return pd.DataFrame(recs)


def write_exemplars(result: ExemplarResult, volumes: Sequence, grid: Grid, nifti_path: str | Path,
                    table_path: str | Path | None = None, *, crop: bool = True,
                    participants: pd.DataFrame | None = None, columns: Sequence[str] = ("subject",)) -> pd.DataFrame:
    """Write the exemplars as one 4D NIfTI on ``grid`` and, optionally, their table (TSV), atomically.

    Volume ``unit_index * k + rank`` of the NIfTI is exemplar ``rank`` (0 = most activating) of
    ``result.units[unit_index]``: units in the order searched, each with its ``k`` exemplars in rank
    order; a missing exemplar (fewer rows than ``k``) is an all-zero volume. With ``crop`` each volume is
    zero outside the receptive-field box around the unit's maximum (see :func:`exemplar_volumes`).
    The file is written volume by volume: memory holds ``k`` volumes, whatever the number of units.
    Returns the table (DataFrame, with the ``volume`` column naming the NIfTI volume).
    """
    if tuple(grid.shape) != tuple(result.input_shape):
        raise InputDataError(f"grid shape {tuple(grid.shape)} does not match the volumes' shape "
                             f"{tuple(result.input_shape)}")

    def vols():
        for u in result.units:
            ex = exemplar_volumes(result, volumes, u, crop=crop)
            for rank in range(result.k):
                yield ex[rank] if rank < len(ex) else np.zeros(grid.shape, np.float32)

    _write_nifti_4d(grid, len(result.units) * result.k, vols(), nifti_path)
    table = exemplar_table(result, participants, grid, columns)
    if table_path is not None:
        with atomic_path(table_path) as tmp:
            table.to_csv(tmp, sep="\t", index=False)
    return table


def _write_nifti_4d(grid, n, vols, path):
    """Write ``n`` volumes from the iterable ``vols`` as a 4D float32 NIfTI on ``grid``, one at a time.

    The header is the one :meth:`~brainfv.data.grid.Grid.to_nifti` makes (grid affine, MNI152 q/sform
    codes) with a 4th axis of length ``n``; the data follow in NIfTI (Fortran) order, so no 4D array
    is built in memory. Atomic: the file appears only when complete.
    """
    img = grid.to_nifti(np.zeros(tuple(grid.shape) + (1,), np.float32))
    img.update_header()
    hdr = img.header.copy()
    hdr.set_data_shape(tuple(grid.shape) + (int(n),))
    dtype = hdr.get_data_dtype()
    count = 0
    with atomic_path(path) as tmp:
        with ImageOpener(str(tmp), "wb") as fh:
            hdr.write_to(fh)
            seek_tell(fh, hdr.get_data_offset(), write0=True)
            for v in vols:
                v = np.asarray(v)
                if v.shape != tuple(grid.shape):
                    raise InputDataError(f"volume {count} has shape {v.shape}; grid is {tuple(grid.shape)}")
                fh.write(np.asarray(v, dtype=dtype).tobytes(order="F"))
                count += 1
            if count != n:
                raise InputDataError(f"{count} volumes written; the header announced {n}")
    return path
