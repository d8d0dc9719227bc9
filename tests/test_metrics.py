"""Fidelity metrics against hand-computed values and against the one-shot training-sequence forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_demo_model

from packcache import FullCache, SlidingWindow
from packcache.demo import PLAIN, ClipFormat, make_clips
from packcache.demo.train import ardf_batch, batch_logits
from packcache.metrics import (
    copy_last_frame,
    format_table,
    ground_truth_accuracy,
    policy_fidelity,
    policy_table,
    teacher_forced,
    token_agreement,
)


def test_token_agreement_counts_generated_frames_only():
    a = np.zeros((3, 2, 2), dtype=int)
    b = a.copy()
    b[0] = 5  # the condition frame is never compared
    b[2, 0, 0] = 1
    assert token_agreement(a, b) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="shape"):
        token_agreement(a, b[:2])


def test_copy_last_frame_scores_zero_on_changed_cells():
    truth = np.stack([c.frames for c in make_clips(range(4), 6)])
    copy = copy_last_frame(truth)
    score = ground_truth_accuracy(copy, truth)
    changed = truth[:, 1:] != truth[:, :-1]
    assert score["changed_acc"] == 0.0
    assert score["acc"] == pytest.approx(1 - changed.mean())
    assert ground_truth_accuracy(truth, truth)["changed_acc"] == 1.0


@pytest.mark.parametrize("clip_format", [PLAIN, ClipFormat(video_start=True, condition_gap=32),
                                         ClipFormat(video_start=True, condition_gap=32, bound_words=True)], ids=str)
def test_teacher_forced_full_cache_equals_the_one_shot_training_forward(clip_format):
    """The cache path (prefill, frozen masked frame, append, compact) reproduces the training sequence's logits,
    in every sequence format (the model's config says which)."""
    model = tiny_demo_model(clip_format)
    clips = make_clips(range(3), 5)
    with torch.no_grad():
        batch = ardf_batch(clips, clip_format=clip_format)
        logits = batch_logits(model, batch)
    tf = teacher_forced(model, clips, FullCache(), batch=2)
    np.testing.assert_array_equal(tf.predicted, logits.argmax(-1).numpy())
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 2), batch.targets.flatten(), reduction="none")
    np.testing.assert_allclose(tf.nll, nll.view(batch.targets.shape).numpy(), atol=1e-5)
    summary = tf.summary()
    assert summary["acc"] == pytest.approx(float((logits.argmax(-1) == batch.targets).float().mean()))
    assert summary["copy_acc"] == pytest.approx(1 - float(batch.changed.float().mean()))


def test_a_compacting_policy_changes_teacher_forced_predictions_beyond_its_window():
    model = tiny_demo_model()
    clips = make_clips(range(4), 6)
    full = teacher_forced(model, clips, FullCache())
    window = teacher_forced(model, clips, SlidingWindow(1))
    # frames 1-2 see the same cache (nothing dropped yet); later frames lose history
    np.testing.assert_allclose(full.nll[:, :2], window.nll[:, :2], atol=1e-5)
    assert np.abs(full.nll[:, 2:] - window.nll[:, 2:]).max() > 1e-4


def test_policy_table_runs_every_policy_at_equal_memory():
    model = tiny_demo_model()
    table = policy_table(model, num_clips=2, num_frames=9, gen_clips=1, steps=1, progress=False)
    names = [r["policy"] for r in table["rows"]]
    assert names[0] == "FullCache" and any(n.startswith("StreamingLLM") for n in names)
    full = table["rows"][0]
    assert full["generated"]["all"]["agreement_with_full"] == 1.0
    pack = next(r for r in table["rows"] if r["policy"] == "PackCache(paper)")
    stream = next(r for r in table["rows"] if r["policy"].startswith("StreamingLLM"))
    assert stream["budget_tokens"] == pack["budget_tokens"] == pack["cache_tokens_last_frame"]
    assert "PackCache(paper)+rebase" in format_table(table, "7-12")


def test_policy_fidelity_averages_seeds_and_adds_a_fitted_budget(tmp_path):
    from packcache import Budget
    from packcache.demo import clip_layout

    model = tiny_demo_model()
    budget = Budget.paper_default(2, 2, 2, clip_layout(9).summary(), model_id="fitted-test")
    budget.keep_ratios = [[1.0, 0.25, 0.0, 0.0], [1.0, 0.25, 0.0, 0.0]]
    budget.provenance["source"] = "fit"
    budget.validate()
    budget.save(tmp_path / "budget.json")
    out = policy_fidelity(model=model, budget_path=tmp_path / "budget.json", seeds=2, clips=2, gen_clips=1,
                          num_frames=9, steps=1, progress=False)
    assert len(out["per_seed"]) == 2 and "PackCache(fitted)+rebase" in out["mean"]
    one = [t["rows"][0]["teacher_forced"]["all"]["acc"] for t in out["per_seed"]]
    assert out["mean"]["FullCache"]["all"]["teacher_forced_acc"] == pytest.approx(np.mean(one))
    full = next(r for r in out["rows"] if r["policy"] == "FullCache")
    assert full["teacher_forced"]["all"]["acc"] == pytest.approx(np.mean(one))
    assert "PackCache(fitted)" in out["table"]
