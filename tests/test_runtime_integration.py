"""13-frame generation with the shipped demo model under every policy at equal memory, and the rendered sample."""

from __future__ import annotations

import pytest
from PIL import Image

from packcache import Budget, FullCache, PackCache, SlidingWindow, StreamingLLM
from packcache.demo import clip_layout, load_demo_model, make_clip
from packcache.demo.train import heldout_seeds
from packcache.metrics import ground_truth_accuracy, token_agreement
from packcache.render import render_gif, render_strip
from packcache.runtime import generate_video

pytestmark = pytest.mark.integration

FRAMES = 13


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def clip():
    return make_clip(heldout_seeds(1, start=9000)[0], FRAMES)


@pytest.fixture(scope="module")
def full_video(model, clip):
    return generate_video(model, clip.text, clip.frames[0], FRAMES, FullCache(), steps=8, cfg_scale=1.0,
                          progress=False)


@pytest.mark.xfail(strict=True, reason="known failure of the shipped checkpoint: in free-running generation objects "
                   "dissolve into the background within 1-2 frames (teacher-forced it recovers uncovered background "
                   "but predicts little motion)")
def test_full_cache_video_shows_the_objects_moving(full_video, clip):
    frames = full_video.frames
    moving = [bool((frames[k] != frames[k - 1]).any()) for k in range(1, 7)]
    assert all(moving), f"within the training length some frames repeat the previous one: {moving}"
    # it moves the way the ground truth does: well above copy-last-frame (0) on the cells that change
    score = ground_truth_accuracy(frames, clip.frames, start=1, stop=4)
    assert score["changed_acc"] > 0.5, score


def equal_memory(model):
    layout = clip_layout(FRAMES)
    c = model.config
    pack = PackCache(Budget.paper_default(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                                          layout.summary()))
    return layout, {"packcache": pack, "sliding_window": SlidingWindow(1),
                    "streaming_llm": StreamingLLM(max_tokens=pack.budget_tokens(layout))}


@pytest.mark.parametrize("name", ["packcache", "sliding_window", "streaming_llm"])
def test_compact_policies_generate_13_frames_at_constant_memory(model, clip, full_video, name):
    layout, policies = equal_memory(model)
    policy = policies[name]
    result = generate_video(model, clip.text, clip.frames[0], FRAMES, policy, steps=8, cfg_scale=1.0,
                            progress=False, rebase=name == "packcache")
    sizes = [r.cache_tokens[0] for r in result.records]
    assert max(sizes) <= policy.budget_tokens(layout)
    assert len(set(sizes[6:])) == 1 and len({r.kv_bytes for r in result.records[6:]}) == 1
    assert sizes[-1] < full_video.records[-1].cache_tokens[0] / 4
    # the first frames see the same cache as the full run (nothing dropped before the budget is reached)
    assert token_agreement(result.frames[:3], full_video.frames[:3]) == 1.0


def test_rendered_strip_and_gif_exist(full_video, tmp_path):
    render_strip(full_video.frames, tmp_path / "video.png")
    render_gif(full_video.frames, tmp_path / "video.gif")
    assert Image.open(tmp_path / "video.png").size[0] > Image.open(tmp_path / "video.png").size[1] * 10
    gif = Image.open(tmp_path / "video.gif")
    durations = []
    for i in range(gif.n_frames):  # Pillow merges identical consecutive frames and adds up their durations
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert sum(durations) == FRAMES * 300
