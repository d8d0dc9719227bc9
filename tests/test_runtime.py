"""generate_video: masked (AR-DF) and raster loops under every policy, against cache-free references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_demo_model, tiny_llama

from packcache import Budget, FullCache, PackCache, SlidingWindow, StreamingLLM
from packcache.demo import PLAIN, VOCAB, ClipFormat, ardf_mask, clip_layout, frame_token_ids, make_clip
from packcache.runtime import VideoResult, generate_video

FRAMES = 13


def policies(layout, num_layers=2, num_heads=2, num_kv_heads=2):
    pack = PackCache(Budget.paper_default(num_layers, num_heads, num_kv_heads, layout.summary()))
    return {"full": FullCache(), "packcache": pack, "sliding_window": SlidingWindow(1),
            "streaming_llm": StreamingLLM(max_tokens=pack.budget_tokens(layout))}


def reference_masked(model, text, cond, num_frames, steps, cfg_scale, clip_format=PLAIN):
    """Cache-free AR-DF MaskGIT loop: every iteration re-runs the whole sequence with a full AR-DF mask, and the
    conditional / unconditional prompts run as separate sequences."""
    layout = clip_layout(num_frames, clip_format=clip_format)
    vis = np.flatnonzero(layout.row[layout.frame_slice(0)] >= 0)
    frames = [np.asarray(cond)]
    cells = layout.height * layout.width
    for k in range(1, num_frames):
        grid = np.full(cells, VOCAB.mask)
        known = np.zeros(cells, dtype=bool)
        end = layout.frame_slice(k).stop
        block = torch.from_numpy(layout.frame[:end].copy())
        mask = ardf_mask(block, block, block, block)
        pos = layout.position_ids(slice(0, end))
        for it in range(steps):
            rows = []
            for t in (text, VOCAB.null_prompt(len(text))):
                ids = np.concatenate([t, clip_format.prefix_ids] + [frame_token_ids(f) for f in frames] +
                                     [frame_token_ids(grid.reshape(layout.height, layout.width))])
                with torch.no_grad():
                    out = model(input_ids=torch.from_numpy(ids)[None], position_ids=pos, attention_mask=mask)
                rows.append(out.logits[0, layout.frame_slice(k).start + vis])
            logits = rows[0] if cfg_scale == 1.0 else rows[1] + cfg_scale * (rows[0] - rows[1])
            probs = logits.softmax(-1)
            tokens, conf = probs.argmax(-1).numpy(), probs.max(-1).values.numpy()
            keep_masked = 0 if it == steps - 1 else max(0, min(math.floor(cells * math.cos(math.pi / 2 * (it + 1) /
                                                                                          steps)),
                                                            int((~known).sum()) - 1))
            conf = np.where(known, np.inf, conf)
            order = np.argsort(-conf, kind="stable")[: cells - keep_masked]
            new = order[~known[order]]
            grid[new] = tokens[new]
            known[new] = True
        frames.append(grid.reshape(layout.height, layout.width))
    return np.stack(frames)


@pytest.mark.parametrize("cfg_scale, clip_format", [(1.0, PLAIN), (3.0, PLAIN),
                                                     (3.0, ClipFormat(video_start=True, condition_gap=32))])
def test_masked_full_cache_equals_cache_free_reference(cfg_scale, clip_format):
    """Also in a format with ``<video_start>`` and the frames far from the condition: the model's config says
    which, and the cache path follows it."""
    model = tiny_demo_model(clip_format)
    clip = make_clip(1, 4)
    result = generate_video(model, clip.text, clip.frames[0], 4, FullCache(), steps=3, cfg_scale=cfg_scale,
                            progress=False)
    ref = reference_masked(model, clip.text, clip.frames[0], 4, 3, cfg_scale, clip_format)
    np.testing.assert_array_equal(result.frames, ref)
    assert (result.frames[1:] < VOCAB.num_colours).all(), "a mask token survived the last iteration"


def test_masked_iterations_do_not_store_the_current_frame():
    model = tiny_demo_model()
    clip = make_clip(2, 5)
    layout = clip_layout(5)
    result = generate_video(model, clip.text, clip.frames[0], 5, FullCache(), steps=4, progress=False)
    tokens = [r.cache_tokens[0] for r in result.records]
    # prefill holds text + condition; each later frame adds exactly one frame's tokens, whatever the step count
    assert tokens[0] == layout.anchor_tokens
    assert tokens[1:] == [layout.anchor_tokens + (k - 1) * layout.tokens_per_frame for k in range(1, 5)]
    assert [r.forwards for r in result.records[1:]] == [5] * 4


@pytest.mark.parametrize("name", ["full", "packcache", "sliding_window", "streaming_llm"])
def test_masked_13_frames_under_every_policy(name):
    model = tiny_demo_model()
    layout = clip_layout(FRAMES)
    policy = policies(layout)[name]
    clip = make_clip(3, FRAMES)
    result = generate_video(model, clip.prompt, clip.frames[0], FRAMES, policy, steps=2, progress=False)
    assert result.frames.shape == (FRAMES, 8, 8)
    np.testing.assert_array_equal(result.frames[0], clip.frames[0])
    sizes = [r.cache_tokens[0] for r in result.records]
    budget = policy.budget_tokens(layout)
    if budget is None:
        assert sizes[-1] == layout.anchor_tokens + (FRAMES - 2) * layout.tokens_per_frame
    else:
        assert max(sizes) <= budget
        assert len(set(sizes[6:])) == 1, f"cache size not constant after packing: {sizes}"
    assert all(r.kv_bytes > 0 and r.seconds > 0 for r in result.records)


def test_packcache_cache_is_constant_and_at_budget_after_packing_with_rebase():
    model = tiny_demo_model()
    layout = clip_layout(FRAMES)
    pack = policies(layout)["packcache"]
    clip = make_clip(4, FRAMES)
    result = generate_video(model, clip.text, clip.frames[0], FRAMES, pack, steps=2, rebase=True,
                            history_mask_ratio=0.5, progress=False)
    sizes = [r.cache_tokens[0] for r in result.records]
    assert sizes[5:] == [pack.budget_tokens(layout)] * (FRAMES - 5)
    assert len({r.kv_bytes for r in result.records[5:]}) == 1


def test_same_seed_same_video_and_sampling_depends_on_seed():
    model = tiny_demo_model()
    clip = make_clip(5, 4)
    runs = [generate_video(model, clip.text, clip.frames[0], 4, FullCache(), steps=2, temperature=1.0, seed=s,
                           progress=False).frames for s in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_result_json_round_trip_without_torch_types(tmp_path):
    model = tiny_demo_model()
    clip = make_clip(6, 4)
    result = generate_video(model, clip.text, clip.frames[0], 4, SlidingWindow(1), steps=2, progress=False)
    path = tmp_path / "video.json"
    result.save(path)
    raw = json.loads(path.read_text())
    assert raw["schema"] == "packcache.video/v1" and raw["meta"]["policy"] == "SlidingWindow(1)"
    back = VideoResult.load(path)
    np.testing.assert_array_equal(back.frames, result.frames)
    assert back.records == result.records


def test_bad_requests_fail_with_clear_errors():
    model = tiny_demo_model()
    clip = make_clip(0, 4)
    with pytest.raises(ValueError, match="mode"):
        generate_video(model, clip.text, clip.frames[0], 4, FullCache(), mode="diffusion", progress=False)
    with pytest.raises(ValueError, match="8x8"):
        generate_video(model, clip.text, clip.frames[0][:4], 4, FullCache(), progress=False)
    with pytest.raises(ValueError, match="prompt word"):
        generate_video(model, "purple up 1", clip.frames[0], 4, FullCache(), progress=False)
    sink_model = tiny_demo_model(ClipFormat(video_start=True))
    with pytest.raises(ValueError, match="1 specials before frame 0, the model's sequence format 0"):
        generate_video(model, clip.text, clip.frames[0], 4, FullCache(), progress=False,
                       layout=clip_layout(4, clip_format=ClipFormat(video_start=True)))
    with pytest.raises(ValueError, match="0 specials before frame 0, the model's sequence format 1"):
        generate_video(sink_model, clip.text, clip.frames[0], 4, FullCache(), progress=False, layout=clip_layout(4))


# ------------------------------------------------------------------------------------------------------------
# raster mode on a tiny raster (causal) model


def reference_raster(model, text, cond, num_frames):
    """Cache-free greedy raster decoding: a full causal forward over everything so far for every visual token."""
    layout = clip_layout(num_frames)
    ids = list(np.concatenate([text, frame_token_ids(cond)]))
    out_frames = [cond]
    for _k in range(1, num_frames):
        template = frame_token_ids(np.zeros((8, 8), dtype=np.int64))
        is_visual = layout.row[layout.frame_slice(1)] >= 0
        cells = []
        for j, tok in enumerate(template):
            if is_visual[j]:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1, : VOCAB.num_colours]
                tok = int(logits.argmax())
                cells.append(tok)
            ids.append(int(tok))
        out_frames.append(np.array(cells).reshape(8, 8))
    return np.stack(out_frames)


def test_raster_full_cache_equals_cache_free_reference():
    model = tiny_llama(vocab=VOCAB.size)
    clip = make_clip(7, 3)
    result = generate_video(model, clip.text, clip.frames[0], 3, FullCache(), mode="raster", cfg_scale=1.0,
                            progress=False)
    np.testing.assert_array_equal(result.frames, reference_raster(model, clip.text, clip.frames[0], 3))
    assert [r.forwards for r in result.records[1:]] == [clip_layout(3).tokens_per_frame] * 2


@pytest.mark.integration
@pytest.mark.parametrize("name", ["full", "packcache", "sliding_window", "streaming_llm"])
def test_raster_13_frames_under_every_policy(name):
    model = tiny_llama(vocab=VOCAB.size)
    layout = clip_layout(FRAMES)
    policy = policies(layout, num_layers=2, num_heads=4, num_kv_heads=2)[name]
    clip = make_clip(8, FRAMES)
    result = generate_video(model, clip.text, clip.frames[0], FRAMES, policy, mode="raster", cfg_scale=1.0,
                            progress=False)
    assert result.frames.shape == (FRAMES, 8, 8) and (result.frames < VOCAB.num_colours).all()
    sizes = [r.cache_tokens[0] for r in result.records]
    budget = policy.budget_tokens(layout)
    if budget is not None:
        assert max(sizes) <= budget and len(set(sizes[6:])) == 1, sizes
    else:
        assert sizes == sorted(sizes) and sizes[-1] > sizes[1]
