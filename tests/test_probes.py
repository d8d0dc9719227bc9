"""The probing backend: group masses equal those summed from eager attention weights; output unchanged; hooks and
attention implementation always restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODELS
from probe_reference import eager_weights, group_mass, spatial_mass, tiny_demo
from reference import output_of

from packcache import Budget, CompactCache, PackCache, SequenceLayout
from packcache.cache import cache_kwargs
from packcache.demo import ardf_mask
from probes import AttentionProbe, ProbeError
from probes.backend import _ACTIVE

LAYOUT = SequenceLayout(text_tokens=5, num_frames=5, height=3, width=4, row_separator=True, frame_prefix=1,
                        frame_suffix=1, prefix_specials=1)
MODELS = {**TINY_MODELS, "demo": (tiny_demo, 3)}
TOL = 1e-5


def ids_for(layout: SequenceLayout, seed: int = 1, vocab: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (layout.num_tokens,), generator=torch.Generator().manual_seed(seed))


def ardf(layout: SequenceLayout) -> torch.Tensor:
    block = torch.from_numpy(layout.frame.copy())
    return ardf_mask(block, block, block, block)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "ardf_mask"])
def test_group_mass_equals_eager(name, masked):
    factory, dims = MODELS[name]
    ids, pos = ids_for(LAYOUT), LAYOUT.position_ids(dims=dims)
    mask = ardf(LAYOUT) if masked else None
    eager, model = factory("eager"), factory("sdpa")
    with torch.no_grad(), eager_weights(eager) as weights:
        eager(input_ids=ids[None], position_ids=pos, attention_mask=mask)
    ref, count = group_mass(weights, LAYOUT, max_distance=3)
    with torch.no_grad():
        plain = output_of(model, model(input_ids=ids[None], position_ids=pos, attention_mask=mask))
        with AttentionProbe(model, LAYOUT, max_distance=3, chunk_size=7) as probe:
            probed = output_of(model, model(input_ids=ids[None], position_ids=pos, attention_mask=mask))
    st = probe.stats
    assert np.abs(st.mass - ref).max() <= TOL
    assert (st.queries == count).all() and count.sum() == LAYOUT.num_frames * LAYOUT.visual_per_frame
    assert float((probed - plain).abs().max()) <= TOL
    np.testing.assert_allclose(st.mass.sum(-1), np.broadcast_to(count, st.mass.shape[:-1]), rtol=1e-5)
    if masked:  # bidirectional inside a frame: d0 gets mass from every cell of the frame, nothing from the future
        assert st.mass[..., 3].max() == 0.0


@pytest.mark.parametrize("name", ["qwen3_vl", "demo"])
def test_spatial_maps_equal_eager(name):
    factory, dims = MODELS[name]
    ids, pos, mask = ids_for(LAYOUT), LAYOUT.position_ids(dims=dims), ardf(LAYOUT)
    eager, model = factory("eager"), factory("sdpa")
    with torch.no_grad(), eager_weights(eager) as weights:
        eager(input_ids=ids[None], position_ids=pos, attention_mask=mask)
    with torch.no_grad(), AttentionProbe(model, LAYOUT, recent_frames=3, chunk_size=5) as probe:
        model(input_ids=ids[None], position_ids=pos, attention_mask=mask)
    assert np.abs(probe.stats.spatial - spatial_mass(weights, LAYOUT, 3)).max() <= TOL
    # consistent with the group masses: the d-th map sums to the d column over frames that have such a frame
    st = probe.stats
    for d in range(3):
        frames = np.arange(LAYOUT.num_frames) - d >= LAYOUT.cond_frames
        np.testing.assert_allclose(st.spatial[:, :, d].sum((-1, -2)), st.mass[:, :, frames, 4 + d].sum(-1),
                                   atol=1e-6)


CACHE_LAYOUT = SequenceLayout(text_tokens=5, num_frames=7, height=4, width=4, row_separator=True, frame_prefix=1,
                              frame_suffix=1, prefix_specials=1)


def _budget(per_kv_head: bool) -> Budget:
    budget = Budget.paper_default(2, 4, 2, CACHE_LAYOUT.summary(), model_id="tiny")
    if per_kv_head:
        budget.keep_ratios = [[[1.0, 0.5, 0.25, 0.0], [0.5, 0.5, 0.25, 0.25]],
                              [[0.75, 0.5, 0.5, 0.25], [0.5, 0.25, 0.125, 0.125]]]
        budget.validate()
    return budget


@pytest.mark.parametrize("per_kv_head", [False, True], ids=["per_layer", "per_kv_head"])
def test_group_mass_on_compact_cache_equals_eager(per_kv_head):
    """Keys come from cache.slot_tokens (per kv head): masses equal the eager weights of the same cached run."""
    factory, dims = TINY_MODELS["qwen3_vl"]
    ids = ids_for(CACHE_LAYOUT, vocab=96)
    chunks = [slice(0, CACHE_LAYOUT.frame_slice(0).stop)] + [CACHE_LAYOUT.frame_slice(f)
                                                              for f in range(1, CACHE_LAYOUT.num_frames)]

    def run(model, collect):
        cache = CompactCache(PackCache(_budget(per_kv_head)), CACHE_LAYOUT, model=model)
        outputs = []
        for chunk in chunks:
            cache.feed(chunk)
            out = model(input_ids=ids[None, chunk], **cache_kwargs(model, cache), use_cache=True,
                        position_ids=cache.position_ids(chunk, dims=dims))
            outputs.append(output_of(model, out))
            collect(chunk, [t.numpy().copy() for t in cache.slot_tokens])
            cache.compact(int(CACHE_LAYOUT.frame[chunk.stop - 1]) + 1)
        return cache, outputs

    model, eager = factory("sdpa"), factory("eager")
    with torch.no_grad():
        _, plain = run(model, lambda chunk, keys: None)
        with AttentionProbe(model, CACHE_LAYOUT, max_distance=5) as probe:
            cache, probed = run(model, lambda chunk, keys: None)
    assert cache.slots_per_layer()[0] < CACHE_LAYOUT.num_tokens - CACHE_LAYOUT.tokens_per_frame
    assert max(float((a - b).abs().max()) for a, b in zip(plain, probed)) <= TOL
    ref = np.zeros_like(probe.stats.mass)
    count = np.zeros_like(probe.stats.queries)

    def collect(chunk, keys):
        m, c = group_mass(weights, CACHE_LAYOUT, 5, queries=np.arange(chunk.start, chunk.stop), keys=keys)
        ref.__iadd__(m)
        count.__iadd__(c)

    with torch.no_grad(), eager_weights(eager) as weights:
        run(eager, collect)
    assert np.abs(probe.stats.mass - ref).max() <= TOL
    assert (probe.stats.queries == count).all()


def test_decoding_steps_are_counted_per_repeated_forward():
    factory, dims = TINY_MODELS["qwen3_vl"]
    model = factory("sdpa")
    layout = CACHE_LAYOUT
    ids = ids_for(layout, vocab=96)
    cache = CompactCache(PackCache(_budget(False)), layout, model=model)
    first, frame = slice(0, layout.frame_slice(0).stop), layout.frame_slice(1)
    with torch.no_grad(), AttentionProbe(model, layout, num_steps=4) as probe:
        for tokens, frozen in [(first, False), (frame, True), (frame, True), (frame, True), (frame, False)]:
            cache.feed(tokens)
            kwargs = dict(input_ids=ids[None, tokens], **cache_kwargs(model, cache), use_cache=True,
                          position_ids=cache.position_ids(tokens, dims=dims))
            if frozen:
                with cache.frozen():
                    model(**kwargs)
            else:
                model(**kwargs)
        with probe.step(2):  # an explicit step overrides the automatic count
            cache.feed(frame)
            with cache.frozen():
                model(input_ids=ids[None, frame], **cache_kwargs(model, cache), use_cache=True,
                      position_ids=cache.position_ids(frame, dims=dims))
    st, n = probe.stats, layout.visual_per_frame
    # forwards: first chunk (step 0), frame 1 x3 frozen (steps 0, 1, 2), appended re-encode (3), explicit step 2
    assert st.step_queries.tolist() == [2 * n, n, 2 * n, n]
    np.testing.assert_allclose(st.step_mass.sum(2), st.mass.sum(2))
    assert st.forwards == 6


def test_detach_restores_implementation_and_removes_hooks_even_on_error():
    model = TINY_MODELS["llama"][0]("eager")
    ids = ids_for(LAYOUT, vocab=96)
    with torch.no_grad():
        before = model(input_ids=ids[None]).logits
        with pytest.raises(RuntimeError, match="boom"), AttentionProbe(model, LAYOUT):
            assert model.config._attn_implementation == "packcache_probe"
            raise RuntimeError("boom")
        after = model(input_ids=ids[None]).logits
    assert model.config._attn_implementation == "eager"
    assert not _ACTIVE
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(before, after)


def test_hook_points_have_stable_names_and_are_removed():
    model = TINY_MODELS["llama"][0]("sdpa")
    ids = ids_for(LAYOUT, vocab=96)
    seen = []
    with torch.no_grad(), AttentionProbe(model, LAYOUT) as probe:
        assert probe.hook_names[:2] == ["blocks.0.attn.hook_group_mass", "blocks.0.attn.hook_spatial"]
        with pytest.raises(KeyError, match="unknown hook point"), probe.hooks({"blocks.9.attn.nope": print}):
            pass
        with probe.hooks({"blocks.1.attn.hook_group_mass": lambda t, info: seen.append((t.shape, info["layer"]))}):
            model(input_ids=ids[None])
        model(input_ids=ids[None])
    assert len(seen) == LAYOUT.num_frames and all(layer == 1 for _, layer in seen)
    assert seen[0][0][-1] == probe.stats.num_groups


def test_a_layout_shorter_than_the_sequence_is_a_clear_error():
    model = TINY_MODELS["llama"][0]("sdpa")
    short = LAYOUT.with_frames(2)
    with torch.no_grad(), AttentionProbe(model, short), pytest.raises(ProbeError, match="outside the layout"):
        model(input_ids=ids_for(LAYOUT, vocab=96)[None])


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "ardf_mask"])
def test_portable_single_call_path_is_exact_too(monkeypatch, masked):
    """Off CPU (or with dropout) the probe makes one masked sdpa call per chunk instead of merging flash calls."""
    import probes.backend as backend

    monkeypatch.setattr(backend, "_can_split", lambda query, dropout: False)
    factory, dims = TINY_MODELS["llama"]
    ids, pos = ids_for(LAYOUT, vocab=96), LAYOUT.position_ids(dims=dims)
    mask = ardf(LAYOUT) if masked else None
    eager, model = factory("eager"), factory("sdpa")
    with torch.no_grad(), eager_weights(eager) as weights:
        ref_out = eager(input_ids=ids[None], position_ids=pos, attention_mask=mask).logits
    ref, _ = group_mass(weights, LAYOUT, max_distance=3)
    with torch.no_grad(), AttentionProbe(model, LAYOUT, max_distance=3, chunk_size=9) as probe:
        out = model(input_ids=ids[None], position_ids=pos, attention_mask=mask).logits
    assert np.abs(probe.stats.mass - ref).max() <= TOL
    assert float((out - ref_out).abs().max()) <= TOL


def test_cost_check_worker_reports_time_and_memory():
    from probes.cost import _worker

    timing = _worker("time", 300, 16, 2, 1, 1, 64)
    memory = _worker("probe", 300, 16, 2, 1, 1, 64)
    assert timing["sdpa"] > 0 and timing["probe"] > 0 and isinstance(memory["peak_extra_bytes"], int)


@pytest.mark.integration
def test_group_mass_equals_eager_on_the_shipped_demo_model():
    from packcache.demo import clip_layout, clip_token_ids, make_clip
    from packcache.demo.model import DEFAULT_MODEL_DIR, load_demo_model

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("trained demo checkpoint not shipped yet")
    layout = clip_layout(4)
    clip = make_clip(5, 4)
    ids = torch.from_numpy(clip_token_ids(clip.text, clip.frames))
    pos, mask = layout.position_ids(dims=3), ardf(layout)
    eager, model = load_demo_model(attn_implementation="eager"), load_demo_model()
    with torch.no_grad(), eager_weights(eager) as weights:
        eager(input_ids=ids[None], position_ids=pos, attention_mask=mask)
    ref, _ = group_mass(weights, layout, max_distance=3)
    with torch.no_grad(), AttentionProbe(model, layout, max_distance=3) as probe:
        model(input_ids=ids[None], position_ids=pos, attention_mask=mask)
    assert np.abs(probe.stats.mass - ref).max() <= TOL
