"""Compacted decoding equals one full forward whose per-layer (per-kv-head) masks hide exactly the dropped slots."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS
from reference import compacted_vs_masked, frame_chunks, output_of, per_layer_masks, visibility_masks

from packcache import Budget, CompactCache, PackCache, SequenceLayout, SlidingWindow, StreamingLLM
from packcache.cache import cache_kwargs

LAYOUT = SequenceLayout(text_tokens=5, num_frames=7, height=4, width=4, row_separator=True, frame_prefix=1,
                        frame_suffix=1, prefix_specials=1)


def budget_with(ratios) -> Budget:
    budget = Budget.paper_default(2, 4, 2, LAYOUT.summary(), model_id="tiny")
    budget.keep_ratios = ratios
    budget.decay = {"model": "exponential", "global": {"rho": 0.5}, "per_layer": None}
    budget.validate()
    return budget


def novelty_budget() -> Budget:
    budget = Budget.paper_default(2, 4, 2, LAYOUT.summary())
    budget.selection = "novelty"
    return budget


POLICIES = {
    "packcache_paper": lambda: PackCache(Budget.paper_default(2, 4, 2, LAYOUT.summary())),
    "packcache_per_layer": lambda: PackCache(budget_with([[1.0, 0.5, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125]])),
    "packcache_per_kv_head": lambda: PackCache(budget_with(
        [[[1.0, 0.5, 0.25, 0.0], [0.5, 0.5, 0.25, 0.25]], [[0.75, 0.5, 0.5, 0.25], [0.5, 0.25, 0.125, 0.125]]])),
    "packcache_novelty": lambda: PackCache(novelty_budget()),
    "sliding_window": lambda: SlidingWindow(frames=1),
    "streaming_llm": lambda: StreamingLLM(max_tokens=60, sinks=4),
}


def video_ids(seed: int = 1) -> torch.Tensor:
    """Random ids where every later frame repeats the condition frame except in about a third of its cells (so the
    novelty selection has a real choice to make)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (LAYOUT.num_tokens,), generator=gen)
    ref = torch.from_numpy(LAYOUT.cond_cell_index().copy())
    later = (ref >= 0) & (torch.from_numpy(LAYOUT.frame.copy()) >= LAYOUT.cond_frames)
    same = later & (torch.rand(LAYOUT.num_tokens, generator=gen) > 0.35)
    ids[same] = ids[ref[same]]
    return ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_compacted_decode_matches_masked_full_forward(tiny_model_name, attn, policy_name):
    factory, dims = TINY_MODELS[tiny_model_name]
    model = factory(attn)
    ids = video_ids()
    diff, cache, effect = compacted_vs_masked(model, LAYOUT, POLICIES[policy_name](),
                                              lambda sl: {"input_ids": ids[None, sl]}, dims=dims)
    assert cache.slots_per_layer()[0] < LAYOUT.num_tokens - LAYOUT.tokens_per_frame, "nothing was dropped"
    assert effect > 1e-3, "dropping slots changed nothing: the comparison would be vacuous"
    assert diff <= 1e-4, diff


def test_reference_detects_a_wrong_mask():
    """The reference is not vacuous: hiding one more slot than the cache dropped changes the outputs."""
    model = TINY_MODELS["llama"][0]("sdpa")
    ids = torch.randint(0, 96, (LAYOUT.num_tokens,), generator=torch.Generator().manual_seed(1))
    chunks = frame_chunks(LAYOUT)
    cache = CompactCache(POLICIES["packcache_paper"](), LAYOUT, model=model)
    visible = []
    with torch.no_grad():
        for chunk in chunks:
            cache.compact(int(LAYOUT.frame[chunk.start]))
            visible.append([t.clone() for t in cache.slot_tokens])
            cache.feed(chunk)
            last = model(input_ids=ids[None, chunk], **cache_kwargs(model, cache), use_cache=True,
                         position_ids=cache.position_ids(chunk, dims=1)).logits[0]
    visible[-1] = [t[:, 1:] for t in visible[-1]]  # pretend the first slot was dropped too
    masks = visibility_masks(LAYOUT.num_tokens, chunks, visible, 4, 2)
    dummy = torch.zeros(1, 1, LAYOUT.num_tokens, LAYOUT.num_tokens)
    with torch.no_grad(), per_layer_masks(model, masks):
        ref = output_of(model, model(input_ids=ids[None], attention_mask=dummy,
                                     position_ids=LAYOUT.position_ids(dims=1)))[0]
    assert float((last - ref[chunks[-1]]).abs().max()) > 1e-3
