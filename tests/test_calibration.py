"""The controls do what they claim: a unit tuned to a lesion shape scores far above its nulls, smooth noise
scores at its null, and a randomized network fails the check a trained one passes."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainfv.featviz.controls import randomized_copy
from brainfv.featviz.study import visualize_layer
from brainfv.report.calibrate import bootstrap_mean, paired_table, summarise
from brainfv.report.compare import Truth, compare_entries
from brainfv.report.metrics import lesion_templates

SHAPE = (24, 24, 24)
VS = 3.0


def lesion_detector():
    """conv3d whose single filter is a dark 15 mm sphere (zero-mean): its centre neuron is maximised by that lesion."""
    t = lesion_templates(["sphere"], [15.0], VS)[0][2]
    k = t.shape[0]
    conv = nn.Conv3d(1, 1, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight[0, 0] = torch.as_tensor(t - t.mean())
    return nn.Sequential(conv).eval()


def truth():
    mask = np.ones(SHAPE, bool)
    lesion_map = np.zeros(SHAPE, np.float32)
    lesion_map[11:14, 11:14, 11:14] = 1.0  # where "lesions were planted": around the centre neuron
    rng = np.random.default_rng(0)
    real = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(4)]
    return Truth("lesion", "lesion", ["absent", "present"], mask, VS, lesion_map=lesion_map,
                 templates=lesion_templates(["sphere", "cube"], [12.0, 15.0], VS), real_volumes=real)


def entry(model, control, n_units=1, seeds=6, steps=40):
    rng = np.random.default_rng(1)
    real = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(4)]
    kw = dict(shape=SHAPE, mask=np.ones(SHAPE, bool), real_volumes=real, test_volumes=real, seed=3, task="lesion",
              regularizer="l2", steps=steps, lr=0.1, n_seeds=seeds, objective="neuron")
    units = list(range(n_units))
    a = visualize_layer(model, "0", units, {"l2": 0.2}, **kw)
    b = visualize_layer(control, "0", units, {"l2": 0.2}, network="randomized", **kw)
    table = pd.concat([a.table, b.table], ignore_index=True)
    return {"task": "lesion", "layer": "0", "module": "0", "regularizer": "l2", "table": table,
            "trained": a.images, "randomized": b.images}


def summary_of(entries, n_surrogates=2):
    trained, controls = compare_entries(entries, {"lesion": truth()}, {}, "classifier", n_surrogates=n_surrogates)
    paired = paired_table(trained, controls, ["lesion_ncc", "lesion_hit"])
    return paired, summarise(paired, ["lesion_ncc"], n_boot=500)


def test_unit_tuned_to_a_lesion_scores_far_above_its_nulls():
    model = lesion_detector()
    paired, s = summary_of([entry(model, randomized_copy(model, 7))])
    row = s[s["metric"] == "lesion_ncc"].iloc[0]
    assert row["mean"] > 0.9                      # the optimum is the lesion itself
    assert row["gain_randomized_low"] > 0.2       # far above the re-initialised network
    assert row["gain_surrogate_low"] > 0.2        # and above its own phase-randomised copies
    assert row["randomization_check"] == "pass" and row["min_gain_lo"] > 0.2 and row["p_min_gain"] < 0.01
    assert (paired["lesion_ncc_z"] > 2).all()
    # the receptive-field crop leaves the template room only around the planted positions: a hit is certain
    # there, so its chance level (over the positions a match can take) is 1, and the hit says nothing
    assert paired["lesion_hit"].mean() == 1.0 and paired["lesion_hit_base_rate"].iloc[0] == 1.0


def test_smooth_noise_scores_at_its_null():
    from scipy import ndimage

    rng = np.random.default_rng(5)
    vols = np.stack([ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5) for _ in range(8)]).astype(np.float32)
    table = pd.DataFrame([{"task": "lesion", "layer": "n", "module": "n", "regularizer": "none", "network": "trained",
                           "unit": u, "seed": s, "volume": 2 * s + u, "region": "0:24,0:24,0:24"}
                          for s in range(4) for u in range(2)])
    e = {"task": "lesion", "layer": "n", "module": "n", "regularizer": "none", "table": table,
         "trained": vols.reshape(4, 2, *SHAPE), "randomized": None}
    _, s = summary_of([e], n_surrogates=4)
    row = s[s["metric"] == "lesion_ncc"].iloc[0]
    assert row["mean"] > 0.2                                        # smoothness alone gives a "lesion" score...
    assert row["gain_surrogate_low"] < 0 < row["gain_surrogate_high"]  # ...that its null explains


def replicate_entries(layer="n"):
    """Visualization entries (2 units x 2 seeds of smooth noise) of request ``layer`` on trained replicates 0, 1."""
    from scipy import ndimage

    entries = []
    for rep in (0, 1):
        rng = np.random.default_rng(10 + rep)
        vols = np.stack([ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5) for _ in range(4)]).astype(np.float32)
        table = pd.DataFrame([{"task": "lesion", "layer": layer, "module": layer, "regularizer": "none",
                               "network": "trained",
                               "unit": u, "seed": s, "volume": 2 * s + u, "region": "0:24,0:24,0:24"}
                              for s in range(2) for u in range(2)])
        entries.append({"task": "lesion", "layer": layer, "module": layer, "regularizer": "none", "table": table,
                        "trained": vols.reshape(2, 2, *SHAPE), "randomized": None, "replicate": rep})
    return entries


def test_trained_replicates_are_carried_to_the_summary():
    """Entries of independently trained networks (``replicate``) keep their index in every row, are paired
    with their own controls, and are the top level of the summary's interval."""
    entries = replicate_entries()
    trained, controls = compare_entries(entries, {"lesion": truth()}, {}, "classifier", n_surrogates=1)
    assert sorted(set(trained["replicate"])) == sorted(set(controls["replicate"])) == [0, 1]
    paired = paired_table(trained, controls, ["lesion_ncc"])
    assert len(paired) == 8 and paired["lesion_ncc_surrogate"].notna().all()
    row = summarise(paired, ["lesion_ncc"]).iloc[0]
    assert row["n_replicates"] == 2 and row["n"] == 8 and row["n_units"] == 2


def test_a_task_with_fewer_replicates_gives_its_first_network_as_the_other_control():
    """The lesion task has two trained replicates, the sex task one: both lesion replicates are paired with the
    sex model's visualizations (same request, units and seeds) as their other-model control."""
    rng = np.random.default_rng(5)
    sex_truth = Truth("sex", "sex", ["F", "M"], np.ones(SHAPE, bool), VS, effect=rng.normal(size=SHAPE),
                      effect_full=rng.normal(size=SHAPE), real_volumes=truth().real_volumes)
    lesion = replicate_entries()
    sex = {**lesion[0], "task": "sex", "table": lesion[0]["table"].assign(task="sex"), "replicate": 0}
    _, controls = compare_entries(lesion + [sex], {"lesion": truth(), "sex": sex_truth}, {}, "classifier",
                                  n_surrogates=0)
    other = controls[(controls["task"] == "lesion") & (controls["control"] == "other")]
    assert sorted(set(other["replicate"])) == [0, 1] and len(other) == 8


class ConstantLogits(nn.Module):
    """A "transfer model" whose logits are the same for every input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_each_replicate_is_tested_on_its_own_transfer_model():
    """Transfer models keyed by (task, replicate) (transfer.from_replicate: replicate 1 tests replicate 0's
    class-logit visualizations, replicate 0 replicate 1's) are looked up per entry before the task's own."""
    for_0, for_1 = ConstantLogits([4.0, -4.0]), ConstantLogits([-4.0, 4.0])  # prefer 'absent' / 'present'
    trained, _ = compare_entries(replicate_entries("classifier"), {"lesion": truth()},
                                 {("lesion", 0): for_0, ("lesion", 1): for_1}, "classifier", n_surrogates=0)
    p = trained.groupby(["replicate", "unit"])["transfer_prob"].mean()
    assert p[0, 0] > 0.99 and p[0, 1] < 0.01 and p[1, 0] < 0.01 and p[1, 1] > 0.99
    trained, _ = compare_entries(replicate_entries("classifier"), {"lesion": truth()}, {"lesion": for_1},
                                 "classifier", n_surrogates=0)  # one transfer model for the task: every replicate
    assert (trained.loc[trained["unit"] == 1, "transfer_prob"] > 0.99).all()


def test_randomized_network_fails_the_check_a_trained_one_passes():
    model = lesion_detector()
    # one unit: the check compares two particular random filters, and which of them scores higher is chance
    # (with the per-stage draws of brainfv.featviz.controls, pairs 1/2 and 5/6 fail, 11/12 and 3/4 pass by a
    # hair: gain 0.02-0.04 against 0.5+ for the trained detector)
    random_a, random_b = randomized_copy(model, 1), randomized_copy(model, 2)
    _, s = summary_of([entry(random_a, random_b)])
    assert s.loc[s["metric"] == "lesion_ncc", "randomization_check"].item() == "fail"
    _, s = summary_of([entry(model, random_b)])
    assert s.loc[s["metric"] == "lesion_ncc", "randomization_check"].item() == "pass"


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_seeds():
    rng = np.random.default_rng(0)
    few = rng.normal(1.0, 1.0, size=(4, 2))
    many = rng.normal(1.0, 1.0, size=(4, 16))
    m, lo, hi, n = bootstrap_mean(few)
    assert lo < m < hi and n == 8
    _, lo2, hi2, _ = bootstrap_mean(many)
    assert hi2 - lo2 < hi - lo
    m, lo, hi, n = bootstrap_mean(np.array([[np.nan, 1.0], [2.0, np.nan]]))
    assert m == 1.5 and n == 2
    assert np.isnan(bootstrap_mean(np.full((2, 2), np.nan))[0])


def sphere(sign):
    v = np.zeros(SHAPE, np.float32)
    g = np.indices(SHAPE) - 12
    v[(g ** 2).sum(0) <= 9] = sign
    return v


def test_class_logits_are_scored_and_summarised_per_intended_class_by_the_volume_column():
    """units.nii.gz volume i is the table row with volume == i, whatever the row order; the 'present' logit
    looks for a dark lesion and the 'absent' one for its absence, and each class is summarised alone."""
    rng = np.random.default_rng(2)
    present = [sphere(-1.0) + 0.05 * rng.normal(size=SHAPE).astype(np.float32) for _ in range(3)]
    absent = [sphere(+1.0) + 0.05 * rng.normal(size=SHAPE).astype(np.float32) for _ in range(3)]
    vols = np.stack([v for pair in zip(absent, present) for v in pair])      # seed-major: unit 0, unit 1, ...
    rows = [{"task": "lesion", "layer": "classifier", "module": "classifier", "regularizer": "none",
             "network": "trained", "unit": u, "seed": s, "volume": 2 * s + u, "region": "0:24,0:24,0:24"}
            for s in range(3) for u in range(2)]
    table = pd.DataFrame(rows[::-1])                                          # rows in another order
    e = {"task": "lesion", "layer": "classifier", "module": "classifier", "regularizer": "none", "table": table,
         "trained": vols.reshape(3, 2, *SHAPE), "randomized": None}
    trained, controls = compare_entries([e], {"lesion": truth()}, {}, "classifier", n_surrogates=1)
    assert set(controls["intended_class"]) == {"absent", "present"}
    for cls in ("absent", "present"):
        t = trained[trained["intended_class"] == cls]
        assert set(t["unit"]) == {["absent", "present"].index(cls)}
        assert (t["lesion_map_corr"] > 0.3).all(), cls                      # each logit's evidence, signed
    s = summarise(paired_table(trained, controls, ["lesion_map_corr"]), ["lesion_map_corr"], n_boot=200)
    assert sorted(s["class"]) == ["absent", "present"] and (s["n"] == 3).all()


def test_a_units_list_is_visualised_in_ascending_order_once():
    from brainfv.featviz.units import resolve_units as resolve_layer_units
    from brainfv.models.arch import resolve_units

    assert resolve_units([3, 0, 3], 4) == [0, 3]
    assert resolve_layer_units(lesion_detector(), "0", [0, 0], (1,) + SHAPE) == [0]


def test_phase_surrogates_keep_amplitude_and_the_sign_of_the_mean():
    from brainfv.report.metrics import phase_surrogates

    rng = np.random.default_rng(0)
    vol = np.zeros(SHAPE, np.float32)
    vol[4:20, 4:20, 4:20] = sphere(-1.0)[4:20, 4:20, 4:20] - 0.5 + 0.1 * rng.normal(size=(16, 16, 16))
    sur = phase_surrogates(vol, 3, rng, region=[[4, 20]] * 3)
    sub = vol[4:20, 4:20, 4:20].astype(np.float64)
    for s in sur:
        assert np.all(s[:4] == 0) and np.all(s[20:] == 0)                   # nothing outside the region
        inner = s[4:20, 4:20, 4:20].astype(np.float64)
        assert inner.mean() == pytest.approx(sub.mean(), abs=1e-5)          # a dark image stays dark
        assert np.allclose(np.abs(np.fft.rfftn(inner)), np.abs(np.fft.rfftn(sub)), atol=1e-3)
        assert abs(np.corrcoef(inner.ravel(), sub.ravel())[0, 1]) < 0.5      # but its structure is gone


def test_hit_base_rate_counts_only_positions_a_match_can_take():
    from brainfv.report.metrics import TemplateBank, base_rate

    t = truth()
    bank = TemplateBank(t.templates, SHAPE)
    whole = bank.valid_positions(None, t.mask)
    assert whole.sum() < np.prod(SHAPE) and whole[12, 12, 12] and not whole[0, 0, 0]
    assert base_rate(t.lesion_map, whole) > base_rate(t.lesion_map, t.mask)   # lesions sit centrally here


def test_template_matching_on_fast_fft_sizes_is_the_linear_correlation():
    from brainfv.report.metrics import TemplateBank
    from brainfv.utils import fast_fft_size

    assert [fast_fft_size(n) for n in (1, 7, 47, 56, 97)] == [1, 8, 48, 60, 100]
    shape, templates = (23, 26, 21), lesion_templates(["sphere", "cube"], [12.0, 15.0], VS)
    bank = TemplateBank(templates, shape)
    m = max(max(x.shape) for _, _, x in templates)
    exact = tuple(n + m - 1 for n in shape)  # the smallest size without wrap-around
    assert bank.fft_shape != exact and all(f >= e and fast_fft_size(f) == f for f, e in zip(bank.fft_shape, exact))
    ref = TemplateBank(templates, shape, fft_shape=exact)
    with pytest.raises(ValueError, match="wrap around"):
        TemplateBank(templates, shape, fft_shape=tuple(e - 1 for e in exact))
    vols = np.random.default_rng(0).normal(size=(3,) + shape)
    vols[0, 8:12, 9:13, 7:11] -= 3  # a dark cube: one clear best match
    mask = np.ones(shape, bool)
    for a, b in zip(bank.match(vols, mask=mask), ref.match(vols, mask=mask)):
        assert a["position"] == b["position"] and a["shape"] == b["shape"] and a["ncc"] == pytest.approx(b["ncc"])


def test_summary_counts_undefined_values_and_converged_share():
    """A metric that is undefined for a visualization (NaN: a constant image's correlation) is counted, not
    averaged in as 0; the converged share of the optimisations is reported beside the estimate."""
    import pandas as pd

    from brainfv.report.calibrate import summarise

    rows = [{"task": "t", "layer": "classifier", "regularizer": "none", "unit": 0, "seed": s,
             "intended_class": "present", "lesion_map_corr": (np.nan if s == 0 else 0.1 * s),
             "converged": s != 3} for s in range(4)]
    out = summarise(pd.DataFrame(rows), ["lesion_map_corr"])
    r = out.iloc[0]
    assert r["n"] == 3 and r["n_undefined"] == 1 and r["converged_share"] == 0.75
    assert np.isclose(r["mean"], 0.2)


def test_known_corr_scores_recovery_of_a_positive_controls_known_optimum():
    """known_corr: the correlation with a positive control's known optimum over the voxels it reads (NaN for a
    class without one, and for units that are not class logits)."""
    from brainfv.report.compare import score_volumes

    shape = (8, 8, 8)
    known = np.full((2,) + shape, np.nan, np.float32)
    known[1, :4] = 1.0
    known[1, 4:6] = -1.0   # the last rows are never read: free
    t = Truth("k", "sex", ["F", "M"], np.ones(shape, bool), 4.0, known=known)
    rng = np.random.default_rng(0)
    perfect = np.where(np.isfinite(known[1]), known[1], rng.normal(size=shape) * 5)
    noise = rng.normal(size=shape)
    s = score_volumes(t, [perfect, noise, perfect], [1, 1, 0], None, True)
    assert s[0]["known_corr"] == pytest.approx(1.0) and abs(s[1]["known_corr"]) < 0.3
    assert np.isnan(s[2]["known_corr"])
    assert np.isnan(score_volumes(t, [perfect], [1], None, False)[0]["known_corr"])


def test_other_model_control_pairs_by_unit_and_seed_when_a_request_reads_fewer_units():
    """A positive control that visualises one logit (unit 1) is paired with the other task's visualizations of
    the same unit and seeds, although that task visualises both logits; a missing seed means no control."""
    rng = np.random.default_rng(6)
    sex_truth = Truth("sex", "sex", ["F", "M"], np.ones(SHAPE, bool), VS, effect=rng.normal(size=SHAPE),
                      effect_full=rng.normal(size=SHAPE), real_volumes=truth().real_volumes)
    sex = {**replicate_entries()[0], "task": "sex", "replicate": 0}
    sex["table"] = sex["table"].assign(task="sex")
    known = {**sex, "task": "lesion-known", "trained": sex["trained"][:, 1:] * 0.5,
             "table": sex["table"][sex["table"]["unit"] == 1].assign(task="lesion-known", volume=[0, 1])}
    truths = {"lesion-known": truth(), "sex": sex_truth}
    _, controls = compare_entries([sex, known], truths, {}, "classifier", n_surrogates=0)
    other = controls[(controls["task"] == "lesion-known") & (controls["control"] == "other")]
    assert other[["unit", "seed"]].values.tolist() == [[1, 0], [1, 1]]
    known["table"] = known["table"].assign(seed=[0, 5])
    _, controls = compare_entries([sex, known], truths, {}, "classifier", n_surrogates=0)
    assert controls.empty or not ((controls["task"] == "lesion-known") & (controls["control"] == "other")).any()


def test_probe_positions_are_a_level_between_units_and_seeds():
    """With several probe positions (a position_index column that varies) the summary averages seeds within a
    position, positions within a unit, then takes the t interval over the units' means (over the positions' means
    for one unit); with one position the numbers are those of the position-free hierarchy."""
    from scipy import stats as st

    from brainfv.report import stats

    rows = []
    values = {(0, 0): [1.0, 2.0], (0, 1): [5.0, 6.0, 7.0], (1, 0): [0.0, 1.0], (1, 1): [3.0, 3.0, 4.0]}
    seed = {0: 0, 1: 0}
    for (u, q), vs in values.items():
        for v in vs:  # seeds stay distinct across positions: position 1's seeds follow position 0's
            rows.append({"unit": u, "seed": q * 2 + seed.setdefault((u, q), 0), "position_index": q, "m": v})
            seed[(u, q)] += 1
    df = pd.DataFrame(rows)
    g = stats.grid(df, "m")
    assert g.shape == (1, 2, 2, 5) and np.isfinite(g).sum() == 10
    unit_means = [(1.5 + 6.0) / 2, (0.5 + 10 / 3) / 2]  # seeds within each position, then the positions
    mean, lo, hi, p, n = stats.mean_interval(g, "t")
    half = st.t.ppf(0.975, 1) * np.std(unit_means, ddof=1) / np.sqrt(2)
    assert n == 10 and np.isclose(mean, np.mean(unit_means)) and np.isclose(mean, 17 / 6)
    assert np.isclose(lo, mean - half) and np.isclose(hi, mean + half)
    assert not np.isclose(mean, df["m"].mean())  # not the flat mean of the seeds (3.2)
    # one unit: the positions are the top level that varies
    one = stats.mean_interval(stats.grid(df[df["unit"] == 0], "m"), "t")
    pos_means = [1.5, 6.0]
    assert np.isclose(one[0], 3.75) and np.isclose(one[2], 3.75 + st.t.ppf(0.975, 1) * np.std(pos_means, ddof=1)
                                                   / np.sqrt(2)) and one[4] == 5
    # gains read the same hierarchy
    per, smallest = stats.joint_gains({"randomized": g - 1.0})
    assert np.isclose(per["randomized"][0], 17 / 6 - 1) and np.isclose(smallest[0], 17 / 6 - 1)
    # one position: exactly the position-free numbers
    flat = pd.DataFrame([{"unit": u, "seed": s, "m": v} for (u, q), vs in values.items() if q == 0
                         for s, v in enumerate(vs)])
    assert np.array_equal(stats.grid(flat.assign(position_index=0), "m"), stats.grid(flat, "m"), equal_nan=True)
    # the summary says how many positions, only where there are several
    base = {"task": "lesion", "layer": "b", "regularizer": "none", "converged": True}
    s = summarise(df.assign(**base), ["m"]).iloc[0]
    assert s["n_positions"] == 2 and np.isclose(s["mean"], 17 / 6) and s["n"] == 10
    assert "n_positions" not in summarise(flat.assign(position_index=0, **base), ["m"])


def test_each_probe_position_is_scored_in_its_own_region():
    """compare_entries reads each position's rows with that position's optimised region (base rate, lesion
    match) and pairs controls per visualization; one position gives what a table without the column gives."""
    t = truth()
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(8, *SHAPE)).astype(np.float32)
    regions = {0: "6:18,6:18,6:18", 1: "0:12,12:24,0:12"}  # the planted lesions (11:14) in the first only
    table = pd.DataFrame([{"task": "lesion", "layer": "b", "module": "b", "network": "trained", "regularizer": "none",
                           "unit": u, "seed": q * 2 + s, "volume": (q * 2 + s) * 2 + u, "position_index": q,
                           "region": regions[q], "preferred_class": "present"}
                          for q in (0, 1) for s in (0, 1) for u in (0, 1)])
    e = {"task": "lesion", "layer": "b", "module": "b", "regularizer": "none", "table": table,
         "trained": vols.reshape(4, 2, *SHAPE), "randomized": vols[::-1].copy().reshape(4, 2, *SHAPE)}
    tr, ctl = compare_entries([e], {"lesion": t}, {}, "classifier", n_surrogates=1)
    for q, region in regions.items():  # each position: as if it were an entry of its own
        sub = table[table["position_index"] == q]
        alone = {**e, "table": sub.assign(volume=range(4)).drop(columns="position_index"),
                 "trained": vols[sub["volume"].to_numpy()].reshape(2, 2, *SHAPE),
                 "randomized": vols[::-1][sub["volume"].to_numpy()].reshape(2, 2, *SHAPE)}
        tr_q, ctl_q = compare_entries([alone], {"lesion": t}, {}, "classifier", n_surrogates=0)
        mine = tr[tr["position_index"] == q].reset_index(drop=True)
        for col in ("lesion_ncc", "lesion_map_corr", "lesion_hit_base_rate", "tv_ratio"):
            assert np.allclose(mine[col], tr_q[col], equal_nan=True), col
        rand = ctl[(ctl["control"] == "randomized") & ctl["seed"].isin(sub["seed"])].reset_index(drop=True)
        assert np.allclose(rand["lesion_ncc"], ctl_q[ctl_q["control"] == "randomized"]["lesion_ncc"], equal_nan=True)
    assert tr.groupby("position_index")["lesion_hit_base_rate"].first().nunique() == 2
    assert len(ctl[ctl["control"] == "surrogate"]) == 8
    # every control row says the position of the visualization it pairs with
    pos_of = dict(zip(table["seed"], table["position_index"]))
    assert (ctl["position_index"] == ctl["seed"].map(pos_of)).all()



def _positions_tables(rng, own_position):
    """A 3-position request (two seeds each, seeds unique across positions, two trained replicates) and a
    single-position one (no position_index: NaN once concatenated) in one table, with their controls."""
    rows, ctrl = [], []
    for rep in range(2):
        for unit in range(4):
            for seed in range(6):
                pos = seed // 2
                base = 10.0 * pos  # the nulls sit far apart by position
                rows.append({"task": "lesion", "layer": "b", "regularizer": "none", "unit": unit, "seed": seed,
                             "replicate": rep, "position_index": pos, "lesion_ncc": base + 1.0})
                for kind in ("randomized", "other", "surrogate"):
                    ctrl.append({"task": "lesion", "layer": "b", "regularizer": "none", "unit": unit, "seed": seed,
                                 "replicate": rep, "control": kind, "lesion_ncc": base + rng.normal(),
                                 **({"position_index": pos} if own_position else {})})
            for seed in range(2):
                rows.append({"task": "lesion", "layer": "c", "regularizer": "none", "unit": 0, "seed": seed,
                             "replicate": rep, "lesion_ncc": 0.5})
                for kind in ("randomized", "other"):
                    ctrl.append({"task": "lesion", "layer": "c", "regularizer": "none", "unit": 0, "seed": seed,
                                 "replicate": rep, "control": kind, "lesion_ncc": rng.normal()})
    return pd.DataFrame(rows), pd.DataFrame(ctrl)


@pytest.mark.parametrize("own_position", [True, False], ids=["controls-say", "from-the-trained-row"])
def test_each_probe_position_is_read_against_its_own_controls(own_position):
    """m_z and m_pct: the randomized/other controls of the same probe position only (each position reads another
    crop of the brain, so its null differs); a request with one position keeps its own null; controls carry
    their position (compare_entries) or take that of the visualization with their keys."""
    trained, controls = _positions_tables(np.random.default_rng(0), own_position)
    paired = paired_table(trained, controls, ["lesion_ncc"])
    assert len(paired) == len(trained)
    ctrl = controls[controls["control"].isin(["randomized", "other"])]
    for (layer, pos), g in paired.groupby(["layer", paired["position_index"].fillna(-1)]):
        c = ctrl[ctrl["layer"] == layer]
        null = (c[c["seed"] // 2 == pos] if layer == "b" else c)["lesion_ncc"].to_numpy()
        x = g["lesion_ncc"].to_numpy()
        np.testing.assert_allclose(g["lesion_ncc_z"], (x - null.mean()) / null.std(ddof=1), rtol=1e-9)
        np.testing.assert_allclose(g["lesion_ncc_pct"], [(null < v).mean() for v in x])
    # each sits one unit above its own position's null; pooled over positions, position 0's would read below it
    assert (paired.loc[paired["layer"] == "b", "lesion_ncc_z"] > 0).all()
    # the paired control values stay the visualization's own (replicate and seed name one position)
    b = paired[paired["layer"] == "b"]
    assert ((b["lesion_ncc_randomized"] - 10.0 * b["position_index"]).abs() < 5).all()


def test_a_visualization_at_two_probe_positions_cannot_be_paired():
    trained, controls = _positions_tables(np.random.default_rng(0), False)
    trained.loc[trained["seed"] == 2, "seed"] = 0  # position 1's first seed now repeats position 0's
    with pytest.raises(ValueError, match="several probe positions"):
        paired_table(trained, controls, ["lesion_ncc"])
