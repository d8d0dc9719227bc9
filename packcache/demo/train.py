"""Train the demo video model with AR-DF temporal tube masking (Lumos-1 style), on CPU.

    make model   # the shipped checkpoint: the Makefile's ``model`` target holds its two commands
    python -m packcache.demo.train --out DIR [--init CHECKPOINT] [options]

The shipped checkpoint (MLP width 256, 661k parameters) is two stages: frame 1 alone from the condition frame
and the prompt, where the model learns to read the prompt's directions; then whole clips with its own frames as
history, a lower frame rate in some steps and the null prompt in half the clips (README: minutes and losses).

Each training sequence is ``text | clean frames 0..T-2 | a masked copy of every frame 1..T-1``. A masked copy
sits at its real frame's positions and sees the text, the clean frames before it and itself (bidirectionally).
Masking is a *tube*: the same cells are masked in every copy of a clip; in half the clips a second tube also
masks history frames 1..T-2 (never the condition frame), so the model learns to predict from incomplete history,
which is what PackCache's sub-sampled frames and Lumos-1's re-encoded history give it at inference. The loss is
cross-entropy on masked cells, weighted up on cells that change from the previous frame. The text is dropped
(null prompt) in 10% of the clips so classifier-free guidance has an unconditional model.

While training it logs teacher-forced accuracy on held-out 13-frame clips, overall and on changed cells, within
the training length (frames 1-6) and beyond it (frames 7-12), and frame 1 from the condition frame with the
prompt's directions true and reversed (:func:`prompt_direction_gain`). Same seed and steps -> same checkpoint.

Frame 1 is the only frame whose motion the prompt alone tells. Trained on whole clips, the model never learns to
read the directions (frame 1 scores the same with them reversed) and predicts a ring around each object. Trained
on frame 1 alone (``--frames 2 --full-mask-prob 1.0``) it learns them after 750-1,000 steps, and
``--first-frame-batch N`` adds N such frame-1 clips to every step of whole-clip training, which otherwise erases
the skill (packcache/demo/README.md).

Free-running, a model meets two states teacher forcing never shows it: a past made of its own (imperfect) frames,
and a partly decoded frame whose visible cells are the ones it was surest of. ``--own-history-prob p`` replaces
the past frames of a fraction p of the clips by the model's own greedy predictions (parallel scheduled
sampling; targets stay the true frames). ``--own-history-passes n`` predicts n times, each pass from the
previous pass's frames, so that the past carries errors compounded over up to n generated frames, as it does
free-running. ``--own-history-steps K`` decodes those frames as generation does, by K greedy MaskGIT iterations
(one pass per generated frame reproduces the free-running video exactly), instead of one greedy shot whose cells
are all chosen at once. ``--own-partial-prob p`` shows a fraction p of the other clips' masked frames as MaskGIT
leaves them half-way: the model's own surest cells visible, the rest hidden (targets stay the true frames).
``--confidence-mask-prob p`` makes a fraction p of the partly masked clips hide each frame's least confident
cells instead of a random tube, as MaskGIT decoding leaves them, but showing the true cells (``--min-mask-ratio``
down to 0.1 reaches its last iterations). All of these need extra no-grad forwards (one per pass, K per pass
with ``--own-history-steps``); ``--free-running-from f`` turns them on only for the last 1 - f of the steps,
once the model's frames are good.

``--compile`` runs the decoder under ``torch.compile`` (needs a C++ compiler), which fuses its element-wise work:
about 1.2 x faster steps without the own-history forwards, 1.09 x with them. Its rounding differs from eager's, so it
trains other weights than the same options without it (packcache/demo/README.md, row C).

``--processes N`` trains data parallel: N processes at ``threads / N`` threads each build every step's whole batch
from the same generator, each computes its 1/N of the rows (and of the own-history forwards), and their gradients
are summed (gloo) before the same optimiser step in each. Two one-thread processes run a step about 1.19 x faster
than one two-thread process (small matrices parallelise poorly over threads); summed in another order, the
gradients round differently, so it too trains other weights.

Every demo prompt is 6 tokens long, so a model can find the prompt by relative position alone.
``--prompt-gap-max G`` shifts every position after the prompt by a random 0..G per step, as a prompt up to G
tokens longer would: the frames keep their distances to each other, only their distance to the prompt varies.
(Tried against the heads that attend 3-5 frames back in direction-reading models: it does not remove them; README.)

``--history-window-prob p`` shows every frame of a fraction p of the steps only its last U{1..``--history-window-max``}
history frames, plus the condition frame and the text, as a sliding-window cache would: the further back a frame,
the more often it is hidden, so a model cannot rely on it. (Tried against the same heads: they move from 3 to 4-5
frames back; README.)

``--turn-prob p`` trains (and logs) on clips whose objects turn at random with probability p per frame after
frame 1 (:func:`~packcache.demo.clips.make_clip`): the older a frame, the less its motion tells about the next,
as in real video. (Tried against the heads that attend 3-5 frames back: they shrink and become idle, but stay;
README.)

``--video-start`` puts Lumos-1's ``<video_start>`` token after the prompt, and ``--condition-gap G`` puts frame 1 G time
steps after the condition frame (frames 1, 2, ... stay one apart; :class:`~packcache.demo.clips.ClipFormat`). The
checkpoint's config records both, and every consumer (runtime, metrics, profiler, dashboard) builds the sequence the
model was trained on; ``--init`` must name a checkpoint of the same format. (Tried against the heads that attend
3-5 frames back: with both, and ``G = 32``, history falls with distance; README.)

``--time-stride-prob p`` spaces frames 1.. U{2..``--time-stride-max``} time steps apart, not 1, in a fraction p of
the steps, as a clip sampled at a lower frame rate would sit (the condition frame and frame 1 keep their places).
(Tried against the heads that park on the farthest frame of the training length, d = 5 at k = 6: d = 5 falls under
d = 4, but because the recent-frame heads learn to read the previous frame 2 steps back too and spread onto
d = 2-4; the far heads stay where they were, and d = 1 loses its margin over d = 2. README.)

``--bound-words`` reads each object's direction and speed words as token ids that carry the object's colour
(:attr:`~packcache.demo.clips.ClipFormat.bound_words`; the prompt string stays the same). With separate words the
model must bind each motion word to the colour word before it, and it never learns that within its budget: from the
condition frame and a two-object prompt it places an object exactly at frame 1 in 0.12 of the cases where the two
objects move differently, against 0.78 where they move alike and 0.95 for one object (session-21 model B). The
training log's ``objects exact`` (:func:`object_exactness`) tracks those cases and the later frames. (Tried: the
2-frame stage with bound words binds, 0.47 exact for two objects that move differently against 0.18, but places
single objects worse, 0.48 against 0.87, and after the whole-clip stage the free-running objects fall apart. README.)

``--attention blocks`` computes the training attention block by block (:mod:`packcache.demo.block_attention`):
the same attention up to float rounding, about a third of its FLOPs, 1.3x faster steps on 2 cores. The shipped
checkpoint is trained with it; the default (one masked sdpa call) reproduces earlier checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from packcache.budget import atomic_write_text
from packcache.demo.block_attention import BACKEND as BLOCK_ATTENTION
from packcache.demo.block_attention import ArdfBlocks, register_block_attention
from packcache.demo.clips import (
    GRID,
    OBJ,
    PLAIN,
    VOCAB,
    Clip,
    ClipFormat,
    clip_layout,
    frame_token_ids,
    make_clips,
    reverse_directions,
    visual_index,
)
from packcache.demo.model import DEFAULT_INTERMEDIATE_SIZE, DemoVideoConfig, DemoVideoModel, ardf_mask
from packcache.progress import ProgressBar
from packcache.runtime import still_masked

__all__ = ["TrainConfig", "ArdfBatch", "ardf_batch", "batch_logits", "evaluate", "prompt_direction_gain", "train",
           "heldout_seeds", "main", "MOTION_KINDS", "motion_kind", "object_exactness"]

HELDOUT_BASE = 10**9


def heldout_seeds(n: int, start: int = 0) -> list[int]:
    """Seeds of held-out clips (disjoint from every training seed)."""
    return [HELDOUT_BASE + start + i for i in range(n)]


def _train_seed(seed: int, step: int, i: int, batch: int) -> int:
    return seed * 10**8 + step * batch + i


#: the frame-1 clips of ``--first-frame-batch`` draw their seeds from their own range
FIRST_FRAME_SEED_OFFSET = 5 * 10**7


@dataclass
class TrainConfig:
    """Training hyper-parameters (``make model`` gives the shipped checkpoint's)."""

    seed: int = 0
    steps: int = 2500
    batch: int = 8
    frames: int = 7
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    changed_weight: float = 4.0
    final_changed_weight: float = 2.0
    final_phase: float = 0.2
    first_frame_batch: int = 0  # extra frame-1-only clips per step (condition + prompt -> frame 1, fully masked)
    full_mask_prob: float = 0.5
    history_mask_prob: float = 0.5
    history_mask_max: float = 0.6
    history_noise_prob: float = 0.0  # clips whose history frames 1.. get random colours in U(0, max) of their cells
    history_noise_max: float = 0.0
    min_mask_ratio: float = 0.3  # a partly masked frame hides U(min_mask_ratio, 1) of its cells
    own_history_prob: float = 0.0  # clips whose past frames 1.. are the model's own predictions (scheduled sampling)
    own_history_passes: int = 1  # pass n predicts from pass n-1's frames: errors compounded over up to n frames
    own_history_steps: int = 0  # own frames decoded by this many MaskGIT iterations, as generation does (0: one-shot)
    own_partial_prob: float = 0.0  # clean-past clips whose partly masked frames show the model's own surest cells
    confidence_mask_prob: float = 0.0  # partly masked clips that hide their least confident cells (MaskGIT states)
    free_running_from: float = 0.0  # the own-frame and confidence options above apply from this fraction on
    prompt_gap_max: int = 0  # each step shifts every position after the prompt by U{0..max}, as a longer prompt would
    history_window_prob: float = 0.0  # steps whose frames see only the last U{1..max} history frames (+ condition)
    history_window_max: int = 2
    time_stride_prob: float = 0.0  # steps whose frames 1.. sit U{2..max} time steps apart (a lower frame rate)
    time_stride_max: int = 2
    turn_prob: float = 0.0  # training and evaluation clips: objects turn at random after frame 1 (make_clip)
    video_start: bool = False  # sequence format (ClipFormat): <video_start> after the text
    condition_gap: int = 1  # sequence format (ClipFormat): time steps from the condition frame to frame 1
    bound_words: bool = False  # sequence format (ClipFormat): direction and speed words carry their object's colour
    intermediate_size: int = DEFAULT_INTERMEDIATE_SIZE  # MLP width of a fresh model (--init: its checkpoint's)
    text_dropout: float = 0.1
    eval_every: int = 200
    eval_clips: int = 32
    max_minutes: float = 90.0  # safety stop only: a run cut short is not the shipped checkpoint
    threads: int = 2
    init: str = ""
    attention: str = "sdpa"  # "blocks": the exact block-by-block backend, 1.3x faster steps (not the shipped run's)
    compile: bool = False  # torch.compile the decoder (needs a C++ compiler): faster steps, its own rounding
    processes: int = 1  # data parallel: each of N processes (threads / N threads each) takes 1/N of every batch

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "blocks"):
            raise ValueError(f"attention must be 'sdpa' or 'blocks', got {self.attention!r}")
        if not 0.0 <= self.turn_prob <= 1.0:
            raise ValueError(f"turn_prob must lie in [0, 1], got {self.turn_prob}")
        if self.history_window_prob and self.history_window_max < 1:
            raise ValueError(f"history_window_max must be >= 1 frame, got {self.history_window_max}")
        if self.time_stride_prob and self.time_stride_max < 2:
            raise ValueError(f"time_stride_max must be >= 2, got {self.time_stride_max}")
        if self.own_history_passes < 1:
            raise ValueError(f"own_history_passes must be >= 1, got {self.own_history_passes}")
        if self.own_history_steps < 0:
            raise ValueError(f"own_history_steps must be >= 0, got {self.own_history_steps}")
        if self.own_partial_prob and self.own_history_passes > 1:
            raise ValueError("own_partial_prob needs own_history_passes 1 (its frames must be decoded from the "
                             "clean past the clip shows)")
        if self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        if self.condition_gap < 1:
            raise ValueError(f"condition_gap must be >= 1, got {self.condition_gap}")
        if self.processes < 1 or self.threads % self.processes or self.batch % self.processes or \
                self.first_frame_batch % self.processes:
            raise ValueError(f"processes must divide threads, batch and first_frame_batch, got {self.processes}")

    @property
    def clip_format(self) -> ClipFormat:
        """The sequence format the model is trained on (recorded in its config)."""
        return ClipFormat(video_start=self.video_start, condition_gap=self.condition_gap,
                          bound_words=self.bound_words)


@dataclass
class ArdfBatch:
    """One teacher-forced AR-DF batch.

    ``ids [B, L]``, ``position_ids [3, 1, L]``, ``mask [1, 1, L, L]`` (shared by the batch), ``query_at [Q, H*W]``
    sequence index of every visual cell of each masked copy (frames 1..Q), ``targets/changed/masked [B, Q, H*W]``.
    """

    ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    query_at: torch.Tensor
    targets: torch.Tensor
    changed: torch.Tensor
    masked: torch.Tensor
    blocks: ArdfBlocks


def _hidden_count(ratio: float) -> int:
    """How many of a frame's cells a mask of ``ratio`` hides (at least one)."""
    n = GRID * GRID
    return min(n, max(1, int(round(ratio * n))))


def _least_confident(confidence: np.ndarray, ratio: float) -> np.ndarray:
    """The cells a mask of ``ratio`` hides in each frame of ``confidence [T, H*W]``: the least confident ones."""
    hide = np.argsort(confidence, axis=1, kind="stable")[:, : _hidden_count(ratio)]
    mask = np.zeros(confidence.shape, dtype=bool)
    np.put_along_axis(mask, hide, True, axis=1)
    return mask


def _tube(rng: np.random.Generator, ratio: float) -> np.ndarray:
    cells = np.zeros(GRID * GRID, dtype=bool)
    cells[rng.choice(cells.size, size=_hidden_count(ratio), replace=False)] = True
    return cells


def ardf_batch(clips: list[Clip], rng: np.random.Generator | None = None, *, query_ratio: float | None = 1.0,
               full_mask_prob: float = 1.0, min_mask_ratio: float = 0.3, history_mask_prob: float = 0.0,
               history_mask_max: float = 0.0, history_noise_prob: float = 0.0, history_noise_max: float = 0.0,
               text_dropout: float = 0.0, past: np.ndarray | None = None, confidence: np.ndarray | None = None,
               prompt_gap: int = 0, history_window: int = 0, time_stride: int = 1,
               queries: np.ndarray | None = None, clip_format: ClipFormat = PLAIN) -> ArdfBatch:
    """Build the teacher-forced sequence ``text | clean frames 0..T-2 | masked copies of frames 1..T-1`` (the
    text followed by the prefix specials of ``clip_format``, at its positions).

    With ``query_ratio=None`` each clip is fully masked with probability ``full_mask_prob``, else masked by a
    tube of ratio U(min_mask_ratio, 1); a number masks that ratio of cells. The default (all cells masked, clean
    history) is the evaluation setting: next-frame prediction from the full, clean past.

    ``past [B, T, H*W]`` replaces the frames the copies see as history (frame 0 stays the condition); targets and
    changed cells still come from the clips. ``confidence [B, T-1, H*W]``, where finite, makes a partly masked
    clip hide the least confident cells of each frame instead of a tube, as MaskGIT decoding leaves them.
    ``history_noise_prob`` clips get random colours on U(0, ``history_noise_max``) of their history frames' cells
    (frames 1.., never the condition), a past that is wrong where it does not look masked. ``prompt_gap`` adds
    that many to the t, h and w positions of every token after the prompt, where a prompt that many tokens longer
    would put them. ``history_window`` w > 0 hides from every frame the history frames more than w frames back
    (the condition frame and the text stay visible), as a sliding-window cache does. ``time_stride`` s > 1 spaces
    frames 1.. s time steps apart: frame f >= 1 moves by (s - 1)(f - 1) on the time axis. ``queries [B, T-1, H*W]``
    sets the masked copies themselves (``VOCAB.mask`` where hidden), as a partly decoded frame is during MaskGIT
    decoding; it overrides the query masking of the clips whose row it gives (rows of -1 give none).
    """
    rng = rng or np.random.default_rng(0)
    frames = clips[0].frames.shape[0]
    layout = clip_layout(frames, clip_format=clip_format)
    text = np.arange(layout.first_frame_token)
    clean = np.concatenate([np.arange(layout.frame_slice(f).start, layout.frame_slice(f).stop)
                            for f in range(frames - 1)])
    query = np.concatenate([np.arange(layout.frame_slice(f).start, layout.frame_slice(f).stop)
                            for f in range(1, frames)])
    index = np.concatenate([text, clean, query])
    n_hist = len(text) + len(clean)
    frame_of = layout.frame[index]
    block = torch.from_numpy(frame_of.copy())
    segment = block + 1
    segment[n_hist:] += 1000
    history = torch.zeros(len(index), dtype=torch.bool)
    history[:n_hist] = True
    mask = ardf_mask(block, segment, block, segment, history)
    if history_window:
        far = (block[None, :] >= 1) & (block[None, :] < block[:, None] - history_window)
        mask[0, 0][far] = torch.finfo(mask.dtype).min
    pos = layout.pos3d[index]
    pos[layout.text_tokens:] += prompt_gap
    if time_stride > 1:
        pos[:, 0] += np.where(frame_of >= 1, (time_stride - 1) * (frame_of - 1), 0)
    position_ids = torch.from_numpy(np.ascontiguousarray(pos.T)).view(3, 1, -1)
    vis = visual_index(layout)
    tpf = layout.tokens_per_frame
    query_at = torch.from_numpy(n_hist + np.arange(frames - 1)[:, None] * tpf + vis[None, :])
    ids, targets, changed, masked = [], [], [], []
    for j, clip in enumerate(clips):
        f = clip.frames.reshape(frames, -1)
        if query_ratio is None:
            ratio = 1.0 if rng.random() < full_mask_prob else rng.uniform(min_mask_ratio, 1.0)
        else:
            ratio = query_ratio
        given = queries is not None and (queries[j] >= 0).all()
        if given:
            qmask = queries[j] == VOCAB.mask
        elif ratio < 1.0 and confidence is not None and np.isfinite(confidence[j]).all():
            qmask = _least_confident(confidence[j], ratio)
        else:
            qmask = np.broadcast_to(_tube(rng, ratio), (frames - 1, f.shape[1]))
        hist = (f if past is None else past[j].reshape(frames, -1))[: frames - 1].copy()
        hist[0] = f[0]
        if history_noise_prob and rng.random() < history_noise_prob:
            noisy = rng.random(hist[1:].shape) < rng.uniform(0.0, history_noise_max)
            hist[1:][noisy] = rng.integers(VOCAB.num_colours, size=int(noisy.sum()))
        if history_mask_prob and rng.random() < history_mask_prob:
            htube = _tube(rng, rng.uniform(0.0, history_mask_max))
            hist[1:, htube] = VOCAB.mask
        q = (queries[j] if given else f[1:]).copy()
        q[qmask] = VOCAB.mask
        text_ids = clip_format.text_ids(VOCAB.null_prompt(len(clip.text)) if rng.random() < text_dropout
                                        else clip.text)
        seq = [text_ids, clip_format.prefix_ids] + [frame_token_ids(g.reshape(GRID, GRID)) for g in hist]
        seq += [frame_token_ids(g.reshape(GRID, GRID)) for g in q]
        ids.append(np.concatenate(seq))
        targets.append(f[1:])
        changed.append(f[1:] != f[:-1])
        masked.append(qmask)
    return ArdfBatch(ids=torch.from_numpy(np.stack(ids)), position_ids=position_ids, mask=mask, query_at=query_at,
                     targets=torch.from_numpy(np.stack(targets)), changed=torch.from_numpy(np.stack(changed)),
                     masked=torch.from_numpy(np.stack(masked).copy()),
                     blocks=ArdfBlocks.training_sequence(len(text), tpf, frames, history_window))


def batch_logits(model: DemoVideoModel, batch: ArdfBatch) -> torch.Tensor:
    """Colour logits of every masked-copy cell: ``[B, Q, H*W, num_colours]``. The block-by-block backend
    (:mod:`packcache.demo.block_attention`) uses ``batch.blocks``; others use ``batch.mask``."""
    b = batch.ids.shape[0]
    out = model(input_ids=batch.ids, position_ids=batch.position_ids.expand(3, b, -1),
                attention_mask=batch.mask.expand(b, -1, -1, -1), use_cache=False,
                ardf_blocks=batch.blocks)
    return out.logits[:, batch.query_at]


@torch.no_grad()
def evaluate(model: DemoVideoModel, clips: list[Clip], *, train_frames: int = 7, batch: int = 8) -> dict:
    """Teacher-forced next-frame accuracy with a full clean past, within (frames 1..train_frames-1) and beyond the
    training length; ``acc``/``changed`` (cells that differ from the previous frame), ``arriving`` (changed cells
    that a moving object enters: they differ from the condition frame too), ``copy`` = copy-last-frame; and the
    :func:`object_exactness` of the one-shot predictions within the training length."""
    was_training = model.training
    model.eval()
    correct, changed, arriving, total_nll, predicted = [], [], [], [], []
    clip_format = ClipFormat.of(model.config)
    for i in range(0, len(clips), batch):
        b = ardf_batch(clips[i : i + batch], clip_format=clip_format)
        logits = batch_logits(model, b)
        predicted.append(logits.argmax(-1).numpy())
        correct.append(predicted[-1] == b.targets.numpy())
        changed.append(b.changed.numpy())
        cond = np.stack([c.frames[0].reshape(-1) for c in clips[i : i + batch]])[:, None, :]
        arriving.append(b.changed.numpy() & (b.targets.numpy() != cond))
        total_nll.append(F.cross_entropy(logits.flatten(0, 2), b.targets.flatten(), reduction="none")
                         .view(b.targets.shape).numpy())
    model.train(was_training)
    correct, changed, nll = np.concatenate(correct), np.concatenate(changed), np.concatenate(total_nll)
    arriving = np.concatenate(arriving)
    out = {}
    q = correct.shape[1]
    for name, sl in (("in", slice(0, train_frames - 1)), ("beyond", slice(train_frames - 1, q))):
        if sl.start >= q:
            continue
        c, ch, n, ar = correct[:, sl], changed[:, sl], nll[:, sl], arriving[:, sl]
        out[f"{name}_acc"] = float(c.mean())
        out[f"{name}_changed"] = float(c[ch].mean()) if ch.any() else float("nan")
        out[f"{name}_arriving"] = float(c[ar].mean()) if ar.any() else float("nan")
        out[f"{name}_copy"] = float(1 - ch.mean())
        out[f"{name}_nll"] = float(n.mean())
    predicted = np.concatenate(predicted).reshape(len(clips), -1, GRID, GRID)[:, : train_frames - 1]
    return out | object_exactness(predicted, [Clip(c.frames[:train_frames], c.text, c.info) for c in clips])


#: the kinds of object motion :func:`object_exactness` tells apart (:func:`motion_kind`)
MOTION_KINDS = ("first_one", "first_two_same", "first_two_different", "straight", "deflected")


def _object_corner(frame: np.ndarray, colour: int) -> tuple[int, int] | None:
    """Top-left cell of the whole 2x2 object of ``colour`` in ``frame``; None where it is hidden or overlapped."""
    ys, xs = np.nonzero(frame == colour)
    if len(ys) != OBJ * OBJ or np.ptp(ys) != OBJ - 1 or np.ptp(xs) != OBJ - 1:
        return None
    return int(ys.min()), int(xs.min())


def motion_kind(clip: Clip, obj: int, k: int) -> str | None:
    """How the prompt's object ``obj`` moves into frame ``k >= 1`` (a :data:`MOTION_KINDS` name), or None where it
    is not whole in the frames that tell. Frame 1 follows the prompt alone: one object, or two objects with the
    same or different motion words. A later frame either goes straight on (the last displacement again) or is
    deflected (off a wall, or by a turn)."""
    colour = clip.object_colours[obj]
    corners = [_object_corner(clip.frames[f], colour) for f in range(max(k - 2, 0), k + 1)]
    if None in corners:
        return None
    if k == 1:
        if len(clip.object_colours) == 1:
            return "first_one"
        return "first_two_same" if (clip.text[1:3] == clip.text[4:6]).all() else "first_two_different"
    (y0, x0), (y1, x1), (y2, x2) = corners
    return "straight" if (y2 - y1, x2 - x1) == (y1 - y0, x1 - x0) else "deflected"


def object_exactness(predicted: np.ndarray, clips: list[Clip]) -> dict:
    """Share of the whole named objects that ``predicted [B, T-1, H, W]`` (frames 1.. of each clip) gets exactly
    right: the object's colour on its cells and nowhere else. Per :func:`motion_kind`: ``exact_{kind}`` (nan
    without a case) and ``n_{kind}``. Per-cell accuracy hides this: an object whose next place the model cannot
    tell is smeared or split over cells that each look nearly right."""
    hits = {kind: [] for kind in MOTION_KINDS}
    for clip, frames in zip(clips, predicted):
        for obj, colour in enumerate(clip.object_colours):
            for k in range(1, len(frames) + 1):
                kind = motion_kind(clip, obj, k)
                if kind is not None:
                    hits[kind].append(bool(((frames[k - 1] == colour) == (clip.frames[k] == colour)).all()))
    out = {f"exact_{kind}": float(np.mean(h)) if h else float("nan") for kind, h in hits.items()}
    return out | {f"n_{kind}": len(h) for kind, h in hits.items()}


def prompt_direction_gain(model: DemoVideoModel, clips: list[Clip], *, batch: int = 16) -> dict:
    """Frame 1 predicted from the condition frame and the prompt, teacher-forced: accuracy on the changed cells
    with the true prompt and with every direction reversed. Frame 0 does not show the motion, so a model that
    reads the prompt's directions scores clearly lower with them reversed (``direction_gain`` well above 0)."""
    scores = {}
    for name, text in (("true", lambda c: c.text), ("reversed", lambda c: reverse_directions(c.text))):
        pairs = [Clip(frames=c.frames[:2], text=text(c)) for c in clips]
        scores[f"first_frame_changed_{name}"] = evaluate(model, pairs, train_frames=2, batch=batch)["in_changed"]
    scores["direction_gain"] = scores["first_frame_changed_true"] - scores["first_frame_changed_reversed"]
    return scores


@torch.no_grad()
def _own_predictions(model: DemoVideoModel, clips: list[Clip], passes: int = 1, steps: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The model's greedy prediction of frames 1..T-1 and the confidence of each predicted cell: ``[B, T-1, H*W]``
    each. The first pass predicts from the clean past, each further pass from the previous pass's frames, so that
    after ``passes`` passes a frame carries the errors of up to that many generated frames, as free-running.
    ``steps`` > 0 decodes each frame as generation does (:func:`_maskgit_decode`), else in one shot."""
    clip_format = ClipFormat.of(model.config)
    condition = np.stack([c.frames[:1].reshape(1, -1) for c in clips])
    predicted = None
    for _ in range(passes):
        past = None if predicted is None else np.concatenate([condition, predicted], axis=1)
        if steps:
            predicted, confidence = _maskgit_decode(model, clips, past, steps, clip_format)
            continue
        confidence, predicted = batch_logits(model, ardf_batch(clips, past=past, clip_format=clip_format)
                                             ).float().softmax(-1).max(-1)
        predicted, confidence = predicted.numpy(), confidence.numpy()
    return predicted, confidence


def _maskgit_decode(model: DemoVideoModel, clips: list[Clip], past: np.ndarray | None, steps: int,
                    clip_format: ClipFormat) -> tuple[np.ndarray, np.ndarray]:
    """Frames 1..T-1 of every clip decoded in parallel from ``past`` (clean frames if None) by the greedy MaskGIT
    loop of :func:`packcache.runtime.generate_video` (cosine schedule, most confident cells kept first, no
    guidance). Returns the frames and a confidence per cell that orders cells by when they were kept (earlier:
    higher), then by the probability they were kept with: ``[B, T-1, H*W]`` each."""
    n, frames, cells = len(clips), clips[0].frames.shape[0] - 1, GRID * GRID
    grid = np.full((n, frames, cells), VOCAB.mask, dtype=np.int64)
    confidence = np.zeros((n, frames, cells))
    known = np.zeros((n, frames, cells), dtype=bool)
    for it in range(steps):
        probs, tokens = batch_logits(model, ardf_batch(clips, past=past, queries=grid, clip_format=clip_format)
                                     ).float().softmax(-1).max(-1)
        probs, tokens = probs.numpy(), tokens.numpy()
        keep = cells - still_masked(cells, it, steps, cells - int(known[0, 0].sum()))
        order = np.argsort(-np.where(known, np.inf, probs), axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(cells), axis=-1)
        newly = (rank < keep) & ~known
        grid[newly] = tokens[newly]
        confidence[newly] = steps - it + probs[newly]
        known |= newly
    return grid, confidence


def _own_partial_frames(predicted: np.ndarray, confidence: np.ndarray, chosen: np.ndarray, rng: np.random.Generator,
                        min_mask_ratio: float) -> np.ndarray:
    """Frames half-way through MaskGIT decoding, for the ``queries`` of :func:`ardf_batch`: each chosen clip hides
    the least confident U(min_mask_ratio, 1) of every frame's cells and shows the model's own ``predicted`` tokens
    in the rest; the other clips' rows are -1 (none given)."""
    queries = np.full_like(predicted, -1)
    for j in np.flatnonzero(chosen):
        hidden = _least_confident(confidence[j], rng.uniform(min_mask_ratio, 1.0))
        queries[j] = np.where(hidden, VOCAB.mask, predicted[j])
    return queries


def _weighted_loss(model: DemoVideoModel, batch: ArdfBatch, changed_weight: float, rows: slice = slice(None)
                   ) -> torch.Tensor:
    """Cross-entropy on the masked cells, ``changed_weight`` times on the cells that change. ``rows`` computes one
    process's share of the whole batch's loss: its clips' terms over the whole batch's weight."""
    w = batch.masked.float() * (1 + (changed_weight - 1) * batch.changed.float())
    mine = replace(batch, ids=batch.ids[rows], targets=batch.targets[rows])
    ce = F.cross_entropy(batch_logits(model, mine).flatten(0, 2), mine.targets.flatten(), reduction="none")
    return (ce.view(mine.targets.shape) * w[rows]).sum() / w.sum()


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train(cfg: TrainConfig, out: str | os.PathLike, *, log=sys.stderr, model_config: DemoVideoConfig | None = None
          ) -> DemoVideoModel:
    """Train from scratch and save the checkpoint atomically to ``out`` (plus ``train_log.json``). With
    ``cfg.processes`` N > 1, N processes each take 1/N of every batch and sum their gradients; the first one logs
    to standard error."""
    if cfg.processes == 1:
        return _train_process(0, cfg, out, log, model_config)
    with tempfile.TemporaryDirectory() as rendezvous:
        torch.multiprocessing.spawn(_train_process, args=(cfg, out, None, model_config, rendezvous),
                                    nprocs=cfg.processes)
    return DemoVideoModel.from_pretrained(out).eval()


def _train_process(rank: int, cfg: TrainConfig, out: str | os.PathLike, log, model_config: DemoVideoConfig | None,
                   rendezvous: str = "") -> DemoVideoModel | None:
    """One training process (of ``cfg.processes``): the whole loop of :func:`train` on its rows of every batch."""
    log = log or sys.stderr
    n = cfg.processes
    if n > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}/store", rank=rank,
                                             world_size=n)
    mine = slice(rank * cfg.batch // n, (rank + 1) * cfg.batch // n)
    first_mine = slice(rank * cfg.first_frame_batch // n, (rank + 1) * cfg.first_frame_batch // n)
    torch.set_num_threads(cfg.threads // n)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    # --init continues from an earlier checkpoint (fresh optimiser and schedule)
    if cfg.init:
        check_init(cfg)
        model = DemoVideoModel.from_pretrained(cfg.init)
    else:
        config = model_config or DemoVideoConfig(vocab_size=cfg.clip_format.vocab_size,
                                                 intermediate_size=cfg.intermediate_size)
        config.update(cfg.clip_format.config_fields())
        model = DemoVideoModel(config)
    if cfg.attention == "blocks":
        register_block_attention()
        model.set_attn_implementation(BLOCK_ATTENTION)  # exact, a third of the masked dense attention's FLOPs
    if cfg.compile:  # fuses the rotary, norm and activation arithmetic, which eager runs op by op
        model.model.compile(dynamic=False)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    eval_clips = make_clips(heldout_seeds(cfg.eval_clips), 13, turn_prob=cfg.turn_prob)
    history, losses = [], []
    start = time.perf_counter()
    bar = ProgressBar(cfg.steps, "train", enabled=rank == 0)
    step = 0
    for step in range(cfg.steps):
        weight = cfg.changed_weight if step < (1 - cfg.final_phase) * cfg.steps else cfg.final_changed_weight
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        clips = make_clips([_train_seed(cfg.seed, step, i, cfg.batch) for i in range(cfg.batch)], cfg.frames,
                           turn_prob=cfg.turn_prob)
        past = confidence = queries = None
        gaps = rng.integers(0, cfg.prompt_gap_max + 1, size=2) if cfg.prompt_gap_max else (0, 0)
        window = 0
        if cfg.history_window_prob and rng.random() < cfg.history_window_prob:
            window = int(rng.integers(1, cfg.history_window_max + 1))
        stride = 1
        if cfg.time_stride_prob and rng.random() < cfg.time_stride_prob:
            stride = int(rng.integers(2, cfg.time_stride_max + 1))
        if (cfg.own_history_prob or cfg.confidence_mask_prob or cfg.own_partial_prob) and \
                step >= cfg.free_running_from * cfg.steps:
            own_rows = _own_predictions(model, clips[mine], cfg.own_history_passes, cfg.own_history_steps)
            # the whole batch's draws below stay the same in every process; other processes' rows go unused
            predicted, confidence = (np.zeros((cfg.batch, *x.shape[1:]), dtype=x.dtype) for x in own_rows)
            predicted[mine], confidence[mine] = own_rows
            past = np.stack([c.frames.reshape(cfg.frames, -1) for c in clips])
            own = rng.random(len(clips)) < cfg.own_history_prob
            past[own, 1:] = predicted[own]
            if cfg.own_partial_prob:
                chosen = ~own & (rng.random(len(clips)) < cfg.own_partial_prob)
                queries = _own_partial_frames(predicted, confidence, chosen, rng, cfg.min_mask_ratio)
            confidence[rng.random(len(clips)) >= cfg.confidence_mask_prob] = np.inf
        b = ardf_batch(clips, rng, query_ratio=None, full_mask_prob=cfg.full_mask_prob,
                       min_mask_ratio=cfg.min_mask_ratio, history_mask_prob=cfg.history_mask_prob,
                       history_mask_max=cfg.history_mask_max, history_noise_prob=cfg.history_noise_prob,
                       history_noise_max=cfg.history_noise_max, text_dropout=cfg.text_dropout, past=past,
                       confidence=confidence, prompt_gap=int(gaps[0]), history_window=window, time_stride=stride,
                       queries=queries, clip_format=cfg.clip_format)
        loss = _weighted_loss(model, b, weight, mine)
        if cfg.first_frame_batch:  # frame 1 from the condition and the prompt alone: keeps the prompt's motion read
            pairs = make_clips([_train_seed(cfg.seed, step, i, cfg.first_frame_batch) + FIRST_FRAME_SEED_OFFSET
                                for i in range(cfg.first_frame_batch)], 2)
            loss = loss + _weighted_loss(model, ardf_batch(pairs, rng, text_dropout=cfg.text_dropout,
                                                           prompt_gap=int(gaps[1]), clip_format=cfg.clip_format),
                                         weight, first_mine)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if n > 1:  # the processes' shares sum to the whole batch's loss and gradients (one call: 10 x cheaper)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            total = torch.cat([loss.detach().view(1)] + [g.flatten() for g in grads])
            torch.distributed.all_reduce(total)
            loss = total[0]
            for g, summed in zip(grads, total[1:].split([g.numel() for g in grads]), strict=True):
                g.copy_(summed.view_as(g))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.update(1, f"loss {np.mean(losses[-50:]):.3f}")
        elapsed = time.perf_counter() - start
        stop = torch.tensor(float(elapsed > cfg.max_minutes * 60))
        if n > 1:  # every process stops at the same step
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        last = step == cfg.steps - 1 or bool(stop)
        if rank == 0 and ((step + 1) % cfg.eval_every == 0 or last):
            with torch.compiler.set_stance("force_eager"):  # a few calls: compiling their shapes costs more
                ev = evaluate(model, eval_clips, train_frames=cfg.frames) | prompt_direction_gain(model, eval_clips)
            ev.update(step=step + 1, minutes=elapsed / 60, loss=float(np.mean(losses[-50:])))
            history.append(ev)
            parts = [f"frames {span}: acc {ev[k + '_acc']:.3f} (copy {ev[k + '_copy']:.3f}) changed "
                     f"{ev[k + '_changed']:.3f} arriving {ev[k + '_arriving']:.3f}"
                     for k, span in (("in", f"1-{cfg.frames - 1}"), ("beyond", f"{cfg.frames}-12")) if k + "_acc" in ev]
            parts.append(f"frame 1 changed {ev['first_frame_changed_true']:.3f}, directions reversed "
                         f"{ev['first_frame_changed_reversed']:.3f}")
            parts.append("objects exact " + ", ".join(f"{kind} {ev['exact_' + kind]:.2f}" for kind in MOTION_KINDS
                                                      if ev["n_" + kind]))
            print(f"\nstep {step + 1} {elapsed / 60:.1f} min loss {ev['loss']:.4f} | " + " | ".join(parts),
                  file=log, flush=True)
        if stop:
            print(f"stopping at step {step + 1}: time limit of {cfg.max_minutes} min", file=log, flush=True)
            break
    bar.close()
    if n > 1:
        torch.distributed.destroy_process_group()
        if rank:
            return None
    model.eval()
    model.set_attn_implementation("sdpa")
    record = {"config": asdict(cfg), "steps_done": step + 1, "minutes": (time.perf_counter() - start) / 60,
              "final_loss": float(np.mean(losses[-50:])), "eval": history,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    save_checkpoint(model, out, record)
    return model


def check_init(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` if ``cfg.init`` is not a demo checkpoint of the MLP width and sequence format ``cfg``
    asks for."""
    if not cfg.init:
        return
    if not (Path(cfg.init) / "config.json").is_file():
        raise ValueError(f"--init {cfg.init}: no checkpoint there (config.json missing)")
    config = DemoVideoConfig.from_pretrained(cfg.init)
    if config.intermediate_size != cfg.intermediate_size:
        raise ValueError(f"--init {cfg.init} has MLP width {config.intermediate_size}, the options ask for "
                         f"{cfg.intermediate_size} (pass the same --intermediate-size)")
    found = ClipFormat.of(config)
    if found != cfg.clip_format:
        raise ValueError(f"--init {cfg.init} was trained on {found}, the options ask for {cfg.clip_format} "
                         f"(pass the same --video-start, --condition-gap and --bound-words)")


def save_checkpoint(model: DemoVideoModel, out: str | os.PathLike, record: dict) -> None:
    """``save_pretrained`` into a temporary sibling directory, then rename it to ``out`` (replacing it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        atomic_write_text(tmp / "train_log.json", json.dumps(record, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m packcache.demo.train --out DIR [--seed N] [--steps N] ...``."""
    p = argparse.ArgumentParser(description="Train the packcache demo video model (AR-DF, tube masking) on CPU.")
    p.add_argument("--out", required=True, help="checkpoint directory (written atomically)")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, bool):
            p.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
        check_init(cfg)
    except ValueError as exc:
        print(f"packcache.demo.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    train(cfg, args.out)
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
