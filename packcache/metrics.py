"""Fidelity metrics: agreement with the full-cache run, teacher-forced accuracy / NLL under a policy, and accuracy
against the ground truth of synthetic clips -- overall and on the cells that change from the previous frame
(copy-last-frame scores 0 there, so that is where a model and a policy show what they keep).

    python -m packcache.metrics --model data/demo-model --out data/demo-policy-table.json

runs :func:`policy_table`: every policy at equal memory on held-out 13-frame clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from packcache.budget import Budget, atomic_write_text
from packcache.cache import CompactCache
from packcache.demo.clips import (
    VOCAB,
    Clip,
    ClipFormat,
    Vocab,
    clip_layout,
    clip_token_ids,
    frame_token_ids,
    make_clips,
)
from packcache.layout import SequenceLayout
from packcache.policies import CachePolicy, FullCache, PackCache, SlidingWindow, StreamingLLM
from packcache.progress import ProgressBar
from packcache.runtime import ardf_forward, generate_video, history_tube, position_dims

__all__ = ["token_agreement", "ground_truth_accuracy", "copy_last_frame", "TeacherForced", "teacher_forced",
           "equal_memory_policies", "policy_table", "policy_fidelity", "format_table", "FRAME_RANGES", "main"]

#: Named frame ranges (generated frame indices) used in reports: within / beyond the 7-frame training length.
FRAME_RANGES = {"all": (1, None), "1-6": (1, 7), "7-12": (7, 13)}


def token_agreement(frames: np.ndarray, reference: np.ndarray, *, start: int = 1) -> float:
    """Fraction of visual tokens of frames ``start..`` equal in ``frames`` and ``reference`` (``[T, H, W]``)."""
    a, b = np.asarray(frames)[start:], np.asarray(reference)[start:]
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {np.asarray(frames).shape} vs {np.asarray(reference).shape}")
    return float((a == b).mean())


def ground_truth_accuracy(pred: np.ndarray, truth: np.ndarray, *, start: int = 1, stop: int | None = None) -> dict:
    """Accuracy of predicted frames ``pred[k]`` against ``truth[k]`` for ``start <= k < stop``: ``acc`` over all
    cells, ``changed_acc`` over cells where ``truth[k] != truth[k-1]`` (NaN if none changed)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {truth.shape}")
    if start < 1:
        raise ValueError("start must be >= 1 (frame 0 is the condition)")
    stop = truth.shape[-3] if stop is None else min(stop, truth.shape[-3])
    correct = pred[..., start:stop, :, :] == truth[..., start:stop, :, :]
    changed = truth[..., start:stop, :, :] != truth[..., start - 1 : stop - 1, :, :]
    return {"acc": float(correct.mean()),
            "changed_acc": float(correct[changed].mean()) if changed.any() else float("nan"),
            "changed_fraction": float(changed.mean())}


def copy_last_frame(truth: np.ndarray) -> np.ndarray:
    """The copy-last-frame baseline: frame ``k`` predicted as the true frame ``k-1`` (frame 0 kept)."""
    truth = np.asarray(truth)
    pred = truth.copy()
    pred[..., 1:, :, :] = truth[..., :-1, :, :]
    return pred


@dataclass
class TeacherForced:
    """Teacher-forced next-frame predictions: arrays ``[clips, frames-1, cells]`` for frames 1..T-1.

    ``predicted`` argmax colour, ``correct`` vs the truth, ``nll`` of the true colour, ``changed`` cell differs
    from the previous true frame.
    """

    predicted: np.ndarray
    correct: np.ndarray
    nll: np.ndarray
    changed: np.ndarray

    def summary(self, start: int = 1, stop: int | None = None) -> dict:
        """Accuracy / NLL over frames ``start..stop-1``, overall and on changed cells; ``copy_acc`` = baseline."""
        sl = slice(start - 1, None if stop is None else stop - 1)
        c, n, ch = self.correct[:, sl], self.nll[:, sl], self.changed[:, sl]
        return {"acc": float(c.mean()), "nll": float(n.mean()),
                "changed_acc": float(c[ch].mean()) if ch.any() else float("nan"),
                "changed_nll": float(n[ch].mean()) if ch.any() else float("nan"),
                "copy_acc": float(1 - ch.mean()), "cells": int(c.size)}


@torch.no_grad()
def teacher_forced(model, clips: Sequence[Clip], policy: CachePolicy, *, rebase: bool = False,
                   history_mask_ratio: float = 0.0, batch: int = 16, vocab: Vocab = VOCAB,
                   progress: bool = False) -> TeacherForced:
    """Predict every frame ``k >= 1`` of each clip from the true past held in a ``policy``-compacted cache.

    Per frame: compact, one frozen forward of the fully masked frame (its keys are not kept), then the true frame
    is appended (re-encoded with a fixed tube of ``history_mask_ratio`` masked cells when > 0). Conditional
    prompt only (no guidance). Clips must have equal length; they run ``batch`` at a time in one cache (one at a
    time for a policy that reads token ids, so each clip gets its own selection).
    """
    batch = 1 if policy.reads_token_ids else batch
    num_frames = clips[0].frames.shape[0]
    if any(c.frames.shape[0] != num_frames for c in clips):
        raise ValueError("teacher_forced: all clips must have the same number of frames")
    clip_format = ClipFormat.of(model.config)
    layout = clip_layout(num_frames, text_tokens=len(clips[0].text), clip_format=clip_format)
    dims = position_dims(model)
    vis = np.flatnonzero(layout.row[layout.frame_slice(0)] >= 0)
    tube = history_tube(layout.height, layout.width, history_mask_ratio)
    masked = frame_token_ids(np.full((layout.height, layout.width), vocab.mask), vocab)
    out = {"predicted": [], "correct": [], "nll": [], "changed": []}
    bar = ProgressBar(len(clips) * (num_frames - 1), f"teacher-forced {policy.name}", enabled=progress)
    for i in range(0, len(clips), batch):
        part = clips[i : i + batch]
        rows = len(part)
        truth = torch.from_numpy(np.stack([c.frames for c in part]).reshape(rows, num_frames, -1))
        cache = CompactCache(policy, layout, model=model, rebase=rebase)
        first = slice(0, layout.frame_slice(0).stop)
        ardf_forward(model, cache, first, np.stack([clip_token_ids(c.text, c.frames[:1], vocab, clip_format)
                                                     for c in part]), dims)
        preds, nlls = [], []
        for k in range(1, num_frames):
            cache.compact(k)
            sl = layout.frame_slice(k)
            with cache.frozen():
                logits = ardf_forward(model, cache, sl, np.tile(masked, (rows, 1)), dims)[:, vis]
            logits = logits if logits.shape[-1] == vocab.num_colours else logits[..., list(vocab.colour_ids)]
            preds.append(logits.argmax(-1))
            nlls.append(F.cross_entropy(logits.flatten(0, 1).float(), truth[:, k].flatten(), reduction="none")
                        .view(rows, -1))
            appended = [np.where(tube, vocab.mask, c.frames[k]) for c in part]
            ardf_forward(model, cache, sl, np.stack([frame_token_ids(g, vocab) for g in appended]), dims)
            bar.update(rows)
        pred = torch.stack(preds, 1)
        out["predicted"].append(pred.numpy())
        out["correct"].append((pred == truth[:, 1:]).numpy())
        out["nll"].append(torch.stack(nlls, 1).numpy())
        out["changed"].append((truth[:, 1:] != truth[:, :-1]).numpy())
    bar.close()
    return TeacherForced(**{k: np.concatenate(v) for k, v in out.items()})


def equal_memory_policies(model, layout: SequenceLayout, budget: Budget | None = None
                          ) -> dict[str, tuple[CachePolicy, bool]]:
    """The policies compared at (about) one frame of history: name -> (policy, rebase).

    PackCache uses :meth:`Budget.paper_default` with the paper's uniform sub-grid and with novelty selection (plus
    ``budget``, e.g. a fitted one, when given); StreamingLLM gets exactly the paper PackCache's token budget.
    """
    config = model.config.get_text_config(decoder=True)
    paper = Budget.paper_default(config.num_hidden_layers, config.num_attention_heads,
                                 config.num_key_value_heads, layout.summary(), model_id="demo")
    packs = {"PackCache(paper)": PackCache(paper),
             "PackCache(paper, novelty)": PackCache(dataclasses.replace(paper, selection="novelty"))}
    if budget is not None:
        packs["PackCache(fitted" + (", novelty)" if budget.selection == "novelty" else ")")] = PackCache(budget)
    pack_rows = {name + ("+rebase" if rebase else ""): (policy, rebase)
                 for name, policy in packs.items() for rebase in (False, True)}
    tokens = packs["PackCache(paper)"].budget_tokens(layout)
    return {
        "FullCache": (FullCache(), False),
        **pack_rows,
        "SlidingWindow(1)": (SlidingWindow(1), False),
        "SlidingWindow(1)+rebase": (SlidingWindow(1), True),
        f"StreamingLLM({tokens})": (StreamingLLM(max_tokens=tokens), False),
    }


def policy_table(model, *, num_clips: int = 64, num_frames: int = 13, gen_clips: int = 8, steps: int = 8,
                 cfg_scale: float = 1.0, temperature: float = 0.0, seed: int = 0, progress: bool = True,
                 budget: Budget | None = None) -> dict:
    """Every policy of :func:`equal_memory_policies` on held-out clips: teacher-forced accuracy / NLL (overall and
    changed cells, per frame range of :data:`FRAME_RANGES`), and for generated videos (masked mode, same seed)
    token agreement with the full-cache run and ground-truth accuracy. JSON-ready."""
    from packcache.demo.train import heldout_seeds

    clips = make_clips(heldout_seeds(num_clips, start=10_000 + seed * num_clips), num_frames)
    layout = clip_layout(num_frames, clip_format=ClipFormat.of(model.config))
    rows, reference = [], None
    for name, (policy, rebase) in equal_memory_policies(model, layout, budget).items():
        tf = teacher_forced(model, clips, policy, rebase=rebase, progress=progress)
        videos = [generate_video(model, c.text, c.frames[0], num_frames, policy, steps=steps, cfg_scale=cfg_scale,
                                 temperature=temperature, seed=seed + j, rebase=rebase, progress=False)
                  for j, c in enumerate(clips[:gen_clips])]
        frames = np.stack([v.frames for v in videos])
        if reference is None:
            reference = frames
        truth = np.stack([c.frames for c in clips[:gen_clips]])
        row = {"policy": name, "rebase": rebase, "budget_tokens": policy.budget_tokens(layout),
               "cache_tokens_last_frame": videos[0].records[-1].cache_tokens[0],
               "teacher_forced": {r: tf.summary(a, b) for r, (a, b) in FRAME_RANGES.items()},
               "generated": {r: {**ground_truth_accuracy(frames, truth, start=a, stop=b),
                                 "agreement_with_full": float((frames[:, a:b] == reference[:, a:b]).mean())}
                             for r, (a, b) in FRAME_RANGES.items()},
               "seconds_per_video": float(np.mean([v.total_seconds for v in videos]))}
        rows.append(row)
    return {"schema": "packcache.policy_table/v1", "num_clips": num_clips, "gen_clips": gen_clips,
            "num_frames": num_frames, "steps": steps, "cfg_scale": cfg_scale, "temperature": temperature,
            "seed": seed, "rows": rows}


def policy_fidelity(*, model=None, budget_path: str | os.PathLike | None = None, seeds: int = 3, clips: int = 16,
                    gen_clips: int = 4, num_frames: int = 13, steps: int = 8, progress: bool = True) -> dict:
    """:func:`policy_table` over ``seeds`` disjoint held-out clip sets (the demo model unless ``model`` is given; a
    budget file adds PackCache(fitted) rows). Returns ``{"rows": the means in :func:`policy_table`'s row format,
    "per_seed": [tables], "mean": {policy: {range: {metric: mean}}}, "table": markdown of the means for frames
    7-12}``."""
    from packcache.demo.model import load_demo_model

    model = model if model is not None else load_demo_model()
    budget = Budget.load(budget_path) if budget_path is not None else None
    tables = [policy_table(model, num_clips=clips, num_frames=num_frames, gen_clips=gen_clips, steps=steps, seed=s,
                           progress=progress, budget=budget) for s in range(seeds)]
    mean: dict[str, dict] = {}
    for row_index, row in enumerate(tables[0]["rows"]):
        mean[row["policy"]] = {
            r: {f"{part}_{k}": float(np.mean([t["rows"][row_index][part][r][k] for t in tables]))
                for part in ("teacher_forced", "generated") for k in row[part][r]}
            for r in FRAME_RANGES}
    averaged = {"rows": [{"policy": name, "cache_tokens_last_frame": row["cache_tokens_last_frame"],
                          "teacher_forced": {r: {k[len("teacher_forced_"):]: v for k, v in m[r].items()
                                                 if k.startswith("teacher_forced_")} for r in FRAME_RANGES},
                          "generated": {r: {k[len("generated_"):]: v for k, v in m[r].items()
                                            if k.startswith("generated_")} for r in FRAME_RANGES}}
                         for (name, m), row in zip(mean.items(), tables[0]["rows"])]}
    return {"rows": averaged["rows"], "per_seed": tables, "mean": mean, "seeds": seeds, "clips": clips,
            "table": f"fidelity, mean of {seeds} seed(s) x {clips} clips:\n" + format_table(averaged, "7-12")}


def format_table(table: dict, frame_range: str = "7-12") -> str:
    """A markdown table of :func:`policy_table` for one frame range."""
    lines = [f"frames {frame_range} | teacher-forced acc | changed | NLL | changed NLL | gen. agreement w/ full | "
             "gen. acc | gen. changed | cache tokens",
             "---|---|---|---|---|---|---|---|---"]
    for r in table["rows"]:
        t, g = r["teacher_forced"][frame_range], r["generated"][frame_range]
        lines.append(f"{r['policy']} | {t['acc']:.3f} | {t['changed_acc']:.3f} | {t['nll']:.3f} | "
                     f"{t['changed_nll']:.3f} | {g['agreement_with_full']:.3f} | {g['acc']:.3f} | "
                     f"{g['changed_acc']:.3f} | {r['cache_tokens_last_frame']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m packcache.metrics [--model DIR] [--out FILE.json]``: the equal-memory policy table."""
    from packcache.demo.model import load_demo_model

    p = argparse.ArgumentParser(description="Teacher-forced and generation fidelity of every cache policy at "
                                "equal memory on the demo model.")
    p.add_argument("--model", default=None, help="demo checkpoint directory (default: the shipped one)")
    p.add_argument("--out", default=None, help="write the table as JSON here (atomically)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--gen-clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=13)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_demo_model(args.model)
    table = policy_table(model, num_clips=args.clips, num_frames=args.frames, gen_clips=args.gen_clips,
                         steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    for r in FRAME_RANGES:
        print(format_table(table, r) + "\n")
    if args.out:
        atomic_write_text(args.out, json.dumps(table, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
