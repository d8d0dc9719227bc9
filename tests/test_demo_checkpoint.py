"""The shipped demo checkpoint (data/demo-model): loads offline, beats copy-last-frame overall and by far on changed
cells (moving objects and uncovered background), and has the attention structure the clips were built for.
Thresholds are stated here and in the README."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from packcache import FullCache
from packcache.demo import ClipFormat, DemoVideoModel, clip_layout, load_demo_model, make_clips
from packcache.demo.clips import visual_index
from packcache.demo.model import DEFAULT_MODEL_DIR
from packcache.demo.train import ardf_batch, batch_logits, heldout_seeds, prompt_direction_gain
from packcache.metrics import copy_last_frame, ground_truth_accuracy, teacher_forced

pytestmark = pytest.mark.integration

#: Held-out teacher-forced accuracy on changed cells (frames 1-6, full cache) must exceed this; copy-last-frame
#: scores exactly 0 there. The shipped checkpoint scores 0.819 on these 48 clips (overall 0.959 vs copy 0.926).
CHANGED_CELL_THRESHOLD = 0.65


@pytest.fixture(scope="module")
def model() -> DemoVideoModel:
    return load_demo_model()


def test_checkpoint_is_small_and_loads_offline(model):
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20
    assert isinstance(model, DemoVideoModel) and not model.training
    assert model.config.packcache_rotary == "mrope_interleaved"


def test_heldout_changed_cell_accuracy_is_well_above_copy_last_frame(model):
    clips = make_clips(heldout_seeds(48, start=5000), 7)
    tf = teacher_forced(model, clips, FullCache())
    truth = np.stack([c.frames for c in clips])
    copy = ground_truth_accuracy(copy_last_frame(truth), truth)
    summary = tf.summary()
    assert copy["changed_acc"] == 0.0
    assert summary["changed_acc"] > CHANGED_CELL_THRESHOLD, summary
    assert summary["acc"] > copy["acc"], (summary, copy)


#: Frame 1 from the condition frame and the prompt: accuracy on its changed cells must fall by more than this when
#: the prompt's directions are reversed, if the model reads them. Frame 0 shows no motion; only the prompt does.
DIRECTION_GAIN_THRESHOLD = 0.1


def test_first_frame_follows_the_prompt_direction(model):
    score = prompt_direction_gain(model, make_clips(heldout_seeds(48, start=5000), 2))
    assert score["direction_gain"] > DIRECTION_GAIN_THRESHOLD, score


def attention_by_group(model, clips) -> tuple[np.ndarray, np.ndarray]:
    """Eager attention of each masked copy's visual cells, summed by key group as ``probes/`` groups keys and
    averaged over clips, cells, heads and layers: ``[query frame k, group]`` with groups text, condition, history
    d = 1..5, own frame (visual cells of each) and specials (frame specials and row separators). Also returns the
    same sums for uniform attention over each query's visible keys (its share of the keys). A ``<video_start>``
    after the text counts among the specials."""
    clip_format = ClipFormat.of(model.config)
    batch = ardf_batch(clips, clip_format=clip_format)
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: captured.append(out[1].detach()))
             for name, m in model.named_modules() if name.endswith("self_attn")]
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            batch_logits(model, batch)
    finally:
        model.set_attn_implementation(implementation)
        for h in hooks:
            h.remove()
    weights = torch.stack(captured).mean(dim=(0, 2))  # [B, L, L] over layers and heads
    visible = (batch.mask[:, 0] == 0).float()
    uniform = visible / visible.sum(-1, keepdim=True)  # [1, L, L]
    layout_frames = clips[0].frames.shape[0]
    layout = clip_layout(layout_frames, clip_format=clip_format)
    head, tpf = layout.first_frame_token, layout.tokens_per_frame  # clean frames start right after text + sink
    cells = torch.from_numpy(visual_index(layout))  # visual cells' offsets inside a frame

    def by_group(w: torch.Tensor) -> np.ndarray:
        out = np.zeros((layout_frames, 9))
        for q, k in enumerate(range(1, layout_frames)):
            rows = w[:, batch.query_at[q]]  # [B, cells, L]
            own = head + (layout_frames - 1) * tpf + q * tpf
            visual = [rows[..., head + f * tpf + cells].sum(-1) for f in range(k)] + [rows[..., own + cells].sum(-1)]
            groups = [rows[..., : layout.text_tokens].sum(-1), visual[0]]
            groups += [visual[k - d] if d < k else torch.full_like(groups[0], float("nan")) for d in range(1, 6)]
            groups.append(visual[-1])
            groups.append(rows.sum(-1) - groups[0] - sum(visual))  # every visible key that is not text or a cell
            out[k] = torch.stack(groups, -1).mean(dim=(0, 1)).numpy()
        return out

    return by_group(weights), by_group(uniform)


def test_attention_anchors_hold_and_history_decays_with_distance(model):
    """Averaged over layers and heads, keys grouped as ``probes/`` groups them (specials apart). Anchors, whose
    importance the paper finds does not decay with temporal distance: per key, text + condition cells are worth at
    least as much at k = 6 as at k = 2 (mass over their share of the visible keys: the shipped model 1.03 and
    1.41), and the condition frame, 6 frames back, gets more mass than the history frame at d = 5 (0.098 vs 0.059):
    it does not follow history's decay. Uniform attention fails the second check; anchors that decay like history
    fail both. History cells, at the last query frame of the training length: d = 1 dominates (0.150, 1.31 x d = 2)
    and mass falls with d = 2..5 (0.115, 0.074, 0.064, 0.059: towards a floor, as the exponential-to-floor fit of
    the profile finds)."""
    mass, uniform = attention_by_group(model, make_clips(heldout_seeds(8, start=7000), 7))
    per_key = (mass[:, 0] + mass[:, 1]) / (uniform[:, 0] + uniform[:, 1])
    assert per_key[6] >= per_key[2], f"anchor mass per key fades with k: {per_key[1:]}"
    assert mass[6, 1] > mass[6, 6], f"the condition frame decays like history: {mass[6, 1]} vs d=5 {mass[6, 6]}"
    history = mass[6, 2:7]  # d = 1..5 for query frame 6
    assert history[0] > 1.3 * history[1], history
    # falls strictly over d = 2..4, then may sit on its floor (d = 4 and 5 within 0.5% of each other)
    assert history[1] > history[2] > history[3] and history[1] > 1.1 * history[4], \
        f"history mass does not fall with distance beyond d=1: {history}"
    assert history[4] <= 1.005 * history[3], f"history mass rises again at d=5: {history}"
