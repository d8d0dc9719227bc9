"""Demo clips, vocabulary and layout; the demo model's save/load, rotary detection and AR-DF mask."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import packcache.demo.train as train_module
from packcache import FullCache, SequenceLayout
from packcache.demo import (
    PLAIN,
    VOCAB,
    ClipFormat,
    DemoVideoConfig,
    DemoVideoModel,
    ardf_mask,
    clip_layout,
    clip_token_ids,
    decode_prompt,
    encode_prompt,
    frame_token_ids,
    load_demo_model,
    make_clip,
    make_clips,
    reverse_directions,
)
from packcache.demo.clips import COLOUR_NAMES, DIRECTIONS, GRID, OBJ, SCALES, Clip, visual_index
from packcache.demo.train import MOTION_KINDS, TrainConfig, ardf_batch, motion_kind, object_exactness, train
from packcache.rope import rotary_layout_of
from packcache.runtime import generate_video


def tiny_config(**kw) -> DemoVideoConfig:
    return DemoVideoConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [4, 2, 2]},
                           **kw)


def test_clips_are_deterministic_by_seed_and_differ_across_seeds():
    a, b, c = make_clip(11, 7), make_clip(11, 7), make_clip(12, 7)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.text, b.text)
    assert not np.array_equal(a.frames, c.frames)
    # a longer clip extends the shorter one
    np.testing.assert_array_equal(make_clip(11, 13).frames[:7], a.frames)


def test_clip_content_matches_its_prompt():
    for seed in range(40):
        clip = make_clip(seed, 9)
        assert clip.frames.min() >= 0 and clip.frames.max() < VOCAB.num_colours
        words = clip.prompt.split()
        assert len(words) == 3 * clip.info["objects"]
        np.testing.assert_array_equal(encode_prompt(clip.prompt), clip.text)
        colours = [COLOUR_NAMES.index(w) for w in words[::3]]
        assert clip.object_colours == colours
        if not clip.info["occluder"]:
            # without an occluder every named object is a full 2x2 block in every frame
            for f in clip.frames:
                for col in colours[-1:]:  # the top-drawn object is never covered
                    assert (f == col).sum() >= 4


def test_objects_follow_the_prompt_at_frame_1_then_turn_at_the_given_rate():
    """Single-object clips without an occluder, speed 1: the object's top-left corner moves as the prompt says
    (reflected at the walls) from frame 0 to 1; each later step continues the motion (reflected at the walls)
    except for turns, which happen at ``turn_prob`` per step. Without the option the clip is unchanged."""
    hi, turn_prob = GRID - OBJ, 0.1

    def step(corner, velocity):  # constant motion, reflected at the walls
        nxt, vel = corner + velocity, velocity.copy()
        for i in range(2):
            if not 0 <= nxt[i] <= hi:
                nxt[i], vel[i] = (-nxt[i], -vel[i]) if nxt[i] < 0 else (2 * hi - nxt[i], -vel[i])
        return nxt, vel

    steps, turned = 0, 0
    for seed in range(500):
        clip, plain = make_clip(seed, 9, turn_prob=turn_prob), make_clip(seed, 9)
        np.testing.assert_array_equal(clip.frames[:2], plain.frames[:2])
        np.testing.assert_array_equal(clip.text, plain.text)
        assert plain.info["turns"] == 0 and (clip.info["turns"] > 0 or np.array_equal(clip.frames, plain.frames))
        words = clip.prompt.split()
        if clip.info["objects"] != 1 or clip.info["occluder"] or words[2] != "1":
            continue
        corner = [np.argwhere(f == clip.object_colours[0]).min(axis=0) for f in clip.frames]
        expected, velocity = step(corner[0], np.array(DIRECTIONS[words[1]]))
        np.testing.assert_array_equal(corner[1], expected)
        for t in range(2, len(corner)):
            expected, continued = step(corner[t - 1], velocity)
            steps += 1
            turned += not np.array_equal(corner[t], expected)
            velocity = continued if np.array_equal(corner[t], expected) else corner[t] - corner[t - 1]
    assert steps > 1000 and abs(turned / steps - turn_prob) < 0.03, (turned, steps)


def test_motion_needs_more_than_the_last_frame():
    frames = np.stack([c.frames for c in make_clips(range(200), 13)])
    changed = (frames[:, 1:] != frames[:, :-1]).mean()
    assert 0.05 < changed < 0.2
    # some cells that change back to an earlier value reappear from 3+ frames ago (uncovered background, occlusion)
    now, prev1, prev2, prev4 = frames[:, 4:], frames[:, 3:-1], frames[:, 2:-2], frames[:, :-4]
    reappear = (now != prev1) & (now != prev2) & (now == prev4)
    assert reappear.mean() > 0.005


def _hand_clip(prompt: str, corners: list[list[tuple[int, int]]]) -> Clip:
    """A clip drawn by hand: plain background (colour 0), the prompt's objects at ``corners[frame][object]``."""
    text = encode_prompt(prompt)
    frames = np.zeros((len(corners), GRID, GRID), dtype=np.int64)
    colours = [VOCAB.colour_words.index(int(w)) for w in text[0::3] if int(w) in VOCAB.colour_words]
    for f, placed in enumerate(corners):
        for colour, (y, x) in zip(colours, placed):
            frames[f, y : y + OBJ, x : x + OBJ] = colour
    return Clip(frames=frames, text=text)


def test_motion_kind_tells_the_prompt_cases_and_bounces():
    # one object moving right at speed 1 from column 3 hits the right wall (column 6) and comes back
    right = _hand_clip("green right 1", [[(2, 3)], [(2, 4)], [(2, 5)], [(2, 6)], [(2, 5)], [(2, 4)]])
    assert [motion_kind(right, 0, k) for k in range(1, 6)] == ["first_one", "straight", "straight", "deflected",
                                                                "straight"]
    same = _hand_clip("green right 1 blue right 1", [[(0, 0), (4, 0)], [(0, 1), (4, 1)]])
    different = _hand_clip("green right 1 blue down 1", [[(0, 0), (4, 0)], [(0, 1), (5, 0)]])
    assert motion_kind(same, 1, 1) == "first_two_same" and motion_kind(different, 1, 1) == "first_two_different"
    # an object that is not a whole 2x2 block in the frames that tell is left out
    overlapped = _hand_clip("green right 1 blue left 1", [[(0, 0), (0, 3)], [(0, 1), (0, 2)]])
    assert motion_kind(overlapped, 0, 1) is None


def test_object_exactness_scores_the_truth_1_and_copy_last_frame_0():
    clips = [c for c in make_clips(range(60), 7) if not c.info["occluder"]]
    truth = np.stack([c.frames[1:] for c in clips])
    perfect = object_exactness(truth, clips)
    copied = object_exactness(np.stack([c.frames[:-1] for c in clips]), clips)
    for kind in MOTION_KINDS:
        assert perfect[f"n_{kind}"] == copied[f"n_{kind}"] > 0, kind
        assert perfect[f"exact_{kind}"] == 1.0
        # every object moves every frame, except a fast one that bounces back onto its own place
        assert copied[f"exact_{kind}"] == 0.0 if kind != "deflected" else 0.0 < copied[f"exact_{kind}"] < 0.5
    # one stray cell of an object's colour elsewhere makes that object inexact
    stray = truth.copy()
    colour = clips[0].object_colours[0]
    y, x = np.argwhere(stray[0, 0] != colour)[0]
    stray[0, 0, y, x] = colour
    kind = motion_kind(clips[0], 0, 1)
    assert object_exactness(stray, clips)[f"exact_{kind}"] == 1 - 1 / perfect[f"n_{kind}"]


def test_token_ids_parse_back_to_the_clip_layout():
    clip = make_clip(3, 5)
    ids = clip_token_ids(clip.text, clip.frames)
    layout = SequenceLayout.from_token_ids(ids, VOCAB.special_tokens(), convention="mmrope", scales=SCALES)
    assert layout == clip_layout(5)
    visual = ids[layout.row >= 0].reshape(5, 8, 8)
    np.testing.assert_array_equal(visual, clip.frames)


def test_video_start_format_parses_back_with_the_sink_after_the_text():
    fmt = ClipFormat(video_start=True, condition_gap=32)
    clip = make_clip(3, 4)
    ids = clip_token_ids(clip.text, clip.frames, clip_format=fmt)
    assert ids[len(clip.text)] == VOCAB.video_start and len(ids) == len(clip_token_ids(clip.text, clip.frames)) + 1
    layout = SequenceLayout.from_token_ids(ids, VOCAB.special_tokens(), convention="mmrope", scales=SCALES,
                                           cond_time_gap=32)
    assert layout == clip_layout(4, clip_format=fmt) and layout.prefix_specials == 1
    assert layout.frame_time(1) - layout.frame_time(0) == 32 * SCALES[0]
    np.testing.assert_array_equal(ids[layout.row >= 0].reshape(4, 8, 8), clip.frames)
    assert PLAIN.vocab_size == VOCAB.video_start < fmt.vocab_size == VOCAB.size
    with pytest.raises(ValueError, match="condition_gap must be >= 1"):
        ClipFormat(condition_gap=0)


def test_prompt_round_trip_and_errors():
    assert decode_prompt(encode_prompt("red right 1 blue down 2")) == "red right 1 blue down 2"
    assert len(encode_prompt("red right 1")) == 6
    with pytest.raises(ValueError, match="triples"):
        encode_prompt("red right")
    with pytest.raises(ValueError, match="unknown prompt word"):
        encode_prompt("red sideways 1")


def test_reverse_directions_swaps_only_the_direction_words():
    text = encode_prompt("red right 1 blue up 2")
    assert decode_prompt(reverse_directions(text)) == "red left 1 blue down 2"
    np.testing.assert_array_equal(reverse_directions(reverse_directions(text)), text)
    np.testing.assert_array_equal(reverse_directions(VOCAB.null_prompt()), VOCAB.null_prompt())


def test_bound_words_give_each_objects_motion_words_ids_of_its_colour():
    bound = ClipFormat(bound_words=True)
    text = encode_prompt("red left 1 blue down 2")
    ids = bound.text_ids(text)
    red, blue = COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    left, down = list(DIRECTIONS).index("left"), list(DIRECTIONS).index("down")
    np.testing.assert_array_equal(ids, [text[0], VOCAB.bound_directions + 4 * red + left, VOCAB.bound_speeds + 2 * red,
                                        text[3], VOCAB.bound_directions + 4 * blue + down,
                                        VOCAB.bound_speeds + 2 * blue + 1])
    assert VOCAB.size <= ids[1:3].min() and ids.max() < bound.vocab_size == VOCAB.bound_size
    # the same words bind to different ids for different objects; padding and the null prompt stay as they are
    assert bound.text_ids(encode_prompt("blue left 1"))[1] != ids[1]
    np.testing.assert_array_equal(bound.text_ids(encode_prompt("red left 1"))[3:], text[3:] * 0 + VOCAB.none_word)
    np.testing.assert_array_equal(bound.text_ids(VOCAB.null_prompt()), VOCAB.null_prompt())
    np.testing.assert_array_equal(PLAIN.text_ids(text), text)
    # every path that builds a sequence reads the prompt as the format does
    clips = make_clips(range(3), 3)
    batch = ardf_batch(clips, clip_format=bound)
    for clip, row in zip(clips, batch.ids.numpy()):
        np.testing.assert_array_equal(row[: len(clip.text)], bound.text_ids(clip.text))
        np.testing.assert_array_equal(clip_token_ids(clip.text, clip.frames, clip_format=bound)[: len(clip.text)],
                                      bound.text_ids(clip.text))


def test_model_saves_and_loads_offline(tmp_path):
    torch.manual_seed(0)
    model = DemoVideoModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    back = DemoVideoModel.from_pretrained(tmp_path).eval()
    assert back.config.packcache_rotary == "mrope_interleaved"
    assert rotary_layout_of(back).kind == "mrope_interleaved"
    batch = ardf_batch(make_clips(range(2), 3))
    with torch.no_grad():
        a = model(batch.ids, batch.position_ids.expand(3, 2, -1), batch.mask.expand(2, -1, -1, -1)).logits
        b = back(batch.ids, batch.position_ids.expand(3, 2, -1), batch.mask.expand(2, -1, -1, -1)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_config_records_its_clip_format_and_loading_checks_the_vocabulary(tmp_path):
    fmt = ClipFormat(video_start=True, condition_gap=32)
    DemoVideoModel(tiny_config(vocab_size=fmt.vocab_size, **fmt.config_fields())).save_pretrained(tmp_path / "sink")
    assert ClipFormat.of(load_demo_model(tmp_path / "sink").config) == fmt
    assert ClipFormat.of(DemoVideoModel(tiny_config()).config) == PLAIN  # and checkpoints from before the options
    bound = ClipFormat(video_start=True, condition_gap=32, bound_words=True)
    DemoVideoModel(tiny_config(vocab_size=bound.vocab_size, **bound.config_fields())).save_pretrained(tmp_path / "b")
    assert ClipFormat.of(load_demo_model(tmp_path / "b").config) == bound
    DemoVideoModel(tiny_config(**fmt.config_fields())).save_pretrained(tmp_path / "short")  # 24 ids: no sink id
    with pytest.raises(ValueError, match="needs 25 token ids, the model embeds 24"):
        load_demo_model(tmp_path / "short")


def test_ardf_mask_is_causal_across_frames_and_bidirectional_within():
    torch.manual_seed(0)
    model = DemoVideoModel(tiny_config()).eval()
    layout = clip_layout(3)
    clip = make_clip(0, 3)
    ids = torch.from_numpy(clip_token_ids(clip.text, clip.frames))[None]
    block = torch.from_numpy(layout.frame.copy())
    mask = ardf_mask(block, block, block, block)
    pos = layout.position_ids()

    def logits(x):
        with torch.no_grad():
            return model(x, pos, mask).logits[0]

    base = logits(ids)
    f1 = layout.frame_slice(1)
    changed = ids.clone()
    changed[0, f1.stop - 3] = (changed[0, f1.stop - 3] + 1) % VOCAB.num_colours  # last row of frame 1
    out = logits(changed)
    torch.testing.assert_close(out[: f1.start], base[: f1.start], rtol=0, atol=0)  # the past ignores it
    assert (out[f1.start : f1.start + 5] - base[f1.start : f1.start + 5]).abs().max() > 1e-4  # its frame sees it
    assert (out[layout.frame_slice(2)] - base[layout.frame_slice(2)]).abs().max() > 1e-4  # the future sees it


def test_ardf_batch_shows_a_given_past_and_hides_the_least_confident_cells():
    frames, cells = 4, 64
    clips = make_clips(range(2), frames)
    clean = ardf_batch(clips)
    past = np.stack([c.frames.reshape(frames, -1) for c in clips])
    past = (past + 1) % VOCAB.num_colours  # every cell differs from the clip, frame 0 included
    confidence = np.random.default_rng(1).random((2, frames - 1, cells))
    confidence[1] = np.inf  # clip 1 keeps the random tube
    b = ardf_batch(clips, np.random.default_rng(0), query_ratio=0.25, past=past, confidence=confidence)
    # targets and changed cells still come from the clips
    assert torch.equal(b.targets, clean.targets) and torch.equal(b.changed, clean.changed)
    # the copies see the condition frame, then the given past
    layout = clip_layout(frames)
    seen = [clips[0].frames[0]] + [past[0, k].reshape(clips[0].frames[0].shape) for k in (1, 2)]
    history = b.ids[0, layout.text_tokens : layout.text_tokens + 3 * layout.tokens_per_frame].numpy()
    np.testing.assert_array_equal(history, np.concatenate([frame_token_ids(g) for g in seen]))
    # clip 0 hides the 16 least confident cells of each frame, clip 1 the same 16 cells in every frame
    lowest = np.argsort(confidence[0], axis=1)[:, :16]
    for k in range(frames - 1):
        assert set(np.flatnonzero(b.masked[0, k].numpy())) == set(lowest[k])
    assert b.masked[1].sum(axis=1).tolist() == [16] * 3 and (b.masked[1] == b.masked[1, 0]).all()
    assert not (b.masked[0] == b.masked[0, 0]).all()
    # hidden cells carry the mask token, the others their true colour
    for j in range(2):
        ids = b.ids[j, b.query_at].numpy()
        assert (ids[b.masked[j].numpy()] == VOCAB.mask).all()
        assert (ids[~b.masked[j].numpy()] != VOCAB.mask).all()


def test_ardf_batch_noises_history_colours_but_never_the_condition_frame():
    frames = 4
    clips = make_clips(range(4), frames)
    clean = ardf_batch(clips)
    b = ardf_batch(clips, np.random.default_rng(0), history_noise_prob=1.0, history_noise_max=0.5)
    layout = clip_layout(frames)
    tpf, text = layout.tokens_per_frame, layout.text_tokens
    # the copies, their targets and the condition frame are untouched
    assert torch.equal(b.ids[:, text + 3 * tpf :], clean.ids[:, text + 3 * tpf :])
    assert torch.equal(b.targets, clean.targets)
    assert torch.equal(b.ids[:, : text + tpf], clean.ids[:, : text + tpf])
    # history frames 1..2 get random colours on some visual cells: specials stay, nothing is masked
    history = slice(text + tpf, text + 3 * tpf)
    differs = (b.ids[:, history] != clean.ids[:, history]).numpy()
    cells = visual_index(layout)
    visual = np.concatenate([cells, cells + tpf])
    assert not differs[:, np.setdiff1d(np.arange(2 * tpf), visual)].any()
    assert differs.mean() > 0 and differs[:, visual].mean() < 0.5
    assert (b.ids[:, history][torch.from_numpy(differs)] < VOCAB.num_colours).all()


def _training_order(layout: SequenceLayout) -> np.ndarray:
    """Layout token indices in ardf_batch's order: text and prefix specials, clean frames 0..T-2, copies of 1..T-1."""
    frames = layout.num_frames
    return np.concatenate([np.arange(layout.first_frame_token)]
                          + [np.arange(layout.frame_slice(f).start, layout.frame_slice(f).stop)
                             for f in [*range(frames - 1), *range(1, frames)]])


def test_ardf_batch_prompt_gap_puts_the_frames_where_a_longer_prompt_would():
    frames, gap = 3, 4
    clips = make_clips(range(2), frames)
    plain, shifted = ardf_batch(clips), ardf_batch(clips, prompt_gap=gap)
    text = clip_layout(frames).text_tokens
    assert torch.equal(shifted.ids, plain.ids) and torch.equal(shifted.mask, plain.mask)
    assert torch.equal(shifted.position_ids[..., :text], plain.position_ids[..., :text])
    # the frames sit at the positions of a layout whose prompt is `gap` tokens longer
    longer = clip_layout(frames, text_tokens=text + gap)
    order = _training_order(longer)[longer.first_frame_token:]
    np.testing.assert_array_equal(shifted.position_ids[:, 0, text:].numpy(), longer.pos3d[order].T)


@pytest.mark.parametrize("stride", [2, 4])
def test_ardf_batch_time_stride_puts_the_frames_where_a_lower_frame_rate_would(stride):
    """Independent reference: a layout whose time axis advances ``stride`` per frame, with the condition frame
    32 // stride of those steps back, has frame 1 where the 32-step gap puts it and every later frame ``stride``
    steps after the previous one."""
    fmt = ClipFormat(video_start=True, condition_gap=32)
    frames = 4
    clips = make_clips(range(2), frames)
    plain, strided = ardf_batch(clips, clip_format=fmt), ardf_batch(clips, clip_format=fmt, time_stride=stride)
    assert torch.equal(strided.ids, plain.ids) and torch.equal(strided.mask, plain.mask)
    layout = clip_layout(frames, clip_format=fmt)
    slower = dataclasses.replace(layout, scales=(stride, *layout.scales[1:]), cond_time_gap=32 // stride)
    order = _training_order(layout)
    np.testing.assert_array_equal(strided.position_ids[:, 0].numpy(), slower.pos3d[order].T)
    moved = (strided.position_ids != plain.position_ids).any(0)[0]
    assert moved.any() and not moved[: layout.first_frame_token + 2 * layout.tokens_per_frame].any()


def test_own_predictions_of_a_later_pass_see_the_previous_passes_frames():
    model = load_demo_model()  # a trained model: a random one predicts one colour everywhere, in every pass
    clips = make_clips([3, 4], 4)
    first, _ = train_module._own_predictions(model, clips)
    second, confidence = train_module._own_predictions(model, clips, 2)
    third, _ = train_module._own_predictions(model, clips, 3)
    assert second.shape == confidence.shape == (2, 3, GRID * GRID)
    # frame 1 sees only the condition, frame 2 sees the first pass's frame 1 after two passes
    np.testing.assert_array_equal(second[:, 0], first[:, 0])
    np.testing.assert_array_equal(third[:, :2], second[:, :2])
    # reference: one clean-past pass over clips whose frame 1 is the first pass's prediction
    for clip, own, two in zip(clips, first, second):
        edited = Clip(frames=clip.frames.copy(), text=clip.text)
        edited.frames[1] = own[0].reshape(GRID, GRID)
        reference, _ = train_module._own_predictions(model, [edited])
        np.testing.assert_array_equal(two[1], reference[0, 1])
    assert not np.array_equal(second, first), "a second pass that changes nothing tests nothing"


def test_own_predictions_decoded_step_by_step_are_the_generated_video():
    """With MaskGIT decoding and as many passes as generated frames, the parallel training-time rollout is
    free-running generation: the reference is :func:`generate_video` over the compact-cache runtime."""
    model = load_demo_model()
    clips = make_clips([3, 4], 5)
    decoded, confidence = train_module._own_predictions(model, clips, passes=4, steps=8)
    for clip, frames in zip(clips, decoded):
        video = generate_video(model, clip.text, clip.frames[0], 5, FullCache(), steps=8, cfg_scale=1.0,
                               progress=False)
        np.testing.assert_array_equal(frames, video.frames[1:].reshape(4, -1))
    # kept-first cells rank higher: the 2 cells the first of 8 iterations keeps (64 cos(pi / 16) = 62 stay masked)
    first_kept = confidence > 8
    assert (first_kept.sum(-1) == 2).all() and (confidence > 0).all()
    one_shot, _ = train_module._own_predictions(model, clips, passes=4)
    assert not np.array_equal(one_shot, decoded), "step-by-step decoding that equals one shot tests nothing"


def test_ardf_batch_queries_set_the_masked_copies():
    clips = make_clips([3, 4], 3)
    queries = np.stack([c.frames[1:].reshape(2, -1) for c in clips])
    queries[:, :, :10] = VOCAB.mask
    queries[0, 1, 20] = (queries[0, 1, 20] + 1) % VOCAB.num_colours  # a kept cell the model got wrong stays wrong
    b = ardf_batch(clips, queries=queries)
    np.testing.assert_array_equal(b.ids[:, b.query_at].numpy(), queries)
    np.testing.assert_array_equal(b.masked.numpy(), queries == VOCAB.mask)
    np.testing.assert_array_equal(b.targets.numpy(), np.stack([c.frames[1:].reshape(2, -1) for c in clips]))


def test_training_runs_and_writes_the_checkpoint_atomically(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    own_steps = []
    predictions = train_module._own_predictions
    monkeypatch.setattr(train_module, "_own_predictions", lambda *a: own_steps.append(1) or predictions(*a))
    windows, strides = [], []
    batch = train_module.ardf_batch
    monkeypatch.setattr(train_module, "ardf_batch",
                        lambda clips, *a, **kw: windows.append(kw.get("history_window", 0))
                        or strides.append(kw.get("time_stride", 1)) or batch(clips, *a, **kw))
    turn_probs = []
    clips_of = train_module.make_clips
    monkeypatch.setattr(train_module, "make_clips",
                        lambda seeds, frames, **kw: turn_probs.append((frames, kw.get("turn_prob", 0.0)))
                        or clips_of(seeds, frames, **kw))
    cfg = TrainConfig(steps=3, batch=2, frames=3, warmup=1, eval_every=3, eval_clips=2, attention="blocks",
                      first_frame_batch=2, own_history_prob=0.5, own_history_steps=2, own_partial_prob=0.5,
                      confidence_mask_prob=0.5, min_mask_ratio=0.1,
                      free_running_from=0.5, prompt_gap_max=3, history_window_prob=1.0, history_window_max=1,
                      time_stride_prob=1.0, time_stride_max=3, turn_prob=0.2)
    train(cfg, out, model_config=tiny_config(), log=io.StringIO())
    # whole clips (training and the 13-frame log) turn; the frame-1 clips need not, their frames 0-1 never turn
    assert {p for frames, p in turn_probs if frames != 2} == {0.2} and turn_probs[0] == (13, 0.2), turn_probs
    assert len(own_steps) == 1, "own predictions only in the steps from free_running_from on (step 2 of 0..2)"
    assert windows.count(1) == 3, "every training step's whole-clip batch sees one history frame"
    assert sum(s in (2, 3) for s in strides) == 3 and strides.count(1) == len(strides) - 3, strides
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    log = (out / "train_log.json").read_text()
    assert '"steps_done": 3' in log and "beyond_changed" in log and "direction_gain" in log
    # trained with the block-by-block attention backend, saved for the stock sdpa one
    assert "packcache_ardf_blocks" not in (out / "config.json").read_text()


def test_own_partial_frames_show_the_models_surest_cells():
    rng = np.random.default_rng(0)
    predicted = rng.integers(VOCAB.num_colours, size=(3, 2, GRID * GRID))
    confidence = rng.random((3, 2, GRID * GRID))
    queries = train_module._own_partial_frames(predicted, confidence, np.array([True, False, True]), rng, 0.1)
    assert (queries[1] == -1).all()
    for j in (0, 2):
        hidden = queries[j] == VOCAB.mask
        counts = hidden.sum(-1)
        assert counts[0] == counts[1] and GRID * GRID * 0.1 - 1 <= counts[0] <= GRID * GRID
        np.testing.assert_array_equal(queries[j][~hidden], predicted[j][~hidden])
        for f in range(2):  # the hidden cells are the least confident of their frame
            assert confidence[j, f][hidden[f]].max() < confidence[j, f][~hidden[f]].min()
    # the batch shows those frames to the given clips only, and still targets the true frames
    clips = make_clips([3, 4, 5], 3)
    b = ardf_batch(clips, rng, query_ratio=None, full_mask_prob=1.0, queries=queries)
    shown = b.ids[:, b.query_at].numpy()
    np.testing.assert_array_equal(shown[[0, 2]], queries[[0, 2]])
    assert (shown[1] == VOCAB.mask).all()
    np.testing.assert_array_equal(b.targets.numpy(), np.stack([c.frames[1:].reshape(2, -1) for c in clips]))


@pytest.mark.parametrize("args, message", [
    (["--attention", "dense"], "attention must be 'sdpa' or 'blocks'"),
    (["--history-window-prob", "0.5", "--history-window-max", "0"], "history_window_max must be >= 1"),
    (["--turn-prob", "1.5"], "turn_prob must lie in [0, 1]"),
    (["--time-stride-prob", "0.5", "--time-stride-max", "1"], "time_stride_max must be >= 2"),
    (["--condition-gap", "0"], "condition_gap must be >= 1"),
    (["--intermediate-size", "0"], "intermediate_size must be >= 1"),
    (["--own-history-passes", "0"], "own_history_passes must be >= 1"),
    (["--own-history-steps", "-1"], "own_history_steps must be >= 0"),
    (["--own-partial-prob", "0.5", "--own-history-passes", "2"], "own_partial_prob needs own_history_passes 1"),
    (["--processes", "3"], "processes must divide threads, batch and first_frame_batch, got 3"),
    (["--init", "no/such/dir"], "--init no/such/dir: no checkpoint there"),
])
def test_training_command_rejects_bad_options_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--out", str(tmp_path / "model"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("packcache.demo.train: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "model").exists()


def test_training_continues_only_in_the_format_of_its_init_checkpoint(tmp_path, capsys):
    DemoVideoModel(tiny_config()).save_pretrained(tmp_path / "plain")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--out", str(tmp_path / "model"), "--init", str(tmp_path / "plain"), "--video-start",
                           "--condition-gap", "32", "--intermediate-size", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "was trained on ClipFormat(video_start=False, condition_gap=1, bound_words=False)" in err
    assert "\n" not in err
    assert not (tmp_path / "model").exists()


def test_training_continues_only_at_the_mlp_width_of_its_init_checkpoint(tmp_path, capsys):
    DemoVideoModel(tiny_config()).save_pretrained(tmp_path / "narrow")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the default width, 384
        train_module.main(["--out", str(tmp_path / "model"), "--init", str(tmp_path / "narrow")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "has MLP width 64, the options ask for 384 (pass the same --intermediate-size)" in err
    assert "\n" not in err
    assert not (tmp_path / "model").exists()


def test_a_fresh_model_takes_the_mlp_width_of_its_options(tmp_path):
    cfg = TrainConfig(steps=1, batch=1, frames=2, warmup=1, eval_every=1, eval_clips=1, intermediate_size=40)
    train(cfg, tmp_path / "model", log=io.StringIO())
    model = DemoVideoModel.from_pretrained(tmp_path / "model")
    assert model.config.intermediate_size == 40
    assert model.model.layers[0].mlp.up_proj.weight.shape == (40, model.config.hidden_size)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_compiled_training_computes_the_eager_losses_and_saves_a_plain_checkpoint(tmp_path):
    cfg = TrainConfig(steps=2, batch=2, frames=3, warmup=1, eval_every=1, eval_clips=2, attention="blocks")
    graphs = []
    for name, compiled in (("eager", False), ("compiled", True)):
        counters.clear()
        train(dataclasses.replace(cfg, compile=compiled), tmp_path / name, model_config=tiny_config(),
              log=io.StringIO())
        graphs.append(counters["stats"]["unique_graphs"])
    # one graph, the training step's (its backward comes with it): the evaluations of the log ran eagerly
    assert graphs == [0, 1]
    logs = {name: json.loads((tmp_path / name / "train_log.json").read_text()) for name in ("eager", "compiled")}
    # step 1's loss comes from the same initial weights; step 2's from weights one (rounding-close) update later
    for eager, compiled in zip(logs["eager"]["eval"], logs["compiled"]["eval"], strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    eager, compiled = (DemoVideoModel.from_pretrained(tmp_path / name).state_dict() for name in ("eager", "compiled"))
    assert compiled.keys() == eager.keys()
    drift = torch.cat([(compiled[k] - eager[k]).abs().flatten() for k in eager])
    assert drift.mean() < 1e-5, "two compiled steps moved the weights away from the eager steps"


def test_training_in_two_processes_follows_one_process(tmp_path):
    # step 2 also predicts the model's own frames (an untrained model's near-ties make later steps' own frames
    # depend on the rounding of the earlier steps)
    cfg = TrainConfig(steps=2, batch=4, frames=3, warmup=1, eval_every=1, eval_clips=2, attention="blocks",
                      first_frame_batch=2, own_history_prob=0.5, own_partial_prob=0.5, confidence_mask_prob=0.5,
                      min_mask_ratio=0.1, free_running_from=0.5, time_stride_prob=0.5, time_stride_max=3)
    train(cfg, tmp_path / "one", model_config=tiny_config(), log=io.StringIO())
    train(dataclasses.replace(cfg, processes=2), tmp_path / "two", model_config=tiny_config())
    logs = {name: json.loads((tmp_path / name / "train_log.json").read_text()) for name in ("one", "two")}
    # the processes' loss shares sum to the whole batch's loss, step by step
    for one, two in zip(logs["one"]["eval"], logs["two"]["eval"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    one, two = (DemoVideoModel.from_pretrained(tmp_path / name).state_dict() for name in ("one", "two"))
    drift = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert drift.mean() < 1e-5, "the summed gradients of the two halves moved the weights elsewhere"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_ardf_batch_in_the_video_start_format_puts_the_sink_after_the_text_at_the_layout_positions():
    fmt = ClipFormat(video_start=True, condition_gap=32)
    frames = 4
    batch = ardf_batch(make_clips(range(2), frames), clip_format=fmt, prompt_gap=3)
    layout = clip_layout(frames, clip_format=fmt)
    text = layout.text_tokens
    assert (batch.ids[:, text] == VOCAB.video_start).all()
    order = _training_order(layout)
    expected = layout.pos3d[order].T.copy()
    expected[:, text:] += 3  # the prompt gap moves everything after the prompt, the sink included
    np.testing.assert_array_equal(batch.position_ids[:, 0].numpy(), expected)
