"""Block-by-block AR-DF training attention against the masked dense reference (forward and gradients)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from packcache.demo import PLAIN, ClipFormat, clip_layout, make_clips
from packcache.demo.block_attention import BACKEND, ArdfBlocks, register_block_attention
from packcache.demo.model import DemoVideoConfig, DemoVideoModel
from packcache.demo.train import ardf_batch, batch_logits


def _gqa_demo_model(clip_format: ClipFormat = PLAIN) -> DemoVideoModel:
    torch.manual_seed(0)
    config = DemoVideoConfig(vocab_size=clip_format.vocab_size, **clip_format.config_fields(),
                             hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [4, 2, 2]})
    return DemoVideoModel(config)


SINK = ClipFormat(video_start=True, condition_gap=32)


@pytest.mark.parametrize("frames, window, clip_format", [(3, 0, PLAIN), (7, 0, PLAIN), (7, 1, PLAIN), (7, 2, PLAIN),
                                                         (7, 2, SINK)])
def test_training_blocks_allow_exactly_what_the_ardf_mask_allows(frames, window, clip_format):
    """An independent check of the block structure: expand it to a dense mask and compare with ardf_batch's.
    With a history window w, the masked copy of frame k sees the condition frame and clean frames k-w..k-1 only.
    Text and ``<video_start>`` form the first block."""
    layout = clip_layout(frames, clip_format=clip_format)
    blocks = ArdfBlocks.training_sequence(layout.first_frame_token, layout.tokens_per_frame, frames, window)
    batch = ardf_batch(make_clips([0], frames), history_window=window, clip_format=clip_format)
    assert blocks.length == batch.ids.shape[1]
    dense = torch.zeros(blocks.length, blocks.length, dtype=torch.bool)
    for (qs, qe), seen in zip(blocks.queries, blocks.key_blocks):
        for j in seen:
            ks, ke = blocks.queries[j]
            dense[qs:qe, ks:ke] = True
    visible = batch.mask[0, 0] == 0
    assert torch.equal(dense, visible)
    text, tpf = layout.first_frame_token, layout.tokens_per_frame
    for k in range(1, frames):
        copy = text + (frames - 2 + k) * tpf  # first token of the masked copy of frame k
        seen_frames = [f for f in range(frames - 1) if visible[copy, text + f * tpf]]
        recent = range(max(1, k - window) if window else 1, k)
        assert seen_frames == [0, *recent], (k, seen_frames)
        assert visible[copy, :text].all()


@pytest.mark.parametrize("window, clip_format", [(0, PLAIN), (1, PLAIN), (1, SINK)])
def test_block_attention_matches_the_masked_dense_forward_and_gradients(window, clip_format):
    register_block_attention()
    model = _gqa_demo_model(clip_format).train()
    rng = np.random.default_rng(0)
    batch = ardf_batch(make_clips(range(3), 4), rng, query_ratio=None, full_mask_prob=0.5, history_mask_prob=1.0,
                       history_mask_max=0.6, history_window=window, clip_format=clip_format)
    results = {}
    for impl in ("sdpa", BACKEND):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = batch_logits(model, batch)
        logits.logsumexp(-1).mean().backward()
        results[impl] = logits.detach(), [p.grad.clone() for p in model.parameters()]
    (ref, ref_grads), (out, grads) = results["sdpa"], results[BACKEND]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # a different block structure gives a different answer: the blocks are what the backend computes
    model.set_attn_implementation(BACKEND)
    wrong = ArdfBlocks(batch.blocks.queries, tuple(tuple(range(i + 1)) for i in range(len(batch.blocks.queries))))
    with torch.no_grad():
        other = batch_logits(model, dataclasses.replace(batch, blocks=wrong))
    assert not torch.allclose(other, ref, atol=1e-3)


def test_block_attention_without_blocks_is_sdpa_and_rejects_a_mismatched_sequence():
    register_block_attention()
    model = _gqa_demo_model().eval()
    batch = ardf_batch(make_clips([0], 3))
    model.set_attn_implementation(BACKEND)
    with torch.no_grad():
        plain = model(input_ids=batch.ids, position_ids=batch.position_ids, attention_mask=batch.mask).logits
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=batch.ids, position_ids=batch.position_ids, attention_mask=batch.mask).logits
        torch.testing.assert_close(plain, ref)
        model.set_attn_implementation(BACKEND)
        short = ArdfBlocks.training_sequence(6, 74, 2)
        with pytest.raises(ValueError, match="ardf_blocks cover"):
            model(input_ids=batch.ids, position_ids=batch.position_ids, attention_mask=batch.mask, ardf_blocks=short)


@pytest.mark.parametrize("queries, key_blocks", [
    (((0, 4), (5, 8)), ((0,), (0, 1))),      # a gap
    (((0, 4), (4, 8)), ((0,), (1, 0))),      # unsorted
    (((0, 4), (4, 8)), ((0,), (0, 2))),      # no such block
    (((0, 4), (4, 8)), ((0,),)),             # one list missing
])
def test_blocks_reject_a_malformed_structure(queries, key_blocks):
    with pytest.raises(ValueError):
        ArdfBlocks(queries, key_blocks)
