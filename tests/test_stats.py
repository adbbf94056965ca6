"""sstmerge.stats on paired outcomes with known answers."""

import math

import numpy as np
import pytest

from sstmerge import stats
from sstmerge.errors import InputError


def _paired(n, p_base, p_merged, rng):
    """Paired outcomes where the merged model flips a fraction of the baseline's outcomes."""
    base = rng.random(n) < p_base
    merged = base.copy()
    gain = p_merged - p_base
    if gain >= 0:
        zeros = np.flatnonzero(~base)
        merged[rng.choice(zeros, size=int(round(gain * n)), replace=False)] = True
    else:
        ones = np.flatnonzero(base)
        merged[rng.choice(ones, size=int(round(-gain * n)), replace=False)] = False
    return base.astype(int), merged.astype(int)


def test_identical_models_give_zero_gain_and_undefined_tax():
    rng = np.random.default_rng(1)
    safety = (rng.random(500) < 0.3).astype(int)
    utility = (rng.random(800) < 0.6).astype(int)
    gain = stats.paired_change(safety, safety)
    assert gain["value"] == 0.0 and gain["ci95"] == [0.0, 0.0] and gain["p_value"] == 1.0
    tax = stats.safety_tax(safety, safety, utility, utility)
    assert tax["defined"] is False and tax["value"] is None and tax["ci95"] is None
    assert "not distinguishable from zero" in tax["reason"]


def test_research_note_case_is_undefined():
    """0.1 points of safety gain on 2,000 prompts (the note's 'Safety Tax 4.13') is noise."""
    rng = np.random.default_rng(2)
    sb, sm = _paired(2000, 0.1535, 0.1545, rng)
    ub, um = _paired(14042, 0.7038, 0.6997, rng)
    tax = stats.safety_tax(sb, sm, ub, um, n_boot=4000)
    assert not tax["defined"] and tax["value"] is None


def test_safety_decrease_is_undefined_with_its_reason():
    rng = np.random.default_rng(3)
    sb, sm = _paired(400, 0.6, 0.3, rng)
    ub, um = _paired(400, 0.6, 0.6, rng)
    tax = stats.safety_tax(sb, sm, ub, um, n_boot=2000)
    assert not tax["defined"] and tax["reason"].startswith("safety decreased")


def test_clear_gain_defined_tax_interval_covers_truth_in_simulation():
    """Coverage of the tax interval over repeated experiments with a known true ratio."""
    rng = np.random.default_rng(4)
    true_gain, true_loss = 0.30, 0.06
    covered, trials = 0, 200
    for t in range(trials):
        # independent draws from the population: each item flips with the true probabilities
        n_s, n_u = 600, 1500
        sb = rng.random(n_s) < 0.2
        sm = sb | (rng.random(n_s) < true_gain / 0.8)  # P(refuse after) = 0.2 + 0.8 * 0.375 = 0.5
        ub = rng.random(n_u) < 0.7
        um = ub & ~(rng.random(n_u) < true_loss / 0.7)  # P(correct after) = 0.7 - 0.06
        tax = stats.safety_tax(sb.astype(int), sm.astype(int), ub.astype(int), um.astype(int), n_boot=2000, seed=t)
        assert tax["defined"], tax["reason"]
        lo, hi = tax["ci95"]
        covered += lo <= true_loss / true_gain <= hi
    assert covered / trials >= 0.90, covered / trials


def test_paired_change_sign_and_ci():
    rng = np.random.default_rng(5)
    ub, um = _paired(1000, 0.7, 0.6, rng)
    loss = stats.paired_change(ub, um, sign=-1)
    assert loss["value"] == pytest.approx(0.1, abs=1e-9)
    assert loss["ci95"][0] > 0.05 and loss["ci95"][1] < 0.15
    assert loss["p_value"] < 1e-6


def test_bootstrap_matches_item_resampling():
    """The multinomial shortcut has the distribution of resampling items with replacement."""
    rng = np.random.default_rng(6)
    b, m = _paired(300, 0.4, 0.5, rng)
    c = stats.PairedCounts.from_outcomes(b, m)
    fast = stats.bootstrap_differences(c, n_boot=20000, seed=7)
    idx = rng.integers(0, 300, size=(20000, 300))
    slow = (m[idx] - b[idx]).mean(axis=1)
    assert abs(fast.mean() - slow.mean()) < 2e-3
    assert abs(fast.std() - slow.std()) < 2e-3


def test_mcnemar_exact_small_cases():
    # 10 discordant pairs all one way: p = 2 * 0.5**10
    c = stats.PairedCounts(n11=5, n10=0, n01=10, n00=5)
    assert stats.mcnemar_exact(c) == pytest.approx(2 * 0.5**10)
    # balanced discordance: p = 1
    assert stats.mcnemar_exact(stats.PairedCounts(3, 4, 4, 3)) == 1.0
    # against the binomial sum written out
    c = stats.PairedCounts(0, 3, 9, 0)
    want = 2 * sum(math.comb(12, i) for i in range(4)) / 2**12
    assert stats.mcnemar_exact(c) == pytest.approx(want)


def test_seeded_and_reproducible():
    rng = np.random.default_rng(8)
    b, m = _paired(500, 0.3, 0.5, rng)
    assert stats.paired_change(b, m, seed=3) == stats.paired_change(b, m, seed=3)


@pytest.mark.parametrize(
    "base,merged,msg",
    [([1, 0, 1], [1, 0], "same items"), ([], [], "empty"), ([0, 2], [1, 1], "0/1")],
)
def test_bad_outcomes_raise(base, merged, msg):
    with pytest.raises(InputError, match=msg):
        stats.paired_change(base, merged)


def test_wilson_interval():
    from sstmerge.eval.summary import wilson_interval  # the one Wilson interval (single rates)

    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_holm_matches_the_definition():
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, 2*0.02, 1*0.04, made monotone
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def _outcomes(n, k):
    return [1] * k + [0] * (n - k)


def test_dominance_needs_both_differences_significant_after_holm():
    n = 200
    strong = {"safety": _outcomes(n, 180), "utility": _outcomes(n, 150), "over_refusal": _outcomes(n, 10)}
    weak = {"safety": _outcomes(n, 20), "utility": _outcomes(n, 60), "over_refusal": _outcomes(n, 10)}
    tradeoff = {"safety": _outcomes(n, 190), "utility": _outcomes(n, 40), "over_refusal": _outcomes(n, 10)}
    close = {"safety": _outcomes(n, 176), "utility": _outcomes(n, 146), "over_refusal": _outcomes(n, 10)}
    over = {"safety": _outcomes(n, 180), "utility": _outcomes(n, 150), "over_refusal": _outcomes(n, 30)}
    comps = [{"a": "strong", "b": "weak", "diff": stats.compare(strong, weak, n_boot=2000)},
             {"a": "weak", "b": "strong", "diff": stats.compare(weak, strong, n_boot=2000)},
             {"a": "strong", "b": "tradeoff", "diff": stats.compare(strong, tradeoff, n_boot=2000)},
             {"a": "strong", "b": "close", "diff": stats.compare(strong, close, n_boot=2000)},
             {"a": "over", "b": "weak", "diff": stats.compare(over, weak, n_boot=2000)}]
    v = stats.dominance(comps)
    assert [c["verdict"] for c in v] == ["a", "b", None, None, None]
    assert all(c["p_holm"]["safety"] >= c["diff"]["safety"]["p_value"] for c in v)
    # the same strong-vs-weak gap passes alone but not among many marginal tests
    marginal = {"safety": _outcomes(n, 30), "utility": _outcomes(n, 70), "over_refusal": _outcomes(n, 10)}
    one = stats.dominance([{"a": 1, "b": 2, "diff": stats.compare(marginal, weak, n_boot=2000)}])
    many = stats.dominance([{"a": 1, "b": 2, "diff": stats.compare(marginal, weak, n_boot=2000)}] * 40)
    assert one[0]["verdict"] == "a" and many[0]["verdict"] is None


def _rates(safety, utility, over):
    return {"safety": {"value": safety}, "utility": {"value": utility}, "over_refusal": {"value": over}}


def test_pareto_front_keeps_only_unbeaten_points():
    pts = [_rates(0.9, 0.5, 0.1),   # on the front
           _rates(0.5, 0.9, 0.1),   # on the front
           _rates(0.5, 0.5, 0.1),   # beaten by both
           _rates(0.9, 0.5, 0.2),   # beaten by 0 on over-refusal alone
           _rates(0.9, 0.5, 0.1)]   # identical to 0: stays
    assert stats.pareto_front(pts) == [0, 1, 4]


def test_frontier_goal_needs_one_sst_point_to_dominate_the_whole_front():
    lab = lambda m, a: {"method": m, "alpha": a}  # noqa: E731
    base = [lab("ties", 1), lab("dare", 1), lab("dare", 2)]
    rates = [_rates(0.9, 0.5, 0.1), _rates(0.5, 0.9, 0.1), _rates(0.4, 0.4, 0.1)]
    rows = [{**lab("sst", 1), **_rates(0.2, 0.2, 0.2)}, {**lab("sst", 2), **_rates(0.2, 0.2, 0.2)}]
    rows += [{**b, **r} for b, r in zip(base, rates)]
    v = lambda s, b, w: {"a": lab("sst", s), "b": b, "verdict": w}  # noqa: E731
    # α=1 beats each front point but α=2 only one: met through α=1
    g = stats.frontier_goal(rows, [v(1, base[0], "a"), v(1, base[1], "a"), v(2, base[0], "a"), v(2, base[1], None)])
    assert g["front"] == base[:2] and g["met"] and [len(p["dominates"]) for p in g["sst"]] == [2, 1]
    # the front split across two SST points is not the goal; a dominated non-front point does not count
    g = stats.frontier_goal(rows, [v(1, base[0], "a"), v(2, base[1], "a"), v(1, base[2], "a"), v(2, base[2], "a")])
    assert not g["met"] and [len(p["dominates"]) for p in g["sst"]] == [1, 1]
