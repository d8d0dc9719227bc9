"""Decay fits (scipy) and budget derivation: recovered parameters, model selection, equal totals, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from packcache import Budget, BudgetError, CompactCache, PackCache, SequenceLayout
from packcache.budget import decay_ratios
from packcache.fit import allocate, budget_from_stats, fit_decay, fit_stats, shares_from_fit
from probes import FIRST_DISTANCE, AttentionStats

LAYOUT = SequenceLayout(text_tokens=6, num_frames=10, height=8, width=8, row_separator=True, frame_prefix=1,
                        frame_suffix=1)


def synthetic_stats(decay, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, text: float = 0.1,
                    cond: float = 0.2) -> AttentionStats:
    """Statistics whose mean mass at distance d >= 1 is ``decay(layer, head, d)`` (d0 takes the rest)."""
    st = AttentionStats.empty("synthetic", layers, heads, kv_heads, LAYOUT, max_distance=9, recent_frames=0)
    n = LAYOUT.visual_per_frame
    for qf in range(LAYOUT.num_frames):
        st.arrays["queries"][qf] = n
        for layer in range(layers):
            for h in range(heads):
                hist = [decay(layer, h, d) for d in range(1, qf)]
                st.arrays["mass"][layer, h, qf, 0] = n * text
                st.arrays["mass"][layer, h, qf, 1] = n * cond
                for d, m in enumerate(hist, start=1):
                    st.arrays["mass"][layer, h, qf, FIRST_DISTANCE + d] = n * m
                st.arrays["mass"][layer, h, qf, FIRST_DISTANCE] = n * (1 - text - cond - sum(hist))
    st.arrays["mass_sq"][:] = st.mass ** 2 / n  # zero spread: every query has the mean
    st.num_samples = 1
    return st


def test_exponential_data_recovers_rho_and_selects_exponential():
    d = np.arange(1, 9)
    fit = fit_decay(d, 0.4 * 0.6 ** d)
    assert fit.model == "exponential" and fit.rho == pytest.approx(0.6, abs=1e-6)
    assert fit.r2["exponential"] == pytest.approx(1.0) and fit.r2["power"] < 1.0
    assert fit.aic["exponential"] < fit.aic["power"] and fit.bic["exponential"] < fit.bic["power"]


def test_power_law_data_selects_power():
    d = np.arange(1, 9)
    fit = fit_decay(d, 0.3 * d ** -1.5, np.full(8, 1e-3))
    assert fit.model == "power" and fit.alpha == pytest.approx(1.5, abs=1e-3)


def test_rho_uncertainty_covers_the_truth_on_noisy_data():
    rng = np.random.default_rng(0)
    d = np.arange(1, 9)
    sigma = 0.004
    hits = 0
    for _ in range(40):
        fit = fit_decay(d, 0.4 * 0.5 ** d + rng.normal(0, sigma, d.size), np.full(d.size, sigma))
        hits += abs(fit.rho - 0.5) <= 2 * fit.rho_se
    assert hits >= 32  # ~95 % expected within 2 standard errors


def test_a_fit_needs_two_distances():
    with pytest.raises(ValueError, match="at least 2"):
        fit_decay([1, 2], [0.3, np.nan])


def test_paper_rho_gives_the_paper_ratios_and_loads_into_packcache():
    stats = synthetic_stats(lambda layer, h, d: 0.3 * 0.5 ** d)
    budget = budget_from_stats(stats, target_frames=1)
    assert budget.keep_ratios == [decay_ratios(0.5, 4)] * 2
    assert budget.decay["global"]["rho"] == pytest.approx(0.5, abs=1e-6)
    assert budget.decay["per_layer"][0]["anchor_share"] == pytest.approx(0.3)
    again = Budget.from_dict(budget.to_dict())
    policy = PackCache(again)
    specials = LAYOUT.tokens_per_frame - LAYOUT.visual_per_frame
    assert policy.budget_tokens(LAYOUT) == LAYOUT.anchor_tokens + LAYOUT.visual_per_frame + 4 * specials


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_every_layer_and_kv_head_keeps_the_same_token_total(per_kv_head):
    rhos = [[0.2, 0.3, 0.7, 0.9], [0.95, 0.9, 0.4, 0.5]]
    stats = synthetic_stats(lambda layer, h, d: 0.5 * (1 - rhos[layer][h]) * rhos[layer][h] ** (d - 1))
    specials = LAYOUT.tokens_per_frame - LAYOUT.visual_per_frame
    target = LAYOUT.anchor_tokens + 4 * specials + 100
    budget = budget_from_stats(stats, target_tokens=target, per_kv_head=per_kv_head)
    rows = [r for layer in budget.ratios() for r in layer]
    totals = {sum(round(x * LAYOUT.visual_per_frame) for x in r) for r in rows}
    assert totals == {100}
    assert all(a >= b for r in rows for a, b in zip(r, r[1:]))
    assert len({tuple(r) for r in rows}) > 1  # the layers (kv heads) really differ
    policy = PackCache(budget)
    cache = CompactCache(policy, LAYOUT, num_layers=2, num_kv_heads=2)
    assert policy.budget_tokens(LAYOUT) == target
    assert cache.policy is policy
    # fast decay keeps the most recent frame whole; slow decay spreads the history
    fits = fit_stats(stats)
    assert fits.per_kv_head[0][0].rho < 0.3 < 0.8 < fits.per_kv_head[1][0].rho


def test_targets_that_cannot_be_met_are_clear_budget_errors():
    stats = synthetic_stats(lambda layer, h, d: 0.3 * 0.5 ** d)
    with pytest.raises(BudgetError, match=r"smaller than the 80 anchor tokens"):
        budget_from_stats(stats, target_tokens=50)
    with pytest.raises(BudgetError, match="exceeds what a 4-frame window holds"):
        budget_from_stats(stats, target_frames=4.5)
    with pytest.raises(BudgetError, match="exactly one target"):
        budget_from_stats(stats)


def test_slow_decay_folds_into_flat_non_increasing_shares():
    fit = fit_decay(np.arange(1, 8), 0.1 * 0.9 ** np.arange(1, 8))
    shares = shares_from_fit(fit, 4)
    assert shares.sum() == pytest.approx(1.0)
    assert np.all(np.diff(shares) <= 1e-12)  # the folded tail (0.73 of the mass) is pooled, not increasing


@settings(max_examples=60, deadline=None)
@given(hst.lists(hst.floats(0.0, 1.0), min_size=1, max_size=6), hst.integers(1, 64), hst.data())
def test_allocate_sums_exactly_under_the_cap(raw, cap, data):
    shares = np.sort(np.asarray(raw))[::-1]
    shares = shares / shares.sum() if shares.sum() > 0 else np.full(len(raw), 1 / len(raw))
    total = data.draw(hst.integers(0, cap * len(raw)))
    counts = allocate(shares, total, cap)
    assert sum(counts) == total and max(counts) <= cap and min(counts) >= 0
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_sharpness_moves_history_to_the_frames_with_most_mass_at_equal_memory():
    stats = synthetic_stats(lambda layer, h, d: 0.3 * 0.6 ** d)
    flat = budget_from_stats(stats, target_frames=1)
    sharp = budget_from_stats(stats, target_frames=1, sharpness=3.0)
    assert sharp.keep_ratios[0][0] > flat.keep_ratios[0][0]
    assert sum(sharp.keep_ratios[0]) == pytest.approx(sum(flat.keep_ratios[0])) == pytest.approx(1.0)
    assert sharp.provenance["allocation"]["sharpness"] == 3.0
    with pytest.raises(BudgetError, match="sharpness"):
        budget_from_stats(stats, target_frames=1, sharpness=0)


def test_a_floor_is_detected_and_the_budget_follows_only_the_decaying_part():
    """Mass that decays fast onto a distance-independent floor: the floor model wins on AIC, and the keep ratios
    follow the excess (most recent frame first), not the flat floor that dominates the raw mass."""
    stats = synthetic_stats(lambda layer, h, d: 0.2 * 0.3 ** d + 0.08)
    fits = fit_stats(stats)
    fit = fits.per_layer[0]
    assert fit.model == "exponential_floor"
    assert fit.rho_floor == pytest.approx(0.3, abs=1e-3) and fit.floor == pytest.approx(0.08, abs=1e-4)
    assert fit.rho > 0.5  # a plain exponential through the same points decays much more slowly
    ratios = budget_from_stats(stats, target_frames=1, report=fits).keep_ratios[0]
    assert ratios[0] >= 0.65 and sum(ratios) == pytest.approx(1.0)
