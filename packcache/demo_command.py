"""``packcache-demo``: the whole path on the embedded demo model, offline.

1. profile the demo model's attention on generated clips and fit its budget (``stats.npz``, ``budget.json``);
2. generate one held-out video under every policy at equal memory and print the cache size per frame and the
   fidelity of each policy (``runs/*.json``, PNG strips and GIFs);
3. serve the dashboard on those files (unless ``--no-serve``) and print the address to open.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from packcache.budget import Budget, BudgetError

__all__ = ["main", "compare_policies"]


def compare_policies(model, budget: Budget, *, seed: int, frames: int, steps: int, progress: bool = True) -> dict:
    """Generate one held-out clip under FullCache, PackCache (paper and fitted), SlidingWindow(1) and
    StreamingLLM at PackCache's token budget; returns ``{name: VideoResult}`` plus the clip."""
    from packcache.demo.clips import ClipFormat, clip_layout, make_clip
    from packcache.demo.train import heldout_seeds
    from packcache.policies import FullCache, PackCache, SlidingWindow, StreamingLLM
    from packcache.runtime import generate_video

    layout = clip_layout(frames, clip_format=ClipFormat.of(model.config))
    config = model.config.get_text_config(decoder=True)
    paper = PackCache(Budget.paper_default(config.num_hidden_layers, config.num_attention_heads,
                                           config.num_key_value_heads, layout.summary(), model_id="demo"))
    fitted = PackCache(budget)
    policies = {"FullCache": FullCache(), "PackCache(paper)": paper, fitted.name: fitted,
                "SlidingWindow(1)": SlidingWindow(1),
                "StreamingLLM": StreamingLLM(max_tokens=paper.budget_tokens(layout))}
    clip = make_clip(heldout_seeds(1, start=seed)[0], frames)
    runs = {name: generate_video(model, clip.text, clip.frames[0], frames, policy, "masked", steps=steps,
                                 cfg_scale=1.0, seed=seed, progress=progress)
            for name, policy in policies.items()}
    return {"clip": clip, "runs": runs}


def _print_comparison(clip, runs: dict) -> None:
    from packcache.metrics import ground_truth_accuracy, token_agreement

    names = list(runs)
    w = max(len(n) for n in names) + 1
    print("\ncache tokens per frame (layer 0) -- what each frame's forwards attended to")
    print(f"{'frame':>5} " + " ".join(f"{n:>{w}}" for n in names))
    for k in range(len(runs[names[0]].records)):
        print(f"{k:>5} " + " ".join(f"{runs[n].records[k].cache_tokens[0]:>{w}}" for n in names))
    print(f"\n{'policy':<{w}}{'peak KV KiB':>12}{'agree w/ full':>15}{'GT acc':>9}{'GT changed':>12}{'seconds':>9}")
    full = runs["FullCache"].frames
    for n in names:
        res = runs[n]
        gt = ground_truth_accuracy(res.frames, clip.frames)
        print(f"{n:<{w}}{max(r.kv_bytes for r in res.records) / 1024:>12.1f}"
              f"{token_agreement(res.frames, full):>15.3f}{gt['acc']:>9.3f}{gt['changed_acc']:>12.3f}"
              f"{res.total_seconds:>9.1f}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packcache-demo``; exit code 2 with one line for unusable input."""
    parser = argparse.ArgumentParser(prog="packcache-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory (default out/demo)")
    parser.add_argument("--budget", type=Path, help="use this budget JSON instead of profiling")
    parser.add_argument("--samples", type=int, default=8, help="clips to profile (default 8)")
    parser.add_argument("--frames", type=int, default=13, help="frames per generated video (default 13)")
    parser.add_argument("--steps", type=int, default=8, help="AR-DF unmasking steps per frame (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-serve", action="store_true", help="do not start the dashboard")
    parser.add_argument("--port", type=int, default=8050)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from packcache.demo.model import load_demo_model

    try:
        budget = Budget.load(args.budget) if args.budget else None
        model = load_demo_model()
        if budget is not None:
            config = model.config.get_text_config(decoder=True)
            budget.check_model(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads)
    except (FileNotFoundError, BudgetError) as exc:
        print(f"packcache-demo: {exc}", file=sys.stderr)
        return 2
    out = args.out
    stats_path, budget_path = out / "stats.npz", out / "budget.json"
    if budget is None:
        from packcache.fit import budget_from_stats, fit_stats
        from packcache.profile import profile_demo, summary_table
        from packcache.progress import ProgressBar

        print(f"[1/3] profiling the demo model's attention on {args.samples} clips")
        bar = ProgressBar(args.samples, "profile")
        stats = profile_demo(model, list(range(args.samples)), progress=bar)
        bar.close()
        report = fit_stats(stats)
        budget = budget_from_stats(stats, target_frames=1.0, model_id="packcache-demo", report=report)
        stats.save(stats_path)
        budget.save(budget_path)
        print(summary_table(report, budget))
        print(f"wrote {stats_path} and {budget_path}")
    else:
        print(f"[1/3] using the budget {args.budget}")
        stats_path = None
    print(f"[2/3] generating a {args.frames}-frame held-out video under each policy (AR-DF, {args.steps} steps)")
    result = compare_policies(model, budget, seed=args.seed, frames=args.frames, steps=args.steps)
    runs_dir = out / "runs"
    from packcache.render import render_gif, render_strip

    for name, res in result["runs"].items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        res.save(runs_dir / f"{slug}.json")
        render_strip(res.frames, out / "frames" / f"{slug}.png")
        render_gif(res.frames, out / "frames" / f"{slug}.gif")
    _print_comparison(result["clip"], result["runs"])
    print(f"wrote {runs_dir}/*.json and {out / 'frames'}/*.png|gif")
    if args.no_serve:
        return 0
    print(f"[3/3] serving the dashboard on http://127.0.0.1:{args.port}/ (Ctrl-C to stop)")
    from dashboard.app import main as dashboard_main

    dash_args = ["--budget", str(budget_path if args.budget is None else args.budget), "--runs", str(runs_dir),
                 "--quality", str(Path(__file__).resolve().parents[1] / "data" / "demo-policy-table.json"),
                 "--port", str(args.port)]
    if stats_path is not None:
        dash_args += ["--stats", str(stats_path)]
    return dashboard_main(dash_args)


if __name__ == "__main__":
    sys.exit(main())
