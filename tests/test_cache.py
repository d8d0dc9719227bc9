"""CompactCache: temporal rebasing, constant memory, generate() integration, refusal paths."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_qwen2vl_text, tiny_qwen3vl_text
from transformers import DynamicCache

from packcache import (
    Budget,
    CompactCache,
    FullCache,
    PackCache,
    RebaseError,
    SequenceLayout,
    SlidingWindow,
    StreamingLLM,
    attach,
)
from packcache.cache import cache_kwargs, passed_cache

LAYOUT = SequenceLayout(text_tokens=5, num_frames=8, height=4, width=4, row_separator=True, frame_prefix=1,
                        frame_suffix=1, prefix_specials=1)


def feed_frames(model, cache, ids, layout, dims, upto=None):
    chunks = [slice(0, layout.frame_slice(0).stop)] + [layout.frame_slice(f) for f in range(1, upto or
                                                                                              layout.num_frames)]
    with torch.no_grad():
        for chunk in chunks:
            cache.feed(chunk)
            model(input_ids=ids[None, chunk], **cache_kwargs(model, cache), use_cache=True,
                  position_ids=cache.position_ids(chunk, dims=dims))
            cache.compact(int(layout.frame[chunk.stop - 1]) + 1)


@pytest.mark.parametrize("factory", [tiny_qwen2vl_text, tiny_qwen3vl_text])
@pytest.mark.parametrize("layout", [LAYOUT, dataclasses.replace(LAYOUT, cond_time_gap=8)], ids=["adjacent", "gap8"])
def test_rebased_keys_equal_keys_computed_at_the_new_positions(factory, layout):
    """Layer-0 keys depend only on the token and its position: recompute them from scratch at the rebased
    positions with the model's own rotary code and compare with the re-rotated cached keys. With a condition gap
    the first kept frame after the condition keeps its distance from it."""
    model = factory()
    ids = torch.randint(0, 96, (layout.num_tokens,), generator=torch.Generator().manual_seed(3))
    cache = CompactCache(PackCache(Budget.paper_default(2, 4, 2, layout.summary())), layout, model=model,
                         rebase=True)
    feed_frames(model, cache, ids, layout, 3, upto=7)
    tokens = cache.slot_tokens[0][0]
    frames = layout.frame[tokens.numpy()]
    kept_frames = sorted(set(frames[frames >= 0].tolist()))
    assert kept_frames == [0, 3, 4, 5, 6], kept_frames  # cond + the window of 4
    expected_pos = layout.pos3d[tokens.numpy()].copy()
    for rank, f in enumerate(kept_frames):
        expected_pos[frames == f, 0] = layout.frame_time(rank)
    assert not np.array_equal(expected_pos, layout.pos3d[tokens.numpy()]), "rebasing moved nothing"
    fresh = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[None, tokens], **cache_kwargs(model, fresh), use_cache=True,
              position_ids=torch.from_numpy(expected_pos.T.copy()).view(3, 1, -1))
    diff = float((fresh.layers[0].keys - cache.layers[0].keys).abs().max())
    assert diff <= 1e-5, diff
    # the next frame is placed right after the kept frames, spatial positions untouched
    nxt = cache.position_ids(layout.frame_slice(7))
    assert int(nxt[0].min()) == layout.frame_time(len(kept_frames))
    assert torch.equal(nxt[1:], layout.position_ids(layout.frame_slice(7))[1:])


def test_rebase_is_refused_for_1d_rope():
    with pytest.raises(RebaseError, match="1-D"):
        CompactCache(FullCache(), LAYOUT, model=tiny_llama(), rebase=True)


def test_constant_memory_after_packing_and_linear_growth_of_full_cache():
    layout = SequenceLayout(text_tokens=5, num_frames=24, height=4, width=4, row_separator=True, frame_prefix=1,
                            frame_suffix=1)
    model = tiny_llama()
    ids = torch.randint(0, 96, (layout.num_tokens,), generator=torch.Generator().manual_seed(0))
    budget = Budget.paper_default(2, 4, 2, layout.summary())
    caches = {"full": CompactCache(FullCache(), layout, model=model),
              "pack": CompactCache(PackCache(budget), layout, model=model)}
    sizes = {name: [] for name in caches}
    chunks = [slice(0, layout.frame_slice(0).stop)] + [layout.frame_slice(f) for f in range(1, layout.num_frames)]
    with torch.no_grad():
        for chunk in chunks:
            for name, cache in caches.items():
                cache.feed(chunk)
                model(input_ids=ids[None, chunk], **cache_kwargs(model, cache), use_cache=True,
                      position_ids=cache.position_ids(chunk, dims=1))
                cache.compact(int(layout.frame[chunk.stop - 1]) + 1)
                sizes[name].append(cache.kv_bytes())
    packed = sizes["pack"][4:]
    assert len(packed) >= 20 and len(set(packed)) == 1, packed
    growth = np.diff(sizes["full"])
    assert len(set(growth.tolist())) == 1 and growth[0] > 0, "full cache grows by one frame per frame"
    assert sizes["full"][-1] > 5 * packed[-1]


def test_frozen_forwards_do_not_grow_the_cache():
    model = tiny_qwen3vl_text()
    ids = torch.randint(0, 96, (LAYOUT.num_tokens,), generator=torch.Generator().manual_seed(0))
    cache = CompactCache(SlidingWindow(1), LAYOUT, model=model)
    feed_frames(model, cache, ids, LAYOUT, 3, upto=3)
    before = cache.slots_per_layer()
    chunk = LAYOUT.frame_slice(3)
    mask = torch.zeros(1, 1, chunk.stop - chunk.start, before[0] + chunk.stop - chunk.start)
    with torch.no_grad(), cache.frozen():
        cache.feed(chunk)
        a = model(input_ids=ids[None, chunk], **cache_kwargs(model, cache), attention_mask=mask,
                  position_ids=cache.position_ids(chunk)).last_hidden_state
    assert cache.slots_per_layer() == before
    with torch.no_grad():
        cache.feed(chunk)
        b = model(input_ids=ids[None, chunk], **cache_kwargs(model, cache), attention_mask=mask,
                  position_ids=cache.position_ids(chunk)).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6) and cache.slots_per_layer()[0] == before[0] + chunk.stop - chunk.start


def test_feed_is_required():
    model = tiny_llama()
    cache = CompactCache(FullCache(), LAYOUT, model=model)
    with pytest.raises(RuntimeError, match="feed"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)


def test_feed_records_token_ids_and_a_later_feed_overwrites():
    cache = CompactCache(FullCache(), LAYOUT, num_layers=1, num_kv_heads=1)
    assert cache.token_ids is None and cache.slot_view().ids is None
    cache.feed(slice(0, 3), torch.tensor([[7, 8, 9], [4, 5, 6]]))
    cache.feed(slice(1, 2), torch.tensor([[1], [2]]))
    assert cache.token_ids[:, :4].tolist() == [[7, 1, 9, -1], [4, 2, 6, -1]]
    assert cache.slot_view().ids is cache.token_ids
    with pytest.raises(ValueError, match="ids must be"):
        cache.feed(slice(0, 3), torch.tensor([[1, 2]]))


@pytest.mark.parametrize("policy_name", ["packcache", "sliding_window", "streaming_llm"])
def test_generate_with_attach_matches_our_own_loop(policy_name):
    """transformers' generate() driving a CompactCache through attach() decodes exactly what our own
    token-by-token loop decodes with the same policy, and the cache stays bounded."""
    layout = SequenceLayout(text_tokens=4, num_frames=6, height=2, width=3, row_separator=True, frame_prefix=1,
                            frame_suffix=1)
    model = tiny_llama()
    policies = {"packcache": lambda: PackCache(Budget.paper_default(2, 4, 2, layout.summary())),
                "sliding_window": lambda: SlidingWindow(1),
                "streaming_llm": lambda: StreamingLLM(max_tokens=30, sinks=4)}
    prompt_len = layout.frame_slice(0).stop
    prompt = torch.randint(0, 96, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    new = layout.num_tokens - prompt_len
    cache = CompactCache(policies[policy_name](), layout, model=model)
    with torch.no_grad(), attach(model, cache):
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    ours = CompactCache(policies[policy_name](), layout, model=model)
    seq = prompt[0].tolist()
    with torch.no_grad():
        chunk = slice(0, prompt_len)
        while len(seq) < layout.num_tokens:
            n = chunk.start
            offset = n - layout.first_frame_token
            if n and offset > 0 and offset % layout.tokens_per_frame == 0:
                ours.compact(offset // layout.tokens_per_frame)
            ours.feed(chunk)
            logits = model(input_ids=torch.tensor([seq[chunk]]), **cache_kwargs(model, ours), use_cache=True,
                           position_ids=layout.position_ids(chunk, dims=1)).logits
            seq.append(int(logits[0, -1].argmax()))
            chunk = slice(len(seq) - 1, len(seq))
    assert out[0].tolist() == seq
    assert [r.next_frame for r in cache.compactions] == [1, 2, 3, 4, 5]  # at every frame boundary
    budget = cache.policy.budget_tokens(layout)
    assert max(r.slots_after for r in cache.compactions) <= budget


def test_cache_is_passed_and_read_under_either_transformers_name():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old kwarg is deprecated, wrapped by a
    decorator); the forward's own signature decides which name is passed."""
    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None):
            return cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return past_key_values

    class Decorated(New):
        @functools.wraps(New.forward)
        def forward(self, *args, **kwargs):  # what transformers' deprecate_kwarg does to a forward
            return super().forward(*args, **kwargs)

    cache = DynamicCache()
    assert cache_kwargs(New(), cache) == {"cache": cache}
    assert cache_kwargs(Decorated(), cache) == {"cache": cache}
    assert cache_kwargs(Old(), cache) == {"past_key_values": cache}
    for model in (New(), Old(), Decorated()):
        assert model(**cache_kwargs(model, cache)) is cache
    assert passed_cache({"cache": cache}) is cache and passed_cache({"past_key_values": cache}) is cache
    assert passed_cache({"input_ids": None}) is None
