"""Property-based tests shared by every policy (kvpress-style matrix): anchors kept, budget respected, subset of
what is present, nearer frames never keep fewer tokens, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packcache import Budget, BudgetError, FullCache, PackCache, SequenceLayout, SlidingWindow, StreamingLLM
from packcache.policies.base import SlotView, equalize
from packcache.policies.packcache import grid_priority


@st.composite
def layouts(draw):
    return SequenceLayout(
        text_tokens=draw(st.integers(0, 6)),
        num_frames=draw(st.integers(3, 10)),
        height=draw(st.integers(1, 6)),
        width=draw(st.integers(1, 6)),
        cond_frames=draw(st.integers(0, 2)),
        row_separator=draw(st.booleans()),
        frame_prefix=draw(st.integers(0, 2)),
        frame_suffix=draw(st.integers(0, 1)),
        prefix_specials=draw(st.integers(0, 2)),
    )


@st.composite
def ratio_rows(draw, window):
    values = sorted(draw(st.lists(st.floats(0, 1), min_size=window, max_size=window)), reverse=True)
    return values


@st.composite
def cases(draw):
    layout = draw(layouts())
    layers, kv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["full", "paper", "per_layer", "per_kv_head", "window0", "window1", "streaming"]))
    window = draw(st.integers(1, 5))
    if kind == "full":
        policy = FullCache()
    elif kind == "paper":
        policy = PackCache(Budget.paper_default(layers, kv, kv, layout.summary(), window=window))
    elif kind in ("per_layer", "per_kv_head"):
        budget = Budget.paper_default(layers, kv, kv, layout.summary(), window=window)
        if kind == "per_layer":
            budget.keep_ratios = [draw(ratio_rows(window)) for _ in range(layers)]
        else:
            budget.keep_ratios = [[draw(ratio_rows(window)) for _ in range(kv)] for _ in range(layers)]
        budget.validate()
        policy = PackCache(budget)
    elif kind.startswith("window"):
        policy = SlidingWindow(frames=int(kind[-1]))
    else:
        sinks = draw(st.integers(0, 4))
        policy = StreamingLLM(max_tokens=sinks + draw(st.integers(1, 3 * layout.tokens_per_frame)), sinks=sinks)
    return layout, layers, kv, policy


def simulate(layout, layers, kv, policy):
    """Feed frame after frame into a slot table and compact at every frame boundary, like CompactCache does."""
    slots = torch.zeros(layers, kv, 0, dtype=torch.long)
    first = max(layout.cond_frames, 1)
    end = layout.frame_slice(first - 1).stop
    slots = torch.arange(end).expand(layers, kv, -1)
    for frame in range(first, layout.num_frames + 1):
        view = SlotView(token=slots, layout=layout)
        keep = policy.keep(view, frame)
        again = policy.keep(SlotView(token=slots.clone(), layout=layout), frame)
        yield slots, keep, again, frame
        if keep is not None:
            slots = slots.gather(-1, keep)
        if frame < layout.num_frames:
            new = torch.arange(layout.frame_slice(frame).start, layout.frame_slice(frame).stop)
            slots = torch.cat([slots, new.expand(layers, kv, -1)], dim=-1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_policy_invariants(case):
    layout, layers, kv, policy = case
    budget = policy.budget_tokens(layout)
    anchors = torch.from_numpy(layout.anchor.copy())
    frame_of = torch.from_numpy(layout.frame.copy())
    visual = torch.from_numpy((layout.group == 2).copy())
    for slots, keep, again, next_frame in simulate(layout, layers, kv, policy):
        if keep is None:
            assert again is None
            continue
        assert torch.equal(keep, again), "not deterministic"
        assert keep.shape[:2] == (layers, kv)
        kept = slots.gather(-1, keep)
        assert bool((keep[..., 1:] > keep[..., :-1]).all()), "indices must be ascending and unique"
        # subset of what is present
        assert bool((keep < slots.shape[-1]).all()) and bool((keep >= 0).all())
        if budget is not None:
            assert kept.shape[-1] <= budget
        for layer in range(layers):
            for head in range(kv):
                present, k = set(slots[layer, head].tolist()), set(kept[layer, head].tolist())
                assert k <= present
                if isinstance(policy, StreamingLLM):
                    assert set(range(policy.sinks)) & present <= k, "sinks dropped"
                    continue
                assert {t for t in present if anchors[t]} <= k, "an anchor was dropped"
                counts = [int((visual[kept[layer, head]] & (frame_of[kept[layer, head]] == next_frame - d)).sum())
                          for d in range(1, next_frame - layout.cond_frames + 1)]
                assert all(a >= b for a, b in zip(counts, counts[1:])), f"nearer frame keeps fewer: {counts}"


def test_packcache_stages_fill_pack_slide():
    layout = SequenceLayout(text_tokens=4, num_frames=24, height=8, width=8, row_separator=True, frame_prefix=1,
                            frame_suffix=1)
    policy = PackCache(Budget.paper_default(1, 1, 1, layout.summary()))
    sizes = []
    for slots, keep, _, _frame in simulate(layout, 1, 1, policy):
        sizes.append(slots.shape[-1] if keep is None else keep.shape[-1])
    assert sizes[0] == layout.anchor_tokens  # before frame 1: anchors only
    assert sizes[1] == layout.anchor_tokens + layout.tokens_per_frame  # fill: frame 1 kept whole
    packed = policy.budget_tokens(layout)
    assert max(sizes) <= packed
    assert len(set(sizes[5:])) == 1, "slide: the packed size must stay constant"
    # the constant size is anchors + 1/2 + 1/4 + 1/8 + 1/8 of a frame's visual tokens + four frames' specials
    assert sizes[-1] == layout.anchor_tokens + 32 + 16 + 8 + 8 + 4 * (layout.tokens_per_frame - 64)


def test_uniform_subgrid_is_nested_and_spread():
    rank = grid_priority(8, 8)
    assert sorted(rank.ravel().tolist()) == list(range(64))
    half = rank < 32
    assert half.sum(axis=0).tolist() == [4] * 8 and half.sum(axis=1).tolist() == [4] * 8  # a checkerboard
    quarter = rank < 16
    assert (quarter <= half).all(), "nested: 1/4 is a subset of 1/2"
    assert quarter[::2, ::2].all() or quarter.sum(axis=0).tolist().count(0) == 4


def test_score_selection_keeps_highest_scores():
    layout = SequenceLayout(text_tokens=2, num_frames=6, height=4, width=4)
    budget = Budget.paper_default(1, 1, 1, layout.summary())
    budget.selection = "score"
    policy = PackCache(budget)
    slots = torch.arange(layout.frame_slice(5).start).view(1, 1, -1)
    scores = torch.rand(1, 1, slots.shape[-1], generator=torch.Generator().manual_seed(0))
    kept = set(policy.keep(SlotView(token=slots, layout=layout, scores=scores), 5)[0, 0].tolist())
    last = list(range(layout.frame_slice(4).start, layout.frame_slice(4).stop))
    top = sorted(last, key=lambda t: -float(scores[0, 0, t]))[:8]
    assert set(top) <= kept and len(set(last) & kept) == 8
    with pytest.raises(BudgetError, match="selection"):
        policy.keep(SlotView(token=slots, layout=layout), 5)


def test_equalize_tops_up_with_most_recent_slots():
    keep = torch.tensor([[[True, False, False, True, False]], [[True, True, True, False, True]]])
    out = equalize(keep)
    assert out.sum(-1).tolist() == [[4], [4]]
    assert out[0, 0].tolist() == [True, False, True, True, True]


def test_budget_smaller_than_anchors_is_refused():
    layout = SequenceLayout(text_tokens=40, num_frames=4, height=4, width=4)
    budget = Budget.paper_default(1, 1, 1, layout.summary())
    PackCache(budget).check(layout, num_layers=1, num_kv_heads=1)  # anchors + history fit: accepted

    class CappedPackCache(PackCache):
        def budget_tokens(self, layout):
            return 30

    with pytest.raises(BudgetError, match="budget of 30 tokens is smaller than the 56 anchor tokens"):
        CappedPackCache(budget).check(layout, num_layers=1, num_kv_heads=1)
    with pytest.raises(BudgetError, match="max_tokens"):
        StreamingLLM(max_tokens=3, sinks=4)


def test_novelty_selection_keeps_what_changed_first_then_the_subgrid():
    layout = SequenceLayout(text_tokens=2, num_frames=7, height=4, width=4)
    budget = Budget.paper_default(1, 1, 1, layout.summary())
    budget.selection = "novelty"
    policy = PackCache(budget)
    assert policy.reads_token_ids and policy.name == "PackCache(paper, novelty)"
    rng = np.random.default_rng(0)
    cond = rng.integers(0, 50, 16)
    ids = np.full(layout.num_tokens, -1)
    ids[layout.frame_slice(0)] = cond
    changed = {}
    for f in range(1, layout.num_frames):
        grid = cond.copy()
        changed[f] = rng.choice(16, size=3, replace=False)
        grid[changed[f]] = 60 + f  # what moved in frame f
        ids[layout.frame_slice(f)] = grid
    rank = grid_priority(4, 4).ravel()

    def kept_cells(next_frame: int, batch_ids: np.ndarray) -> dict[int, set[int]]:
        slots = torch.arange(layout.frame_slice(next_frame).start).view(1, 1, -1)
        kept = policy.keep(SlotView(token=slots, layout=layout, ids=torch.from_numpy(batch_ids)), next_frame)[0, 0]
        return {f: {int(t) - layout.frame_slice(f).start for t in kept.tolist() if layout.frame[t] == f}
                for f in range(1, next_frame)}

    cells = kept_cells(5, ids[None])
    for f, count in ((4, 8), (3, 4)):  # distances 1 and 2 keep 1/2 and 1/4 of the 16 cells
        novel = set(changed[f].tolist())
        assert novel <= cells[f], (f, cells[f], novel)
        rest = sorted(set(range(16)) - novel, key=lambda c: rank[c])[: count - 3]
        assert cells[f] == novel | set(rest)
    assert cells[2] == set(sorted(changed[2].tolist(), key=lambda c: rank[c])[:2])  # 1/8: the first two by rank
    later = kept_cells(6, ids[None])
    assert all(later[f] <= cells[f] for f in range(2, 5)), "nested: an ageing frame keeps a subset"
    # batch rows share one choice: a cell novel in any row counts
    other = ids.copy()
    other[layout.frame_slice(4)] = cond
    other[layout.frame_slice(4).start + 0] = 99
    assert 0 in kept_cells(5, np.stack([ids, other]))[4]
    with pytest.raises(BudgetError, match="novelty"):
        policy.keep(SlotView(token=torch.arange(layout.frame_slice(5).start).view(1, 1, -1), layout=layout), 5)
