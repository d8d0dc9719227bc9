"""Raster generation through the stock ``generate()`` with a CompactCache inside ``attach(...)`` (Emu3)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from adapter_configs import save_tiny

from packcache import Budget, CompactCache, FullCache, PackCache, SlidingWindow, attach
from packcache.adapters import adapter_for, load_model

FRAMES, HEIGHT, WIDTH = 10, 2, 3


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    model = load_model(save_tiny("emu3", str(tmp_path_factory.mktemp("emu3") / "emu3")))
    adapter = adapter_for(model)
    ids, layout = adapter.example(model.config, FRAMES, HEIGHT, WIDTH, seed=5)
    return model, adapter, ids, layout


def generate(model, adapter, ids, layout, policy):
    """Generate every frame after the conditioning one; record the position ids the decoder saw."""
    prompt = ids[:, : layout.anchor_tokens]
    cache = CompactCache(policy, layout, model=model)
    seen: list[torch.Tensor] = []
    with attach(model, cache):
        handle = adapter.decoder(model).register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
        try:
            out = model.generate(prompt, past_key_values=cache, max_new_tokens=layout.num_tokens - prompt.shape[1],
                                 do_sample=False, prefix_allowed_tokens_fn=adapter.raster_constraint(layout))
        finally:
            handle.remove()
    return out, cache, torch.cat([p.flatten() for p in seen])


def test_full_cache_through_attach_equals_plain_generate(emu3):
    """Absolute positions from the layout reproduce generate()'s own decoding exactly when nothing is dropped."""
    model, adapter, ids, layout = emu3
    out, cache, positions = generate(model, adapter, ids, layout, FullCache())
    plain = model.generate(ids[:, : layout.anchor_tokens], max_new_tokens=layout.num_tokens - layout.anchor_tokens,
                           do_sample=False, prefix_allowed_tokens_fn=adapter.raster_constraint(layout))
    assert torch.equal(out, plain)
    assert positions.tolist() == list(range(layout.num_tokens - 1))
    assert cache.slots_per_layer()[0] == layout.num_tokens - 1


@pytest.mark.parametrize("policy_name", ["packcache", "packcache_novelty", "sliding_window"])
def test_emu3_raster_generate_keeps_the_cache_constant_after_packing(emu3, policy_name):
    model, adapter, ids, layout = emu3
    config = model.config.text_config
    paper = Budget.paper_default(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                                 layout.summary())
    policy = (SlidingWindow(frames=1) if policy_name == "sliding_window" else
              PackCache(replace(paper, selection="novelty") if policy_name == "packcache_novelty" else paper))
    out, cache, positions = generate(model, adapter, ids, layout, policy)
    # attach() records what generate() fed (every token but the last, which is generated and never fed)
    assert torch.equal(cache.token_ids[0, : out.shape[1] - 1], out[0, :-1])
    # the generated stream keeps Emu3's format: it parses back into the same layout
    assert adapter.layout_from_ids(out[0]) == layout
    # positions stay absolute: every forward got the layout's 1-D positions, never the cache length
    assert positions.tolist() == list(range(layout.num_tokens - 1))
    # compaction happened exactly at the frame boundaries of the layout, before every generated frame (the final
    # <|image end|> is generated, never fed)
    assert [r.next_frame for r in cache.compactions] == list(range(layout.cond_frames, layout.num_frames))
    budget = policy.budget_tokens(layout)
    packed = [r.slots_after for r in cache.compactions if r.slots_before > budget]
    assert len(packed) >= 4, "the run never reached the Pack/Slide stage"
    # Pack, then Slide: the first pack may sit below the budget (window not yet full), then the size is constant
    assert max(packed) == budget and set(packed[1:]) == {budget}, packed
    assert max(r.slots_before for r in cache.compactions) <= budget + layout.tokens_per_frame
    assert cache.slots_per_layer()[0] < layout.num_tokens // 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_generate_through_attach_equals_the_models_own_positions(tmp_path, family):
    """generate() with the layout's 3-D positions (attach) == generate() with the model's own get_rope_index;
    the same run with another position convention does not match (the check is not vacuous)."""
    model = load_model(save_tiny(family, str(tmp_path / family)))
    adapter = adapter_for(model)
    ids, layout = adapter.example(model.config, 4, 2, 2, seed=1)  # T=4 > max(H, W)=2: text after the video
    new = 6
    layout = replace(layout, suffix_specials=layout.suffix_specials + new)  # room for the generated text
    inputs = adapter.rope_index_inputs(layout)
    inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, : ids.shape[1]]
    kw = dict(max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True, **inputs)
    plain = model.generate(ids, **kw)

    def scores_diff(lay) -> float:
        cache = CompactCache(FullCache(), lay, model=model)
        with attach(model, cache):
            out = model.generate(ids, past_key_values=cache, **kw)
        assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
        return max(float((a - b).abs().max()) for a, b in zip(out.scores, plain.scores))

    assert scores_diff(layout) <= 1e-5
    assert scores_diff(replace(layout, convention="mmrope")) > 1e-4
