"""13-frame generation with the shipped demo model under every policy at equal memory, and the rendered sample."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from packcache import Budget, FullCache, PackCache, SlidingWindow, StreamingLLM
from packcache.demo import ClipFormat, clip_layout, load_demo_model, make_clip, make_clips
from packcache.demo.train import heldout_seeds
from packcache.metrics import ground_truth_accuracy, teacher_forced, token_agreement
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


#: Free-running (full cache, frames 1-6 of 8 held-out clips): accuracy on the cells that change must exceed this;
#: copy-last-frame scores 0 there.
MOTION_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def training_length_videos(model):
    clips = make_clips(heldout_seeds(8, start=9000), 7)
    videos = [generate_video(model, c.text, c.frames[0], 7, FullCache(), steps=8, cfg_scale=1.0, progress=False)
              for c in clips]
    return clips, np.stack([v.frames for v in videos])


def _object_sizes(clips, generated) -> np.ndarray:
    """Cells of each named object's colour in generated frames 1.. of the clips without an occluder."""
    return np.concatenate([(frames[1:] == colour).sum(axis=(1, 2)) for clip, frames in zip(clips, generated)
                           if not clip.info["occluder"] for colour in clip.object_colours])


def test_full_cache_videos_keep_their_objects_and_change(training_length_videos):
    """What the shipped checkpoint does reach free-running (0.854 and 0.833; an early one scored 0.29 and 0.0)."""
    clips, generated = training_length_videos
    changes = (generated[:, 1:] != generated[:, :-1]).any(axis=(2, 3))
    assert changes.mean() > 0.8, f"frames repeat the previous one: {changes}"
    sizes = _object_sizes(clips, generated)
    assert np.mean(sizes >= 2) > 0.6, f"objects dissolve into the background: {sizes}"


@pytest.mark.xfail(strict=True, reason="known limitation of the shipped checkpoint (README): free-running, it moves "
                   "the changed cells right (0.52) but its objects keep 3-5 cells in only 0.60 of frames")
def test_full_cache_videos_show_the_objects_moving(training_length_videos):
    clips, generated = training_length_videos
    truth = np.stack([c.frames for c in clips])
    # it moves the way the ground truth does, well above copy-last-frame (0) on the cells that change
    score = ground_truth_accuracy(generated, truth, start=1)
    assert score["changed_acc"] > MOTION_THRESHOLD, score
    # objects stay objects: without an occluder, each named 2x2 object keeps 3-5 cells of its colour
    sizes = _object_sizes(clips, generated)
    assert np.mean((sizes >= 3) & (sizes <= 5)) > 0.8, sizes


def equal_memory(model):
    layout = clip_layout(FRAMES, clip_format=ClipFormat.of(model.config))  # the sequence the model is run on
    c = model.config
    pack = PackCache(Budget.paper_default(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                                          layout.summary()))
    novelty = PackCache(dataclasses.replace(pack.budget, selection="novelty"))
    return layout, {"packcache": pack, "packcache_novelty": novelty, "sliding_window": SlidingWindow(1),
                    "streaming_llm": StreamingLLM(max_tokens=pack.budget_tokens(layout))}


@pytest.mark.parametrize("name", ["packcache", "packcache_novelty", "sliding_window", "streaming_llm"])
def test_compact_policies_generate_13_frames_at_constant_memory(model, clip, full_video, name):
    layout, policies = equal_memory(model)
    policy = policies[name]
    result = generate_video(model, clip.text, clip.frames[0], FRAMES, policy, steps=8, cfg_scale=1.0,
                            progress=False, rebase=name.startswith("packcache"))
    sizes = [r.cache_tokens[0] for r in result.records]
    assert max(sizes) <= policy.budget_tokens(layout)
    assert len(set(sizes[6:])) == 1 and len({r.kv_bytes for r in result.records[6:]}) == 1
    assert sizes[-1] < full_video.records[-1].cache_tokens[0] / 4
    # the first frames see the same cache as the full run (nothing dropped before the budget is reached)
    assert token_agreement(result.frames[:3], full_video.frames[:3]) == 1.0


def test_novelty_selection_keeps_the_motion_the_uniform_subgrid_loses(model):
    """Teacher-forced beyond the training length (frames 7-12) at equal memory: keeping the history cells that
    differ from the condition frame first recovers the moving objects the paper's uniform sub-grid drops. The
    shipped checkpoint: changed cells 0.709 against 0.600, overall 0.943 against 0.929, NLL 0.1805 against 0.1797
    (the previous checkpoint gained 0.18 on changed cells and lowered the NLL; the fidelity benchmark's 3 x 16
    clips put the spread of changed-cell accuracy over seeds at about 0.012)."""
    clips = make_clips(heldout_seeds(16, start=30_000), FRAMES)
    _, policies = equal_memory(model)
    score = {name: teacher_forced(model, clips, policies[name]).summary(7, 13)
             for name in ("packcache", "packcache_novelty")}
    uniform, novelty = score["packcache"], score["packcache_novelty"]
    assert novelty["changed_acc"] > uniform["changed_acc"] + 0.05, score
    assert novelty["acc"] >= uniform["acc"] and novelty["nll"] < 1.02 * uniform["nll"], score


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
