"""``packcache-profile``: measure where a model's attention goes and fit its own PackCache budget.

    packcache-profile [MODEL_ID] [-o budget.json] [--samples N] [--target-frames F | --target-tokens T]
                      [--stats-out stats.npz] [--layout SPEC] [--per-kv-head] [--trust-remote-code]
                      [--window W] [--sharpness P] [--selection RULE] [--compare fidelity.json] [--threads N]
                      [--quiet]

* No ``MODEL_ID``: the shipped demo model (``data/demo-model``) generates demo clips with AR-DF masked decoding
  (conditional branch, full cache); every decoding step is probed.
* A demo checkpoint directory is recognised by its config (``model_type`` ``packcache_demo_video``).
* Any other hub id or local path loads through :func:`packcache.adapters.load_model`; its adapter builds synthetic
  sequences of its own family (or ``--layout SPEC`` describes the layout, for models whose layout it cannot
  infer) and each sample is one causal forward.

``--layout SPEC`` is ``key=value`` pairs separated by commas, with the :class:`~packcache.layout.SequenceLayout`
fields (aliases ``text``, ``frames``, ``cond``, ``rowsep``), e.g. ``text=8,frames=6,height=4,width=4``.

Multi-process: ``torchrun --nproc-per-node N -m packcache.profile ...`` profiles sample ``i`` on rank
``i % N``; the statistics are summed with ``all_reduce`` (gloo on CPU) and rank 0 writes the outputs.

Errors (unknown model, offline hub, a layout that does not fit, an impossible target) print one line and exit 2;
nothing is written then. Outputs are written atomically, the statistics first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from packcache.budget import BudgetError, atomic_write_text
from packcache.layout import LayoutError, SequenceLayout
from packcache.rope import position_dims

__all__ = ["main", "profile_demo", "profile_model", "parse_layout_spec", "compare_with_paper", "summary_table",
           "ProfileError", "DEMO_MODEL_TYPE"]

DEMO_MODEL_TYPE = "packcache_demo_video"
_ALIASES = {"text": "text_tokens", "frames": "num_frames", "cond": "cond_frames", "rowsep": "row_separator",
            "prefix": "frame_prefix", "suffix": "frame_suffix"}


class ProfileError(RuntimeError):
    """A profiling request that cannot run; the CLI prints it on one line and exits with code 2."""


def parse_layout_spec(spec: str) -> SequenceLayout:
    """``"text=8,frames=6,height=4,width=4"`` -> :class:`SequenceLayout`; raises :class:`LayoutError`."""
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise LayoutError(f"layout spec item {part!r} is not key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        key = _ALIASES.get(key, key)
        if key not in SequenceLayout.__dataclass_fields__:
            raise LayoutError(f"unknown layout field {key!r} in spec {spec!r}")
        if key == "convention":
            fields[key] = value
        elif key == "row_separator":
            fields[key] = value.lower() in ("1", "true", "yes")
        elif key == "scales":
            fields[key] = tuple(int(x) for x in value.split(":"))
        else:
            try:
                fields[key] = int(value)
            except ValueError:
                raise LayoutError(f"layout field {key} needs an integer, got {value!r}") from None
    for need in ("num_frames", "height", "width"):
        if need not in fields:
            raise LayoutError(f"layout spec {spec!r} lacks {need} (e.g. frames=6,height=4,width=4)")
    return SequenceLayout(**{"text_tokens": 0, **fields})


# --------------------------------------------------------------------------------------------------------
# the two profiling paths
def _is_demo_checkpoint(path: str | None) -> bool:
    if path is None:
        return True
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == DEMO_MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def _probe(model: torch.nn.Module, layout: SequenceLayout, model_id: str, num_steps: int):
    from probes import AttentionProbe

    return AttentionProbe(model, layout, model_id=model_id, num_steps=num_steps, recent_frames=2,
                          max_distance=min(layout.num_frames, 8))


def profile_demo(model: torch.nn.Module, sample_ids: list[int], *, frames: int = 7, steps: int = 8,
                 layout: SequenceLayout | None = None, model_id: str = "demo", progress=None):
    """Probe AR-DF masked generation of the demo model on demo clips ``sample_ids`` (seeds); returns stats.

    Decoding step ``s < steps`` are the masked iterations; step ``steps`` is the re-encoding forward of the
    finished frame.
    """
    from packcache.demo import ClipFormat, clip_layout, make_clip
    from packcache.policies import FullCache
    from packcache.runtime import generate_video

    if layout is not None:  # a spec may choose the number of frames; the rest is fixed by the demo clips
        frames = layout.num_frames
    expected = clip_layout(frames, clip_format=ClipFormat.of(model.config))
    if layout is not None and layout != expected:
        raise ProfileError(f"layout {_describe(layout)} does not fit the demo clips ({_describe(expected)})")
    with _probe(model, expected, model_id, steps + 1) as probe:
        for seed in sample_ids:
            clip = make_clip(int(seed), frames)
            generate_video(model, clip.text, clip.frames[0], frames, FullCache(), "masked", steps=steps,
                           cfg_scale=1.0, progress=False)
            probe.next_sample()
            if progress is not None:
                progress.update(1)
    return probe.stats


def profile_model(model: torch.nn.Module, sample_ids: list[int], *, layout: SequenceLayout | None = None,
                  model_id: str = "", progress=None, frames: int = 6, height: int = 4, width: int = 4):
    """Probe one causal forward per sample of a transformers model on synthetic sequences of its family.

    Without ``layout`` the family adapter builds the sequences; with it, random token ids fill that layout.
    """
    from packcache.adapters import AdapterError, adapter_for
    from packcache.adapters.base import random_ids, vocab_size_of

    try:
        adapter = adapter_for(model)
    except AdapterError:
        adapter = None
    if adapter is None and layout is None:
        raise ProfileError(f"cannot infer the token layout of {model_id or type(model).__name__}; "
                           "pass --layout text=..,frames=..,height=..,width=..")
    config = model.config
    if layout is None:
        _, layout = adapter.example(config, frames, height, width, seed=0)
    dims = adapter.position_dims if adapter is not None else position_dims(model)
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    top = int(layout.pos3d.max() if dims == 3 else layout.pos1d.max()) + 1
    if limit is not None and top > limit:
        raise ProfileError(f"layout {_describe(layout)} needs {top} positions, the model has "
                           f"{limit} (max_position_embeddings)")
    vocab = vocab_size_of(config)
    stats = None
    with _probe(model, layout, model_id, 1) as probe:
        for seed in sample_ids:
            if adapter is not None:
                ids, sample_layout = adapter.example(config, layout.num_frames, layout.height, layout.width,
                                                     seed=int(seed))
                if sample_layout != layout:
                    ids = None
            else:
                ids = None
            if ids is None:
                ids = random_ids(torch.Generator().manual_seed(int(seed)), layout.num_tokens, vocab)[None]
            pos = layout.position_ids(dims=dims)
            with torch.no_grad():
                model(input_ids=ids, position_ids=pos)
            probe.next_sample()
            if progress is not None:
                progress.update(1)
        stats = probe.stats
    return stats


def _describe(layout: SequenceLayout) -> str:
    return (f"text={layout.text_tokens},frames={layout.num_frames},height={layout.height},width={layout.width},"
            f"rowsep={int(layout.row_separator)},prefix={layout.frame_prefix},suffix={layout.frame_suffix},"
            f"prefix_specials={layout.prefix_specials},cond_time_gap={layout.cond_time_gap}")


# --------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    initialised: bool = False


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), True)


def _load(model_id: str | None, trust_remote_code: bool) -> tuple[torch.nn.Module, bool, str]:
    if _is_demo_checkpoint(model_id):
        from packcache.demo import load_demo_model

        try:
            return load_demo_model(model_id), True, model_id or "packcache-demo"
        except (FileNotFoundError, OSError) as exc:
            raise ProfileError(str(exc).splitlines()[0]) from None
    from packcache.adapters import ModelLoadError, load_model

    try:
        return load_model(model_id, trust_remote_code=trust_remote_code), False, model_id
    except ModelLoadError as exc:
        raise ProfileError(str(exc)) from None


def summary_table(report, budget) -> str:
    """Per layer: anchor shares, current-frame and history share, fitted rho (+- se), the selected model (with the
    excess decay rate and floor for the floor model), keep ratios."""
    lines = [f"{'layer':>5} {'text':>6} {'cond':>6} {'spec':>6} {'d=0':>6} {'hist':>6} {'rho':>14} {'model':>17} "
             f"{'excess rho/floor':>16}  keep ratios d=1..W"]
    ratios = budget.keep_ratios
    for row in report.summary_rows():
        i = row["layer"]
        se = f"+-{row['rho_se']:.3f}" if row["rho_se"] is not None else ""
        r = ratios[i]
        shown = " | ".join(" ".join(f"{x:.3f}" for x in kv) for kv in r) if budget.per_kv_head else \
            " ".join(f"{x:.3f}" for x in r)
        excess = f"{row['rho_excess']:.3f}/{row['floor']:.3f}" if row["rho_excess"] is not None else "-"
        lines.append(f"{i:>5} {row['text']:6.3f} {row['cond']:6.3f} {row['special']:6.3f} {row['current']:6.3f} "
                     f"{row['history']:6.3f} {row['rho']:7.3f}{se:>7} {row['model']:>17} {excess:>16}  {shown}")
    g = report.global_fit
    se = f" +- {g.rho_se:.3f}" if g.rho_se is not None else ""
    lines.append(f"global rho {g.rho:.3f}{se} ({g.model} selected by AIC, R^2 {g.r2[g.model]:.3f}); "
                 f"mean mass by distance d=1..: "
                 + " ".join(f"{x:.3f}" for x in _mean_by_distance(report) if math.isfinite(x)))
    return "\n".join(lines)


def compare_with_paper(model: torch.nn.Module, fitted, *, num_clips: int = 64, num_frames: int = 13,
                       seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Teacher-forced fidelity (:func:`packcache.metrics.teacher_forced`) of the fitted budget, the paper's fixed
    rho = 1/2 budget at the same memory, and the full cache, on held-out demo clips; JSON-ready."""
    from packcache.budget import Budget
    from packcache.demo import ClipFormat, clip_layout, make_clips
    from packcache.demo.train import heldout_seeds
    from packcache.metrics import FRAME_RANGES, teacher_forced
    from packcache.policies import FullCache, PackCache

    layout = clip_layout(num_frames, clip_format=ClipFormat.of(model.config))
    m = fitted.model
    paper = Budget.paper_default(m["num_layers"], m["num_heads"], m["num_kv_heads"], dict(fitted.layout),
                                 model_id=m["id"], window=fitted.window)
    paper_pack, fitted_pack = PackCache(paper), PackCache(fitted)
    policies = {p.name: p for p in (FullCache(), paper_pack, fitted_pack)}
    if paper_pack.budget_tokens(layout) != fitted_pack.budget_tokens(layout):
        raise ProfileError("the fitted budget does not use the paper's memory; compare at --target-frames 1")
    clips = make_clips(heldout_seeds(num_clips, start=10_000 + seed * num_clips), num_frames)
    rows = {}
    for name, policy in policies.items():
        tf = teacher_forced(model, clips, policy, progress=progress)
        rows[name] = {"budget_tokens": policy.budget_tokens(layout),
                      "teacher_forced": {r: tf.summary(a, b) for r, (a, b) in FRAME_RANGES.items()}}
    return {"num_clips": num_clips, "num_frames": num_frames, "seed": seed, "rows": rows}


def format_comparison(result: dict[str, Any]) -> str:
    lines = []
    w = max(len(name) for name in result["rows"])
    for rng in next(iter(result["rows"].values()))["teacher_forced"]:
        lines.append(f"frames {rng:>4} | {'policy':<{w}} | acc   | changed | NLL   | changed NLL | cache tokens")
        for name, row in result["rows"].items():
            t = row["teacher_forced"][rng]
            lines.append(f"{'':11} | {name:<{w}} | {t['acc']:.3f} | {t['changed_acc']:.3f}   | {t['nll']:.3f} | "
                         f"{t['changed_nll']:.3f}       | {row['budget_tokens']}")
    return "\n".join(lines)


def _mean_by_distance(report) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(report.mean, axis=(0, 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packcache-profile", description="Probe a model's attention and fit a PackCache "
                                "budget (no MODEL_ID: the shipped demo model on generated clips).")
    p.add_argument("model", nargs="?", metavar="MODEL_ID", help="hub id or local path (default: the demo model)")
    p.add_argument("-o", "--output", default="budget.json", help="budget JSON to write (default: budget.json)")
    p.add_argument("--samples", type=int, default=8, help="number of sample sequences (default: 8)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-frames", type=float, help="history worth F frames of visual tokens (default: 1)")
    target.add_argument("--target-tokens", type=int, help="whole packed cache in tokens (anchors included)")
    p.add_argument("--window", type=int, default=4, help="history frames kept, W (default: 4)")
    p.add_argument("--stats-out", help="also write the raw statistics (.npz) here")
    p.add_argument("--layout", metavar="SPEC", help="layout spec, e.g. text=8,frames=6,height=4,width=4")
    p.add_argument("--frames", type=int, default=7, help="frames per demo clip (default: 7, the training length)")
    p.add_argument("--steps", type=int, default=8, help="masked decoding steps per demo frame (default: 8)")
    p.add_argument("--seed", type=int, default=None, help="first sample seed (default: held-out demo clips, "
                   "disjoint from the training clips and from the --compare clips)")
    p.add_argument("--per-kv-head", action="store_true", help="fit and allocate per kv head")
    p.add_argument("--sharpness", type=float, default=1.0, help="keep shares proportional to fitted mass ** this "
                   "(default: 1, the paper's proportional rule; larger favours the frames with the most mass)")
    p.add_argument("--selection", choices=("novelty", "uniform_grid"), default="novelty",
                   help="in-frame rule: novelty (default) keeps the tokens that differ from the condition frame's "
                   "cell first, then the uniform sub-grid; uniform_grid is the paper's")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repository")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for the small demo model, "
                   "whose forwards are too small to gain from more; torch's default otherwise)")
    p.add_argument("--compare", metavar="FILE.json", help="demo only: also compare the fitted budget with the "
                   "paper's rho = 1/2 at the same memory (teacher-forced, held-out 13-frame clips); write here")
    p.add_argument("--compare-clips", type=int, default=64, help="held-out clips for --compare (default: 64)")
    return p


def _fail(message: str) -> int:
    sys.stderr.write(f"packcache-profile: error: {message}\n")
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dist = _init_distributed()
    try:
        return _run(args, dist)
    except (ProfileError, BudgetError, LayoutError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    finally:
        if dist.initialised:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run(args: argparse.Namespace, dist: _Dist) -> int:
    from packcache.fit import budget_from_stats, fit_stats
    from packcache.progress import ProgressBar

    if args.samples < 1:
        raise ProfileError(f"--samples must be >= 1, got {args.samples}")
    if args.window < 1:
        raise ProfileError(f"--window must be >= 1, got {args.window}")
    layout = parse_layout_spec(args.layout) if args.layout else None
    model, is_demo, model_id = _load(args.model, args.trust_remote_code)
    if args.threads is not None or is_demo:
        torch.set_num_threads(max(1, args.threads or 1))
    first = args.seed
    if first is None:
        from packcache.demo.train import HELDOUT_BASE

        first = HELDOUT_BASE + 500_000
    samples = [first + i for i in range(args.samples)]
    mine = samples[dist.rank::dist.world]
    bar = ProgressBar(len(mine), f"profile {model_id}" + (f" [rank {dist.rank}]" if dist.world > 1 else ""),
                      enabled=not args.quiet)
    try:
        if is_demo:
            stats = profile_demo(model, mine, frames=args.frames, steps=args.steps, layout=layout,
                                 model_id=model_id, progress=bar)
        else:
            stats = profile_model(model, mine, layout=layout, model_id=model_id, progress=bar)
    finally:
        bar.close()
    if dist.world > 1:
        stats.all_reduce()
    target = {"target_tokens": args.target_tokens} if args.target_tokens is not None else {
        "target_frames": args.target_frames if args.target_frames is not None else 1.0}
    report = fit_stats(stats)
    budget = budget_from_stats(stats, window=args.window, per_kv_head=args.per_kv_head, report=report,
                               sharpness=args.sharpness, selection=args.selection, **target)
    if dist.rank != 0:
        return 0
    comparison = None
    if args.compare:
        if not is_demo:
            raise ProfileError("--compare needs the demo model (its clips have ground truth)")
        comparison = compare_with_paper(model, budget, num_clips=args.compare_clips, progress=not args.quiet)
    if args.stats_out:
        stats.save(args.stats_out)
    budget.save(args.output)
    if comparison is not None:
        atomic_write_text(args.compare, json.dumps(comparison, indent=2) + "\n")
    print(summary_table(report, budget))
    if comparison is not None:
        print(format_comparison(comparison))
    print(f"wrote {args.output}" + (f" and {args.stats_out}" if args.stats_out else "")
          + f" ({stats.num_samples} samples, {stats.forwards} forwards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
